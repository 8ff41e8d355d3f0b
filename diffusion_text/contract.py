"""The contract between the network and the processes.

`models/` builds a backbone from a `ModelSpec` and hands it over as a
`Denoiser`; `processes/` asks for a `ModelSpec` and receives a `Denoiser`.
Both import this module and neither imports the other (DESIGN.md section 6):
it holds plain dataclasses of callables, no Flax and no process math.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """The network as the process sees it: callables bound to parameters.

  predict(x_t, t, self_cond=None) -> output
      x_t: int32 [B, L] token ids (token stem) or float [B, L, D] latents;
      t: float [B] in [0, 1]; output: logits [B, L, V_out] or a vector
      [B, L, D] (see `ModelSpec.output`).
  embed(ids [B, L]) -> [B, L, D]: learned token embeddings (Gaussian only).
  round_logits(x [B, L, D]) -> [B, L, V]: logits of p(w | x) (Gaussian only).
  round_nll(x [B, L, D], target [B, L]) -> [B, L]: optional fused
      -log softmax(round_logits(x))[target] (no [B, L, V] array).
  gamma(t [B]) -> [B]: a learned noise schedule gamma(t) = -log SNR(t),
      monotone increasing in t (only with `ModelSpec.learned_schedule`).
  target_nll(x_t, t [B], target [B, L], where [B, L], weights=None)
      -> [B, L]: optional fused -log softmax(predict(x_t, t))[target]
      evaluated only where `where` holds (values elsewhere arbitrary).
  target_lse(x_t, t [B], target, where, classes=None, weights=None)
      -> ([B, L], [B, L]): optional; `target_nll` and logsumexp(logits)
      together, over the first `classes` outputs, fused at the selected
      positions.
  map_logits(x_t, t [B], fn, rows, self_cond=None, weights=None, chunk=None)
      -> pytree of [B, L, ...]: optional; fn(logits [C, V], rows of C
      positions) -> per-position values, applied to the logits of `predict`
      a chunk of positions at a time (`rows`: a pytree of [B, L, ...] arrays
      split the same way; C = `chunk`, default ROW_CHUNK), so no [B, L, V]
      array exists in either pass; see `map_rows` below.
  `weights` (target_nll, target_lse, map_logits): the weight the caller's
  loss gives each output per position, up to one common factor (a pytree
  like the output).
  With it the gradient is formed in the forward pass from the logits already
  computed (`models.folded`); the backward pass checks the cotangents it
  gets against it and recomputes exactly if they differ (with a warning
  where `folded.warn_enabled()`).
  """

  predict: Callable[..., Array]
  embed: Optional[Callable[[Array], Array]] = None
  round_logits: Optional[Callable[[Array], Array]] = None
  round_nll: Optional[Callable[[Array, Array], Array]] = None
  gamma: Optional[Callable[[Array], Array]] = None
  target_nll: Optional[Callable[..., Array]] = None
  target_lse: Optional[Callable[..., tuple[Array, Array]]] = None
  map_logits: Optional[Callable[..., object]] = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What a process needs from the backbone; the model builder reads it.

  input: 'tokens' (embedding stem over `input_vocab` ids) or 'latents'
      (a projection stem over `latent_dim`-dimensional vectors).
  output: 'logits' (a head over `output_dim` classes) or 'vector' (a head
      of size `output_dim` in latent space).
  embed_vocab: size of a learned token-embedding table of width `latent_dim`
      exposed as `Denoiser.embed` / `round_logits` (Gaussian processes).
  causal: causal attention (the AR baseline).
  self_conditioning: `predict` accepts a `self_cond` input of the same shape
      as its latent input.
  learned_schedule: the model carries a monotone network gamma(t) = -log SNR
      exposed as `Denoiser.gamma`, initialised to the line from
      gamma_range[0] (t=0) to gamma_range[1] (t=1) (Kingma et al. 2021 sec. 5).
  time_input: what `predict` receives as its time argument: 't' (the
      process time in [0, 1]) or 'total_noise' (sigma_bar(t) of the
      process's schedule, which SEDD's published DiT was trained on).
  """

  input: str
  output: str
  output_dim: int
  input_vocab: Optional[int] = None
  latent_dim: Optional[int] = None
  embed_vocab: Optional[int] = None
  causal: bool = False
  self_conditioning: bool = False
  learned_schedule: bool = False
  gamma_range: tuple[float, float] = (-10.0, 10.0)
  time_input: str = "t"


def cross_entropy(logits_BxLxV: Array, target_BxL: Array) -> Array:
  """-log softmax(logits)[target] [B, L] in float32, as logsumexp minus the
  target logit (no [B, L, V] log-probabilities). The dense reference of
  `Denoiser.target_nll`; every process's cross-entropy is this one."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  target_BxL = jnp.take_along_axis(
      logits_BxLxV, target_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BxLxV, axis=-1) - target_BxL


ROW_CHUNK = 128  # positions per chunk: a [128, 10k] float32 block is 5 MB
# Positions per chunk of a chunked head (`Denoiser.map_logits`) whose row
# function holds only a few V-wide temporaries (the uniform D3PM and SEDD
# terms): at the benchmark size (d = 256, V = 10k) their train steps ran
# 3-4% faster at 256 than at 128 on a 2-core CPU, where gaussian_vlb's
# heavier x0-hat ran 3% slower; at the demo's d = 128, where the head's
# matmul is half as large next to the V-wide work, 256 ran 0-4% slower.
LIGHT_ROW_CHUNK = 256


def map_rows(fn: Callable, rows, chunk: Optional[int] = None):
  """fn over the leading axis of `rows` a chunk at a time: fn(rows of C) ->
  a pytree of [C, ...], concatenated back to [N, ...].

  For vocabulary-sized work per position (softmaxes, score sums): each
  chunk is recomputed in the backward pass (jax.checkpoint), so neither
  pass holds more than one chunk's [C, V] temporaries (DESIGN.md section 8).
  fn must act row by row; it may close over parameters (differentiable).
  The last chunk is padded with copies of the last row, so fn never sees
  rows that are not real values.
  """
  n = jax.tree.leaves(rows)[0].shape[0]
  chunk = chunk or ROW_CHUNK
  if n <= chunk:
    return fn(rows)
  out = jax.lax.map(jax.checkpoint(fn, prevent_cse=False),
                    jax.tree.map(lambda a: split_rows(a, chunk), rows))
  return jax.tree.map(lambda a: join_rows(a, n), out)


def split_rows(a: Array, chunk: int) -> Array:
  """[N, ...] -> [ceil(N / chunk), chunk, ...], the last chunk padded with
  copies of the last row (real values, never garbage)."""
  pad = [(0, -a.shape[0] % chunk)] + [(0, 0)] * (a.ndim - 1)
  return jnp.pad(a, pad, mode="edge").reshape(-1, chunk, *a.shape[1:])


def join_rows(a: Array, n: int) -> Array:
  """The inverse of `split_rows`: [K, chunk, ...] -> the first n rows."""
  return a.reshape(-1, *a.shape[2:])[:n]
