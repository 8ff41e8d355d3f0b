"""Scaled dot-product attention with a hand-written backward pass.

  O = softmax(Q K^T [+ causal mask]) V

for Q, K, V laid out [B, heads, L, H], with Q already multiplied by
1 / sqrt(H). The scores, the softmax and the accumulations are float32
(the matmuls take the inputs' dtype with a float32 result), as
`jax.nn.dot_product_attention`'s XLA implementation does.

The VJP is FlashAttention's (Dao et al. 2022, Algorithm 4, untiled): with
P the probabilities and dO the output's cotangent,

  dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),
  dQ = dS K,     dK = dS^T Q,

where rowsum(dO * O) = rowsum(dP * P), a sum over H instead of over L. The
forward pass keeps P and O. Against autodiff of
`jax.nn.dot_product_attention` on [B, L, heads, H] operands (transposes
around its batched matmuls, the softmax differentiated in passes of its
own), this form runs a 4-layer backbone's forward + backward ~9% faster
on XLA:CPU at the benchmark size (benchmarks/README.md), with the same
values to float32 rounding (tests/test_models.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

_F32 = jnp.float32


def _einsum(spec: str, a: Array, b: Array, dtype) -> Array:
  """einsum in `dtype` with a float32 result."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                    preferred_element_type=_F32)


def _probs(q_BxNxLxH: Array, k_BxNxLxH: Array, causal: bool) -> Array:
  s_BxNxLxL = _einsum("bnlh,bnmh->bnlm", q_BxNxLxH, k_BxNxLxH, q_BxNxLxH.dtype)
  if causal:
    length = s_BxNxLxL.shape[-1]
    below_LxL = jnp.tril(jnp.ones((length, length), bool))
    s_BxNxLxL = jnp.where(below_LxL, s_BxNxLxL, jnp.finfo(_F32).min)
  return jax.nn.softmax(s_BxNxLxL, axis=-1)


def _forward(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, causal):
  p_BxNxLxL = _probs(q_BxNxLxH, k_BxNxLxH, causal)
  o_BxNxLxH = _einsum("bnlm,bnmh->bnlh", p_BxNxLxL, v_BxNxLxH,
                      v_BxNxLxH.dtype)
  return o_BxNxLxH.astype(v_BxNxLxH.dtype), p_BxNxLxL


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, causal):
  return _forward(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, causal)[0]


def _attention_fwd(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, causal):
  o_BxNxLxH, p_BxNxLxL = _forward(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, causal)
  return o_BxNxLxH, (q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, p_BxNxLxL, o_BxNxLxH)


def _attention_bwd(causal, res, do_BxNxLxH):
  del causal  # P is 0 above the diagonal, so dS is too
  q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, p_BxNxLxL, o_BxNxLxH = res
  dtype = v_BxNxLxH.dtype
  dv_BxNxLxH = _einsum("bnlm,bnlh->bnmh", p_BxNxLxL, do_BxNxLxH, dtype)
  dp_BxNxLxL = _einsum("bnlh,bnmh->bnlm", do_BxNxLxH, v_BxNxLxH, dtype)
  delta_BxNxL = jnp.sum(do_BxNxLxH.astype(_F32) * o_BxNxLxH.astype(_F32),
                        axis=-1)
  ds_BxNxLxL = p_BxNxLxL * (dp_BxNxLxL - delta_BxNxL[..., None])
  dq_BxNxLxH = _einsum("bnlm,bnmh->bnlh", ds_BxNxLxL, k_BxNxLxH, dtype)
  dk_BxNxLxH = _einsum("bnlm,bnlh->bnmh", ds_BxNxLxL, q_BxNxLxH, dtype)
  return (dq_BxNxLxH.astype(q_BxNxLxH.dtype),
          dk_BxNxLxH.astype(k_BxNxLxH.dtype), dv_BxNxLxH.astype(dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q_BxNxLxH: Array, k_BxNxLxH: Array, v_BxNxLxH: Array, *,
              causal: bool) -> Array:
  """softmax(q k^T) v per batch row and head -> [B, heads, L, H] in v's
  dtype; q must already carry the 1 / sqrt(H) scale. `causal` lets
  position l attend to positions <= l only."""
  if not q_BxNxLxH.shape == k_BxNxLxH.shape == v_BxNxLxH.shape:
    raise ValueError("attention expects q, k, v of one shape [B, heads, L, "
                     f"H], got {q_BxNxLxH.shape}, {k_BxNxLxH.shape}, "
                     f"{v_BxNxLxH.shape}")
  return _attention(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, bool(causal))


def heads_last_attention(q_BxLxNxH: Array, k_BxLxNxH: Array,
                         v_BxLxNxH: Array, *, causal: bool) -> Array:
  """`attention` for q, k, v laid out [B, L, heads, H] as projections give
  them, q unscaled -> [B, L, heads, H]: softmax(q k^T / sqrt(H)) v, as
  `jax.nn.dot_product_attention(q, k, v, is_causal=causal)`. q is scaled
  before its transpose (one fused pass with whatever produced it)."""
  scale = q_BxLxNxH.shape[-1] ** -0.5
  heads_first = lambda x_BxLxNxH: x_BxLxNxH.transpose(0, 2, 1, 3)
  out_BxNxLxH = attention(heads_first(q_BxLxNxH * scale),
                          heads_first(k_BxLxNxH), heads_first(v_BxLxNxH),
                          causal=causal)
  return out_BxNxLxH.transpose(0, 2, 1, 3)


__all__ = ["attention", "heads_last_attention"]
