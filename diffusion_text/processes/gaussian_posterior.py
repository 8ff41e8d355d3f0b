"""The base-measure posterior mean of the discrete-time Gaussian process
(gaussian.py, `base_eps`): x0_base = q(w | x_t) @ E under a uniform token
prior, where

  q(w | x_t) = softmax_w((a <x_t, e_w> - b ||e_w||^2) / c)

with per-position coefficients (a, b, c) = (sqrt(ab), ab / 2, 1 - ab).

`softmax_mean` computes it a chunk of positions at a time with a custom
VJP: the backward pass recomputes each chunk's softmax and forms the
gradients of x and the table directly (five [C, D] x [D, V]-sized matmuls
and a few elementwise passes per chunk), so neither pass holds a [N, V]
array and no per-chunk [V, D] temporaries of jax's autodiff of a chunked
map are made. `posterior_mean` adds an exact shortcut once the tokens are
resolved; `base_logits` is its dense reference, and `nearest_ids` the
zero-noise limit (the nearest row of E).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffusion_text import contract

Array = jax.Array

# A softmax entry this far below the top logit is exp(-120) ~ 8e-53: exactly
# 0 in float32 (the smallest subnormal is 1.4e-45).
RESOLVED_GAP = 120.0


def affine_logits(x_CxD: Array, coef_Cx3: Array, table_VxD: Array,
                  sq_V: Array) -> Array:
  """(a <x, e_w> - b ||e_w||^2) / c per row [C, V]; sq_V = ||e_w||^2."""
  a_C1, b_C1, c_C1 = (coef_Cx3[:, i:i + 1] for i in range(3))
  dot_CxV = jax.lax.dot_general(x_CxD, table_VxD, (((1,), (1,)), ((), ())))
  return (a_C1 * dot_CxV - b_C1 * sq_V) / c_C1


def base_logits(x_t: Array, coef_Bx3: Array, table_VxD: Array) -> Array:
  """log q(w | x_t) + const per position [B, L, V] for per-sequence
  coefficients [B, 3]: -||x_t - sqrt(ab) e_w||^2 / (2 (1 - ab)) without
  the w-free ||x_t||^2. The dense reference of `posterior_mean`."""
  b, length, d = x_t.shape
  coef_Nx3 = jnp.repeat(jnp.broadcast_to(coef_Bx3, (b, 3)), length, axis=0)
  sq_V = jnp.sum(jnp.square(table_VxD), axis=-1)
  return affine_logits(x_t.reshape(b * length, d), coef_Nx3, table_VxD,
                       sq_V).reshape(b, length, -1)


def nearest_ids(x: Array, table_VxD: Array) -> Array:
  """Id of the nearest (L2) row of the table to x [B, L, D] -> int32
  [B, L]: argmax x.e - |e|^2 / 2 (x.e alone favours long embeddings)."""
  score_BxLxV = (jnp.einsum("bld,vd->blv", x, table_VxD)
                 - 0.5 * jnp.sum(jnp.square(table_VxD), axis=-1))
  return jnp.argmax(score_BxLxV, axis=-1).astype(jnp.int32)


def _softmax(x_CxD, coef_Cx3, table_VxD, sq_V):
  """(unnormalised exp(z - max z) [C, V], its row sums [C, 1])."""
  z_CxV = affine_logits(x_CxD, coef_Cx3, table_VxD, sq_V)
  e_CxV = jnp.exp(z_CxV - jnp.max(z_CxV, axis=-1, keepdims=True))
  return e_CxV, jnp.sum(e_CxV, axis=-1, keepdims=True)


def _forward(x_NxD, coef_Nx3, table_VxD, chunk):
  sq_V = jnp.sum(jnp.square(table_VxD), axis=-1)

  def one(rows):
    e_CxV, s_C1 = _softmax(*rows, table_VxD, sq_V)
    return (e_CxV @ table_VxD) / s_C1

  split = lambda a: contract.split_rows(a, chunk)
  out = jax.lax.map(one, (split(x_NxD), split(coef_Nx3)))
  return contract.join_rows(out, x_NxD.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_mean(x_NxD, coef_Nx3, table_VxD, chunk):
  return _forward(x_NxD, coef_Nx3, table_VxD, chunk)


def _softmax_mean_fwd(x_NxD, coef_Nx3, table_VxD, chunk):
  out_NxD = _forward(x_NxD, coef_Nx3, table_VxD, chunk)
  return out_NxD, (x_NxD, coef_Nx3, table_VxD)


def _softmax_mean_bwd(chunk, res, g_NxD):
  """With p = softmax(z), out = p @ E and g = d/d out:
    dz = p * (dp - sum_w p_w dp_w) with dp = g @ E^T,  w = dz / c,
    dx = a * (w @ E),
    dE = p^T @ g + w^T @ (a x) - 2 E * (w^T @ b)   (summed over chunks).
  The coefficients get no gradient (the schedule is fixed)."""
  x_NxD, coef_Nx3, table_VxD = res
  n = x_NxD.shape[0]
  sq_V = jnp.sum(jnp.square(table_VxD), axis=-1)

  def body(d_table, rows):
    x_CxD, coef_Cx3, g_CxD = rows
    e_CxV, s_C1 = _softmax(x_CxD, coef_Cx3, table_VxD, sq_V)
    p_CxV = e_CxV / s_C1
    dp_CxV = jax.lax.dot_general(g_CxD, table_VxD, (((1,), (1,)), ((), ())))
    # sum_w p_w dp_w equals <g, out>, but summed over w it is exactly dp at
    # the top token when p is one-hot (so dz = 0 exactly, as autodiff gives,
    # where the 1 / c of a resolved position would amplify any rounding).
    r_C1 = jnp.sum(p_CxV * dp_CxV, axis=-1, keepdims=True)
    a_C1, b_C1, c_C1 = (coef_Cx3[:, i:i + 1] for i in range(3))
    w_CxV = p_CxV * (dp_CxV - r_C1) / c_C1
    dx_CxD = a_C1 * (w_CxV @ table_VxD)
    t_contract = (((0,), (0,)), ((), ()))
    d_table = (d_table
               + jax.lax.dot_general(p_CxV, g_CxD, t_contract)
               + jax.lax.dot_general(w_CxV, a_C1 * x_CxD, t_contract)
               - 2.0 * table_VxD * jax.lax.dot_general(w_CxV, b_C1,
                                                        t_contract))
    return d_table, dx_CxD

  # Padded rows get a zero cotangent, so they add nothing to d_table.
  g = jnp.pad(g_NxD, [(0, -n % chunk), (0, 0)]).reshape(-1, chunk,
                                                        g_NxD.shape[1])
  rows = (contract.split_rows(x_NxD, chunk),
          contract.split_rows(coef_Nx3, chunk), g)
  d_table, dx = jax.lax.scan(body, jnp.zeros_like(table_VxD), rows)
  return contract.join_rows(dx, n), jnp.zeros_like(coef_Nx3), d_table


_softmax_mean.defvjp(_softmax_mean_fwd, _softmax_mean_bwd)


def softmax_mean(x_NxD: Array, coef_Nx3: Array, table_VxD: Array,
                 chunk: int | None = None) -> Array:
  """softmax_w((a <x_n, e_w> - b ||e_w||^2) / c) @ E [N, D], float32.

  coef: [N, 3] rows (a, b, c > 0), constants (no gradient); differentiable
  in x and the table; `chunk` positions at a time (contract.ROW_CHUNK).
  """
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return _softmax_mean(f32(x_NxD), jax.lax.stop_gradient(f32(coef_Nx3)),
                       f32(table_VxD), chunk or contract.ROW_CHUNK)


def posterior_mean(x_t: Array, coef_Bx3: Array, table_VxD: Array,
                   tokens: Array | None = None) -> Array:
  """x0_base = q(. | x_t) @ E [B, L, D] (`softmax_mean`, per-sequence
  coefficients coef [B, 3]).

  `tokens` [B, L] (x_1 in the loss, drawn from these tokens): first check,
  without gradient, whether at every position no base logit but the
  token's own lies within RESOLVED_GAP of it, where float32 rounds every
  other softmax entry to exactly 0; then q(. | x_t) is exactly one-hot at
  the token, its softmax gradient exactly 0, and x0_base = E[token], the
  same numbers without the V-way softmax. Otherwise the full softmax, as
  always.
  """
  b, length, d = x_t.shape
  x_NxD = x_t.reshape(b * length, d)
  coef_Nx3 = jnp.repeat(jnp.asarray(coef_Bx3, jnp.float32), length, axis=0)
  dense = lambda: softmax_mean(x_NxD, coef_Nx3, table_VxD).reshape(x_t.shape)
  if tokens is None:
    return dense()

  table = jax.lax.stop_gradient(table_VxD)
  sq_V = jnp.sum(jnp.square(table), axis=-1)
  ids_N = tokens.reshape(-1).astype(jnp.int32)

  def near(rows):  # how many logits lie within the gap of the token's own
    x_CxD, coef_Cx3, ids_C = rows
    z_CxV = affine_logits(x_CxD, coef_Cx3, table, sq_V)
    own_C1 = jnp.take_along_axis(z_CxV, ids_C[:, None], axis=-1)
    return jnp.sum(z_CxV > own_C1 - RESOLVED_GAP, axis=-1)

  near_N = contract.map_rows(
      near, jax.lax.stop_gradient((x_NxD, coef_Nx3, ids_N)))
  return jax.lax.cond(
      jnp.all(near_N == 1),
      lambda: jnp.take(table_VxD, tokens, axis=0), dense)
