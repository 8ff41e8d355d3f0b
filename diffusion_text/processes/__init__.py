"""Diffusion processes, built by registry name (DESIGN.md section 2).

A new family is one file in this package and one line in `_REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from diffusion_text.processes.base import (Bound, Denoiser, LossOutput,
                                           ModelSpec, Process)

# name -> "module:Class"; modules are imported on first use.
_REGISTRY: dict[str, str] = {
    "gaussian": "diffusion_text.processes.gaussian:GaussianProcess",
    "gaussian_vlb": "diffusion_text.processes.gaussian_vlb:GaussianVLBProcess",
    "d3pm_uniform": "diffusion_text.processes.categorical:D3PMUniform",
    "d3pm_absorbing": "diffusion_text.processes.categorical:D3PMAbsorbing",
    "masked": "diffusion_text.processes.masked:MaskedProcess",
    "sedd_absorb": "diffusion_text.processes.sedd:SEDDAbsorb",
    "sedd_uniform": "diffusion_text.processes.sedd:SEDDUniform",
    "ar": "diffusion_text.processes.autoregressive:Autoregressive",
}


def names() -> list[str]:
  return list(_REGISTRY)


def process_class(name: str) -> type[Process]:
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown process {name!r}; choose one of: {', '.join(_REGISTRY)}")
  module, cls = _REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)


def option_names(name: str) -> list[str]:
  return [f.name for f in dataclasses.fields(process_class(name))]


def make_process(name: str, **options: Any) -> Process:
  """Build the process `name` with `options` (vocab_size is required)."""
  cls = process_class(name)
  valid = option_names(name)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(
        f"unknown option(s) {unknown} for process {name!r}; "
        f"valid options: {', '.join(valid)}")
  if "vocab_size" not in options:
    raise ValueError(f"process {name!r} needs vocab_size (the data's vocabulary)")
  return cls(**options)


__all__ = ["Bound", "Denoiser", "LossOutput", "ModelSpec", "Process",
           "make_process", "names", "option_names", "process_class"]
