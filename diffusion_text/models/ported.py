"""Layers shared by the ported published architectures (GPT-2, SEDD/MDLM DiT).

Written to match the PyTorch originals to float32 rounding: LayerNorm
statistics in float32 with the originals' eps (1e-5), and the attention
core on packed (q|k|v, head, head_dim) projections, the column order both
GPT-2's `c_attn` and the DiT's `attn_qkv` use; the core is the backbone's
(`models.attention`: softmax attention with FlashAttention's backward).
"""

from __future__ import annotations

import jax
from flax import nnx

from diffusion_text.models.attention import heads_last_attention
from diffusion_text.models.layers import rotary

Array = jax.Array

TORCH_LN_EPS = 1e-5  # torch.nn.LayerNorm / F.layer_norm default


def torch_layer_norm(d_model: int, *, use_bias: bool, rngs: nnx.Rngs,
                     eps: float = TORCH_LN_EPS) -> nnx.LayerNorm:
  """A LayerNorm whose variance is E[(x - mean)^2], as torch computes it."""
  return nnx.LayerNorm(d_model, epsilon=eps, use_bias=use_bias,
                       use_fast_variance=False, rngs=rngs)


def packed_attention(qkv_BxLx3D: Array, num_heads: int, *, causal: bool,
                     rope: bool) -> Array:
  """Softmax(q k^T / sqrt(hd)) v on packed projections -> [B, L, D].

  The 3D columns are (q|k|v, head, head_dim); with `rope`, q and k are
  rotated in the non-interleaved rotate-half pairing (flash-attn default).
  """
  b, length, three_d = qkv_BxLx3D.shape
  d = three_d // 3
  qkv_BxLx3xNxH = qkv_BxLx3D.reshape(b, length, 3, num_heads, d // num_heads)
  q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = (qkv_BxLx3xNxH[:, :, i] for i in range(3))
  if rope:
    q_BxLxNxH, k_BxLxNxH = rotary(q_BxLxNxH), rotary(k_BxLxNxH)
  out_BxLxNxH = heads_last_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH,
                                     causal=causal)
  return out_BxLxNxH.reshape(b, length, d)


def gelu_tanh(x: Array) -> Array:
  """GELU with the tanh approximation (GPT-2 "gelu_new", DiT's MLP)."""
  return jax.nn.gelu(x, approximate=True)


def linear(d_in: int, d_out: int, *, rngs: nnx.Rngs,
           use_bias: bool = True) -> nnx.Linear:
  """A float32 Linear, normal(0.02)-initialised as GPT-2 and DiT's trunk
  (zero biases); converters overwrite every value."""
  return nnx.Linear(d_in, d_out, use_bias=use_bias, rngs=rngs,
                    kernel_init=nnx.initializers.normal(0.02))


__all__ = ["TORCH_LN_EPS", "gelu_tanh", "linear", "packed_attention",
           "torch_layer_norm"]
