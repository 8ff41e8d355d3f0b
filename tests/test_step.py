"""The pure steps: EMA, learning-rate schedule, train step, bound step.

Each is a pure function, so it must give the same numbers with and without
jit (chex.variants). One tiny model (the `ar` process) serves the module.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_text import config as config_lib, step as step_lib
from diffusion_text.models import as_denoiser, build_model
from diffusion_text.processes import make_process

TC = config_lib.TrainConfig(steps=100, lr=1e-2, warmup_steps=10,
                            min_lr_ratio=0.1, ema_decay=0.9)
V, B, L = 7, 3, 8


@functools.lru_cache(maxsize=None)
def _model():
  cfg = config_lib.load_preset("synthetic_ar").model
  process = make_process("ar", vocab_size=V)
  graphdef, params = nnx.split(build_model(process.model_spec, cfg, seed=0))
  return process, graphdef, params


def _batch():
  rng = np.random.default_rng(0)
  mask = np.ones((B, L), np.int32)
  mask[-1, 5:] = 0
  return {"tokens": jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32),
          "mask": jnp.asarray(mask)}


class StepTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_learning_rate_warms_up_then_decays_to_the_floor(self):
    lr = self.variant(step_lib.learning_rate(TC))
    np.testing.assert_allclose(lr(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(lr(5), TC.lr * 0.5, rtol=1e-5)
    np.testing.assert_allclose(lr(10), TC.lr, rtol=1e-5)
    np.testing.assert_allclose(lr(100), TC.lr * TC.min_lr_ratio, rtol=1e-5)
    # cosine half-way through the decay: the mean of peak and floor
    np.testing.assert_allclose(lr(55), TC.lr * (1 + TC.min_lr_ratio) / 2,
                               rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ema_is_warm_started_then_uses_the_decay(self):
    ema = {"w": jnp.zeros(3)}
    params = {"w": jnp.ones(3)}
    update = self.variant(functools.partial(step_lib._ema_update, decay=0.9))
    # step 0: d = min(0.9, 1/10) = 0.1 -> mostly the new params
    np.testing.assert_allclose(update(ema, params, 0)["w"], 0.9, rtol=1e-6)
    # step 1000: d = min(0.9, 1001/1010) = 0.9
    np.testing.assert_allclose(update(ema, params, 1000)["w"], 0.1, rtol=1e-5)
    off = self.variant(functools.partial(step_lib._ema_update, decay=0.0))
    np.testing.assert_allclose(off(ema, params, 5)["w"], 1.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bound_step_is_the_process_bound(self):
    process, graphdef, params = _model()
    batch, key = _batch(), jax.random.key(1)
    bound = self.variant(functools.partial(
        step_lib.bound_step, graphdef=graphdef, process=process))
    nats_B, terms = bound(params, batch, key)
    want = process.nll_bound(key, as_denoiser(nnx.merge(graphdef, params)),
                             batch["tokens"], batch["mask"])
    np.testing.assert_allclose(nats_B, want.nats, rtol=1e-5)
    # named terms add up to the bound, and padding is not counted
    np.testing.assert_allclose(sum(terms.values()), nats_B, rtol=1e-5)
    assert nats_B.shape == (B,) and np.all(np.asarray(nats_B) > 0)

  def test_train_step_updates_params_ema_and_counts(self):
    process, graphdef, params = _model()
    tx = step_lib.make_optimizer(TC)
    state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx)
    train = jax.jit(step_lib.make_train_step(graphdef, process, tx,
                                             TC.ema_decay))
    new, metrics = train(state, _batch(), jax.random.key(0))
    assert int(new.step) == 1
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    # EMA after one step at d = 0.1: 0.1 * old + 0.9 * new params
    for e, p, p0 in zip(jax.tree.leaves(new.ema), jax.tree.leaves(new.params),
                        jax.tree.leaves(params)):
      np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p, rtol=1e-5, atol=1e-7)
    # step 0 has learning rate 0 (warmup), so the params did not move
    for p, p0 in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
      np.testing.assert_allclose(p, p0, atol=1e-7)


def test_weight_decay_applies_to_matrices_only():
  tx = step_lib.make_optimizer(config_lib.TrainConfig(
      steps=10, warmup_steps=0, lr=0.1, weight_decay=0.5, grad_clip=0.0))
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert np.all(np.asarray(updates["w"]) < 0)  # decayed towards 0
  np.testing.assert_allclose(updates["b"], 0.0)
