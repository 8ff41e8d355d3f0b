"""Gradient accumulation (train.grad_accum) in the one train step.

The `ar` loss is exact (it draws no noise), so a step on one batch of B
rows and a step on the same rows in A micro-batches of B / A must give the
same gradients, metrics and updated parameters to float tolerance. For a
noisy process the accumulated gradient must be the mean of the micro-batch
gradients, each drawn with fold_in(key, i) on rows i, i + A, ...
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_text import config as config_lib, step as step_lib
from diffusion_text.models import build_model
from diffusion_text.processes import make_process

V, B, L = 11, 8, 8
TC = config_lib.TrainConfig(steps=10, lr=1e-2, warmup_steps=0, ema_decay=0.0)


@functools.lru_cache(maxsize=None)
def _setup(name: str):
  cfg = config_lib.load_preset("synthetic_ar").model
  process = make_process(name, vocab_size=V)
  graphdef, params = nnx.split(build_model(process.model_spec, cfg, seed=0))
  return process, graphdef, params


def _batch():
  rng = np.random.default_rng(0)
  return {"tokens": jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32),
          "mask": jnp.ones((B, L), jnp.int32)}


def _step(name: str, grad_accum: int):
  process, graphdef, params = _setup(name)
  tx = step_lib.make_optimizer(TC)
  fn = jax.jit(step_lib.make_train_step(graphdef, process, tx, TC.ema_decay,
                                        grad_accum=grad_accum))
  return fn(step_lib.init_state(params, tx), _batch(), jax.random.key(3))


def test_accumulated_ar_step_equals_the_whole_batch_step():
  state_1, metrics_1 = _step("ar", 1)
  state_4, metrics_4 = _step("ar", 4)
  for k in ("loss", "grad_norm", "nll_bound"):
    np.testing.assert_allclose(metrics_4[k], metrics_1[k], rtol=1e-5,
                               err_msg=k)
  for a, b in zip(jax.tree.leaves(state_4.params),
                  jax.tree.leaves(state_1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The step moved the parameters (the comparison is not of two no-ops).
  _, _, params = _setup("ar")
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(state_1.params), jax.tree.leaves(params)))
  assert moved > 1e-4


def test_accumulated_gradient_is_the_mean_over_strided_micro_batches():
  process, graphdef, params = _setup("masked")
  batch, key, accum = _batch(), jax.random.key(5), 2
  grads_of = functools.partial(step_lib._loss_and_grads, graphdef=graphdef,
                               process=process)
  (loss, _), grads = jax.jit(functools.partial(
      step_lib._accumulated_grads, graphdef=graphdef, process=process,
      grad_accum=accum))(params, batch, key)
  parts = [jax.jit(grads_of)(params,
                             jax.tree.map(lambda x: x[i::accum], batch),
                             jax.random.fold_in(key, i))
           for i in range(accum)]
  np.testing.assert_allclose(loss, np.mean([p[0][0] for p in parts]),
                             rtol=1e-5)
  for leaves in zip(jax.tree.leaves(grads),
                    *[jax.tree.leaves(p[1]) for p in parts]):
    np.testing.assert_allclose(leaves[0], np.mean(leaves[1:], axis=0),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("accum", [0, 3])
def test_grad_accum_must_divide_the_batch(accum):
  cfg = config_lib.Config(data=config_lib.DataConfig(batch_size=8),
                          train=config_lib.TrainConfig(grad_accum=accum))
  with pytest.raises(config_lib.ConfigError, match="train.grad_accum"):
    config_lib.validate(cfg)
