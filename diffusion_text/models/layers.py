"""Transformer building blocks: norm, rotary positions, attention, MLP.

Rotary position embeddings follow Su et al. 2021 (RoFormer, eq. 34) in the
"rotate half" layout of GPT-NeoX. The attention core is `models.attention`
(bidirectional, or causal for the AR baseline): `jax.nn.dot_product_attention`'s
numbers, with a hand-written backward pass. Parameters are float32;
`dtype` is the compute dtype (bf16 matmuls, fp32 norms and softmax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_text.models.attention import heads_last_attention
from diffusion_text.models.cross_entropy import chunk_logits

Array = jax.Array

# DiT initialises every linear layer with Xavier-uniform.
dense_init = nnx.initializers.xavier_uniform()


def apply_flat(layer: nnx.Linear, x: Array) -> Array:
  """`layer` over the last axis of x as one [N, D] x [D, F] matmul.

  The same numbers as `layer(x)`; on XLA:CPU the backward pass of a
  [B, L, D] dot_general copies its activation gradients to transpose them,
  which a flat [B * L, D] input avoids (about 20% of the backbone's
  forward + backward time at the benchmark size).
  """
  return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def layer_norm(x_BxLxD: Array, eps: float = 1e-6) -> Array:
  """LayerNorm without affine parameters (adaLN supplies shift and scale).

  Statistics are taken in float32; the result has the input's dtype.
  """
  x = x_BxLxD.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return ((x - mean) * jax.lax.rsqrt(var + eps)).astype(x_BxLxD.dtype)


def modulate(x_BxLxD: Array, shift_BxD: Array, scale_BxD: Array) -> Array:
  """DiT's adaLN modulation x * (1 + scale) + shift, broadcast over L."""
  return x_BxLxD * (1 + scale_BxD[:, None, :]) + shift_BxD[:, None, :]


def rotary(x_BxLxNxH: Array, base: float = 10_000.0) -> Array:
  """Rotate query/key features by position (RoFormer eq. 34, half layout).

  With halves x = (x1, x2): (x1 cos - x2 sin, x2 cos + x1 sin), written as
  x * (cos, cos) + roll(x, H/2) * (-sin, sin): the same numbers, but one
  fused pass over x in each direction where slicing the halves and
  concatenating them cost the backbone ~4% of its forward + backward.
  """
  _, length, _, head_dim = x_BxLxNxH.shape
  half = head_dim // 2
  inv_freq_F = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_LxF = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq_F
  cos_LxF, sin_LxF = jnp.cos(angle_LxF), jnp.sin(angle_LxF)
  cos_LxH = jnp.concatenate([cos_LxF, cos_LxF], axis=-1)[None, :, None, :]
  sin_LxH = jnp.concatenate([-sin_LxF, sin_LxF], axis=-1)[None, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  out = x * cos_LxH + jnp.roll(x, half, axis=-1) * sin_LxH
  return out.astype(x_BxLxNxH.dtype)


class OutputHead(nnx.Module):
  """Zero-initialised linear head x @ kernel.T + bias (DiT's final layer).

  The kernel is stored [out, in], the layout of an embedding table, not
  `nnx.Linear`'s [in, out]: the chunked heads (`models.cross_entropy`,
  `Denoiser.map_logits`) form its gradient a chunk of positions at a time,
  and XLA:CPU forms that gradient ~1.4x faster as [V, D] than as [D, V];
  stored so, it needs no transpose in either pass. The matmul runs in
  `dtype` with a float32 result.
  """

  def __init__(self, d_in: int, d_out: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    zeros = nnx.initializers.zeros
    # The two keys nnx.Linear draws, so later parameters keep their values.
    self.kernel = nnx.Param(zeros(rngs.params(), (d_out, d_in), jnp.float32))
    self.bias = nnx.Param(zeros(rngs.params(), (d_out,), jnp.float32))
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    """x [..., in] -> float32 [..., out], as one [N, in] x [in, out] matmul."""
    out_NxV = chunk_logits(x.reshape(-1, x.shape[-1]), self.kernel[...],
                           self.bias[...], self.dtype)
    return out_NxV.reshape(*x.shape[:-1], -1)


class Attention(nnx.Module):
  """Multi-head self-attention with rotary positions."""

  def __init__(self, d_model: int, num_heads: int, *, causal: bool,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by "
                       f"num_heads={num_heads}")
    self.num_heads = num_heads
    self.causal = causal
    self.qkv = nnx.Linear(d_model, 3 * d_model, kernel_init=dense_init,
                          dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(d_model, d_model, kernel_init=dense_init,
                          dtype=dtype, rngs=rngs)

  def __call__(self, x_BxLxD: Array) -> Array:
    b, length, d = x_BxLxD.shape
    qkv_BxLx3xNxH = apply_flat(self.qkv, x_BxLxD).reshape(
        b, length, 3, self.num_heads, d // self.num_heads)
    out_BxLxNxH = heads_last_attention(
        rotary(qkv_BxLx3xNxH[:, :, 0]), rotary(qkv_BxLx3xNxH[:, :, 1]),
        qkv_BxLx3xNxH[:, :, 2], causal=self.causal)
    return apply_flat(self.out, out_BxLxNxH.reshape(b, length, d))


class MLP(nnx.Module):
  """Position-wise feed-forward network with a tanh-GELU (as DiT)."""

  def __init__(self, d_model: int, hidden: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.up = nnx.Linear(d_model, hidden, kernel_init=dense_init,
                         dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(hidden, d_model, kernel_init=dense_init,
                           dtype=dtype, rngs=rngs)

  def __call__(self, x_BxLxD: Array) -> Array:
    h_BxLxF = jax.nn.gelu(apply_flat(self.up, x_BxLxD), approximate=True)
    return apply_flat(self.down, h_BxLxF)
