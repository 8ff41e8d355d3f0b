"""Closed-form transition families against dense K x K matrices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_text.processes import transitions

V = 6
FAMILIES = [transitions.Uniform, transitions.Absorbing]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_sum_to_one_and_match_the_definition(family):
  for beta in (0.0, 0.3, 1.0):
    q = np.asarray(family.dense_matrix(beta, V))
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-6)
    assert (q >= 0).all()
  q = np.asarray(family.dense_matrix(0.3, V))
  k = family(V).num_states
  if family is transitions.Uniform:
    expected = 0.7 * np.eye(k) + 0.3 / V
  else:  # every state moves to [MASK] = V with prob beta; [MASK] stays
    expected = 0.7 * np.eye(k)
    expected[:, V] += 0.3
  np.testing.assert_allclose(q, expected, atol=1e-6)


class ClosedFormTest(chex.TestCase):
  """The O(K) closed forms equal products of dense one-step matrices, with
  and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_marginal_is_product_of_steps_and_closed_forms_agree(self):
    for family in FAMILIES:
      fam = family(V)
      k = fam.num_states
      betas = np.random.default_rng(0).uniform(0.05, 0.4, size=5)
      q_bar = np.eye(k)
      for b in betas:
        q_bar = q_bar @ np.asarray(family.dense_matrix(b, V), np.float64)
      r = float(np.prod(1.0 - betas))
      np.testing.assert_allclose(q_bar, family.dense_matrix(1.0 - r, V),
                                 atol=1e-6)
      states = jnp.arange(k)
      # marginal = rows of Q-bar, column = columns of Q-bar, mix = p @ Q-bar.
      marginal = self.variant(fam.marginal)
      column = self.variant(fam.column)
      mix = self.variant(fam.mix)
      np.testing.assert_allclose(marginal(states, r), q_bar, atol=1e-6)
      np.testing.assert_allclose(column(states, r), q_bar.T, atol=1e-6)
      p = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (3, V)))
      np.testing.assert_allclose(mix(p, r), np.asarray(p) @ q_bar[:V],
                                 atol=1e-6)
      np.testing.assert_allclose(self.variant(fam.limit_prob)(states),
                                 fam.limit(), atol=0)


def test_absorbing_base_prior_and_its_kl():
  """p_base keeps a uniform token with probability alpha_1, else [MASK];
  KL(q(x_1 | x0) || p_base) = alpha_1 log V, by brute force."""
  fam = transitions.Absorbing(V)
  np.testing.assert_array_equal(
      fam.base_prior(jax.random.PRNGKey(0), (3, 4), 0.0), V)
  a1, n = 0.3, 30000
  x = np.asarray(fam.base_prior(jax.random.PRNGKey(1), (n,), a1))
  freq = np.bincount(x, minlength=V + 1) / n
  p_base = np.append(np.full(V, a1 / V), 1 - a1)
  assert (np.abs(freq - p_base) <= 4.5 * np.sqrt(p_base / n)).all()
  q = np.asarray(fam.marginal(jnp.array(2), a1))
  kl = float(np.sum(q[q > 0] * np.log(q[q > 0] / p_base[q > 0])))
  np.testing.assert_allclose(fam.base_prior_kl(a1), kl, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_frequencies_match_marginal(family):
  fam = family(V)
  n, r = 20000, 0.35
  x0 = jnp.full((n,), 2, jnp.int32)
  xt = fam.sample(jax.random.PRNGKey(0), x0, r)
  freq = np.bincount(np.asarray(xt), minlength=fam.num_states) / n
  expected = np.asarray(fam.marginal(x0[:1], r))[0]
  tol = 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-9
  assert (np.abs(freq - expected) <= tol).all(), (freq, expected)
  # Per-position keep probabilities broadcast ([B, 1] against [B, L]).
  xt = fam.sample(jax.random.PRNGKey(1), jnp.zeros((2, 500), jnp.int32),
                  jnp.array([[1.0], [0.0]]))
  assert (xt[0] == 0).all()
  if family is transitions.Absorbing:
    assert (xt[1] == V).all()
