"""Draw text samples from a trained workdir through the one sampling loop."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Optional

import jax
from flax import nnx

from diffusion_text import sampling
from diffusion_text.models import as_denoiser
from diffusion_text.processes import SamplingOptions


def with_sampling_options(process, **options) -> SamplingOptions:
  """The SamplingOptions from the given (non-None) sampler, temperature,
  top_p, checked against what `process` supports."""
  fields = {f.name for f in dataclasses.fields(SamplingOptions)}
  given = {k: v for k, v in options.items() if v is not None}
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"unknown sampling option(s) {unknown}; valid: "
                     f"{', '.join(sorted(fields))}")
  sampling_options = SamplingOptions(**given)
  process.sampler(sampling_options)
  return sampling_options


def sample_workdir(workdir, num: int = 4, steps: int = 0, length: int = 0,
                   seed: int = 0, prompt: Optional[str] = None,
                   infill: Optional[str] = None, use_ema: bool = True,
                   options: Optional[dict] = None,
                   log: Callable[[str], None] = print) -> list[str]:
  from diffusion_text import train
  workdir = pathlib.Path(workdir)
  cfg = train.load_config(workdir)
  run = train.setup(cfg, workdir, log)
  params, step = train.restore_params(run, workdir, use_ema=use_ema)
  process = run.process
  sampling_options = with_sampling_options(process, **(options or {}))
  length = length or cfg.data.seq_len
  tok = run.prepared.tokenizer
  if prompt is not None and infill is not None:
    raise ValueError("use either --prompt or --infill, not both")
  cond = ()
  if prompt is not None:
    cond = sampling.prompt_condition(tok, prompt, length)
  elif infill is not None:
    cond = sampling.infill_condition(tok, infill, length)
  fn = sampling.make_sampler(
      process, num, length, steps or None,
      build_denoiser=lambda p: as_denoiser(nnx.merge(run.graphdef, p)),
      options=sampling_options)
  ids = jax.device_get(fn(jax.random.key(seed), params, *cond))
  return [tok.decode([int(i) for i in row]) for row in ids]
