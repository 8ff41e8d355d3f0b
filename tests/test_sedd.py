"""SEDD: exact CTMC math, score entropy, the ELBO with an oracle score, samplers.

The oracle is the exact concrete score of i.i.d. tokens with a known
distribution pi: p_t(y) = sum_x0 pi(x0) q(y | x0), score_y = p_t(y)/p_t(x_t).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import expm

from diffusion_text.processes import Denoiser, SamplingOptions, make_process
from diffusion_text.processes import sedd_absorb
from tests.helpers import count_recomputes

V = 5
PI = np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32)
H_PI = float(-(PI * np.log(PI)).sum())
GRAPHS = ("sedd_absorb", "sedd_uniform")


def _process(name, **kw):
  return make_process(name, vocab_size=V, **kw)


def _raw_from_log_ratio(process, log_s_BxLxK, t_B):
  """Network output that the process turns back into `log_s` (undoes the
  absorbing graph's scale_by_sigma shift, documented in SEDDAbsorb)."""
  if isinstance(process, sedd_absorb.SEDDAbsorb):
    a_B = process.alpha(t_B)
    shift_B = jnp.log(a_B) - jnp.log1p(-a_B) - math.log(process.vocab_size)
    return log_s_BxLxK - shift_B[:, None, None]
  return log_s_BxLxK


def _oracle(process, garbage=0.0):
  """Exact score of i.i.d. pi tokens; `garbage` is added at the current token,
  which the process must ignore (its score is 1 by definition)."""
  pi_V = jnp.asarray(PI)
  k = process.num_states

  def predict(x_t, t_B):
    x0_BxV = jnp.broadcast_to(jnp.arange(V), (t_B.shape[0], V))
    p_t_BxK = jnp.einsum("v,bvk->bk", pi_V, process.marginal_probs(x0_BxV, t_B))
    log_p_BxK = jnp.log(p_t_BxK)
    log_s = log_p_BxK[:, None, :] - jnp.take_along_axis(log_p_BxK, x_t, -1)[..., None]
    raw = _raw_from_log_ratio(process, log_s, t_B)
    return raw + garbage * jax.nn.one_hot(x_t, k)

  return Denoiser(predict=predict)


def _conditional_oracle(process, x0):
  """The true conditional score q(y | x0) / q(x_t | x0) (x0 known)."""

  def predict(x_t, t_B):
    log_q = jnp.log(process.marginal_probs(x0, t_B))
    log_s = log_q - jnp.take_along_axis(log_q, x_t[..., None], -1)
    return _raw_from_log_ratio(process, log_s, t_B)

  return Denoiser(predict=predict)


def _data(key, shape):
  return jax.random.choice(key, V, shape, p=jnp.asarray(PI)).astype(jnp.int32)


# ---- exact CTMC math -----------------------------------------------------------

@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize("schedule", ("loglinear", "geometric"))
def test_marginals_match_matrix_exponential(name, schedule):
  p = _process(name, schedule=schedule)
  k = p.num_states
  q_KxK = p.rate_matrix()
  off_diag = q_KxK - jnp.diag(jnp.diag(q_KxK))
  np.testing.assert_allclose(q_KxK.sum(-1), 0.0, atol=1e-6)  # a generator
  assert float(off_diag.min()) >= 0.0
  states = jnp.arange(k)
  np.testing.assert_allclose(p.forward_rates(states), q_KxK)
  np.testing.assert_allclose(p.transp_rate(states), q_KxK.T)
  for t in (1e-3, 0.2, 0.7, 1.0):
    dense = expm(p.total_noise(t) * q_KxK)
    np.testing.assert_allclose(p.marginal_probs(states, t), dense, atol=2e-6)
  # sigma = d sigma_bar / dt and alpha = exp(-sigma_bar).
  t = jnp.linspace(0.05, 0.95, 7)
  fd = (p.total_noise(t + 1e-3) - p.total_noise(t - 1e-3)) / 2e-3
  np.testing.assert_allclose(p.rate_noise(t), fd, rtol=2e-3)
  np.testing.assert_allclose(p.alpha(t), jnp.exp(-p.total_noise(t)), rtol=1e-5)


@pytest.mark.parametrize("name", GRAPHS)
def test_posterior_matches_bayes(name):
  p = _process(name)
  k = p.num_states
  s, t = 0.3, 0.6
  q = p.rate_matrix()
  q_s = expm(p.total_noise(s) * q)                      # [x0, x_s]
  q_ts = expm((p.total_noise(t) - p.total_noise(s)) * q)  # [x_s, x_t]
  x0, x_t = jnp.meshgrid(jnp.arange(V), jnp.arange(k), indexing="ij")
  post = p.posterior_probs(x_t, x0, s, t)
  joint = q_s[x0] * q_ts[:, x_t].transpose(1, 2, 0)
  reachable = joint.sum(-1, keepdims=True) > 0
  brute = jnp.where(reachable, joint / jnp.where(reachable, joint.sum(-1, keepdims=True), 1), 0)
  np.testing.assert_allclose(jnp.where(reachable, post, 0), brute, atol=1e-5)


@pytest.mark.parametrize("name", GRAPHS)
def test_corrupt_matches_marginals(name):
  p = _process(name)
  x0 = jnp.full((4000, 1), 2, jnp.int32)
  t = jnp.full((4000,), 0.4)
  x_t = p.corrupt(jax.random.key(0), x0, t)
  freq = np.bincount(np.asarray(x_t).ravel(), minlength=p.num_states) / 4000
  np.testing.assert_allclose(freq, p.marginal_probs(x0[0, 0], 0.4), atol=0.03)


@pytest.mark.parametrize("name", GRAPHS)
def test_prior_kl_and_prior_samples(name):
  p = _process(name, eps=0.3)
  k = p.num_states
  q1_VxK = p.marginal_probs(jnp.arange(V), 1.0)
  x1 = p.prior(jax.random.key(1), (400, 10))
  if name == "sedd_absorb":
    base_K = jnp.concatenate([jnp.full((V,), 0.3 / V), jnp.array([0.7])])
    assert _process(name, eps=0.0).prior_kl_per_token() == 0.0
    assert bool(jnp.all(_process(name, eps=0.0).prior(jax.random.key(1), (2, 3)) == V))
  else:
    base_K = jnp.full((k,), 1.0 / k)
  kl = jnp.sum(jax.scipy.special.xlogy(q1_VxK, q1_VxK / base_K), -1)
  np.testing.assert_allclose(kl, p.prior_kl_per_token(), rtol=1e-5)
  freq = np.bincount(np.asarray(x1).ravel(), minlength=k) / x1.size
  np.testing.assert_allclose(freq, base_K, atol=0.03)  # prior() samples p_base


# ---- score entropy and the bound -------------------------------------------------

@pytest.mark.parametrize("name", GRAPHS)
def test_score_entropy_nonnegative_and_zero_at_true_score(name):
  p = _process(name)
  keys = jax.random.split(jax.random.key(2), 4)
  x0 = _data(keys[0], (16, 8))
  t_B = jax.random.uniform(keys[1], (16,), minval=1e-3, maxval=1.0)
  x_t = p.corrupt(keys[2], x0, t_B)
  noise = 2.0 * jax.random.normal(keys[3], (16, 8, p.num_states))

  @jax.jit
  def both():
    true = p.log_score(_conditional_oracle(p, x0), x_t, t_B)
    wrong = p.log_score(Denoiser(predict=lambda x, t: noise), x_t, t_B)
    return p.dwdse(true, x_t, x0, t_B), p.dwdse(wrong, x_t, x0, t_B)
  true_se, wrong_se = both()
  np.testing.assert_allclose(true_se, 0.0, atol=1e-4)
  assert float(wrong_se.min()) >= 0.0
  assert float(wrong_se.sum()) > 1.0


def test_uniform_score_entropy_matches_float64_near_the_true_score():
  """sedd_uniform's dwdse (one exponential per entry, expm1 at the r = 1/rho
  entry) against the definition (1/K) sum_{y != x} r_y h(log s_y - log r_y),
  h(d) = expm1(d) - d, in float64: at t near 0 (r = 1/rho up to ~1e7) and
  near the true ratios, where the terms are tiny, it stays within 1e-6 nats
  + 0.1% (the float32 rounding of the score itself; one exponential at the
  1/rho entry too would be off by ~1e-3 nats)."""
  k = 1000
  p = make_process("sedd_uniform", vocab_size=k)
  keys = jax.random.split(jax.random.key(5), 3)
  b, length = 4, 32
  for t in (1e-4, 1e-2, 0.5, 0.99):
    t_B = jnp.full((b,), t, jnp.float32)
    x0 = jax.random.randint(keys[0], (b, length), 0, k)
    # Half the positions changed, at any t (corrupt() rarely does at small t).
    changed = jax.random.bernoulli(keys[1], 0.5, x0.shape)
    x_t = jnp.where(changed, (x0 + 1) % k, x0)
    # log rho as the process rounds it (float32); the rest in float64.
    a, om = p.noise_schedule.alpha(t_B), p.noise_schedule.one_minus_alpha(t_B)
    log_rho = float((jnp.log(om) - jnp.log(om + k * a))[0])
    x0_, x_t_ = np.asarray(x0)[..., None], np.asarray(x_t)[..., None]
    y = np.arange(k)
    log_r = np.where(x_t_ == x0_, log_rho, np.where(y == x0_, -log_rho, 0.0))
    for eps in (0.0, 1e-3, 0.3):
      noise = np.asarray(jax.random.normal(keys[2], log_r.shape), np.float64)
      score = np.where(y == x_t_, 0.0, log_r + eps * noise).astype(np.float32)
      got = np.asarray(p.dwdse(jnp.asarray(score), x_t, x0, t_B), np.float64)
      d = score.astype(np.float64) - log_r
      terms = np.where(y == x_t_, 0.0, np.exp(log_r) * (np.expm1(d) - d))
      rate = float(p.noise_schedule.rate(t_B)[0])
      want = rate * terms.sum(-1) / k
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
      assert got.min() >= 0.0


def _bounds(p, denoiser, num_keys=32, batch=64, length=8):
  def one(key):
    data_key, bound_key = jax.random.split(key)
    tokens = _data(data_key, (batch, length))
    return p.nll_bound(bound_key, denoiser, tokens, jnp.ones_like(tokens))
  keys = jax.random.split(jax.random.key(3), num_keys)
  return jax.jit(jax.vmap(one))(keys)


@pytest.mark.parametrize("name,schedule", [("sedd_absorb", "loglinear"),
                                        ("sedd_uniform", "geometric")])
def test_oracle_bound_is_close_to_and_above_entropy(name, schedule):
  """With the exact score the path KL vanishes, so E[bound] = L H(pi) + the
  (tiny) prior gap, and never less. The estimator is noisy (one time per
  sequence; its variance grows like log(1/t_min)). Found: 10.35 +- 0.18
  (absorb) and 10.68 +- 0.31 (uniform) against L H(pi) = 10.15 (+1.1 and
  +1.7 SEM; 131k uniform sequences gave 10.154 +- 0.035). The expectation
  itself is checked to 1e-5 by the quadrature test below."""
  p = _process(name, schedule=schedule, recon_prob=0.1)
  length = 8
  bound = _bounds(p, _oracle(p, garbage=3.0), length=length)
  batch_means = np.asarray(bound.nats).mean(-1)   # times are stratified per batch
  mean = batch_means.mean()
  sem = batch_means.std() / math.sqrt(batch_means.size)
  target = length * H_PI
  assert target - 3 * sem <= mean <= target + 3 * sem
  assert float(np.asarray(bound.terms["reconstruction"]).max()) > 0.0
  # An uninformative score (all ratios 1 / uniform p(x0 | x_t)) is far worse.
  zeros = Denoiser(predict=lambda x, t: jnp.zeros(x.shape + (p.num_states,)))
  blind = _bounds(p, zeros, num_keys=8, length=length)
  assert float(blind.nats.mean()) > target + 6 * sem + 0.2 * length


@pytest.mark.parametrize("name,schedule", [("sedd_absorb", "loglinear"),
                                        ("sedd_absorb", "geometric"),
                                        ("sedd_uniform", "geometric")])
def test_exact_quadrature_of_oracle_bound_equals_entropy(name, schedule):
  """Theorem 3.6 without Monte Carlo: per token, the expected DWDSE (summed
  over all (x0, x_t) pairs) integrated over [t_min, 1] by quadrature, plus the
  exact reconstruction and prior terms, equals H(pi) up to the prior gap
  I(x0; x1) <= prior KL (found: |gap| < 1e-6 for the geometric noise)."""
  p = _process(name, schedule=schedule)
  den = _oracle(p)
  x0, x_t = (a.reshape(1, -1) for a in jnp.meshgrid(
      jnp.arange(V), jnp.arange(p.num_states), indexing="ij"))

  def expected(t):  # E_{x0 ~ pi, x_t ~ q}[DWDSE], E[-log p_dec(x0 | x_t)]
    t_B = jnp.full((1,), t)
    score = p.log_score(den, x_t, t_B)
    q_t = jnp.take_along_axis(p.marginal_probs(x0, t_B), x_t[..., None], -1)
    w = jnp.asarray(PI)[x0] * q_t[..., 0]
    return (jnp.sum(w * p.dwdse(score, x_t, x0, t_B)),
            -jnp.sum(w * p.decoder_log_probs(score, x_t, x0, t_B)))

  log_t = jnp.linspace(math.log(p.t_min), 0.0, 2001)   # dt = t dlog t
  dwdse_T, _ = jax.jit(jax.vmap(expected))(jnp.exp(log_t))
  diffusion = float(jnp.trapezoid(dwdse_T * jnp.exp(log_t), log_t))
  reconstruction = float(jax.jit(expected)(p.t_min)[1])
  total = diffusion + reconstruction + p.prior_kl_per_token()
  assert reconstruction > 0.0
  assert H_PI - 1e-5 <= total <= H_PI + p.prior_kl_per_token() + 1e-5


@pytest.mark.parametrize("name", GRAPHS)
def test_bound_respects_mask_and_loss_has_finite_gradients(name):
  p = _process(name)
  k = p.num_states
  tokens = _data(jax.random.key(4), (8, 8))
  mask = jnp.arange(8)[None, :] < jnp.array([8, 5, 3, 0, 8, 1, 6, 2])[:, None]
  other = jnp.where(mask, tokens, (tokens + 1) % V)
  den = _oracle(p)
  bound = jax.jit(lambda x: p.nll_bound(jax.random.key(5), den, x, mask))
  a, b = bound(tokens), bound(other)
  np.testing.assert_allclose(a.nats, b.nats, rtol=1e-6)
  assert float(a.nats[3]) == 0.0 and all(float(v[3]) == 0.0 for v in a.terms.values())

  def loss(w_KxK):
    den = Denoiser(predict=lambda x, t: w_KxK[x] * t[:, None, None])
    return p.loss(jax.random.key(6), den, tokens, mask).loss
  g = jax.jit(jax.grad(loss))(jax.random.normal(jax.random.key(7), (k, k)))
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


def test_uniform_bound_through_the_chunked_head_is_the_dense_formula(
    monkeypatch):
  """sedd_uniform's bound through the backbone's chunked head, one sequence
  per chunk, where chunks without a decoder sequence skip the decoder
  (`sedd._sparse_terms`, hand-written VJP), equals the bound assembled from
  the dense score by plain autodiff of `dwdse` and `decoder_log_probs`, in
  value and in the parameters' gradient, and never recomputes the folded
  gradient."""
  from flax import nnx
  from diffusion_text import contract
  from diffusion_text.config import ModelConfig
  from diffusion_text.models import as_denoiser, build_model
  from diffusion_text.processes import base
  # t_min = 0.3: the decoder works on noisy tokens, so its gradient counts.
  p = _process("sedd_uniform", recon_prob=0.3, t_min=0.3)
  b, length = 8, 6
  monkeypatch.setattr(contract, "LIGHT_ROW_CHUNK", length)  # one per chunk
  recomputes = count_recomputes(monkeypatch)
  cfg = ModelConfig(num_layers=1, d_model=16, num_heads=2, mlp_ratio=2,
                    cond_dim=8)
  graphdef, params = nnx.split(build_model(p.model_spec, cfg, seed=0))
  params = jax.tree.map(lambda x: x + 0.3 * jnp.cos(jnp.arange(x.size).reshape(
      x.shape)), params)  # make the zero-initialised head and gates act
  tokens = _data(jax.random.key(8), (b, length))
  mask = jnp.ones((b, length), bool).at[1, 4:].set(False)
  key = jax.random.key(9)
  time_key, noise_key = jax.random.split(key)   # as nll_bound splits it
  t_B, recon_B = p._times(time_key, b)
  assert 0 < int(recon_B.sum()) < b   # chunks with and without the decoder

  def chunked(params):
    den = as_denoiser(nnx.merge(graphdef, params))
    assert den.map_logits is not None
    return jnp.sum(p.nll_bound(key, den, tokens, mask).nats)

  def dense(params):
    model = nnx.merge(graphdef, params)
    x_t = p.corrupt(noise_key, tokens, t_B)
    t_BxL = jnp.broadcast_to(t_B[:, None], x_t.shape)
    score = p.score_from_raw(model(x_t, p.network_time(t_B)), x_t, t_BxL)
    dw_B = base.masked_sum(p.dwdse(score, x_t, tokens, t_BxL), mask)
    dec_B = base.masked_sum(p.decoder_log_probs(score, x_t, tokens, t_BxL),
                            mask)
    weight = (1.0 - p.t_min) / (1.0 - p.recon_prob)
    n_B = jnp.sum(mask, axis=-1)
    return jnp.sum(jnp.where(recon_B, -dec_B / p.recon_prob, weight * dw_B)
                   + n_B * p.prior_kl_per_token())

  (v0, g0), (v1, g1) = (jax.jit(jax.value_and_grad(f))(params)
                        for f in (dense, chunked))
  jax.effects_barrier()
  assert recomputes == []
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  # float32: the chunked and dense sums differ by up to ~1e-5 of a leaf's
  # largest entry (the same before the decoder was skipped).
  jax.tree.map(lambda a, c: np.testing.assert_allclose(
      a, c, rtol=1e-4, atol=1e-4 * float(np.abs(a).max())), g0, g1)


# ---- samplers ----------------------------------------------------------------------

@pytest.mark.parametrize("name", GRAPHS)
def test_tweedie_step_is_exact_bayes_and_euler_agrees_for_small_steps(name):
  """Analytic step with the true score = p(x_s | x_t) of i.i.d. pi data
  (SEDD Theorem 4.2), including the final denoiser to noise 0."""
  p = _process(name, schedule="geometric")
  analytic = SamplingOptions(sampler="analytic")
  k = p.num_states
  den = _oracle(p, garbage=5.0)
  x_t = jnp.arange(k)[None, :]
  q = p.rate_matrix()
  pi_K = jnp.zeros(k).at[:V].set(jnp.asarray(PI))
  for t, s in ((0.7, 0.4), (0.2, 0.0)):
    sig_s = p.total_noise(s) if s > 0 else 0.0
    p_s = pi_K @ expm(sig_s * q)
    joint = p_s[:, None] * expm((p.total_noise(t) - sig_s) * q)   # [x_s, x_t]
    brute = (joint / joint.sum(0)).T
    probs = p.reverse_probs(den, x_t, t, s, analytic)[0]
    np.testing.assert_allclose(probs / probs.sum(-1, keepdims=True), brute, atol=1e-4)
  for sampler in ("euler", "tau_leaping"):
    t, s = 0.5, 0.5 - 1e-3
    step = p.reverse_probs(den, x_t, t, s, SamplingOptions(sampler=sampler))[0]
    exact = p.reverse_probs(den, x_t, t, s, analytic)[0]
    step, exact = (w / w.sum(-1, keepdims=True) for w in (step, exact))
    move = float(jnp.abs(exact - jnp.eye(k)).max())
    assert 0.0 < float(jnp.abs(step - exact).max()) < 0.02 * move


@pytest.mark.parametrize("name", GRAPHS)
def test_reverse_step_draws_from_reverse_probs(name):
  """One step from every state, 4000 times: the frequencies of x_s are the
  normalised `reverse_probs` (the step never builds them: SEDDAbsorb draws
  unmask-then-token, sedd_uniform stays or moves, draws.stay_or_move)."""
  p = _process(name, schedule="geometric")
  k, n = p.num_states, 4000
  den = _oracle(p, garbage=5.0)
  x_t = jnp.broadcast_to(jnp.arange(k), (n, k))
  step = jax.jit(lambda key, t, s: p.reverse_step(key, den, x_t, t, s))
  for t, s in ((0.7, 0.4), (0.2, 0.0)):
    probs = p.reverse_probs(den, x_t[:1], t, s)[0]
    probs = np.asarray(probs / probs.sum(-1, keepdims=True))
    x_s = np.asarray(step(jax.random.key(3), jnp.float32(t), jnp.float32(s)))
    for x in range(k):
      freq = np.bincount(x_s[:, x], minlength=k) / n
      sem = np.sqrt(probs[x] * (1 - probs[x]) / n)
      assert np.all(np.abs(freq - probs[x]) <= 4.5 * sem + 1e-9), (x, freq,
                                                                   probs[x])


def _sample(p, denoiser, key, shape, steps, options):
  """A tiny sampling loop over `time_grid` (the shared one lives elsewhere)."""
  grid_T = p.time_grid(steps, shape[1])
  prior_key, step_key = jax.random.split(key)
  x = p.prior(prior_key, shape)

  def body(i, x):
    return p.reverse_step(jax.random.fold_in(step_key, i), denoiser, x,
                          grid_T[i], grid_T[i + 1], options)
  return p.decode(denoiser, jax.lax.fori_loop(0, steps, body, x))


@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize("sampler", ("euler", "tau_leaping", "analytic"))
def test_sampler_with_oracle_recovers_pi(name, sampler):
  p = _process(name)
  options = SamplingOptions(sampler=sampler)
  grid = p.time_grid(32, 16)
  assert grid.shape == (33,) and float(grid[0]) == 1.0 and float(grid[-1]) == 0.0
  np.testing.assert_allclose(grid[-2], p.t_min, rtol=1e-6)
  run = jax.jit(lambda key: _sample(p, _oracle(p), key, (64, 16), 32, options))
  x = np.asarray(run(jax.random.key(8)))
  assert x.dtype == np.int32 and x.min() >= 0 and x.max() < V  # no [MASK]
  np.testing.assert_array_equal(x, run(jax.random.key(8)))      # deterministic
  assert not np.array_equal(x, run(jax.random.key(9)))
  freq = np.bincount(x.ravel(), minlength=V) / x.size
  np.testing.assert_allclose(freq, PI, atol=0.05)


def test_options_are_validated():
  with pytest.raises(ValueError, match="euler, tau_leaping, analytic"):
    _process("sedd_absorb").sampler(SamplingOptions(sampler="nope"))
  with pytest.raises(ValueError, match="temperature"):
    _process("sedd_absorb").sampler(SamplingOptions(temperature=0.5))
  with pytest.raises(ValueError, match="schedule.*loglinear, geometric"):
    _process("sedd_uniform", schedule="cosine_alpha")
  with pytest.raises(ValueError, match="eps"):
    _process("sedd_uniform", eps=0.0)
  spec = _process("sedd_absorb").model_spec
  assert spec.input_vocab == spec.output_dim == V + 1
  assert _process("sedd_uniform").model_spec.output_dim == V
  hash(_process("sedd_absorb"))


def test_absorb_with_eps_zero_is_finite_at_t_one():
  """eps = 0: sigma_bar(1) = inf and p_base is exactly all-[MASK]; the
  integrand at t = 1 is finite: sigma * ratio = 1/t times the cross-entropy
  (log V for a uniform prediction)."""
  p = _process("sedd_absorb", eps=0.0)
  zeros = Denoiser(predict=lambda x, t: jnp.zeros(x.shape + (V + 1,)))
  x_t = jnp.full((2, 4), V, jnp.int32)
  x0 = jnp.zeros((2, 4), jnp.int32)
  one = jnp.ones((2,))
  np.testing.assert_allclose(p.dwdse(p.log_score(zeros, x_t, one), x_t, x0, one),
                             math.log(V), rtol=1e-5)
  probs = p.reverse_probs(zeros, x_t, 1.0, 0.9)
  assert bool(jnp.all(jnp.isfinite(probs)))
  np.testing.assert_allclose(probs[..., :V], 0.1 / V, rtol=1e-5)  # (a_s - a_t)/(1 - a_t) / V
