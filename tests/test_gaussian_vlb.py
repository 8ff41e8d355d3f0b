"""Tests for the continuous-time Gaussian VLB process (VDM / PLAID).

The network is replaced by closures whose x0 posterior is known exactly: for
i.i.d. tokens from pi, p(w | z_t) is proportional to pi(w) N(z_t; alpha_t e_w,
sigma_t^2 I), so with the process's exact Gaussian base logits the oracle
network just returns log pi.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_text import sampling
from diffusion_text.processes import Denoiser, SamplingOptions, make_process
from diffusion_text.processes.gaussian_vlb import (GaussianVLBProcess,
                                                   alpha_sigma)
from tests.helpers import constant_logits

V, D, L, B = 3, 4, 8, 64
PI = np.array([0.6, 0.3, 0.1])
ENTROPY = float(-(PI * np.log(PI)).sum())
# Random (non-orthogonal) table; the process normalises its rows.
TABLE_VxD = jax.random.normal(jax.random.key(42), (V, D)) * 3.0


def _embed(ids):
  return jnp.take(TABLE_VxD, ids, axis=0)


def _oracle(process, pi=PI):
  """Exact p(w | z_t) for i.i.d. data from pi."""
  logpi_V = jnp.log(jnp.asarray(pi, jnp.float32))
  if process.base_logits:
    return constant_logits(logpi_V, embed=_embed)

  def predict(z_BxLxD, t_B, self_cond=None):
    del self_cond
    e_VxD = process.embeddings(Denoiser(predict=None, embed=_embed))
    alpha_B, sigma_B = alpha_sigma(process.gamma(t_B))
    sq_BxLxV = jnp.sum((z_BxLxD[:, :, None, :] - alpha_B[:, None, None, None]
                        * e_VxD) ** 2, -1)
    return logpi_V - 0.5 * sq_BxLxV / sigma_B[:, None, None] ** 2
  return Denoiser(predict=predict, embed=_embed)


def _iid_tokens(key, batch=B, length=L):
  return jax.random.choice(key, V, (batch, length), p=jnp.asarray(PI))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_means(process, denoiser, key, tokens, mask):
  """Mean bound over the batch for each of K = 512 keys -> [K]. One t per
  sequence makes single bounds heavy-tailed (std ~ 14 nats here), so tight
  checks average many independent batches."""
  return jax.lax.map(
      lambda k: process.nll_bound(k, denoiser, tokens, mask).nats.mean(),
      jax.random.split(key, 512))


_nll = jax.jit(lambda p, key, den, tokens, mask: p.nll_bound(
    key, den, tokens, mask), static_argnums=(0, 2))


def test_registry_and_model_spec():
  p = make_process("gaussian_vlb", vocab_size=V, latent_dim=D)
  assert isinstance(p, GaussianVLBProcess) and hash(p) == hash(p)
  spec = p.model_spec
  assert spec.input == "latents" and spec.output == "logits"
  assert spec.output_dim == V and spec.embed_vocab == V and spec.latent_dim == D
  assert spec.gamma_range == (p.gamma_min, p.gamma_max)
  with pytest.raises(ValueError, match="embed_norm"):
    GaussianVLBProcess(vocab_size=V, embed_norm="bad")


def test_vp_marginal_moments():
  p = GaussianVLBProcess(vocab_size=V, latent_dim=D)
  x0 = jnp.broadcast_to(jnp.array([1.0, -2.0, 0.5, 0.0]), (B, 16, D))
  t = 0.6
  z = p.corrupt(jax.random.key(0), x0, jnp.full((B,), t))
  alpha, sigma = alpha_sigma(p.gamma(t))
  np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-6)
  n = B * 16
  mean, var = z.reshape(n, D).mean(0), z.reshape(n, D).var(0)
  np.testing.assert_allclose(mean, alpha * x0[0, 0],
                             atol=4 * sigma / math.sqrt(n))
  np.testing.assert_allclose(var, sigma ** 2, rtol=0.15)


def test_reverse_step_is_the_gaussian_posterior():
  """With x0-hat exact (one-token data) a step samples q(z_s | z_t, x)."""
  p = GaussianVLBProcess(vocab_size=V, latent_dim=D, self_conditioning=False)
  onehot = jnp.log(jnp.array([1.0, 1e-30, 1e-30]))
  den = constant_logits(onehot, embed=_embed)
  x = p.embeddings(den)[0]
  t, s = 0.55, 0.5
  z_t = jnp.broadcast_to(jnp.array([0.3, -0.2, 0.1, 0.7]), (B, 16, D))
  z_s = p.reverse_step(jax.random.key(1), den, z_t, t, s)
  (a_t, s_t), (a_s, s_s) = alpha_sigma(p.gamma(t)), alpha_sigma(p.gamma(s))
  a_ts, var_ts = a_t / a_s, s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2
  mean = a_ts * s_s ** 2 / s_t ** 2 * z_t[0, 0] + a_s * var_ts / s_t ** 2 * x
  var = var_ts * s_s ** 2 / s_t ** 2
  n = B * 16
  np.testing.assert_allclose(z_s.reshape(n, D).mean(0), mean,
                             atol=4 * math.sqrt(var / n))
  np.testing.assert_allclose(z_s.reshape(n, D).var(0), var, rtol=0.15)
  z_0 = p.reverse_step(jax.random.key(2), den, z_t, t, 0.0)
  assert float(jnp.std(z_0[:, :, 0])) < 1e-6  # s == 0: the mean, no noise


def test_bound_is_zero_for_deterministic_data():
  """Entropy-0 data, exact x0-hat and separated embeddings: bound ~ 0."""
  p = GaussianVLBProcess(vocab_size=V, latent_dim=D, gamma_max=10.0)
  den = _oracle(p, pi=np.array([1.0, 1e-30, 1e-30]))
  tokens, mask = jnp.zeros((B, L), jnp.int32), jnp.ones((B, L))
  bound = _nll(p, jax.random.key(0), den, tokens, mask)
  assert float(jnp.max(jnp.abs(bound.terms["diffusion"]))) < 1e-4
  assert float(jnp.max(bound.terms["reconstruction"])) < 1e-4
  # Prior KL for unit-norm embeddings, closed form.
  a1_sq = jax.nn.sigmoid(-10.0)
  s1_sq = jax.nn.sigmoid(10.0)
  kl = 0.5 * (a1_sq + D * (s1_sq - 1.0 - jnp.log(s1_sq)))
  np.testing.assert_allclose(bound.terms["prior"], L * kl, rtol=1e-2)
  assert float(jnp.max(bound.nats)) < 1e-3


@pytest.mark.parametrize("base_logits", [True, False])
def test_bound_with_oracle_is_at_least_the_entropy(base_logits):
  """i.i.d. data from pi and the exact posterior: E[bound] >= L H(pi), and
  the gap is small (the continuous-time VLB is tight up to the endpoints)."""
  p = GaussianVLBProcess(vocab_size=V, latent_dim=D, base_logits=base_logits)
  den = _oracle(p)
  tokens = _iid_tokens(jax.random.key(3))
  means = _batch_means(p, den, jax.random.key(4), tokens, jnp.ones((B, L)))
  mean, sem = float(means.mean()), float(means.std() / math.sqrt(means.size))
  # Given the drawn tokens, -log p(tokens) = sum of -log pi(w); the prior
  # term (~0.03 nats per sequence) is the only gap the endpoints leave.
  nll = float(-jnp.log(jnp.asarray(PI))[tokens].sum(-1).mean())
  assert sem < 0.1
  assert mean >= nll - 3.5 * sem, (mean, nll, sem)
  assert mean <= nll + 3.5 * sem + 0.05, (mean, nll, sem)
  assert abs(nll - L * ENTROPY) < 0.2 * L


@pytest.mark.parametrize("embed_norm", ["unit", "none"])
def test_base_logits_give_the_bayes_posterior(embed_norm):
  """Network log pi + the process's Gaussian logits = the brute-force
  posterior log pi(w) - ||z - alpha e_w||^2 / (2 sigma^2): same bound.
  With unit rows the ||e_w||^2 term is the same for every w; "none" keeps
  the table's own norms, so it is checked too."""
  with_base = GaussianVLBProcess(vocab_size=V, latent_dim=D,
                                 embed_norm=embed_norm)
  brute = dataclasses.replace(with_base, base_logits=False)
  tokens, mask = _iid_tokens(jax.random.key(21)), jnp.ones((B, L))
  k = jax.random.key(22)
  np.testing.assert_allclose(
      _nll(with_base, k, _oracle(with_base), tokens, mask).nats,
      _nll(brute, k, _oracle(brute), tokens, mask).nats, rtol=1e-4, atol=1e-3)


