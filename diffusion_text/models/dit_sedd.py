"""SEDD's DiT (Lou et al. 2024, `model/transformer.py`) and MDLM's, which
derives from it (Sahoo et al. 2024, `models/dit.py`): one module, two options.

The trunk (README facts S1-S8 of the converter fixtures):
  * token embedding [V, D], no position table: positions enter via rotary;
  * sigma -> 256 sinusoids [cos | sin] of sigma itself (no x1000, not t)
    -> Linear, SiLU, Linear -> SiLU = c, the vector every adaLN reads;
  * blocks: LN (no bias, eps 1e-5) modulated by Linear(c) split into
    shift/scale/gate for attention and MLP; residual x + gate * branch;
    bias-free qkv/out projections, rotary q/k, bidirectional attention;
    MLP D -> 4D -> D with tanh-GELU;
  * final layer: adaLN (shift, scale) of LN(x), then Linear(D -> V).

`ScoreDiT(ids, sigma)` returns the RAW output-layer logits [B, L, V] (float32).
What the published models do with them lives in plain functions:
  * `sedd_log_score`: SEDD.forward's post-processing (absorb: minus
    log(e^sigma - 1) + log(V - 1); both graphs: 0 at the input token);
  * `mdlm_subs_log_probs`: MDLM's `_subs_parameterization`.
`time_conditioning=False` (MDLM's published setting) feeds sigma = 0 to the
embedding, as MDLM's HF wrapper does; c is then constant but not zero.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_text.models.ported import (gelu_tanh, linear, packed_attention,
                                          torch_layer_norm)

Array = jax.Array

SIGMA_FREQ_DIM = 256  # SEDD's TimestepEmbedder frequency_embedding_size
MDLM_NEG_INF = -1e6   # MDLM's finite "-inf" in `_subs_parameterization`


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Shape of a SEDD/MDLM DiT; `vocab_size` counts every embedding row and
  output column (the [MASK] id included for absorb/MDLM)."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  cond_dim: int
  max_length: int             # the published model's sequence length
  time_conditioning: bool = True


def sigma_embedding(sigma_B: Array, dim: int = SIGMA_FREQ_DIM,
                    max_period: float = 10_000.0) -> Array:
  """[cos(sigma f_j) | sin(sigma f_j)], f_j = max_period^(-j / (dim/2))."""
  half = dim // 2
  freqs_F = jnp.exp(-math.log(max_period)
                    * jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxF = sigma_B.astype(jnp.float32)[:, None] * freqs_F
  return jnp.concatenate([jnp.cos(angle_BxF), jnp.sin(angle_BxF)], axis=-1)


def _modulate(x_BxLxD: Array, shift_BxD: Array, scale_BxD: Array) -> Array:
  return x_BxLxD * (1 + scale_BxD[:, None, :]) + shift_BxD[:, None, :]


class DiTBlock(nnx.Module):
  """SEDD's DDiTBlock (eval mode: dropout is the identity)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.num_heads = cfg.num_heads
    self.norm1 = torch_layer_norm(d, use_bias=False, rngs=rngs)
    self.norm2 = torch_layer_norm(d, use_bias=False, rngs=rngs)
    self.qkv = linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.attn_out = linear(d, d, use_bias=False, rngs=rngs)
    self.mlp_in = linear(d, 4 * d, rngs=rngs)
    self.mlp_out = linear(4 * d, d, rngs=rngs)
    self.ada = linear(cfg.cond_dim, 6 * d, rngs=rngs)

  def __call__(self, x_BxLxD: Array, c_BxC: Array) -> Array:
    (shift_a, scale_a, gate_a, shift_m, scale_m,
     gate_m) = jnp.split(self.ada(c_BxC), 6, axis=-1)
    h_BxLxD = _modulate(self.norm1(x_BxLxD), shift_a, scale_a)
    h_BxLxD = self.attn_out(packed_attention(
        self.qkv(h_BxLxD), self.num_heads, causal=False, rope=True))
    x_BxLxD = x_BxLxD + gate_a[:, None, :] * h_BxLxD
    h_BxLxD = _modulate(self.norm2(x_BxLxD), shift_m, scale_m)
    h_BxLxD = self.mlp_out(gelu_tanh(self.mlp_in(h_BxLxD)))
    return x_BxLxD + gate_m[:, None, :] * h_BxLxD


