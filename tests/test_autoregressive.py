"""Tests for the autoregressive baseline (processes/autoregressive.py)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_text.config import ModelConfig
from diffusion_text.models import as_denoiser, build_model
from diffusion_text.processes import SamplingOptions, make_process
from diffusion_text.processes.base import Denoiser
from tests.helpers import constant_logits

V, L = 5, 6
# Chi-square 99.9% quantiles by degrees of freedom (a 1-in-1000 false alarm).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def markov_chain(seed=0):
  """Initial distribution pi [V] and transition matrix P [V, V]."""
  rng = np.random.default_rng(seed)
  pi = rng.dirichlet(np.ones(V))
  trans = rng.dirichlet(np.ones(V), size=V)
  return pi, trans


def chain_denoiser(pi, trans):
  """predict(inputs) = log p(next | previous input); BOS (id V) -> pi."""
  table = jnp.log(jnp.asarray(np.concatenate([trans, pi[None]]), jnp.float32))

  def predict(x_BxL, t_B, self_cond=None):
    del t_B, self_cond
    return table[x_BxL]

  return Denoiser(predict=predict)


def exact_nll(pi, trans, tokens, lengths):
  """-log p(x_0 .. x_{n-1}) under the chain, by hand."""
  out = []
  for row, n in zip(np.asarray(tokens), lengths):
    nll = -np.log(pi[row[0]])
    for prev, cur in zip(row[:n - 1], row[1:n]):
      nll -= np.log(trans[prev, cur])
    out.append(nll)
  return np.array(out)


def run_sampler(process, denoiser, key, num, length, cond_tokens=None,
                cond_mask=None, options=SamplingOptions()):
  """prior -> impose -> [reverse_step -> impose] over the time grid."""
  steps = process.num_sampling_steps(None, length)
  grid_T = process.time_grid(steps, length)
  prior_key, step_key = jax.random.split(key)

  def impose(x, t):
    if cond_tokens is None:
      return x
    return process.impose(None, denoiser, x, t, cond_tokens, cond_mask)

  def body(i, x):
    x = process.reverse_step(jax.random.fold_in(step_key, i), denoiser, x,
                             grid_T[i], grid_T[i + 1], options)
    return impose(x, grid_T[i + 1])

  x = impose(process.prior(prior_key, (num, length)), grid_T[0])
  x = jax.lax.fori_loop(0, steps, body, x)
  return process.decode(denoiser, x)


def chi_square(samples, probs):
  counts = np.bincount(np.asarray(samples).ravel(), minlength=len(probs))
  keep = probs > 0
  assert counts[~keep].sum() == 0, "sampled a class of probability zero"
  expected = counts.sum() * probs[keep]
  return np.sum((counts[keep] - expected) ** 2 / expected), keep.sum() - 1


def test_spec_and_time_interface():
  ar = make_process("ar", vocab_size=V)
  spec = ar.model_spec
  assert (spec.input_vocab, spec.output_dim, spec.causal) == (V + 1, V, True)
  assert ar.num_sampling_steps(3, L) == L
  grid = ar.time_grid(ar.num_sampling_steps(None, L), L)
  assert grid.shape == (L + 1,) and grid[0] == 1.0 and grid[-1] == 0.0
  np.testing.assert_array_equal(ar.sample_time(jax.random.key(0), 3), 0.0)
  x = jnp.arange(2 * L).reshape(2, L) % V
  np.testing.assert_array_equal(
      ar.corrupt(None, x, None),
      np.concatenate([np.full((2, 1), V), x[:, :-1]], axis=1))


def test_nll_bound_is_exact_chain_nll():
  pi, trans = markov_chain()
  ar = make_process("ar", vocab_size=V)
  tokens = jax.random.randint(jax.random.key(0), (4, L), 0, V)
  mask = jnp.ones((4, L), jnp.int32)
  bound = ar.nll_bound(jax.random.key(1), chain_denoiser(pi, trans), tokens,
                       mask)
  assert set(bound.terms) == {"nll"}
  expected = exact_nll(pi, trans, tokens, [L] * 4)
  np.testing.assert_allclose(bound.nats, expected, rtol=1e-5)
  np.testing.assert_allclose(bound.terms["nll"], expected, rtol=1e-5)

  out = ar.loss(jax.random.key(1), chain_denoiser(pi, trans), tokens, mask)
  np.testing.assert_allclose(out.loss, expected.sum() / (4 * L), rtol=1e-5)
  np.testing.assert_allclose(out.metrics["nll_bound"], out.loss, rtol=1e-6)
  np.testing.assert_allclose(out.terms["nll"], expected, rtol=1e-5)


def test_bound_respects_mask():
  pi, trans = markov_chain(1)
  ar = make_process("ar", vocab_size=V)
  denoiser = chain_denoiser(pi, trans)
  lengths = [L, 4, 1]
  tokens = jax.random.randint(jax.random.key(2), (3, L), 0, V)
  mask = (jnp.arange(L)[None] < jnp.array(lengths)[:, None]).astype(jnp.int32)
  bound = ar.nll_bound(None, denoiser, tokens, mask)
  np.testing.assert_allclose(bound.nats, exact_nll(pi, trans, tokens, lengths),
                             rtol=1e-5)
  # Whatever sits in the padding changes nothing.
  other = jnp.where(mask.astype(bool), tokens, (tokens + 1) % V)
  np.testing.assert_allclose(ar.nll_bound(None, denoiser, other, mask).nats,
                             bound.nats, rtol=1e-6)
  out = ar.loss(None, denoiser, tokens, mask)
  np.testing.assert_allclose(out.loss, bound.nats.sum() / sum(lengths),
                             rtol=1e-5)


def test_reverse_step_fills_one_position():
  ar = make_process("ar", vocab_size=V)
  denoiser = constant_logits(jnp.where(jnp.arange(V) == 3, 0.0, -1e9))
  grid = ar.time_grid(L, L)
  x = ar.prior(None, (2, L))
  for i in (0, 2, L - 1):
    out = ar.reverse_step(jax.random.key(i), denoiser, x, grid[i], grid[i + 1])
    np.testing.assert_array_equal(out, jnp.where(jnp.arange(L) == i, 3, x))


def test_sampling_deterministic_and_in_range():
  pi, trans = markov_chain(2)
  ar = make_process("ar", vocab_size=V)
  denoiser = chain_denoiser(pi, trans)
  a = run_sampler(ar, denoiser, jax.random.key(0), 8, L)
  b = run_sampler(ar, denoiser, jax.random.key(0), 8, L)
  c = run_sampler(ar, denoiser, jax.random.key(1), 8, L)
  assert a.shape == (8, L) and a.dtype == jnp.int32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert np.all((np.asarray(a) >= 0) & (np.asarray(a) < V))


def test_prefix_clamping_conditions_the_continuation():
  # A near-deterministic chain: next = prev + 1 (mod V).
  pi = np.full(V, 1.0 / V)
  trans = np.full((V, V), 1e-6) + np.roll(np.eye(V), 1, axis=1)
  trans /= trans.sum(-1, keepdims=True)
  ar = make_process("ar", vocab_size=V)
  cond_tokens = jnp.array([4, 1, 3, 0, 0, 0], jnp.int32)
  cond_mask = jnp.arange(L) < 3
  x = run_sampler(ar, chain_denoiser(pi, trans), jax.random.key(0), 16, L,
                  cond_tokens, cond_mask)
  np.testing.assert_array_equal(x[:, :3], np.broadcast_to([4, 1, 3], (16, 3)))
  np.testing.assert_array_equal(x[:, 3:], np.broadcast_to([4, 0, 1], (16, 3)))


@pytest.mark.parametrize("options,target", [
    ({}, [0.4, 0.3, 0.2, 0.1, 0.0]),
    ({"temperature": 0.5}, np.array([16, 9, 4, 1, 0]) / 30.0),
    ({"top_p": 0.6}, [4 / 7, 3 / 7, 0.0, 0.0, 0.0]),
])
def test_sample_frequencies_match(options, target):
  probs = np.array([0.4, 0.3, 0.2, 0.1, 0.0])
  ar = make_process("ar", vocab_size=V)
  with np.errstate(divide="ignore"):
    denoiser = constant_logits(np.log(probs))
  x = run_sampler(ar, denoiser, jax.random.key(3), 64, 16,
                  options=SamplingOptions(**options))
  stat, dof = chi_square(x, np.asarray(target))
  assert stat < CHI2_999[dof], (stat, np.bincount(np.ravel(x), minlength=V))


def test_greedy_temperature_zero():
  ar = make_process("ar", vocab_size=V)
  x = run_sampler(ar, constant_logits([0.0, 1.0, 3.0, 2.0, -1.0]),
                  jax.random.key(0), 4, L,
                  options=SamplingOptions(temperature=0.0))
  np.testing.assert_array_equal(x, 2)


def test_real_backbone_nll_is_causal():
  ar = make_process("ar", vocab_size=V)
  cfg = ModelConfig(num_layers=2, d_model=32, num_heads=2, mlp_ratio=2,
                    cond_dim=16)
  model = build_model(ar.model_spec, cfg, seed=0)
  graphdef, params = nnx.split(model)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [
      x + 0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])

  @jax.jit
  def token_nll_and_bound(params, tokens, mask):
    denoiser = as_denoiser(nnx.merge(graphdef, params))
    return (ar.token_nll(denoiser, tokens),
            ar.nll_bound(None, denoiser, tokens, mask).nats)

  tokens = jax.random.randint(jax.random.key(2), (2, L), 0, V)
  cut = 2  # change every token after position `cut`
  changed = tokens.at[:, cut + 1:].set((tokens[:, cut + 1:] + 1) % V)
  mask = jnp.broadcast_to(jnp.arange(L) <= cut, (2, L)).astype(jnp.int32)
  a, bound_a = token_nll_and_bound(params, tokens, mask)
  b, bound_b = token_nll_and_bound(params, changed, mask)
  np.testing.assert_allclose(a[:, :cut + 1], b[:, :cut + 1], rtol=1e-5,
                             atol=1e-6)
  assert np.abs(a[:, cut + 1:] - b[:, cut + 1:]).min() > 0
  # Hence the bound over the first cut + 1 tokens ignores the rest too.
  np.testing.assert_allclose(bound_a, bound_b, rtol=1e-5)