def test_learned_schedule_matches_fixed_line_and_is_invariant():
  fixed = GaussianVLBProcess(vocab_size=V, latent_dim=D)
  learned = dataclasses.replace(fixed, learned_schedule=True)
  gmin, gmax = fixed.gamma_min, fixed.gamma_max
  tokens, mask = _iid_tokens(jax.random.key(5)), jnp.ones((B, L))
  oracle = _oracle(fixed)
  line = Denoiser(predict=oracle.predict, embed=_embed,
                  gamma=lambda t: gmin + (gmax - gmin) * t)
  key = jax.random.key(6)
  np.testing.assert_allclose(
      _nll(learned, key, line, tokens, mask).nats,
      _nll(fixed, key, oracle, tokens, mask).nats, rtol=1e-5, atol=1e-5)
  # Another monotone schedule with the same endpoints: the continuous-time
  # VLB depends only on gamma(0), gamma(1) (VDM eq. 20).
  curved = Denoiser(predict=oracle.predict, embed=_embed,
                    gamma=lambda t: gmin + (gmax - gmin) * t ** 3)
  a = _batch_means(fixed, oracle, key, tokens, mask)
  b = _batch_means(learned, curved, key, tokens, mask)
  sem = float(jnp.sqrt((a.var() + b.var()) / a.size))
  assert abs(float(a.mean() - b.mean())) < 3.5 * sem, (a.mean(), b.mean(), sem)


