"""GPT-2 (Radford et al. 2019), as transformers' `GPT2LMHeadModel` computes it.

Learned absolute positions added to the token embedding; pre-LN blocks
(LayerNorm with bias, eps `layer_norm_epsilon`) with causal attention
scaled by 1/sqrt(head_dim) and a c_fc -> tanh-GELU ("gelu_new") -> c_proj
MLP of width 4D; a final LayerNorm; logits = ln_f(h) wte^T (tied, no bias).
Eval mode: every dropout is the identity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_text.models.ported import (TORCH_LN_EPS, gelu_tanh, linear,
                                          packed_attention, torch_layer_norm)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The architecture fields of a transformers GPT2Config."""

  vocab_size: int             # vocab_size
  max_length: int             # n_positions
  d_model: int                # n_embd
  num_layers: int             # n_layer
  num_heads: int              # n_head
  eps: float = TORCH_LN_EPS   # layer_norm_epsilon
  bos_id: int = -1            # bos_token_id (<|endoftext|>); -1: vocab_size - 1

  @property
  def bos_token(self) -> int:
    return self.bos_id if self.bos_id >= 0 else self.vocab_size - 1


class GPT2Block(nnx.Module):
  """ln_1 -> causal attention -> residual; ln_2 -> MLP -> residual."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.num_heads = cfg.num_heads
    self.ln_1 = torch_layer_norm(d, use_bias=True, eps=cfg.eps, rngs=rngs)
    self.c_attn = linear(d, 3 * d, rngs=rngs)
    self.attn_proj = linear(d, d, rngs=rngs)
    self.ln_2 = torch_layer_norm(d, use_bias=True, eps=cfg.eps, rngs=rngs)
    self.c_fc = linear(d, 4 * d, rngs=rngs)
    self.mlp_proj = linear(4 * d, d, rngs=rngs)

  def __call__(self, x_BxLxD: Array) -> Array:
    h_BxLxD = packed_attention(self.c_attn(self.ln_1(x_BxLxD)),
                               self.num_heads, causal=True, rope=False)
    x_BxLxD = x_BxLxD + self.attn_proj(h_BxLxD)
    h_BxLxD = self.mlp_proj(gelu_tanh(self.c_fc(self.ln_2(x_BxLxD))))
    return x_BxLxD + h_BxLxD


class GPT2(nnx.Module):
  """ids [B, L] (L <= max_length) -> next-token logits [B, L, V] (float32)."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    self.wte = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init,
                         rngs=rngs)
    self.wpe = nnx.Embed(cfg.max_length, cfg.d_model, embedding_init=init,
                         rngs=rngs)
    self.blocks = nnx.List([GPT2Block(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.ln_f = torch_layer_norm(cfg.d_model, use_bias=True, eps=cfg.eps,
                                 rngs=rngs)

  def __call__(self, ids_BxL: Array) -> Array:
    length = ids_BxL.shape[1]
    if length > self.cfg.max_length:
      raise ValueError(f"sequence length {length} exceeds GPT-2's "
                       f"n_positions={self.cfg.max_length}; use "
                       f"data.seq_len <= {self.cfg.max_length}")
    h_BxLxD = self.wte(ids_BxL) + self.wpe.embedding[...][:length][None]
    for block in self.blocks:
      h_BxLxD = block(h_BxLxD)
    h_BxLxD = self.ln_f(h_BxLxD)
    return self.wte.attend(h_BxLxD).astype(jnp.float32)


__all__ = ["GPT2", "GPT2Block", "GPT2Config"]
