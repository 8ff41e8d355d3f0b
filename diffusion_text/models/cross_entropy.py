"""Fused linear head + cross-entropy at selected positions only.

DESIGN.md section 8: the 10k-way output head and its softmax dominate a
train step when run densely. `selected_cross_entropy` computes

  ce[n] = logsumexp(h[n] @ W + b) - (h[n] @ W + b)[target[n]]   if where[n]
  ce[n] = 0                                                      otherwise

without ever holding [N, V] logits: the selected rows are packed to the
front and processed in chunks of `chunk` rows by a loop whose trip count is
the number of selected rows (a dynamic count at static shapes), so an
absorbing process that masks half the tokens pays for half the head. The
backward pass (a custom VJP) recomputes each chunk's logits and forms
softmax - onehot in one fused pass, so no log-probabilities, scattered
one-hots or [N, V] temporaries exist at any point.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def chunk_logits(h_CxD: Array, w_DxV: Array, b_V: Array, dtype) -> Array:
  """Logits of one chunk as `nnx.Linear(dtype, preferred f32)` computes them."""
  logits_CxV = jax.lax.dot_general(
      h_CxD.astype(dtype), w_DxV.astype(dtype), (((1,), (0,)), ((), ())),
      preferred_element_type=jnp.float32)
  return logits_CxV + b_V.astype(dtype)


def _packed_rows(where_N: Array, chunk: int):
  """Row ids with the selected rows first (padded to whole chunks) and their
  count; rows past the count are fillers whose results are discarded."""
  n = where_N.shape[0]
  pad = -n % chunk
  order_N = jnp.argsort(~where_N, stable=True).astype(jnp.int32)
  rows_P = jnp.concatenate([order_N, jnp.zeros((pad,), jnp.int32)])
  count = jnp.sum(where_N, dtype=jnp.int32)
  return rows_P, count, (count + chunk - 1) // chunk


def _forward(h_NxD, w_DxV, b_V, target_N, where_N, chunk, dtype):
  rows_P, count, n_chunks = _packed_rows(where_N, chunk)
  arange_C = jnp.arange(chunk, dtype=jnp.int32)

  def body(c, out):
    ce_N, lse_N = out
    rows_C = jax.lax.dynamic_slice_in_dim(rows_P, c * chunk, chunk)
    logits_CxV = chunk_logits(h_NxD[rows_C], w_DxV, b_V, dtype)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _selected_ce(h_NxD, w_DxV, b_V, target_N, where_N, chunk, dtype):
  ce_N, (_, _, _, lse_N) = _forward(h_NxD, w_DxV, b_V, target_N, where_N,
                                    chunk, dtype)
  return ce_N, lse_N


def _selected_ce_fwd(h_NxD, w_DxV, b_V, target_N, where_N, chunk, dtype):
  ce_N, (rows_P, count, n_chunks, lse_N) = _forward(
      h_NxD, w_DxV, b_V, target_N, where_N, chunk, dtype)
  return (ce_N, lse_N), (h_NxD, w_DxV, b_V, target_N, where_N, rows_P, count,
                         n_chunks, lse_N)


def _selected_ce_bwd(chunk, dtype, res, g):
  (h_NxD, w_DxV, b_V, target_N, where_N, rows_P, count, n_chunks,
   lse_N) = res
  g_N, g_lse_N = g
  n, vocab = h_NxD.shape[0], w_DxV.shape[1]
  arange_C = jnp.arange(chunk, dtype=jnp.int32)
  vocab_V = jnp.arange(vocab, dtype=jnp.int32)

  def body(c, grads):
    dh_NxD, dw_DxV, db_V = grads
    rows_C = jax.lax.dynamic_slice_in_dim(rows_P, c * chunk, chunk)
    valid_C = c * chunk + arange_C < count
    h_CxD = h_NxD[rows_C]
    logits_CxV = chunk_logits(h_CxD, w_DxV, b_V, dtype)
    g_C = jnp.where(valid_C, g_N[rows_C], 0.0)
    g_lse_C = jnp.where(valid_C, g_lse_N[rows_C], 0.0)
    # d ce / d logits = softmax - onehot(target), d lse / d logits = softmax,
    # times their cotangents.
    onehot_CxV = vocab_V == target_N[rows_C][:, None]
    softmax_CxV = jnp.exp(logits_CxV - lse_N[rows_C][:, None])
    dlogits_CxV = (g_C[:, None] * (softmax_CxV - onehot_CxV)
                   + g_lse_C[:, None] * softmax_CxV)
    dlogits_CxV = dlogits_CxV.astype(dtype)
    dh_CxD = jax.lax.dot_general(
        dlogits_CxV, w_DxV.astype(dtype), (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32)
    dw_DxV = dw_DxV + jax.lax.dot_general(
        h_CxD.astype(dtype), dlogits_CxV, (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)
    db_V = db_V + jnp.sum(dlogits_CxV, axis=0, dtype=jnp.float32)
    rows_C = jnp.where(valid_C, rows_C, n)
    dh_NxD = dh_NxD.at[rows_C].set(dh_CxD, mode="drop")
    return dh_NxD, dw_DxV, db_V

  init = (jnp.zeros(h_NxD.shape, jnp.float32), jnp.zeros(w_DxV.shape, jnp.float32),
          jnp.zeros(b_V.shape, jnp.float32))
  dh_NxD, dw_DxV, db_V = jax.lax.fori_loop(0, n_chunks, body, init)
  del vocab
  return (dh_NxD.astype(h_NxD.dtype), dw_DxV.astype(w_DxV.dtype),
          db_V.astype(b_V.dtype), None, None)


_selected_ce.defvjp(_selected_ce_fwd, _selected_ce_bwd)


def selected_cross_entropy(h_NxD: Array, w_DxV: Array, b_V: Array,
                           target_N: Array, where_N: Array, *,
                           chunk: int = 128,
                           dtype=jnp.float32) -> Array:
  """-log softmax(h @ W + b)[target] at rows `where` selects, 0 elsewhere.

  h: [N, D] features; w: [D, V]; b: [V]; target: int [N] in [0, V);
  where: bool [N]. Float32 [N]; differentiable in h, w and b. The matmuls run
  in `dtype` with float32 accumulation, as the model's head does.
  """
  return selected_ce_and_lse(h_NxD, w_DxV, b_V, target_N, where_N,
                             chunk=chunk, dtype=dtype)[0]


def selected_ce_and_lse(h_NxD: Array, w_DxV: Array, b_V: Array,
                        target_N: Array, where_N: Array, *, chunk: int = 128,
                        dtype=jnp.float32) -> tuple[Array, Array]:
  """(`selected_cross_entropy`, logsumexp(h @ W + b)) at the selected rows,
  0 elsewhere; both differentiable (SEDD's score entropy needs the two)."""
  return _selected_ce(h_NxD, w_DxV, b_V, target_N.astype(jnp.int32),
                      where_N.astype(bool), chunk, jnp.dtype(dtype))