def test_determinism_and_mask():
  p = GaussianVLBProcess(vocab_size=V, latent_dim=D)
  den = _oracle(p)
  tokens = _iid_tokens(jax.random.key(7))
  mask = (jnp.arange(L) < 5).astype(jnp.float32)[None].repeat(B, 0)
  mask = mask.at[0].set(0.0)
  k = jax.random.key(8)
  b1 = _nll(p, k, den, tokens, mask).nats
  np.testing.assert_array_equal(b1, _nll(p, k, den, tokens, mask).nats)
  assert not np.allclose(b1, _nll(p, jax.random.key(9), den, tokens,
                                         mask).nats)
  # Padded positions contribute nothing: change their tokens, same bound.
  other = jnp.where(mask > 0, tokens, (tokens + 1) % V)
  np.testing.assert_allclose(_nll(p, k, den, other, mask).nats, b1,
                             rtol=1e-6)
  assert float(b1[0]) == 0.0


def test_eval_uses_the_two_pass_self_conditioned_prediction():
  """nll_bound with self-conditioning equals a hand-made two-pass network."""
  p_sc = GaussianVLBProcess(vocab_size=V, latent_dim=D, base_logits=False)
  p_plain = dataclasses.replace(p_sc, self_conditioning=False)
  w_DxV = jax.random.normal(jax.random.key(10), (D, V))

  def net(z, t, self_cond=None):
    sc = jnp.zeros_like(z) if self_cond is None else self_cond
    return (z + 3.0 * sc) @ w_DxV + t[:, None, None]

  e_VxD = p_sc.embeddings(Denoiser(predict=None, embed=_embed))

  def two_pass(z, t):
    x0hat = jax.nn.softmax(net(z, t, jnp.zeros_like(z)), -1) @ e_VxD
    return net(z, t, x0hat)

  tokens, mask = _iid_tokens(jax.random.key(11)), jnp.ones((B, L))
  k = jax.random.key(12)
  np.testing.assert_allclose(
      _nll(p_sc, k, Denoiser(predict=net, embed=_embed), tokens, mask).nats,
      _nll(p_plain, k, Denoiser(predict=two_pass, embed=_embed), tokens,
                        mask).nats, rtol=1e-5)


def test_loss_is_the_bound_per_token_and_has_gradients():
  p = GaussianVLBProcess(vocab_size=V, latent_dim=D)
  tokens, mask = _iid_tokens(jax.random.key(13)), jnp.ones((B, L))

  def loss_fn(table, key):
    den = Denoiser(predict=lambda z, t, self_cond=None: z @ table.T,
                   embed=lambda ids: jnp.take(table, ids, axis=0))
    out = p.loss(key, den, tokens, mask)
    return out.loss, out

  grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
  for seed in range(4):  # covers both branches of the self-cond coin
    g, out = grad_fn(TABLE_VxD, jax.random.key(seed))
    total = sum(out.terms.values())
    np.testing.assert_allclose(out.loss, total.sum() / (B * L), rtol=1e-5)
    assert set(out.terms) == {"prior", "diffusion", "reconstruction"}
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0


def test_sampler_reproduces_pi_and_is_deterministic():
  p = GaussianVLBProcess(vocab_size=V, latent_dim=D, num_steps=64)
  sample = sampling.make_sampler(p, B, L)  # carries x0-hat as sampler state
  ids = sample(jax.random.key(14), _oracle(p))
  np.testing.assert_array_equal(ids, sample(jax.random.key(14), _oracle(p)))
  assert ids.dtype == jnp.int32 and ids.min() >= 0 and ids.max() < V
  freq = np.bincount(np.asarray(ids).ravel(), minlength=V) / ids.size
  np.testing.assert_allclose(freq, PI, atol=0.05)


