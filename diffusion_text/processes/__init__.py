"""Diffusion processes, built by registry name (DESIGN.md section 2).

A new family is one file in this package and one line in `_REGISTRY`.
`check_options` is the one place process options are validated (names,
types and values); `make_process` and the config both go through it.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any

from diffusion_text.contract import Denoiser, ModelSpec
from diffusion_text.processes.base import (Bound, LossOutput, Process,
                                           SamplingOptions)

# name -> "module:Class"; modules are imported on first use.
_REGISTRY: dict[str, str] = {
    "gaussian": "diffusion_text.processes.gaussian:GaussianProcess",
    "gaussian_vlb": "diffusion_text.processes.gaussian_vlb:GaussianVLBProcess",
    "d3pm_uniform": "diffusion_text.processes.d3pm_uniform:D3PMUniform",
    "d3pm_absorbing": "diffusion_text.processes.d3pm_absorbing:D3PMAbsorbing",
    "masked": "diffusion_text.processes.masked:MaskedProcess",
    "sedd_absorb": "diffusion_text.processes.sedd_absorb:SEDDAbsorb",
    "sedd_uniform": "diffusion_text.processes.sedd_uniform:SEDDUniform",
    "ar": "diffusion_text.processes.autoregressive:Autoregressive",
}


def register(name: str, target: str) -> None:
  """Add a process by name, as "module:Class" (imported on first use);
  a family shipped with the package is a line in `_REGISTRY` instead."""
  if ":" not in target:
    raise ValueError(f"register {name!r}: target {target!r} must read "
                     "'package.module:ClassName'")
  _REGISTRY[name] = target


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


def _coerce(value: Any, kind: type) -> Any:
  """`value` as a `kind` option, or raise TypeError saying what was wanted."""
  if kind is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
      return value.lower() == "true"
    raise TypeError("true or false")
  if kind is int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise TypeError("an integer")
    if isinstance(value, float) and not value.is_integer():
      raise TypeError("an integer")
    return int(value)
  if kind is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise TypeError("a number")
    return float(value)
  if kind is str:
    if not isinstance(value, str):
      raise TypeError("a string")
    return value
  return value


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
  """Validate process options by name, type and value; return them coerced
  (numbers in float options become floats).

  Raises ValueError naming the option, the process and the valid choices.
  Values are checked by building the process (with vocab_size 2 unless
  given), so a registry name such as `schedule` is checked where it is used.
  """
  cls = process_class(name)
  valid = option_names(name)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(
        f"unknown option(s) {unknown} for process {name!r}; "
        f"valid options: {', '.join(valid)}")
  hints = typing.get_type_hints(cls)
  checked = {}
  for key, value in options.items():
    try:
      checked[key] = _coerce(value, hints[key])
    except TypeError as e:
      raise ValueError(f"option {key}={value!r} for process {name!r} must be "
                       f"{e}") from None
  trial = dict(checked)
  trial.setdefault("vocab_size", 2)
  try:
    cls(**trial)
  except ValueError as e:
    raise ValueError(f"process {name!r}: {e}") from None
  return checked


def make_process(name: str, **options: Any) -> Process:
  """Build the process `name` with `options` (vocab_size is required)."""
  if "vocab_size" not in options:
    raise ValueError(f"process {name!r} needs vocab_size (the data's vocabulary)")
  return process_class(name)(**check_options(name, options))


__all__ = ["Bound", "Denoiser", "LossOutput", "ModelSpec", "Process",
           "SamplingOptions", "check_options", "make_process", "names",
           "option_names", "process_class", "register"]
