"""Fused linear head + cross-entropy at selected positions only.

DESIGN.md section 8: the 10k-way output head and its softmax dominate a
train step when run densely. `selected_cross_entropy` computes

  ce[n] = logsumexp(z[n]) - z[n][target[n]]   if where[n],  z = h @ W.T + b
  ce[n] = 0                                    otherwise

without ever holding [N, V] logits: the selected rows are packed to the
front and processed in chunks of `chunk` rows by a loop whose trip count is
the number of selected rows (a dynamic count at static shapes), so an
absorbing process that masks half the tokens pays for half the head. The
backward pass (a custom VJP) recomputes each chunk's logits and forms
softmax - onehot in one fused pass, so no log-probabilities, scattered
one-hots or [N, V] temporaries exist at any point. Given the loss's
per-row `weights`, the forward pass forms the gradient itself from the
logits it has (`models.folded`: the backward then only scales it), which
saves the recomputation.

The kernel W is [V, D], as `layers.OutputHead` stores it: the weight
gradient of a chunk, dlogits^T h, is then formed as [V, D], which XLA:CPU
computes ~1.4x faster than h^T dlogits as [D, V] (5.3 vs 7.7 ms for a
[256, 10000] chunk on 2 cores); the logits and input-gradient matmuls run
at the same speed in either layout.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from diffusion_text.models import folded

Array = jax.Array

# Selected rows per chunk: [256, 10k] float32 logits are 10 MB. On a 2-core
# CPU 256 ran the masked and AR steps 3-4% faster than 128 (fewer [V, D]
# gradient accumulations, larger matmuls) and 512 no faster. The chunked
# row maps take `contract.ROW_CHUNK` (128) or `LIGHT_ROW_CHUNK` (256).
CHUNK = 256


def chunk_logits(h_CxD: Array, w_VxD: Array, b_V: Array, dtype) -> Array:
  """Logits h @ w.T + b of one chunk, the matmul in `dtype` with a float32
  result (as `nnx.Linear(dtype, preferred_element_type=f32)`)."""
  logits_CxV = jax.lax.dot_general(
      h_CxD.astype(dtype), w_VxD.astype(dtype), (((1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32)
  return _add_bias(logits_CxV, b_V.astype(dtype))


def column_sums(x_CxV: Array) -> Array:
  """sum over the rows of x, float32 [V], as ones @ x.

  The bias gradient of a chunk. XLA:CPU reduces a [256, 10000] block over
  its rows ~5x slower than over its columns; as a matrix-vector product its
  matmul library reads the block once at bandwidth.
  """
  ones_C = jnp.ones(x_CxV.shape[:1], x_CxV.dtype)
  return jax.lax.dot_general(ones_C, x_CxV, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


@jax.custom_vjp
def _add_bias(logits_CxV: Array, b_V: Array) -> Array:
  """logits + b, whose bias gradient is `column_sums` of the cotangent.
  (A custom VJP: reverse mode only, as for the attention core.)"""
  return logits_CxV + b_V


def _add_bias_fwd(logits_CxV, b_V):
  return _add_bias(logits_CxV, b_V), jnp.zeros((), b_V.dtype)


def _add_bias_bwd(b_like, g_CxV):
  return g_CxV, column_sums(g_CxV).astype(b_like.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _head_grads(h_CxD, w_VxD, dlogits_CxV, dw_VxD, db_V, dtype):
  """One chunk's input gradient, and the weight and bias gradients added to
  their running sums, from d loss / d logits (the head's backward)."""
  dlogits_CxV = dlogits_CxV.astype(dtype)
  dh_CxD = jax.lax.dot_general(
      dlogits_CxV, w_VxD.astype(dtype), (((1,), (0,)), ((), ())),
      preferred_element_type=jnp.float32)
  dw_VxD = dw_VxD + jax.lax.dot_general(
      dlogits_CxV, h_CxD.astype(dtype), (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32)
  return dh_CxD, dw_VxD, db_V + column_sums(dlogits_CxV)


def _packed_rows(where_N: Array, chunk: int):
  """Row ids with the selected rows first (padded to whole chunks) and their
  count; rows past the count are fillers whose results are discarded."""
  n = where_N.shape[0]
  pad = -n % chunk
  order_N = jnp.argsort(~where_N, stable=True).astype(jnp.int32)
  rows_P = jnp.concatenate([order_N, jnp.zeros((pad,), jnp.int32)])
  count = jnp.sum(where_N, dtype=jnp.int32)
  return rows_P, count, (count + chunk - 1) // chunk


def _forward(h_NxD, w_VxD, b_V, target_N, where_N, chunk, dtype):
  rows_P, count, n_chunks = _packed_rows(where_N, chunk)
  arange_C = jnp.arange(chunk, dtype=jnp.int32)

  def body(c, out):
    ce_N, lse_N = out
    rows_C = jax.lax.dynamic_slice_in_dim(rows_P, c * chunk, chunk)
    logits_CxV = chunk_logits(h_NxD[rows_C], w_VxD, b_V, dtype)
    lse_C = jax.nn.logsumexp(logits_CxV, axis=-1)
    tgt_C = jnp.take_along_axis(logits_CxV, target_N[rows_C][:, None], -1)[:, 0]
    valid_C = c * chunk + arange_C < count
    # Fillers point at row 0; drop their writes so row 0 keeps its value.
    rows_C = jnp.where(valid_C, rows_C, h_NxD.shape[0])
    ce_N = ce_N.at[rows_C].set(lse_C - tgt_C, mode="drop")
    lse_N = lse_N.at[rows_C].set(lse_C, mode="drop")
    return ce_N, lse_N

  zeros_N = jnp.zeros(where_N.shape, jnp.float32)
  ce_N, lse_N = jax.lax.fori_loop(0, n_chunks, body, (zeros_N, zeros_N))
  return ce_N, (rows_P, count, n_chunks, lse_N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _selected_ce(h_NxD, w_VxD, b_V, target_N, where_N, wce_N, wlse_N,
                 chunk, dtype, weighted):
  del wce_N, wlse_N, weighted
  ce_N, (_, _, _, lse_N) = _forward(h_NxD, w_VxD, b_V, target_N, where_N,
                                    chunk, dtype)
  return ce_N, lse_N


def _weighted_forward(h_NxD, w_VxD, b_V, target_N, where_N, wce_N, wlse_N,
                      chunk, dtype):
  """`_forward` that also forms the gradient of sum(wce ce + wlse lse), from
  the same logits and exponentials (no recomputation in the backward)."""
  rows_P, count, n_chunks = _packed_rows(where_N, chunk)
  n, vocab = h_NxD.shape[0], w_VxD.shape[0]
  arange_C = jnp.arange(chunk, dtype=jnp.int32)
  vocab_V = jnp.arange(vocab, dtype=jnp.int32)

  def body(c, carry):
    ce_N, lse_N, dh_NxD, dw_VxD, db_V = carry
    rows_C = jax.lax.dynamic_slice_in_dim(rows_P, c * chunk, chunk)
    valid_C = c * chunk + arange_C < count
    h_CxD = h_NxD[rows_C]
    target_C = target_N[rows_C]
    logits_CxV = chunk_logits(h_CxD, w_VxD, b_V, dtype)
    max_C = jnp.max(logits_CxV, axis=-1)
    exp_CxV = jnp.exp(logits_CxV - max_C[:, None])
    sum_C = jnp.sum(exp_CxV, axis=-1)
    lse_C = max_C + jnp.log(sum_C)
    tgt_C = jnp.take_along_axis(logits_CxV, target_C[:, None], -1)[:, 0]
    g_C = jnp.where(valid_C, wce_N[rows_C], 0.0)
    g_lse_C = jnp.where(valid_C, wlse_N[rows_C], 0.0)
    softmax_CxV = exp_CxV * (1.0 / sum_C)[:, None]
    onehot_CxV = vocab_V == target_C[:, None]
    dlogits_CxV = ((g_C + g_lse_C)[:, None] * softmax_CxV
                   - jnp.where(onehot_CxV, g_C[:, None], 0.0))
    dh_CxD, dw_VxD, db_V = _head_grads(h_CxD, w_VxD, dlogits_CxV, dw_VxD,
                                       db_V, dtype)
    rows_C = jnp.where(valid_C, rows_C, n)
    ce_N = ce_N.at[rows_C].set(lse_C - tgt_C, mode="drop")
    lse_N = lse_N.at[rows_C].set(lse_C, mode="drop")
    dh_NxD = dh_NxD.at[rows_C].set(dh_CxD, mode="drop")
    return ce_N, lse_N, dh_NxD, dw_VxD, db_V

  zeros_N = jnp.zeros(where_N.shape, jnp.float32)
  init = (zeros_N, zeros_N, jnp.zeros(h_NxD.shape, jnp.float32),
          jnp.zeros(w_VxD.shape, jnp.float32), jnp.zeros(b_V.shape, jnp.float32))
  ce_N, lse_N, dh_NxD, dw_VxD, db_V = jax.lax.fori_loop(0, n_chunks, body, init)
  return ce_N, lse_N, (rows_P, count, n_chunks), (dh_NxD, dw_VxD, db_V)


def _selected_ce_fwd(h_NxD, w_VxD, b_V, target_N, where_N, wce_N, wlse_N,
                     chunk, dtype, weighted):
  if not weighted:
    ce_N, (rows_P, count, n_chunks, lse_N) = _forward(
        h_NxD, w_VxD, b_V, target_N, where_N, chunk, dtype)
    grads = None
  else:
    ce_N, lse_N, (rows_P, count, n_chunks), grads = _weighted_forward(
        h_NxD, w_VxD, b_V, target_N, where_N, wce_N, wlse_N, chunk, dtype)
  return (ce_N, lse_N), (h_NxD, w_VxD, b_V, target_N, where_N, wce_N, wlse_N,
                         rows_P, count, n_chunks, lse_N, grads)


def _selected_ce_bwd(chunk, dtype, weighted, res, g):
  (h_NxD, w_VxD, b_V, target_N, where_N, wce_N, wlse_N, rows_P, count,
   n_chunks, lse_N, grads) = res
  g_N, g_lse_N = g
  recompute = functools.partial(
      _recomputed_grads, h_NxD, w_VxD, b_V, target_N, rows_P, count,
      n_chunks, lse_N, chunk, dtype)
  if weighted:
    sel = lambda a: jnp.where(where_N, a, 0.0)  # only selected rows count
    c, ok = folded.weights_factor((sel(g_N), sel(g_lse_N)),
                                  (sel(wce_N), sel(wlse_N)))

    def slow(g_N, g_lse_N):
      folded.maybe_warn_recomputed("selected_cross_entropy")
      return recompute(g_N, g_lse_N)

    dh_NxD, dw_VxD, db_V = jax.lax.cond(
        ok, lambda *_: tuple(c * a for a in grads), slow, g_N, g_lse_N)
  else:
    dh_NxD, dw_VxD, db_V = recompute(g_N, g_lse_N)
  zeros = jnp.zeros_like(wce_N)
  return (dh_NxD.astype(h_NxD.dtype), dw_VxD.astype(w_VxD.dtype),
          db_V.astype(b_V.dtype), None, None, zeros, zeros)


def _recomputed_grads(h_NxD, w_VxD, b_V, target_N, rows_P, count, n_chunks,
                      lse_N, chunk, dtype, g_N, g_lse_N):
  """The VJP a chunk at a time, each chunk's logits recomputed."""
  n, vocab = h_NxD.shape[0], w_VxD.shape[0]
  arange_C = jnp.arange(chunk, dtype=jnp.int32)
  vocab_V = jnp.arange(vocab, dtype=jnp.int32)

  def body(c, grads):
    dh_NxD, dw_VxD, db_V = grads
    rows_C = jax.lax.dynamic_slice_in_dim(rows_P, c * chunk, chunk)
    valid_C = c * chunk + arange_C < count
    h_CxD = h_NxD[rows_C]
    logits_CxV = chunk_logits(h_CxD, w_VxD, b_V, dtype)
    g_C = jnp.where(valid_C, g_N[rows_C], 0.0)
    g_lse_C = jnp.where(valid_C, g_lse_N[rows_C], 0.0)
    # d ce / d logits = softmax - onehot(target), d lse / d logits = softmax,
    # times their cotangents.
    onehot_CxV = vocab_V == target_N[rows_C][:, None]
    softmax_CxV = jnp.exp(logits_CxV - lse_N[rows_C][:, None])
    dlogits_CxV = (g_C[:, None] * (softmax_CxV - onehot_CxV)
                   + g_lse_C[:, None] * softmax_CxV)
    dh_CxD, dw_VxD, db_V = _head_grads(h_CxD, w_VxD, dlogits_CxV, dw_VxD,
                                       db_V, dtype)
    rows_C = jnp.where(valid_C, rows_C, n)
    dh_NxD = dh_NxD.at[rows_C].set(dh_CxD, mode="drop")
    return dh_NxD, dw_VxD, db_V

  init = (jnp.zeros(h_NxD.shape, jnp.float32), jnp.zeros(w_VxD.shape, jnp.float32),
          jnp.zeros(b_V.shape, jnp.float32))
  return jax.lax.fori_loop(0, n_chunks, body, init)


_selected_ce.defvjp(_selected_ce_fwd, _selected_ce_bwd)


def selected_cross_entropy(h_NxD: Array, w_VxD: Array, b_V: Array,
                           target_N: Array, where_N: Array, *,
                           chunk: Optional[int] = None, dtype=jnp.float32,
                           weights: Optional[Array] = None) -> Array:
  """-log softmax(h @ W.T + b)[target] at rows `where` selects, 0 elsewhere.

  h: [N, D] features; w: [V, D] (the head's kernel as `layers.OutputHead`
  stores it, or a tied embedding table); b: [V]; target: int [N] in [0, V);
  where: bool [N]. Float32 [N]; differentiable in h, w and b. The matmuls run
  in `dtype` with float32 accumulation, as the model's head does.
  weights: see `selected_ce_and_lse`.
  """
  return selected_ce_and_lse(h_NxD, w_VxD, b_V, target_N, where_N,
                             chunk=chunk, dtype=dtype,
                             weights=None if weights is None else
                             (weights, jnp.zeros_like(weights)))[0]


def selected_ce_and_lse(h_NxD: Array, w_VxD: Array, b_V: Array,
                        target_N: Array, where_N: Array, *,
                        chunk: Optional[int] = None,
                        dtype=jnp.float32,
                        weights: Optional[tuple[Array, Array]] = None
                        ) -> tuple[Array, Array]:
  """(`selected_cross_entropy`, logsumexp(h @ W.T + b)) at the selected rows,
  0 elsewhere; both differentiable (SEDD's score entropy needs the two).

  weights: optional ([N], [N]), the weight the caller's objective gives each
  row's cross-entropy and logsumexp, up to one common factor (e.g. the
  per-position loss weight). When differentiated, the forward pass then also
  forms the gradient of that weighted sum from the logits it already has, and
  the backward pass only scales it: one head matmul and one exponential per
  chunk fewer. The backward checks that the cotangents it receives are those
  weights times one factor (to `folded.WEIGHTS_RTOL` of the largest, over the
  selected rows); if not, it recomputes the exact gradient as without
  weights (warning where `folded.warn_enabled()`). Values are the same
  either way.
  """
  n = where_N.shape[0]
  wce_N, wlse_N = ((jnp.zeros((n,), jnp.float32),) * 2 if weights is None
                   else (jnp.asarray(w, jnp.float32) for w in weights))
  return _selected_ce(h_NxD, w_VxD, b_V, target_N.astype(jnp.int32),
                      where_N.astype(bool), wce_N, wlse_N,
                      chunk or CHUNK,
                      jnp.dtype(dtype), weights is not None)
