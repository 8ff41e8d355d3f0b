"""Backbones meet processes: the one place that knows both.

`models/` builds networks from a `ModelSpec` and plain callables;
`processes/` asks for a `ModelSpec` and receives a `Denoiser`. What binds a
published backbone (`models.backbones`) to a process needs both sides, so
it lives above them:
  * the backbone's vocabulary must fit `process.model_spec.input_vocab`;
  * the time the process feeds must be the one the backbone reads
    (`ModelSpec.time_input`; SEDD's DiT reads sigma_bar(t), so a SEDD
    process serving it needs `process.time_input=total_noise`);
  * MDLM's DiT reads sigma(t) = -log alpha(t) of the masked process, given
    to it as a plain `time_fn`.
`build_model(process, model_cfg, seed)` is the model of any run: the
native DiT (`model.backbone=dit`) or a published backbone (`gpt2`,
`sedd_dit`, `mdlm_dit`, with `model.arch` its own config).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from diffusion_text import models
from diffusion_text.config import ModelConfig
from diffusion_text.contract import Denoiser
from diffusion_text.models import backbones
from diffusion_text.processes import Process

NATIVE = "dit"


def masked_total_noise(process: Process) -> backbones.TimeFn:
  """sigma(t) = -log alpha(t) of a masked process, capped at MDLM's
  largest trained noise (alpha >= MDLM_MIN_ALPHA) so t = 1 stays finite."""
  return lambda t_B: -jnp.log(jnp.maximum(process.alpha(t_B),
                                          backbones.MDLM_MIN_ALPHA))


# backbone -> time_fn(process); the rest read what the process feeds.
TIME_FNS = {"mdlm_dit": masked_total_noise}


def check_backbone(name: str, arch: Any, process: Process) -> None:
  """Raise if backbone `name` (config `arch`) cannot serve `process`."""
  bb = backbones.backbone(name)
  spec = process.model_spec
  rows = bb.input_rows(backbones.make_arch(name, arch))
  if rows != spec.input_vocab:
    raise ValueError(
        f"backbone {name!r} has {rows} input ids (BOS/[MASK] included) but "
        f"process {type(process).__name__} with vocab_size="
        f"{process.vocab_size} needs {spec.input_vocab}; set model.vocab_size "
        "to the checkpoint's vocabulary")
  if bb.time_input != spec.time_input:
    raise ValueError(
        f"backbone {name!r} reads time as {bb.time_input!r} but the process "
        f"feeds {spec.time_input!r}; set process.time_input={bb.time_input}")


def time_fn(name: str, process: Process) -> backbones.TimeFn:
  make = TIME_FNS.get(name)
  return make(process) if make else backbones.identity_time


def wrap(name: str, module: nnx.Module, process: Process) -> nnx.Module:
  """A converted published module, ready to serve `process`."""
  check_backbone(name, module.cfg, process)
  return backbones.Adapted(name, module, process.model_spec,
                           time_fn(name, process))


def build_backbone(name: str, arch: Any, process: Process,
                   seed: int = 0) -> nnx.Module:
  """A freshly initialised published backbone `name` for `process`."""
  check_backbone(name, arch, process)
  return backbones.build_adapted(name, arch, process.model_spec,
                                 time_fn(name, process), seed)


def bind_backbone(name: str, module: nnx.Module, process: Process) -> Denoiser:
  """The `Denoiser` through which `process` calls the bare module."""
  return wrap(name, module, process).adapted_denoiser()


def build_model(process: Process, cfg: ModelConfig, seed: int) -> nnx.Module:
  """The network of a run: `cfg.backbone` sized by `cfg` (native) or by
  `cfg.arch` (published backbones)."""
  if cfg.backbone == NATIVE:
    if process.model_spec.time_input != "t":
      raise ValueError("the native dit backbone reads process time t; drop "
                       "process.time_input")
    return models.build_model(process.model_spec, cfg, seed=seed)
  if not cfg.arch:
    raise ValueError(f"model.backbone={cfg.backbone} needs model.arch (its "
                     "published config); create the workdir with "
                     "`diffusion-text import`")
  return build_backbone(cfg.backbone, cfg.arch, process, seed)


__all__ = ["NATIVE", "TIME_FNS", "bind_backbone", "build_backbone",
           "build_model", "check_backbone", "masked_total_noise", "time_fn",
           "wrap"]
