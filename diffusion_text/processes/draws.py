"""Categorical draws shared by the token samplers: temperature, top-k and
top-p filtering, and inverse-CDF draws made only where a token changes.

Every draw is a two-level inverse CDF -- a block of 128 classes from the
block masses, then a class within the block -- so no V-long cumsum is built
(XLA's CPU cumsum is quadratic in its length) and no V Gumbels per position.
Precision (`SamplingOptions.float64`, on by default): float32 Gumbel-max or
a float32 inverse CDF over a large vocabulary loses the tail (MDLM sec. 4.2
reports the lowered entropy). float64 draws each level from its own uniform
(float64 arithmetic under `jax_enable_x64`; otherwise 2 x 24 random bits and
the relative float32 error of two short sums); `float64=False` reuses one
float32 uniform for both levels, a plain float32 inverse CDF.

Only positions that change need a draw: `draw_where` gathers those rows (up
to a static capacity, else it falls back to every row), so the V-sized work
per step is the few positions that unmask, not all of them. `stay_or_move`
does the same for a chain whose every position may move: one uniform
decides stay or move from the current state's weight, and only the movers
draw a new state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

BLOCK = 128  # classes per block of the two-level draw


def nucleus(probs_NxV: Array, top_p: float) -> Array:
  """Top-p (Holtzman et al. 2020): zero the tail outside the smallest set
  of classes with mass >= top_p (ties at the threshold are all kept)."""
  sorted_NxV = -jnp.sort(-probs_NxV, axis=-1)
  mass_before = jnp.cumsum(sorted_NxV, axis=-1) - sorted_NxV
  count_N = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1), 1)
  threshold = jnp.take_along_axis(sorted_NxV, count_N[..., None] - 1, -1)
  return jnp.where(probs_NxV >= threshold, probs_NxV, 0.0)


def filtered_probs(logits_NxV: Array, options) -> Array:
  """Unnormalised probabilities after temperature (> 0), top-k and top-p."""
  logits_NxV = logits_NxV.astype(jnp.float32) / options.temperature
  if options.top_k:
    kth_N = jax.lax.top_k(logits_NxV, options.top_k)[0][..., -1:]
    logits_NxV = jnp.where(logits_NxV >= kth_N, logits_NxV, -jnp.inf)
  probs_NxV = jnp.exp(logits_NxV - jnp.max(logits_NxV, -1, keepdims=True))
  if options.top_p < 1.0:
    probs_NxV = nucleus(probs_NxV / probs_NxV.sum(-1, keepdims=True),
                        options.top_p)
  return probs_NxV


def _inverse_cdf(u_N: Array, probs_NxK: Array) -> tuple[Array, Array]:
  """(class, u's position inside it in [0, 1)) for u * total on the CDF;
  never a zero-mass class. K stays short: XLA's CPU cumsum is quadratic."""
  cdf_NxK = jnp.cumsum(probs_NxK, axis=-1)
  target_N = u_N * cdf_NxK[..., -1]
  idx_N = jnp.sum(cdf_NxK <= target_N[..., None], axis=-1)
  # u * total may round up to the total: take the last class with mass.
  last_N = (probs_NxK.shape[-1] - 1
            - jnp.argmax(probs_NxK[..., ::-1] > 0, axis=-1))
  idx_N = jnp.minimum(idx_N, last_N)
  mass_N = jnp.take_along_axis(probs_NxK, idx_N[:, None], -1)[:, 0]
  before_N = jnp.take_along_axis(cdf_NxK, idx_N[:, None], -1)[:, 0] - mass_N
  inside_N = jnp.clip((target_N - before_N) / jnp.maximum(mass_N, 1e-38),
                      0.0, 1.0 - 1e-7)
  return idx_N, inside_N


def categorical(u_Nx2: Array, probs_NxV: Array, float64: bool) -> Array:
  """One draw per row from unnormalised probs, given two uniforms per row.

  Two levels (a block of BLOCK classes, then a class in it). float64: the
  second level gets its own uniform (in float64 under jax_enable_x64);
  otherwise it reuses the first uniform's remainder, a plain float32
  inverse CDF.
  """
  if float64 and jax.config.jax_enable_x64:
    probs_NxV, u_Nx2 = probs_NxV.astype(jnp.float64), u_Nx2.astype(jnp.float64)
  n, v = probs_NxV.shape
  pad = -v % BLOCK
  blocks_NxKxB = jnp.pad(probs_NxV, ((0, 0), (0, pad))).reshape(n, -1, BLOCK)
  block_N, rest_N = _inverse_cdf(u_Nx2[:, 0], blocks_NxKxB.sum(-1))
  in_block_NxB = jnp.take_along_axis(blocks_NxKxB, block_N[:, None, None],
                                     1)[:, 0]
  class_N, _ = _inverse_cdf(u_Nx2[:, 1] if float64 else rest_N, in_block_NxB)
  return (block_N * BLOCK + class_N).astype(jnp.int32)


def draw(key: Array, logits_NxV: Array, options) -> Array:
  """One token per row of logits [N, V] under `options` -> int32 [N]."""
  if options.temperature == 0.0:
    return jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
  u_Nx2 = jax.random.uniform(key, (logits_NxV.shape[0], 2))
  return categorical(u_Nx2, filtered_probs(logits_NxV, options),
                     options.float64)


def _where_rows(rows_fn, where_N: Array, capacity: int, *arrays_N):
  """int32 [N]: rows_fn(*arrays) on the rows `where_N` selects, 0 elsewhere.

  Up to `capacity` rows are gathered and computed alone; more fall back to
  every row. Row-wise functions give the same result either way."""
  n = where_N.shape[0]
  capacity = min(capacity, n)

  def gathered():
    idx_C = jnp.nonzero(where_N, size=capacity, fill_value=n)[0]
    safe_C = jnp.minimum(idx_C, n - 1)
    ids_C = rows_fn(*(a[safe_C] for a in arrays_N))
    return jnp.zeros((n,), jnp.int32).at[idx_C].set(ids_C, mode="drop")

  def everywhere():
    return jnp.where(where_N, rows_fn(*arrays_N), 0)

  if capacity == n:
    return everywhere()
  return jax.lax.cond(jnp.sum(where_N) <= capacity, gathered, everywhere)


def draw_where(key: Array, logits_BxLxV: Array, where_BxL: Array, options,
               capacity: int = 64) -> Array:
  """Tokens int32 [B, L], drawn only where `where_BxL` (elsewhere 0).

  Up to `capacity` positions are gathered and drawn alone; more fall back
  to a draw at every position. The uniforms are per position, so which path
  runs does not change the result.
  """
  b, l, v = logits_BxLxV.shape
  n = b * l

  def rows(u, logits):
    if options.temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return categorical(u, filtered_probs(logits, options), options.float64)

  u_Nx2 = jax.random.uniform(key, (n, 2))
  out_N = _where_rows(rows, where_BxL.reshape(n), capacity, u_Nx2,
                      logits_BxLxV.reshape(n, v))
  return out_N.reshape(b, l)


def stay_or_move(key: Array, weights_BxLxK: Array, current_BxL: Array,
                 float64: bool, capacity: int = 64) -> Array:
  """One draw per position from unnormalised weights over K states, the
  current state included -> int32 [B, L].

  A position stays with probability w[current] / sum(w) (one uniform);
  the others draw from w with the current state removed, which together is
  the draw from w. Only the movers' rows are drawn (`draw_where`'s
  gathering), so a reverse chain that moves a few positions per step pays
  for a few rows, and no K-long cumsum is built anywhere.
  """
  b, l, k = weights_BxLxK.shape
  n = b * l
  stay_key, draw_key = jax.random.split(key)
  total_BxL = jnp.sum(weights_BxLxK, axis=-1)
  current_BxL = current_BxL.astype(jnp.int32)
  stay_BxL = jnp.take_along_axis(weights_BxLxK, current_BxL[..., None],
                                 -1)[..., 0]
  u_BxL = jax.random.uniform(stay_key, (b, l))
  move_BxL = (u_BxL * total_BxL >= stay_BxL) & (stay_BxL < total_BxL)

  def rows(u, weights, current):
    others = jnp.where(jnp.arange(k) == current[:, None], 0.0, weights)
    return categorical(u, others, float64)

  u_Nx2 = jax.random.uniform(draw_key, (n, 2))
  new_N = _where_rows(rows, move_BxL.reshape(n), capacity, u_Nx2,
                      weights_BxLxK.reshape(n, k), current_BxL.reshape(n))
  return jnp.where(move_BxL, new_N.reshape(b, l), current_BxL)
