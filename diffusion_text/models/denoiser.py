"""The one denoiser backbone: a DiT-style transformer over token sequences.

Peebles & Xie 2023 (DiT, sec. 3.2): pre-norm attention + MLP blocks whose
LayerNorms are modulated by the time embedding ("adaLN-zero": per-block
shift, scale and a residual gate regressed from the cond vector, all
zero-initialised so every block starts as the identity), and a final
adaLN + zero-initialised linear head. Positions are rotary (RoFormer);
attention is bidirectional, or causal for the AR baseline.

The stem and the head are chosen by the process's `ModelSpec`:
token ids (embedding table) or continuous latents (linear projection) in;
logits or a latent-space vector out. Optional extras: a learned token
embedding table (Diffusion-LM, Li et al. 2022, sec. 4.1) with tied rounding
logits, and VDM's learned monotone gamma(t).

The module holds only `nnx.Param` variables, so `nnx.split(model)` yields a
plain parameter pytree for `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_text.config import ModelConfig, compute_dtype
from diffusion_text.models.conditioning import MonotoneGamma, TimeEmbedding
from diffusion_text.models.cross_entropy import (chunk_logits,
                                                 selected_ce_and_lse,
                                                 selected_cross_entropy)
from diffusion_text.models.folded import map_rows_folded
from diffusion_text.models.layers import (MLP, Attention, OutputHead,
                                          apply_flat, dense_init, layer_norm,
                                          modulate)
from diffusion_text.contract import ModelSpec, map_rows

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Block(nnx.Module):
  """Pre-norm transformer block with adaLN-zero time conditioning."""

  def __init__(self, cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs):
    dtype = _DTYPES[cfg.dtype]
    d = cfg.d_model
    self.attn = Attention(d, cfg.num_heads, causal=causal, dtype=dtype,
                          rngs=rngs)
    self.mlp = MLP(d, cfg.mlp_ratio * d, dtype=dtype, rngs=rngs)
    self.ada = nnx.Linear(cfg.cond_dim, 6 * d, dtype=dtype, rngs=rngs,
                          kernel_init=nnx.initializers.zeros)

  def __call__(self, x_BxLxD: Array, c_BxC: Array) -> Array:
    mod_Bx6D = self.ada(jax.nn.silu(c_BxC)).astype(x_BxLxD.dtype)
    (shift_a, scale_a, gate_a, shift_m, scale_m,
     gate_m) = jnp.split(mod_Bx6D, 6, axis=-1)
    h_BxLxD = self.attn(modulate(layer_norm(x_BxLxD), shift_a, scale_a))
    x_BxLxD = x_BxLxD + gate_a[:, None, :] * h_BxLxD
    h_BxLxD = self.mlp(modulate(layer_norm(x_BxLxD), shift_m, scale_m))
    return x_BxLxD + gate_m[:, None, :] * h_BxLxD


class Transformer(nnx.Module):
  """Denoiser backbone; see the module docstring. Build with `build_model`."""

  def __init__(self, spec: ModelSpec, cfg: ModelConfig, *, rngs: nnx.Rngs):
    # model.dtype "auto" becomes this backend's compute dtype here, the one
    # place every build path passes through.
    cfg = dataclasses.replace(cfg, dtype=compute_dtype(cfg.dtype))
    _check(spec, cfg)
    self.spec, self.cfg = spec, cfg
    self.dtype = _DTYPES[cfg.dtype]
    d = cfg.d_model

    if spec.input == "tokens":
      self.stem = nnx.Embed(spec.input_vocab, d, dtype=self.dtype, rngs=rngs)
    else:
      width = spec.latent_dim * (2 if spec.self_conditioning else 1)
      self.stem = nnx.Linear(width, d, kernel_init=dense_init,
                             dtype=self.dtype, rngs=rngs)
    self.time = TimeEmbedding(cfg.cond_dim, rngs=rngs)

    blocks = [Block(cfg, causal=spec.causal, rngs=rngs)
              for _ in range(cfg.num_layers)]
    if cfg.scan_layers:
      # One Block whose every parameter has a leading [num_layers] axis,
      # scanned over in `__call__`; same initial values as the loop layout.
      graphdef, *_ = nnx.split(blocks[0])
      states = [nnx.state(b) for b in blocks]
      self.blocks = nnx.merge(
          graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    else:
      self.blocks = nnx.List(blocks)

    zeros = nnx.initializers.zeros
    self.final_ada = nnx.Linear(cfg.cond_dim, 2 * d, kernel_init=zeros,
                                dtype=self.dtype, rngs=rngs)
    # Zero-initialised head (DiT), kernel [output_dim, d]; bf16 matmul with a
    # float32 result.
    self.head = OutputHead(d, spec.output_dim, dtype=self.dtype, rngs=rngs)

    if spec.embed_vocab:
      # Unit variance per coordinate, i.e. the scale of the unit-variance
      # Gaussian noise it is mixed with (Diffusion-LM's nn.Embedding init).
      self.token_embedding = nnx.Param(jax.random.normal(
          rngs.params(), (spec.embed_vocab, spec.latent_dim), jnp.float32))
    if spec.learned_schedule:
      self.schedule = MonotoneGamma(spec.gamma_range, rngs=rngs)

  # ------------------------------------------------------------ denoiser
  def __call__(self, x: Array, t_B: Array,
               self_cond: Optional[Array] = None) -> Array:
    """x: int32 [B, L] ids or float [B, L, latent_dim]; t: [B] -> float32."""
    h_BxLxD = self._features(x, t_B, self_cond)
    return self.head(h_BxLxD)

  def target_nll(self, x: Array, t_B: Array, target_BxL: Array,
                 where_BxL: Array, weights: Optional[Array] = None) -> Array:
    """-log softmax(logits)[target] [B, L] where `where`, 0 elsewhere.

    Equals `logsumexp(self(x, t)) - self(x, t)[target]` at the selected
    positions, but runs the head and its softmax only there, fused (see
    `models.cross_entropy`). `weights` [B, L]: the weight the caller's
    objective puts on each position, up to one factor (a speed hint, see
    `selected_ce_and_lse`). Processes reach it as `Denoiser.target_nll`.
    """
    return self.target_lse(
        x, t_B, target_BxL, where_BxL,
        weights=None if weights is None else (weights,
                                              jnp.zeros_like(weights)))[0]

  def target_lse(self, x: Array, t_B: Array, target_BxL: Array,
                 where_BxL: Array, classes: Optional[int] = None,
                 weights: Optional[tuple[Array, Array]] = None
                 ) -> tuple[Array, Array]:
    """(-log softmax(logits)[target], logsumexp(logits)) [B, L] where
    `where`, over the first `classes` outputs (all by default); fused like
    `target_nll`; `weights`: ([B, L], [B, L]) for the two, as there.
    Processes reach it as `Denoiser.target_lse`."""
    if self.spec.output != "logits":
      raise ValueError("target_nll / target_lse need a logits head")
    h_BxLxD = self._features(x, t_B)
    b, length, d = h_BxLxD.shape
    flat = lambda a: jnp.broadcast_to(a, (b, length)).reshape(-1)
    ce_N, lse_N = selected_ce_and_lse(
        h_BxLxD.reshape(b * length, d), self.head.kernel[:classes],
        self.head.bias[:classes], target_BxL.reshape(-1),
        where_BxL.reshape(-1), dtype=self.dtype,
        weights=None if weights is None else tuple(map(flat, weights)))
    return ce_N.reshape(b, length), lse_N.reshape(b, length)

  def map_logits(self, x: Array, t_B: Array, fn, rows,
                 self_cond: Optional[Array] = None, weights=None,
                 chunk: Optional[int] = None):
    """fn(logits [C, V], rows of C positions) over chunks of positions.

    Equals `fn(self(x, t_B, self_cond).reshape(B * L, V), rows flattened)`
    reshaped to [B, L, ...], but the head runs a chunk of positions at a
    time inside `contract.map_rows`, so neither pass holds [B, L, V] logits.
    `weights` (optional; a pytree like fn's output of [B, L, ...] arrays):
    the weight the caller's loss gives each output, up to one factor; the
    gradient is then formed in the forward pass (`models.folded`), saving
    each chunk's recomputation. `chunk`: positions per chunk (default
    `contract.ROW_CHUNK`). Processes reach it as `Denoiser.map_logits`.
    """
    if self.spec.output != "logits":
      raise ValueError("map_logits needs a logits head")
    h_BxLxD = self._features(x, t_B, self_cond)
    b, length, d = h_BxLxD.shape
    kernel_VxD, bias_V = self.head.kernel[...], self.head.bias[...]
    flat = lambda a: a.reshape(b * length, *a.shape[2:])
    rows_N = (h_BxLxD.reshape(b * length, d), jax.tree.map(flat, rows))

    def chunk_fn(head, args):
      h_CxD, rows_C = args
      return fn(chunk_logits(h_CxD, *head, self.dtype), rows_C)

    if weights is None:
      out = map_rows(functools.partial(chunk_fn, (kernel_VxD, bias_V)), rows_N,
                     chunk)
    else:
      out = map_rows_folded(chunk_fn, (kernel_VxD, bias_V), rows_N,
                            jax.tree.map(flat, weights), chunk)
    return jax.tree.map(lambda a: a.reshape(b, length, *a.shape[1:]), out)

  def _features(self, x: Array, t_B: Array,
                self_cond: Optional[Array] = None) -> Array:
    """The head's input: final adaLN-modulated features [B, L, D]."""
    if self.spec.input == "tokens":
      h_BxLxD = self.stem(x)
    else:
      x_BxLxD = x.astype(jnp.float32)
      if self.spec.self_conditioning:
        if self_cond is None:
          self_cond = jnp.zeros_like(x_BxLxD)
        x_BxLxD = jnp.concatenate(
            [x_BxLxD, self_cond.astype(jnp.float32)], axis=-1)
      h_BxLxD = apply_flat(self.stem, x_BxLxD)
    h_BxLxD = h_BxLxD.astype(self.dtype)

    t_B = jnp.broadcast_to(jnp.asarray(t_B, jnp.float32), (x.shape[0],))
    c_BxC = self.time(t_B)
    h_BxLxD = self._blocks(h_BxLxD, c_BxC)

    shift_BxD, scale_BxD = jnp.split(
        self.final_ada(jax.nn.silu(c_BxC)).astype(self.dtype), 2, axis=-1)
    return modulate(layer_norm(h_BxLxD), shift_BxD, scale_BxD)

  def _blocks(self, h_BxLxD: Array, c_BxC: Array) -> Array:
    def apply(block, h, c):
      return block(h, c)

    if not self.cfg.scan_layers:
      step = nnx.remat(apply) if self.cfg.remat else apply
      for block in self.blocks:
        h_BxLxD = step(block, h_BxLxD, c_BxC)
      return h_BxLxD

    graphdef, stacked = nnx.split(self.blocks)

    def body(h, layer_state):
      return apply(nnx.merge(graphdef, layer_state), h, c_BxC), None

    if self.cfg.remat:
      body = jax.checkpoint(body)
    h_BxLxD, _ = jax.lax.scan(body, h_BxLxD, stacked)
    return h_BxLxD

  # -------------------------------------------------------------- extras
  def embed(self, ids_BxL: Array) -> Array:
    """Learned token embeddings E[ids] -> [B, L, latent_dim] (float32)."""
    return jnp.take(self.token_embedding[...], ids_BxL, axis=0)

  def round_logits(self, x_BxLxD: Array) -> Array:
    """Tied rounding logits x @ E^T -> [B, L, V] (float32)."""
    return jnp.einsum("bld,vd->blv", x_BxLxD.astype(jnp.float32),
                      self.token_embedding[...])

  def round_nll(self, x_BxLxD: Array, target_BxL: Array) -> Array:
    """-log softmax(round_logits(x))[target] [B, L], fused like
    `target_nll` (no [B, L, V] logits in either pass)."""
    b, length, d = x_BxLxD.shape
    table_VxD = self.token_embedding[...]
    ce_N = selected_cross_entropy(
        x_BxLxD.reshape(b * length, d).astype(jnp.float32), table_VxD,
        jnp.zeros(table_VxD.shape[:1], jnp.float32), target_BxL.reshape(-1),
        jnp.ones((b * length,), bool))
    return ce_N.reshape(b, length)

  def gamma(self, t_B: Array) -> Array:
    """Learned -log SNR(t), increasing, gamma(0), gamma(1) = gamma_range."""
    return self.schedule(t_B)


def _check(spec: ModelSpec, cfg: ModelConfig) -> None:
  """Raise a clear error for a spec/config the backbone cannot build."""
  if spec.input not in ("tokens", "latents"):
    raise ValueError(f"ModelSpec.input must be 'tokens' or 'latents', "
                     f"not {spec.input!r}")
  if spec.output not in ("logits", "vector"):
    raise ValueError(f"ModelSpec.output must be 'logits' or 'vector', "
                     f"not {spec.output!r}")
  if spec.latent_dim is None and (spec.input == "latents" or spec.embed_vocab):
    raise ValueError("a latent stem or embedding table needs "
                     "ModelSpec.latent_dim (the process owns it)")
  if spec.input == "tokens" and not spec.input_vocab:
    raise ValueError("ModelSpec.input='tokens' needs input_vocab")
  if cfg.dtype not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, "
                     f"not {cfg.dtype!r}")
  if cfg.d_model % cfg.num_heads or (cfg.d_model // cfg.num_heads) % 2:
    raise ValueError(f"model.d_model={cfg.d_model} must split into "
                     f"model.num_heads={cfg.num_heads} heads of even width "
                     "(rotary positions rotate feature pairs)")
