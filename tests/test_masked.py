"""Tests for the masked (MDLM / MD4) process: the ELBO math and one step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_text.processes import Denoiser, SamplingOptions, make_process
from diffusion_text.processes.masked import MaskedProcess, fine_gumbel
from tests.helpers import constant_logits

V, L, B, K = 8, 16, 64, 256
PI = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])


def bound_over_keys(process, logits_V, tokens, mask):
  """Per-sequence bounds [K, B] for K independent keys (one compile)."""
  den = constant_logits(logits_V)
  fn = jax.jit(jax.vmap(
      lambda k: process.nll_bound(k, den, tokens, mask).nats))
  return np.asarray(fn(jax.random.split(jax.random.key(1), K)))


def iid_tokens(seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.choice(V, size=(B, L), p=PI), jnp.int32)


@pytest.mark.parametrize("schedule", ["linear", "cosine_alpha"])
def test_oracle_elbo_is_tight_at_the_entropy(schedule):
  """With the exact posterior (i.i.d. data: p(x0_i | x_t) = pi) the masked
  ELBO equals sum_i -log pi(x0_i) in expectation, i.e. L * H(pi)."""
  process = MaskedProcess(vocab_size=V, schedule=schedule)
  tokens = iid_tokens()
  mask = jnp.ones((B, L), bool)
  nats_KxB = bound_over_keys(process, np.log(PI), tokens, mask)
  key_means = nats_KxB.mean(-1)
  sem = key_means.std(ddof=1) / math.sqrt(K)
  nll_B = -np.log(PI)[np.asarray(tokens)].sum(-1)
  m_min = float(process.mask_prob(jnp.float32(process.t_min)))
  a_1 = float(process.alpha(jnp.float32(1.0)))
  expected = ((1.0 - m_min - a_1) * nll_B.mean()
              + L * (m_min + a_1) * math.log(V))
  assert abs(key_means.mean() - expected) < 4 * sem + 1e-4
  # ... and the data's own average -log pi estimates L * H(pi).
  entropy = -(PI * np.log(PI)).sum()
  data_sem = np.log(PI)[np.asarray(tokens)].std() * math.sqrt(L / B)
  assert abs(expected - L * entropy) < 4 * data_sem


def test_uniform_logits_give_log_v_per_token():
  process = MaskedProcess(vocab_size=V)
  mask = jnp.ones((B, L), bool)
  nats_KxB = bound_over_keys(process, np.zeros(V), iid_tokens(), mask)
  key_means = nats_KxB.mean(-1)
  sem = key_means.std(ddof=1) / math.sqrt(K)
  assert abs(key_means.mean() - L * math.log(V)) < 4 * sem + 1e-4


def test_antithetic_times_are_stratified_over_0_1():
  process = MaskedProcess(vocab_size=V, t_min=1e-3)
  t = np.sort(np.asarray(process.sample_time(jax.random.key(0), B)))
  assert t.min() > process.t_min and t.max() <= 1.0
  # exactly one time in each of B equal strata of (t_min, 1]
  strata = np.floor((1.0 - t) / (1.0 - process.t_min) * B).astype(int)
  np.testing.assert_array_equal(np.sort(strata), np.arange(B))
  plain = MaskedProcess(vocab_size=V, antithetic=False)
  t2 = np.asarray(plain.sample_time(jax.random.key(0), 4096))
  assert t2.min() > plain.t_min and t2.max() <= 1.0
  assert abs(t2.mean() - 0.5) < 0.02


@pytest.mark.parametrize("schedule", ["linear", "cosine_alpha"])
def test_loss_weight_matches_finite_differences(schedule):
  process = MaskedProcess(vocab_size=V, schedule=schedule)
  t = jnp.linspace(0.05, 0.95, 19)
  h = 1e-3
  dalpha = (process.alpha(t + h) - process.alpha(t - h)) / (2 * h)
  expected = -dalpha / (1.0 - process.alpha(t))
  np.testing.assert_allclose(process.loss_weight(t), expected, rtol=2e-3)
  if schedule == "linear":
    np.testing.assert_allclose(process.loss_weight(t), 1.0 / t, rtol=1e-5)
  # near t = 0 the weight is ~ c / t (c = 1 linear, 2 cosine), not inf/nan
  small = jnp.array([1e-7, 1e-5, 1e-3])
  c = 1.0 if schedule == "linear" else 2.0
  np.testing.assert_allclose(process.loss_weight(small), c / small, rtol=1e-3)


def test_padding_is_ignored_and_loss_is_the_bound_per_token():
  process = MaskedProcess(vocab_size=V)
  den = constant_logits(np.log(PI))
  tokens = iid_tokens()
  mask = jnp.arange(L)[None, :] < jnp.arange(1, B + 1)[:, None] % L + 1
  other = jnp.where(mask, tokens, (tokens + 3) % V)
  key = jax.random.key(3)
  bound = jax.jit(lambda x, m: process.nll_bound(key, den, x, m))
  b1, b2 = bound(tokens, mask), bound(other, mask)
  np.testing.assert_allclose(b1.nats, b2.nats, rtol=1e-6)
  assert set(b1.terms) == {"diffusion", "prior", "reconstruction"}
  out = jax.jit(lambda x, m: process.loss(key, den, x, m))(tokens, mask)
  np.testing.assert_allclose(out.loss, b1.nats.sum() / mask.sum(), rtol=1e-6)
  np.testing.assert_allclose(out.metrics["nll_bound"], out.loss)
  # the prior KL is honest: exactly zero when alpha(1) = 0
  np.testing.assert_array_equal(b1.terms["prior"], 0.0)
  # a fully padded sequence contributes nothing
  empty = bound(tokens, jnp.zeros((B, L), bool))
  np.testing.assert_array_equal(empty.nats, 0.0)


def test_corrupt_masks_at_rate_one_minus_alpha():
  process = MaskedProcess(vocab_size=V, schedule="cosine_alpha")
  x0 = jnp.zeros((2, 4096), jnp.int32) + 5
  t = jnp.array([0.2, 0.7])
  x_t = np.asarray(process.corrupt(jax.random.key(0), x0, t))
  assert set(np.unique(x_t)) <= {5, V}
  rate = (x_t == V).mean(-1)
  np.testing.assert_allclose(rate, 1.0 - process.alpha(t), atol=0.03)


def test_posterior_matches_bayes_by_brute_force():
  process = MaskedProcess(vocab_size=4, schedule="cosine_alpha")
  s, t = 0.3, 0.8
  x0 = jnp.arange(4)
  q_s = np.asarray(process.marginal_probs(x0, s))    # q(x_s | x0) [4, 5]
  a_s, a_t = float(process.alpha(jnp.float32(s))), float(process.alpha(jnp.float32(t)))
  q_ts = np.zeros((5, 5))                            # q(x_t | x_s)
  for k in range(4):
    q_ts[k, k], q_ts[k, 4] = a_t / a_s, 1.0 - a_t / a_s
  q_ts[4, 4] = 1.0
  for x_t in range(5):
    joint = q_s * q_ts[:, x_t][None, :]              # [x0, x_s]
    for i in range(4):
      if joint[i].sum() == 0:
        continue
      got = process.posterior_probs(jnp.array(x_t), x0[i], s, t)
      np.testing.assert_allclose(got, joint[i] / joint[i].sum(), atol=1e-6)


def test_reverse_step_unmasks_at_the_right_rate_and_carries_over():
  process = MaskedProcess(vocab_size=V)
  den = constant_logits(np.log(PI))
  x_t = jnp.full((8, 512), V, jnp.int32).at[:, :10].set(2)
  step = jax.jit(lambda k, t, s: process.reverse_step(k, den, x_t, t, s))
  x_s = np.asarray(step(jax.random.key(0), 0.6, 0.3))
  np.testing.assert_array_equal(x_s[:, :10], 2)
  unmasked = (x_s[:, 10:] != V).mean()
  assert abs(unmasked - (0.7 - 0.4) / 0.6) < 0.02
  assert x_s.min() >= 0 and x_s.max() <= V
  final = step(jax.random.key(1), 0.3, 0.0)
  assert int((final == V).sum()) == 0  # s = 0 fills every mask


def test_prior_spec_and_registry():
  for schedule in ("linear", "cosine_alpha"):
    process = make_process("masked", vocab_size=V, schedule=schedule)
    x = process.prior(jax.random.key(0), (2, L))
    np.testing.assert_array_equal(x, V)
  spec = process.model_spec
  assert (spec.input_vocab, spec.output_dim) == (V + 1, V)
  hash(process)
  with pytest.raises(ValueError, match="default, ancestral, cached"):
    process.sampler(SamplingOptions(sampler="fast"))
  assert process.sampler(SamplingOptions()) == "ancestral"
  assert process.sampler_names() == ("ancestral", "cached", "confidence",
                                     "margin", "entropy", "remdm_cap",
                                     "remdm_rescale", "remdm_loop")
  with pytest.raises(ValueError, match="schedule"):
    MaskedProcess(vocab_size=V, schedule="nope")


def test_fine_gumbel_exceeds_the_float32_cap():
  grid = 2.0 ** -23
  lowest = fine_gumbel(jnp.float32(0.0), jnp.float32(0.0))
  plain_cap = -math.log(-math.log1p(-grid))  # float32 uniform's best
  assert float(lowest) > plain_cap + 10
  # and it is the standard Gumbel in distribution (CDF exp(-exp(-g)))
  u = jax.random.uniform(jax.random.key(0), (2, 20000))
  g = np.asarray(fine_gumbel(u[0], u[1]))
  for q in (-1.0, 0.0, 1.0, 3.0):
    assert abs((g <= q).mean() - math.exp(-math.exp(-q))) < 0.015


def test_fused_head_gives_the_same_bound_and_gradient():
  """The backbone's fused `target_nll` (head and softmax at masked positions
  only) gives the bound and gradients of the dense logits path."""
  from flax import nnx
  from diffusion_text.config import ModelConfig
  from diffusion_text.models import as_denoiser, build_model
  p = MaskedProcess(vocab_size=V)
  cfg = ModelConfig(num_layers=1, d_model=16, num_heads=2, mlp_ratio=2,
                    cond_dim=8)
  graphdef, params = nnx.split(build_model(p.model_spec, cfg, seed=0))
  params = jax.tree.map(lambda x: x + 0.3 * jnp.cos(jnp.arange(x.size).reshape(
      x.shape)), params)  # make the zero-initialised head and gates act
  tokens, mask = iid_tokens()[:8], jnp.ones((8, L)).at[2, 5:].set(0)

  def bound(params, fused):
    model = nnx.merge(graphdef, params)
    den = (as_denoiser(model) if fused else
           Denoiser(predict=lambda x, t: model(x, t)))
    return jnp.sum(p.nll_bound(jax.random.key(2), den, tokens, mask).nats)

  (v0, g0), (v1, g1) = (jax.jit(jax.value_and_grad(bound), static_argnums=1)(
      params, f) for f in (False, True))
  assert as_denoiser(nnx.merge(graphdef, params)).target_nll is not None
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5), g0, g1)