class ScoreDiT(nnx.Module):
  """SEDD/MDLM DiT: (ids [B, L], sigma [B]) -> raw logits [B, L, V]."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.d_model
    self.embed = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
    self.sigma_in = linear(SIGMA_FREQ_DIM, cfg.cond_dim, rngs=rngs)
    self.sigma_out = linear(cfg.cond_dim, cfg.cond_dim, rngs=rngs)
    self.blocks = nnx.List([DiTBlock(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.final_norm = torch_layer_norm(d, use_bias=False, rngs=rngs)
    self.final_ada = linear(cfg.cond_dim, 2 * d, rngs=rngs)
    self.head = linear(d, cfg.vocab_size, rngs=rngs)

  def cond(self, sigma_B: Array) -> Array:
    """c [B, cond_dim] = SiLU(sigma_map(sigma)); sigma = 0 without time
    conditioning (MDLM's wrapper zeroes its `timesteps`)."""
    sigma_B = jnp.asarray(sigma_B, jnp.float32)
    if not self.cfg.time_conditioning:
      sigma_B = jnp.zeros_like(sigma_B)
    h_BxC = self.sigma_in(sigma_embedding(sigma_B))
    return jax.nn.silu(self.sigma_out(jax.nn.silu(h_BxC)))

  def __call__(self, ids_BxL: Array, sigma_B: Array) -> Array:
    sigma_B = jnp.broadcast_to(jnp.asarray(sigma_B, jnp.float32),
                               (ids_BxL.shape[0],))
    c_BxC = self.cond(sigma_B)
    h_BxLxD = self.embed(ids_BxL)
    for block in self.blocks:
      h_BxLxD = block(h_BxLxD, c_BxC)
    shift_BxD, scale_BxD = jnp.split(self.final_ada(c_BxC), 2, axis=-1)
    h_BxLxD = _modulate(self.final_norm(h_BxLxD), shift_BxD, scale_BxD)
    return self.head(h_BxLxD).astype(jnp.float32)


def sedd_log_score(raw_BxLxV: Array, ids_BxL: Array, sigma_B: Array, *,
                   scale_by_sigma: bool) -> Array:
  """SEDD.forward's output from the raw logits: the log concrete score.

  With `scale_by_sigma` (absorb only) subtract log(e^sigma - 1) (expm1 for
  sigma < 0.5, as the reference) and log(V - 1); then set the entry of each
  position's own input token to exactly 0 (also at [MASK] inputs).
  """
  out = raw_BxLxV.astype(jnp.float32)
  if scale_by_sigma:
    sigma_B = jnp.asarray(sigma_B, jnp.float32)
    esigm1_B = jnp.where(sigma_B < 0.5, jnp.expm1(sigma_B),
                         jnp.exp(sigma_B) - 1.0)
    out = (out - jnp.log(esigm1_B)[:, None, None]
           - math.log(out.shape[-1] - 1))
  own_BxLxV = jax.nn.one_hot(ids_BxL, out.shape[-1], dtype=bool)
  return jnp.where(own_BxLxV, 0.0, out)


def mdlm_subs_log_probs(logits_BxLxV: Array, ids_BxL: Array,
                        mask_id: int) -> Array:
  """MDLM's SUBS parameterisation (sec. 3.2.1): zero masking (the [MASK]
  column gets -1e6 before the log-softmax) and carry-over unmasking
  (unmasked positions put all mass on their own token)."""
  v = logits_BxLxV.shape[-1]
  logits = logits_BxLxV.astype(jnp.float32)
  logits = logits + MDLM_NEG_INF * jax.nn.one_hot(mask_id, v)
  logits = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  carry_BxLxV = jnp.where(jax.nn.one_hot(ids_BxL, v, dtype=bool), 0.0,
                          MDLM_NEG_INF)
  unmasked_BxLx1 = (ids_BxL != mask_id)[..., None]
  return jnp.where(unmasked_BxLx1, carry_BxLxV, logits)


__all__ = ["DiTBlock", "DiTConfig", "ScoreDiT", "mdlm_subs_log_probs",
           "sedd_log_score", "sigma_embedding"]