def test_stateful_step_self_conditions_on_the_previous_prediction():
  p = GaussianVLBProcess(vocab_size=V, latent_dim=D, base_logits=False)
  w_DxV = jax.random.normal(jax.random.key(16), (D, V))
  den = Denoiser(predict=lambda z, t, self_cond: (z + 3.0 * self_cond) @ w_DxV,
                 embed=_embed)
  z_t = jax.random.normal(jax.random.key(17), (B, L, D))
  state = jax.random.normal(jax.random.key(18), (B, L, D))
  key = jax.random.key(19)
  z_s, new_state = p.reverse_step_with_state(key, den, z_t, 0.5, 0.4, state)
  e_VxD = p.embeddings(den)
  np.testing.assert_allclose(
      new_state, jax.nn.softmax(den.predict(z_t, None, state), -1) @ e_VxD,
      rtol=1e-5, atol=1e-6)
  zeros = p.init_sampler_state(z_t)
  np.testing.assert_array_equal(zeros, jnp.zeros_like(z_t))
  z_s0, _ = p.reverse_step_with_state(key, den, z_t, 0.5, 0.4, zeros)
  assert not np.allclose(z_s, z_s0)  # the state reaches the network


def test_replacement_conditioning_keeps_fixed_tokens():
  p = GaussianVLBProcess(vocab_size=V, latent_dim=D)
  cond_tokens = jnp.full((L,), 2, jnp.int32)  # the rarest symbol under pi
  cond_mask = jnp.arange(L) % 2 == 0
  ids = sampling.make_sampler(p, B, L, steps=32)(
      jax.random.key(15), _oracle(p), cond_tokens, cond_mask)
  np.testing.assert_array_equal(ids[:, cond_mask], 2)
  # The free positions are still drawn (not copied from the condition).
  assert float(jnp.mean(ids[:, ~cond_mask] == 2)) < 0.5
  # At t = 0 a fixed position is the noise-free alpha_0 e_w.
  z = p.impose(jax.random.key(20), _oracle(p), jnp.zeros((B, L, D)), 0.0,
               jnp.broadcast_to(cond_tokens, (B, L)),
               jnp.broadcast_to(cond_mask, (B, L)))
  alpha0 = alpha_sigma(p.gamma(0.0))[0]
  np.testing.assert_allclose(z[:, 0], alpha0 * p.embeddings(_oracle(p))[2]
                             * jnp.ones((B, 1)), rtol=1e-6)
  np.testing.assert_array_equal(z[:, 1], 0.0)


def test_sampling_temperature_divides_the_predicted_noise():
  """PLAID's score temperature: eps-hat / tau, x0 re-derived from it, so the
  step mean moves by -c alpha_s / alpha_t (z_t - alpha_t x0-hat)(1/tau - 1)."""
  p = GaussianVLBProcess(vocab_size=V, latent_dim=D)
  den = _oracle(p)
  z_t = jax.random.normal(jax.random.key(21), (2, L, D))
  state = p.init_sampler_state(z_t)
  key, t, s, tau = jax.random.key(22), 0.6, 0.5, 0.5
  z_1, x0hat = p.reverse_step_with_state(key, den, z_t, t, s, state)
  z_tau, _ = p.reverse_step_with_state(key, den, z_t, t, s, state,
                                       SamplingOptions(temperature=tau))
  gamma_t, gamma_s = p.gamma(jnp.array([t, s]))
  alpha_t, alpha_s = alpha_sigma(gamma_t)[0], alpha_sigma(gamma_s)[0]
  c = -jnp.expm1(gamma_s - gamma_t)
  expected = -c * alpha_s / alpha_t * (z_t - alpha_t * x0hat) * (1 / tau - 1)
  np.testing.assert_allclose(z_tau - z_1, expected, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="top_p"):
    p.sampler(SamplingOptions(top_p=0.9))


