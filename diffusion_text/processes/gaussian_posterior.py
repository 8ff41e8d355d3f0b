"""The base-measure posterior mean of the discrete-time Gaussian process
(gaussian.py, `base_eps`): x0_base = q(w | x_t) @ E under a uniform token
prior, computed a chunk of positions at a time, with an exact shortcut once
the tokens are resolved.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_text.contract import map_rows

Array = jax.Array

# A softmax entry this far below the top logit is exp(-120) ~ 8e-53: exactly
# 0 in float32 (the smallest subnormal is 1.4e-45).
_RESOLVED_GAP = 120.0


def posterior_mean(base_logits: Callable, x_t: Array, t_B: Array,
                   table_VxD: Array, resolved: bool = False) -> Array:
  """x0_base = q(. | x_t) @ E [B, L, D], a chunk of positions at a time
  (no [B, L, V] softmax in either pass).

  `resolved=True` (x_1 in the loss): first check, without gradient,
  whether at every position the top base logit leads the next by more
  than _RESOLVED_GAP, where float32 rounds every other softmax entry to
  exactly 0; then q(. | x_t) is exactly one-hot, its softmax gradient
  exactly 0, and x0_base = E[argmax], the same numbers without the
  V-way softmax. Otherwise the full softmax, as always.
  """
  positions = lambda x: x.reshape(-1, 1, x.shape[-1])
  rows = (positions(x_t), jnp.broadcast_to(t_B[:, None],
                                           x_t.shape[:2]).reshape(-1))

  def softmax_mean(rows):
    x_Nx1xD, t_N = rows
    probs_Nx1xV = jax.nn.softmax(
        base_logits(x_Nx1xD, t_N, table_VxD), -1)
    return jnp.einsum("blv,vd->bld", probs_Nx1xV, table_VxD)

  dense = lambda: map_rows(softmax_mean, rows).reshape(x_t.shape)
  if not resolved:
    return dense()

  def lead(rows):  # (top logit - runner-up, argmax) per position
    logits_NxV = base_logits(*rows, jax.lax.stop_gradient(table_VxD))[:, 0]
    best_N = jnp.argmax(logits_NxV, -1)
    top_N = jnp.max(logits_NxV, -1)
    others_NxV = jnp.where(jnp.arange(logits_NxV.shape[-1]) == best_N[:, None],
                           -jnp.inf, logits_NxV)
    return top_N - jnp.max(others_NxV, -1), best_N

  gap_N, best_N = map_rows(lead, jax.lax.stop_gradient(rows))
  return jax.lax.cond(
      jnp.all(gap_N > _RESOLVED_GAP),
      lambda: jnp.take(table_VxD, best_N, axis=0).reshape(x_t.shape), dense)
