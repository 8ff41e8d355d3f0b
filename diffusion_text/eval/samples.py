"""Draw text samples from a trained workdir through the one sampling loop.

Every setting comes from the workdir's `sample` config section (the CLI's
flags are shorthand for `--set sample.KEY=VALUE`); the sampler receives
them as one `processes.SamplingOptions`.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
from flax import nnx

from diffusion_text import processes, run as run_lib, sampling
from diffusion_text.config import SampleConfig
from diffusion_text.models import as_denoiser


def sampling_options(sc: SampleConfig):
  """The sampler's options from the `sample` config section."""
  return processes.SamplingOptions(sampler=sc.sampler,
                                   temperature=sc.temperature, top_p=sc.top_p,
                                   top_k=sc.top_k, float64=sc.float64,
                                   block_length=sc.block_length,
                                   remask_eta=sc.remask_eta,
                                   remask_t_on=sc.remask_t_on,
                                   remask_t_off=sc.remask_t_off,
                                   remask_alpha_on=sc.remask_alpha_on)


def make_sampler(process, graphdef, sc: SampleConfig, length: int,
                 wrap_denoiser: Optional[Callable] = None):
  """The jitted sampler `fn(key, params, *cond) -> ids [num, length]`.

  `wrap_denoiser(Denoiser) -> Denoiser` (e.g. a network-call counter) is
  applied inside the jitted function.
  """
  wrap = wrap_denoiser or (lambda d: d)
  build = lambda p: wrap(as_denoiser(nnx.merge(graphdef, p)))
  steps = sc.steps or None
  return sampling.make_sampler(process, sc.num, length, steps, build,
                               options=sampling_options(sc))


def notices(tokenizer, text: str, length: int, trained_length: int
            ) -> list[str]:
  """What a sampling request asks beyond the training data: samples longer
  than the training blocks, and prompt or infill words (pieces around each
  `sampling.GAP`) that are not in the vocabulary."""
  out = []
  if length > trained_length:
    out.append(f"length {length} is longer than the {trained_length}-token "
               "blocks the model was trained on; positions past them were "
               "never trained")
  unknown = sorted({u for piece in text.split(sampling.GAP)
                    for u in tokenizer.unknown(piece)})
  if unknown:
    out.append("not in the vocabulary, fixed as the unknown token: "
               + ", ".join(map(repr, unknown)))
  return out


def sample_workdir(workdir, overrides=(), prompt: Optional[str] = None,
                   infill: Optional[str] = None,
                   log: Callable[[str], None] = print) -> list[str]:
  """`sample.num` texts from a trained workdir (config read once)."""
  if prompt is not None and infill is not None:
    raise ValueError("use either --prompt or --infill, not both")
  run, params, _ = run_lib.open_workdir(workdir, overrides, log)
  sc = run.cfg.sample
  length = sc.length or run.cfg.data.seq_len
  tok = run.prepared.tokenizer
  for notice in notices(tok, prompt or infill or "", length,
                       run.cfg.data.seq_len):
    log(f"[sample] {notice}")
  cond = ()
  if prompt is not None:
    cond = sampling.prompt_condition(tok, prompt, length)
  elif infill is not None:
    cond = sampling.infill_condition(tok, infill, length)
  fn = make_sampler(run.process, run.graphdef, sc, length)
  ids = jax.device_get(fn(jax.random.key(sc.seed), params, *cond))
  return [tok.decode([int(i) for i in row]) for row in ids]
