"""D3PM on the uniform graph (see categorical.py for the process, its bound
and loss): Q_t = (1 - b_t) I + b_t / V 11^T, prior Uniform(V).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from diffusion_text import contract
from diffusion_text.processes import transitions
from diffusion_text.processes.base import map_logits
from diffusion_text.processes.categorical import (_TINY, D3PM, _draw_where,
                                                  _lse_and_probs, _take)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class D3PMUniform(D3PM):
  """Q_t = (1 - b_t) I + b_t / V 11^T; prior Uniform(V)."""

  IMPOSE_DRAWS = True  # conditioning draws q(x_t | x0), not the clean token

  @property
  def transition(self) -> transitions.Uniform:
    return transitions.Uniform(self.vocab_size)

  def _step_term(self, logits_BxLxV, lse_BxL, probs_BxLxV, x_t, x0, a_s,
                 a_t):
    return _step_parts(self.vocab_size, logits_BxLxV, lse_BxL, probs_BxLxV,
                       x_t, x0, a_s, a_t).value

  def _ce_positions(self, x_t):
    return jnp.ones(x_t.shape, bool)

  def _position_terms(self, denoiser, x_t, t_B, x0, a_s, a_t, weights):
    # Every position needs O(V) sums of its logits: a chunk of positions at
    # a time (base.map_logits), never [B, L, V] log-probabilities; the
    # gradient with respect to the logits in closed form (`_chunk_terms`).
    def terms(logits_NxV, rows):
      return _chunk_terms(self.vocab_size, logits_NxV, *rows)

    rows = (x_t, x0, jnp.broadcast_to(a_s, x_t.shape),
            jnp.broadcast_to(a_t, x_t.shape))
    return map_logits(denoiser, x_t, t_B, terms, rows, weights=weights,
                      chunk=contract.LIGHT_ROW_CHUNK)

  def _prior_kl(self, a_T):
    v = self.vocab_size
    c = (1.0 - a_T) / v
    return xlogy(a_T + c, v * (a_T + c)) + (v - 1) * xlogy(c, v * c)

  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    return jax.random.randint(key, shape, 0, self.vocab_size, jnp.int32)

  def _reverse_sample(self, key, logits_BxLxV, x_t, a_s, a_t, at_zero,
                      float64):
    # p(x_s | x_t = k) is a mixture: keep k (weight r M_k), a draw from p~
    # (c1 a_s) or a uniform token (c1 (1 - a_s)), all over Z = c1 + r M_k.
    v = self.vocab_size
    r = self._keep_ratio(a_s, a_t)
    c1 = (1.0 - r) / v
    p_k = _take(jax.nn.softmax(logits_BxLxV, axis=-1), x_t)
    keep_w = r * (a_s * p_k + (1.0 - a_s) / v)
    z = c1 + keep_w
    choice_key, model_key, noise_key = jax.random.split(key, 3)
    u_choice = jax.random.uniform(choice_key, x_t.shape) * z
    keep = u_choice < keep_w
    # At s = 0 (a_s = 1) the uniform component has weight 0; `at_zero` only
    # guards against u_choice rounding up to z.
    model = ~keep & ((u_choice < keep_w + c1 * a_s) | at_zero)
    # p~ is drawn only where it is chosen (a few positions per step).
    from_model = _draw_where(model_key, logits_BxLxV, model, float64)
    from_uniform = jax.random.randint(noise_key, x_t.shape, 0, v, jnp.int32)
    x_s = jnp.where(keep, x_t, jnp.where(model, from_model, from_uniform))
    return x_s.astype(x_t.dtype)


class _StepParts(NamedTuple):
  """L(s, t) per position and the per-row coefficients of its gradient
  with respect to the logits l (see `_step_parts`)."""

  value: Array
  g: Array  # coefficient of g_j = u p_j / (1 + u p_j)
  p: Array  # coefficient of p_j
  k: Array  # added at j = x_t
  x: Array  # added at j = x0


def _step_parts(v, logits, lse, probs, x_t, x0, a_s, a_t) -> _StepParts:
  """KL(q(x_s | x_t, x0) || p(x_s | x_t)) per position (-log p(x0 | x_t) at
  s = 0, a_s = 1) and its gradient in the logits, d L / d l_j =
  g g_j + p p_j + k [j = x_t] + x [j = x0].

  q(x_s = j | x_t = k, x0) ∝ (c1 + r [j=k]) (c2 + a_s [j=x0]) and
  p(x_s = j | x_t = k) ∝ (c1 + r [j=k]) M_j, M_j = a_s p~_j + c2, so
  log(q_j / p_j) = log(Zp / Zq) - log(M_j / c2) + [j=x0] log(1 + a_s/c2):
  one O(V) reduction, sum_j q_j softplus(log(u p~_j)) with u = a_s / c2, no
  V-sized log-probabilities kept; softplus(log(u p~_j)) is computed as
  log1p(u p~_j) from the softmax the logsumexp's exponentials give (one
  transcendental per entry instead of two). With d p~_i / d l_j =
  p~_i ([i=j] - p~_j), d sum_i log1p(u p~_i) / d l_j = g_j - p~_j sum_i g_i
  and d softplus(log u + log p~_k) / d l_j = sigmoid(.) ([j=k] - p~_j).
  """
  r = jnp.clip(a_t / jnp.maximum(a_s, _TINY), 0.0, 1.0)  # D3PM._keep_ratio
  c1 = jnp.maximum((1.0 - r) / v, _TINY)
  c2 = jnp.maximum((1.0 - a_s) / v, _TINY)
  same = (x_t == x0).astype(jnp.float32)
  logp_k = _take(logits, x_t) - lse
  logp_x = _take(logits, x0) - lse
  log_ratio = jnp.log(jnp.maximum(a_s, _TINY)) - jnp.log(c2)
  ratio = jnp.maximum(a_s, _TINY) / c2
  up = ratio[..., None] * probs
  sp_sum = jnp.sum(jnp.log1p(up), axis=-1)
  g_sum = jnp.sum(up / (1.0 + up), axis=-1)
  sp_k = jax.nn.softplus(log_ratio + logp_k)
  sp_x = jax.nn.softplus(log_ratio + logp_x)
  sig_k = jax.nn.sigmoid(log_ratio + logp_k)
  sig_x = jax.nn.sigmoid(log_ratio + logp_x)
  p_k = jnp.exp(logp_k)
  z_q = v * c1 * c2 + r * c2 + a_s * c1 + same * r * a_s
  z_p = c1 + r * (a_s * p_k + c2)
  w_x = (c1 + same * r) * a_s
  mean_sp = (c1 * c2 * sp_sum + r * c2 * sp_k + w_x * sp_x) / z_q
  q_x = (c1 + same * r) * (c2 + a_s) / z_q
  kl = (jnp.log(z_p) - jnp.log(z_q) - mean_sp
        + q_x * jax.nn.softplus(log_ratio))
  # s = 0: -log p(x0 | x_t), p(j | k) = (c1 + r [j=k]) p~_j / (c1 + r p~_k).
  log_r = jnp.log(jnp.maximum(r, _TINY))
  nll0 = (jnp.logaddexp(jnp.log(c1), log_r + logp_k)
          - jnp.log(c1 + r * same) - logp_x)
  at_zero = a_s >= 1.0
  # d max(kl, 0) / d kl as jax differentiates it (1/2 at a tie).
  live = jnp.where(kl > 0, 1.0, jnp.where(kl == 0, 0.5, 0.0))
  keep_k = r * a_s * p_k / z_p
  kl_p = -keep_k + (c1 * c2 * g_sum + r * c2 * sig_k + w_x * sig_x) / z_q
  kl_k = keep_k - r * c2 * sig_k / z_q
  w0 = jax.nn.sigmoid(log_r + logp_k - jnp.log(c1))  # r p~_k / (c1 + r p~_k)
  return _StepParts(
      value=jnp.where(at_zero, nll0, jnp.maximum(kl, 0.0)),
      g=jnp.where(at_zero, 0.0, -live * c1 * c2 / z_q),
      p=jnp.where(at_zero, 1.0 - w0, live * kl_p),
      k=jnp.where(at_zero, w0, live * kl_k),
      x=jnp.where(at_zero, -1.0, -live * w_x * sig_x / z_q))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_terms(v, logits_NxV, x_t, x0, a_s, a_t):
  """(L(s, t), -log p~(x0 | x_t)) per row of logits [N, V]; its VJP forms
  the logits' gradient in one V-wide pass from `_StepParts` (autodiff of
  the formula wrote six [N, V] temporaries per chunk). The times a_s, a_t
  get no gradient: the schedule is not learned."""
  return _chunk_terms_fwd(v, logits_NxV, x_t, x0, a_s, a_t)[0]


def _chunk_terms_fwd(v, logits_NxV, x_t, x0, a_s, a_t):
  lse_N, probs_NxV = _lse_and_probs(logits_NxV)
  parts = _step_parts(v, logits_NxV, lse_N, probs_NxV, x_t, x0, a_s, a_t)
  ce_N = lse_N - _take(logits_NxV, x0)
  ratio = jnp.maximum(a_s, _TINY) / jnp.maximum((1.0 - a_s) / v, _TINY)
  return (parts.value, ce_N), (logits_NxV, lse_N, ratio, parts, x_t, x0,
                               a_s, a_t)


def _chunk_terms_bwd(v, res, cotangents):
  del v
  logits_NxV, lse_N, ratio, parts, x_t, x0, a_s, a_t = res
  d_step, d_ce = cotangents
  probs_NxV = jnp.exp(logits_NxV - lse_N[:, None])
  up = ratio[:, None] * probs_NxV
  d_logits = ((d_step * parts.g)[:, None] * (up / (1.0 + up))
              + (d_step * parts.p + d_ce)[:, None] * probs_NxV)
  rows = jnp.arange(logits_NxV.shape[0])
  d_logits = d_logits.at[rows, x_t].add(d_step * parts.k)
  d_logits = d_logits.at[rows, x0].add(d_step * parts.x - d_ce)
  return (d_logits, None, None, jnp.zeros_like(a_s), jnp.zeros_like(a_t))


_chunk_terms.defvjp(_chunk_terms_fwd, _chunk_terms_bwd)
