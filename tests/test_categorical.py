"""D3PM uniform / absorbing: exact math against dense matrices, the bound
against known entropies, and the ancestral sampler."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_text.processes import (Denoiser, SamplingOptions, make_process,
                                      transitions)
from tests.helpers import constant_logits

V, T = 6, 8
NAMES = ["d3pm_uniform", "d3pm_absorbing"]
DENSE = {"d3pm_uniform": transitions.Uniform,
         "d3pm_absorbing": transitions.Absorbing}


def _dense_chain(name, process):
  """Betas, one-step matrices Q_1..Q_T and Q-bar_0..Q-bar_T (float64)."""
  alpha = np.asarray(process.alpha_bar(jnp.arange(T + 1) / T), np.float64)
  betas = 1.0 - alpha[1:] / alpha[:-1]
  steps = [np.asarray(DENSE[name].dense_matrix(b, V), np.float64)
           for b in betas]
  bars = [np.eye(steps[0].shape[0])]
  for q in steps:
    bars.append(bars[-1] @ q)
  return betas, steps, bars


def _span(steps, s, t):
  out = np.eye(steps[0].shape[0])
  for q in steps[s:t]:
    out = out @ q
  return out


def test_registry_defaults_and_model_spec():
  uni = make_process("d3pm_uniform", vocab_size=V)
  ab = make_process("d3pm_absorbing", vocab_size=V)
  assert uni.num_steps == 1000
  assert (uni.schedule, ab.schedule) == ("cosine_alpha", "linear")
  assert uni.model_spec.input_vocab == V and ab.model_spec.input_vocab == V + 1
  assert uni.model_spec.output_dim == ab.model_spec.output_dim == V
  hash(uni), hash(ab)
  # linear alpha = 1 - t is D3PM's absorbing schedule b_i = 1 / (T - i + 1).
  betas, _, _ = _dense_chain("d3pm_absorbing", make_process(
      "d3pm_absorbing", vocab_size=V, num_steps=T))
  np.testing.assert_allclose(betas, 1.0 / (T - np.arange(1, T + 1) + 1),
                             rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_marginal_matches_forward_chain_monte_carlo(name):
  process = make_process(name, vocab_size=V, num_steps=T)
  _, steps, _ = _dense_chain(name, process)
  rng = np.random.default_rng(0)
  n, x0 = 20000, 2
  x = np.full((n,), x0)
  for i, q in enumerate(steps, start=1):
    cdf = np.cumsum(q[x], axis=-1)
    x = np.minimum((cdf < rng.uniform(size=(n, 1))).sum(-1), q.shape[0] - 1)
    if i in (1, T // 2, T):
      freq = np.bincount(x, minlength=q.shape[0]) / n
      expected = np.asarray(process.marginal_probs(jnp.array(x0), i / T))
      tol = 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-6
      assert (np.abs(freq - expected) <= tol).all(), (i, freq, expected)
  # `corrupt` draws from the same marginal, with per-sequence times.
  t = jnp.array([0.25, 0.75])
  xt = np.asarray(process.corrupt(jax.random.PRNGKey(0),
                                  jnp.full((2, n), x0, jnp.int32), t))
  for b in range(2):
    freq = np.bincount(xt[b], minlength=steps[0].shape[0]) / n
    expected = np.asarray(process.marginal_probs(jnp.array(x0), t[b]))
    assert np.abs(freq - expected).max() < 4.5 * 0.5 / np.sqrt(n)


@pytest.mark.parametrize("name", NAMES)
def test_posterior_and_p_theta_match_brute_force(name):
  process = make_process(name, vocab_size=V, num_steps=T)
  _, steps, bars = _dense_chain(name, process)
  k = steps[0].shape[0]
  xt, x0 = (jnp.asarray(a.reshape(-1, 1)) for a in
            np.meshgrid(np.arange(k), np.arange(V), indexing="ij"))
  logits = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (k * V, 1, V))
  p0 = np.asarray(jax.nn.softmax(logits), np.float64)[:, 0]
  for s, t in [(0, 1), (0, 3), (2, 5), (T - 1, T), (0, T)]:
    q_st = _span(steps, s, t)
    joint = q_st[:, np.asarray(xt)[:, 0]].T * bars[s][np.asarray(x0)[:, 0]]
    evidence = bars[t][np.asarray(x0)[:, 0], np.asarray(xt)[:, 0]]
    valid = evidence > 1e-9
    post = np.asarray(process.posterior_probs(xt, x0, s / T, t / T))[:, 0]
    expected = joint / np.maximum(evidence, 1e-30)[:, None]
    np.testing.assert_allclose(post[valid], expected[valid], atol=1e-5)
    # p(x_s | x_t) ∝ q(x_t | x_s) (p~ Q-bar_s)(x_s), normalised.
    pt = np.asarray(process.p_theta_probs(logits, xt, s / T, t / T))[:, 0]
    p_joint = q_st[:, np.asarray(xt)[:, 0]].T * (p0 @ bars[s][:V])
    z = p_joint.sum(-1, keepdims=True)
    reachable = z[:, 0] > 1e-9
    expected = p_joint / np.maximum(z, 1e-30)
    np.testing.assert_allclose(pt[reachable], expected[reachable], atol=1e-5)
    np.testing.assert_allclose(pt[reachable].sum(-1), 1.0, atol=1e-5)
    # The O(V) closed-form bound term equals the dense KL (-log p at s = 0).
    kl = np.sum(np.where(post > 0, post * (np.log(np.where(post > 0, post, 1))
                                           - np.log(np.maximum(pt, 1e-30))),
                         0.0), -1)
    term = np.asarray(process.step_term(logits, xt, x0, s / T, t / T))[:, 0]
    np.testing.assert_allclose(term[valid], kl[valid], atol=2e-5, rtol=1e-4)
    if name == "d3pm_absorbing":  # KL vanishes wherever x_t is unmasked
      assert (term[np.asarray(xt)[:, 0] != V] == 0).all()


# ---- the bound on i.i.d. data with known distribution pi ---------------------
L, B, KEYS, T_BOUND = 8, 64, 200, 20


def _iid_data():
  rng = np.random.default_rng(0)
  pi = rng.dirichlet(np.ones(V))
  tokens = jnp.asarray(rng.choice(V, size=(B, L), p=pi), jnp.int32)
  return pi, tokens


@functools.partial(jax.jit, static_argnums=0)
def _bounds(process, logits_V, tokens, mask):
  """nll_bound under a denoiser that always predicts logits_V, many keys."""
  keys = jax.random.split(jax.random.PRNGKey(1), KEYS)
  bound = jax.vmap(lambda k: process.nll_bound(k, constant_logits(logits_V), tokens,
                                               mask))(keys)
  return bound.nats, bound.terms


@pytest.mark.parametrize("name", NAMES)
def test_bound_is_exact_for_the_oracle_and_log_v_for_uniform_logits(name):
  # With p~ = pi at every step, eq. 4 is the exact reverse of i.i.d. pi data,
  # so E[bound] = -log pi(tokens) (and log V per token for p~ = uniform).
  process = make_process(name, vocab_size=V, num_steps=T_BOUND)
  pi, tokens = _iid_data()
  mask = jnp.ones((B, L), jnp.int32)
  for logits, nll in [(np.log(pi), -np.log(pi)[np.asarray(tokens)].sum()),
                      (np.zeros(V), B * L * np.log(V))]:
    nats, terms = _bounds(process, jnp.asarray(logits, jnp.float32), tokens,
                          mask)
    nats = np.asarray(nats)
    np.testing.assert_allclose(
        nats, sum(np.asarray(v) for v in terms.values()), rtol=1e-5)
    sem = nats.sum(-1).std() / np.sqrt(KEYS)
    assert abs(nats.sum(-1).mean() - nll) < 4 * sem + 1e-3 * nll, (
        nats.sum(-1).mean(), nll, sem)
    assert np.asarray(terms["prior"]).max() < 1e-5
    first = np.asarray(terms["reconstruction"]) != 0
    assert not (first & (np.asarray(terms["diffusion"]) != 0)).any()


def test_uniform_bound_with_exact_posterior_stays_above_entropy():
  # p~ = the true p(x0 | x_t) is not the optimum of eq. 4 for uniform noise
  # (it counts q(x_t | x0) twice), but any denoiser's bound is >= L H(pi).
  process = make_process("d3pm_uniform", vocab_size=V, num_steps=T_BOUND)
  pi, tokens = _iid_data()
  log_pi = jnp.asarray(np.log(pi), jnp.float32)

  def predict(x_t, t):
    states = jnp.broadcast_to(jnp.arange(V), x_t.shape + (V,))
    lik = process.marginal_probs(states, t[:, None, None])  # [B, L, x0, x_t]
    return log_pi + jnp.log(jnp.take_along_axis(lik, x_t[..., None, None],
                                                -1)[..., 0])

  keys = jax.random.split(jax.random.PRNGKey(2), KEYS)
  nats = jax.jit(jax.vmap(lambda k: process.nll_bound(
      k, Denoiser(predict), tokens, jnp.ones((B, L))).nats))(keys)
  per_token = np.asarray(nats).mean() / L
  entropy = -(pi * np.log(pi)).sum()
  sem = np.asarray(nats).sum(-1).std() / np.sqrt(KEYS) / (B * L)
  assert per_token > entropy - 4 * sem
  assert per_token < 2.0 * np.log(V)


@pytest.mark.parametrize("name", NAMES)
def test_mask_loss_and_gradients(name):
  process = make_process(name, vocab_size=V, num_steps=T_BOUND,
                         hybrid_lambda=0.5)
  _, tokens = _iid_data()
  mask = jnp.asarray(np.arange(L)[None, :] < np.arange(B)[:, None] % (L + 1))
  junk = jnp.where(mask, tokens, V - 1)
  table = jax.random.normal(jax.random.PRNGKey(3), (V + 1, V))

  def loss_and_bound(table, tokens, key):
    den = Denoiser(predict=lambda x, t: table[x] * (1.0 + t[:, None, None]))
    out = process.loss(key, den, tokens, mask)
    return out.loss, (out, process.nll_bound(key, den, tokens, mask))

  fn = jax.jit(jax.value_and_grad(loss_and_bound, has_aux=True))
  key = jax.random.PRNGKey(4)
  (loss, (out, bound)), grad = fn(table, tokens, key)
  (_, (_, bound_junk)), grad_junk = fn(table, junk, key)
  # Padded positions contribute nothing, whatever ids they hold.
  np.testing.assert_allclose(bound.nats, bound_junk.nats, rtol=1e-6)
  np.testing.assert_allclose(grad, grad_junk, rtol=1e-5, atol=1e-7)
  assert (np.asarray(bound.nats)[np.asarray(mask).sum(-1) == 0] == 0).all()
  assert np.isfinite(np.asarray(grad)).all() and np.abs(grad).sum() > 0
  # loss = bound per token + lambda * CE; loss terms are the bound's terms.
  real = float(mask.sum())
  m = out.metrics
  np.testing.assert_allclose(m["nll_bound"], bound.nats.sum() / real,
                             rtol=1e-5)
  np.testing.assert_allclose(loss, m["nll_bound"] + 0.5 * m["ce"], rtol=1e-5)
  for k in ("prior", "diffusion", "reconstruction"):
    np.testing.assert_allclose(out.terms[k], bound.terms[k], rtol=1e-6)
  assert float(m["ce"]) > 0


# ---- sampling ----------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _sample(process, logits_V, shape, steps, key):
  """A local ancestral loop over process.time_grid (one fori_loop)."""
  den = constant_logits(logits_V)
  grid = process.time_grid(steps, shape[1])
  prior_key, step_key = jax.random.split(key)

  def body(i, x):
    return process.reverse_step(jax.random.fold_in(step_key, i), den, x,
                                grid[i], grid[i + 1])
  x = jax.lax.fori_loop(0, steps, body, process.prior(prior_key, shape))
  return process.decode(den, x)


@pytest.mark.parametrize("name", NAMES)
def test_sampler(name):
  process = make_process(name, vocab_size=V, num_steps=T_BOUND)
  pi, _ = _iid_data()
  log_pi = jnp.asarray(np.log(pi), jnp.float32)
  shape = (64, 16)
  prior = np.asarray(process.prior(jax.random.PRNGKey(0), shape))
  assert ((prior == V).all() if name == "d3pm_absorbing"
          else (prior >= 0).all() and (prior < V).all())
  for steps in (T_BOUND, 7):  # the native grid and a coarser one
    key = jax.random.PRNGKey(5)
    x = np.asarray(_sample(process, log_pi, shape, steps, key))
    again = _sample(process, log_pi, shape, steps, key)
    other = _sample(process, log_pi, shape, steps, jax.random.PRNGKey(6))
    np.testing.assert_array_equal(x, again)
    assert (x != np.asarray(other)).any()
    assert x.dtype == np.int32 and (x >= 0).all() and (x < V).all()
    # The oracle's reverse chain is exact, so samples are i.i.d. pi.
    freq = np.bincount(x.ravel(), minlength=V) / x.size
    tol = 4.5 * np.sqrt(pi * (1 - pi) / x.size)
    assert (np.abs(freq - pi) <= tol).all(), (freq, pi)


def test_absorbing_step_to_zero_unmasks_everything():
  process = make_process("d3pm_absorbing", vocab_size=V, num_steps=T_BOUND)
  x_t = jnp.where(jnp.arange(16) % 3 == 0, V, jnp.arange(16) % V)[None]
  x0 = process.reverse_step(jax.random.PRNGKey(0), constant_logits(jnp.zeros(V)),
                            x_t, jnp.float32(1.0), jnp.float32(0.0))
  assert (x0 != V).all()
  unmasked = np.asarray(x_t) != V
  np.testing.assert_array_equal(np.asarray(x0)[unmasked],
                                np.asarray(x_t)[unmasked])


def test_temperature_zero_unmasks_to_the_mode():
  process = make_process("d3pm_absorbing", vocab_size=V, num_steps=T_BOUND)
  logits_V = jnp.arange(V, dtype=jnp.float32) % 3  # mode: the first 2
  x_t = jnp.full((2, 16), V, jnp.int32)
  x0 = process.reverse_step(jax.random.PRNGKey(0), constant_logits(logits_V),
                            x_t, jnp.float32(1.0), jnp.float32(0.0),
                            SamplingOptions(temperature=0.0))
  np.testing.assert_array_equal(x0, 2)
  with pytest.raises(ValueError, match="top_p"):
    process.sampler(SamplingOptions(top_p=0.5))
