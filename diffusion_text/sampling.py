"""The one sampling loop shared by every process (DESIGN.md section 1).

  x = prior -> impose conditioning at t_0 = 1 -> for i < steps:
      x = reverse_step(fold_in(key, i), x, t_i, t_{i+1}); impose at t_{i+1}
  -> decode

The loop is a single `jax.lax.fori_loop`, so a sampler compiles once per
(process, batch shape, steps). Keys follow the md4 sampler: `fold_in(key, i)`.

How to sample (the sampler variant, temperature, top-p) is a
`SamplingOptions`, separate from the process: the process defines the model
and its bound, the options only the draw. Each step goes through the
sampler-state protocol of `Process` (e.g. the cached masked sampler keeps the
last prediction to skip network calls):

  init_sampler_state(x_T, options) -> state                  (any pytree)
  reverse_step_with_state(key, denoiser, x_t, t, s, state, options)
      -> (x_s, state)

which by default carries nothing and calls `reverse_step`.

Conditioning (prompts, infilling) is a pair `cond_tokens`, `cond_mask` of
shape [length] or [num, length]; the process's `condition` sets the positions
in `cond_mask` after every step: to a draw of q(x_t | tokens) (`impose`), or
to the clean values for a model trained with `train_conditioning`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_text.contract import Denoiser
from diffusion_text.processes.base import Process, SamplingOptions

Array = jax.Array

GAP = "___"  # marks a span to generate in an infilling template


def sample(key: Array, process: Process, denoiser: Denoiser, num: int,
           length: int, steps: Optional[int] = None,
           cond_tokens: Optional[Array] = None,
           cond_mask: Optional[Array] = None,
           options: SamplingOptions = SamplingOptions()) -> Array:
  """Draw `num` sequences of `length` tokens -> int32 [num, length]."""
  process.sampler(options)  # an unknown sampler fails before tracing
  steps = process.num_sampling_steps(steps, length, options)
  grid_T = process.time_grid(steps, length, options)
  prior_key, step_key, impose_key = jax.random.split(key, 3)
  conditioned = cond_tokens is not None
  if conditioned:
    if cond_mask is None:
      raise ValueError("cond_tokens needs a cond_mask (1 = keep the token)")
    cond_tokens = jnp.broadcast_to(jnp.asarray(cond_tokens, jnp.int32),
                                   (num, length))
    cond_mask = jnp.broadcast_to(jnp.asarray(cond_mask, bool), (num, length))

  def impose(i, x, t):
    if not conditioned:
      return x
    return process.condition(jax.random.fold_in(impose_key, i), denoiser, x,
                             t, cond_tokens, cond_mask)

  x = impose(0, process.prior(prior_key, (num, length)), grid_T[0])
  state = process.init_sampler_state(x, options)

  def body(i, carry):
    x_t, state = carry
    t, s = grid_T[i], grid_T[i + 1]
    key_i = jax.random.fold_in(step_key, i)
    x_s, state = process.reverse_step_with_state(key_i, denoiser, x_t, t, s,
                                                 state, options)
    return impose(i + 1, x_s, s), state

  x, _ = jax.lax.fori_loop(0, steps, body, (x, state))
  return process.decode(denoiser, x, options).astype(jnp.int32)


def make_sampler(process: Process, num: int, length: int,
                 steps: Optional[int] = None,
                 build_denoiser: Optional[Callable[[Any], Denoiser]] = None,
                 options: SamplingOptions = SamplingOptions()):
  """A jitted `fn(key, params, cond_tokens=None, cond_mask=None) -> ids`.

  `build_denoiser(params) -> Denoiser` must be pure; with Flax NNX:
  `lambda p: models.as_denoiser(nnx.merge(graphdef, p))`. Without it,
  `params` must already be a `Denoiser` (then it is a static argument and
  each new Denoiser object retraces). `options` picks the sampler variant,
  temperature and top-p; it is checked here, before anything compiles.
  """
  process.sampler(options)
  if build_denoiser is None:
    def run(key, denoiser, cond_tokens=None, cond_mask=None):
      return sample(key, process, denoiser, num, length, steps,
                    cond_tokens, cond_mask, options)
    return jax.jit(run, static_argnums=1)

  def run(key, params, cond_tokens=None, cond_mask=None):
    return sample(key, process, build_denoiser(params), num, length, steps,
                  cond_tokens, cond_mask, options)
  return jax.jit(run)


# ---- prompts ----------------------------------------------------------------
def _encode(tokenizer: Any, text: str) -> list[int]:
  """Ids of `text` from a tokenizer with `.encode` (or a plain callable)."""
  out = tokenizer.encode(text) if hasattr(tokenizer, "encode") else tokenizer(text)
  out = getattr(out, "ids", out)  # a `tokenizers.Encoding`
  return [int(i) for i in out]


def prompt_condition(tokenizer: Any, text: str,
                     length: int) -> tuple[np.ndarray, np.ndarray]:
  """Prefix prompt: `text`'s tokens fixed at the start, the rest generated.

  Returns (cond_tokens int32 [length], cond_mask bool [length]).
  """
  return _layout([_encode(tokenizer, text)], [], length, text)


def infill_condition(tokenizer: Any, template: str, length: int,
                     gap_lengths: Optional[Sequence[int]] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Infilling: "A ___ B ___ C" fixes the pieces, generates the gaps.

  Layout rule: without `gap_lengths` the gaps share the free length
  (`length` minus the fixed tokens) equally, earlier gaps taking the
  remainder, so the last piece ends the sequence ("A ___ B" puts A first and
  B last). With `gap_lengths` (one per "___") each gap has exactly that many
  tokens and positions after the last piece are free to generate too.
  Pieces are encoded separately with trailing spaces stripped (a BPE word
  carries its own leading space, so the generated gap supplies it).

  Returns (cond_tokens int32 [length], cond_mask bool [length]).
  """
  pieces = template.split(GAP)
  if len(pieces) < 2:
    raise ValueError(f"infill template {template!r} has no gap: mark the "
                     f"span to generate with {GAP!r}, e.g. 'A {GAP} B'")
  ids = [_encode(tokenizer, p.rstrip()) if p.strip() else [] for p in pieces]
  num_gaps = len(pieces) - 1
  if gap_lengths is None:
    free = length - sum(len(p) for p in ids)
    if free < 0:
      _too_long(template, sum(len(p) for p in ids), length)
    gap_lengths = [free // num_gaps + (g < free % num_gaps)
                   for g in range(num_gaps)]
  elif len(gap_lengths) != num_gaps:
    raise ValueError(f"template {template!r} has {num_gaps} gap(s) but "
                     f"gap_lengths has {len(gap_lengths)}")
  return _layout(ids, list(gap_lengths), length, template)


def _layout(pieces: list[list[int]], gaps: list[int], length: int,
            text: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Place pieces[0], gap[0], pieces[1], ... from position 0."""
  tokens = np.zeros((length,), np.int32)
  keep = np.zeros((length,), bool)
  pos = 0
  for i, piece in enumerate(pieces):
    if pos + len(piece) > length:
      _too_long(text, pos + len(piece), length)
    tokens[pos:pos + len(piece)] = piece
    keep[pos:pos + len(piece)] = True
    pos += len(piece) + (gaps[i] if i < len(gaps) else 0)
  return tokens, keep


def _too_long(text: str, needed: int, length: int):
  raise ValueError(f"the prompt {text!r} needs {needed} positions but samples "
                   f"have length {length}: shorten it or raise sample.length")
