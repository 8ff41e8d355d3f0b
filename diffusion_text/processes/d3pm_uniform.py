"""D3PM on the uniform graph (see categorical.py for the process, its bound
and loss): Q_t = (1 - b_t) I + b_t / V 11^T, prior Uniform(V).
"""

from __future__ import annotations

import dataclasses

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
    # q(x_s = j | x_t = k, x0) ∝ (c1 + r [j=k]) (c2 + a_s [j=x0]) and
    # p(x_s = j | x_t = k) ∝ (c1 + r [j=k]) M_j, M_j = a_s p~_j + c2, so
    # log(q_j / p_j) = log(Zp / Zq) - log(M_j / c2) + [j=x0] log(1 + a_s/c2):
    # one O(V) reduction, sum_j q_j softplus(log(a_s p~_j / c2)), no V-sized
    # log-probabilities kept; softplus(log(a_s p~_j / c2)) is computed as
    # log1p(a_s p~_j / c2) from the softmax the logsumexp's exponentials
    # give (one transcendental per entry instead of two).
    v = self.vocab_size
    r = self._keep_ratio(a_s, a_t)
    c1 = jnp.maximum((1.0 - r) / v, _TINY)
    c2 = jnp.maximum((1.0 - a_s) / v, _TINY)
    same = (x_t == x0).astype(jnp.float32)
    logp_k = _take(logits_BxLxV, x_t) - lse_BxL
    logp_x = _take(logits_BxLxV, x0) - lse_BxL
    log_ratio = jnp.log(jnp.maximum(a_s, _TINY)) - jnp.log(c2)
    ratio = jnp.maximum(a_s, _TINY) / c2
    sp_sum = jnp.sum(jnp.log1p(ratio[..., None] * probs_BxLxV), axis=-1)
    sp_k = jax.nn.softplus(log_ratio + logp_k)
    sp_x = jax.nn.softplus(log_ratio + logp_x)
    z_q = v * c1 * c2 + r * c2 + a_s * c1 + same * r * a_s
    z_p = c1 + r * (a_s * jnp.exp(logp_k) + c2)
    mean_sp = (c1 * c2 * sp_sum + r * c2 * sp_k
               + (c1 + same * r) * a_s * sp_x) / z_q
    q_x = (c1 + same * r) * (c2 + a_s) / z_q
    kl = (jnp.log(z_p) - jnp.log(z_q) - mean_sp
          + q_x * jax.nn.softplus(log_ratio))
    # s = 0: -log p(x0 | x_t), p(j | k) = (c1 + r [j=k]) p~_j / (c1 + r p~_k).
    nll0 = (jnp.logaddexp(jnp.log(c1), jnp.log(jnp.maximum(r, _TINY)) + logp_k)
            - jnp.log(c1 + r * same) - logp_x)
    return jnp.where(a_s >= 1.0, nll0, jnp.maximum(kl, 0.0))

  def _ce_positions(self, x_t):
    return jnp.ones(x_t.shape, bool)

  def _position_terms(self, denoiser, x_t, t_B, x0, a_s, a_t, weights):
    # Every position needs O(V) sums of its logits: a chunk of positions at
    # a time (base.map_logits), never [B, L, V] log-probabilities.
    def terms(logits_NxV, rows):
      x_t_N, x0_N, a_s_N, a_t_N = rows
      lse_N, probs_NxV = _lse_and_probs(logits_NxV)
      return (self._step_term(logits_NxV, lse_N, probs_NxV, x_t_N, x0_N,
                              a_s_N, a_t_N),
              lse_N - _take(logits_NxV, x0_N))

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