@pytest.mark.parametrize("gamma_min", [-13.3, -2.0])
def test_reconstruction_term_is_accurate_and_nonnegative(gamma_min):
  """The compiled bound's reconstruction term, -log p(w | z_0) summed per
  sequence, equals a float64 evaluation of VDM's decoder on the same z_0
  draw and is never negative (real backbone, its learned table). At the
  default gamma_min = -13.3 the decoder's logits are ~1e5, where logsumexp
  minus the target logit in float32 came out ~0.05 nats off either way
  (negative terms); the process works from logit differences instead
  (`decoder_nll`)."""
  from flax import nnx
  from diffusion_text import config as config_lib
  from diffusion_text.models import as_denoiser, build_model
  vocab, length = 12, 16
  p = GaussianVLBProcess(vocab_size=vocab, latent_dim=8, gamma_min=gamma_min)
  cfg = config_lib.load_preset("synthetic_gaussian_vlb").model
  graphdef, params = nnx.split(build_model(p.model_spec, cfg, seed=0))
  tokens = jax.random.randint(jax.random.key(0), (4, length), 0, vocab)
  mask, key = jnp.ones((4, length)), jax.random.key(1)
  got = np.asarray(jax.jit(lambda params: p.nll_bound(
      key, as_denoiser(nnx.merge(graphdef, params)), tokens,
      mask).terms["reconstruction"])(params))

  rec_key = jax.random.split(key, 4)[2]  # as `_terms` splits its key
  e = np.asarray(p.embeddings(as_denoiser(nnx.merge(graphdef, params))),
                 np.float64)
  gamma0 = float(p.gamma(jnp.array(0.0)))
  eps = np.asarray(jax.random.normal(rec_key, (4, length, 8)), np.float64)
  y = e[np.asarray(tokens)] + np.exp(0.5 * gamma0) * eps
  logits = -0.5 * np.exp(-gamma0) * np.sum((y[..., None, :] - e) ** 2, -1)
  top = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  want = (lse - np.take_along_axis(logits, np.asarray(tokens)[..., None],
                                   -1)[..., 0]).sum(-1)
  assert np.all(got >= 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  if gamma_min > -5:  # a soft decoder: non-trivial values are covered too
    assert want.mean() > 0.1

  # The gradient too: through `_reconstruction` (at -13.3 every position is
  # resolved, the decoder skipped and the term exactly 0) as by autodiff of
  # `decoder_nll` at every position.
  def rec(params, skip):
    den = as_denoiser(nnx.merge(graphdef, params))
    e_VxD, gamma0 = p.embeddings(den), p.gamma(jnp.array(0.0), den)
    z0 = alpha_sigma(gamma0)[0] * (jnp.take(e_VxD, tokens, axis=0)
                                   + jnp.exp(0.5 * gamma0) * eps)
    fn = p._reconstruction if skip else p.decoder_nll
    return jnp.sum(fn(z0, tokens, e_VxD, gamma0))

  eps = jnp.asarray(eps, jnp.float32)
  (v0, g0), (v1, g1) = (jax.jit(jax.value_and_grad(rec), static_argnums=1)(
      params, skip) for skip in (False, True))
  np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v1, want.sum(), rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6), g0, g1)
  if gamma_min < -5:
    assert float(v1) == 0.0


def test_reconstruction_skips_the_decoder_only_when_every_position_is_resolved():
  """`_reconstruction` with one position far out along its token's
  embedding (every other logit > RESOLVED_GAP below: exactly 0 in float32)
  and one halfway between two embeddings (-log p ~ log 2): both values and
  the gradients in z_0 and the table equal autodiff of `decoder_nll`, so
  a resolved position never zeroes an unresolved one; all resolved: 0."""
  p = GaussianVLBProcess(vocab_size=12, latent_dim=8)
  e_VxD = jax.random.normal(jax.random.key(0), (12, 8))
  e_VxD = e_VxD / jnp.linalg.norm(e_VxD, axis=-1, keepdims=True)
  gamma0 = jnp.float32(-2.0)
  alpha0 = alpha_sigma(gamma0)[0]
  tokens = jnp.array([[3, 5]])
  far = 60.0 * e_VxD[3]
  z0 = alpha0 * jnp.stack([far, 0.5 * (e_VxD[5] + e_VxD[7])])[None]

  def grads(fn, z0):
    return jax.jit(jax.value_and_grad(
        lambda z, e: jnp.sum(fn(z, tokens, e, gamma0) * jnp.array([1.0, 2.0])),
        argnums=(0, 1)))(z0, e_VxD)

  terms = jax.jit(p._reconstruction)(z0, tokens, e_VxD, gamma0)
  assert float(terms[0, 0]) == 0.0 and 0.3 < float(terms[0, 1]) < 3.0
  (v0, g0), (v1, g1) = grads(p.decoder_nll, z0), grads(p._reconstruction, z0)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(g0, g1):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  resolved = z0.at[0, 1].set(alpha0 * 60.0 * e_VxD[5])
  v, g = grads(p._reconstruction, resolved)
  assert float(v) == 0.0 and all(float(jnp.abs(x).max()) == 0.0 for x in g)

