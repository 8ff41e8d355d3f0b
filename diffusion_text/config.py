"""Typed, frozen run configuration; presets are functions; dotted overrides.

A run is fully described by one `Config`. Presets live in `experiments/`
(one module per paper row, each with a `config()` function). Command-line
overrides are `key=value` with dotted keys, e.g. `train.steps=200` or
`process.schedule=cosine_alpha` (keys under `process.` other than `name` are the
process's own options; run.check_process validates them against the
process registry, so this module imports no other part of the package).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import pathlib
import typing
from typing import Any, Optional


class ConfigError(ValueError):
  """A user-facing configuration mistake; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
  """What defines the model and its bound (part of a workdir's identity).

  Sampling-time settings (temperature, top_p, sampler) are SampleConfig's.
  """
  name: str = "masked"           # registry name, see processes.names()
  options: dict = dataclasses.field(default_factory=dict)  # process options
  # (vocab_size is filled in from the tokenizer; never set it here; a
  # Gaussian process's latent_dim, the embedding width, is one of these)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  num_layers: int = 4            # transformer blocks
  d_model: int = 256             # residual width
  num_heads: int = 4             # attention heads (d_model % num_heads == 0)
  mlp_ratio: int = 4             # MLP hidden = mlp_ratio * d_model
  cond_dim: int = 128            # width of the time embedding fed to adaLN
  dtype: str = "float32"         # compute dtype: float32 or bfloat16
  remat: bool = False            # rematerialise each block in the backward pass
  scan_layers: bool = False      # stack blocks and jax.lax.scan over them


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "ptb"            # corpus name (data.sources.names()), tfds:NAME or hf:NAME
  path: Optional[str] = None     # text/text8: a file; files/owt: a file, dir or glob; lm1b: release dir
  tokenizer: str = "word"        # word | char | gpt2 | bert | text8
  seq_len: int = 128             # tokens per training/eval block
  batch_size: int = 32           # global batch (sequences per step)
  data_dir: Optional[str] = None   # corpora; default $DIFFUSION_TEXT_DATA
  cache_dir: Optional[str] = None  # prepared data; default $DIFFUSION_TEXT_CACHE
  seed: int = 0                  # shuffling seed of the training stream
  packing: str = "concat"        # concat (units+EOS cut into blocks) | pad (one padded block per unit)
  valid_docs: int = 100_000      # files/owt sources: last documents held out as 'valid' (SEDD/MDLM OWT)
  txt_document: str = "line"     # files/owt sources: a .txt holds one document per 'line' or per 'file'
  workers: int = 2               # tokenizer processes while preparing corpora over 16 MB (1: in-process)
  shard_blocks: int = 8192       # blocks per array_record shard (the resume granularity)
  allow_download: bool = False   # tfds:/hf: sources may download; otherwise local caches only


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000              # optimizer steps
  lr: float = 1e-3               # peak learning rate
  warmup_steps: int = 100        # linear warmup from 0 to lr
  min_lr_ratio: float = 0.1      # cosine decay ends at lr * min_lr_ratio
  weight_decay: float = 0.01     # AdamW decoupled weight decay
  b1: float = 0.9                # Adam beta1
  b2: float = 0.98               # Adam beta2
  grad_clip: float = 1.0         # global-norm clipping (0 disables)
  ema_decay: float = 0.999       # EMA of parameters (0 disables)
  seed: int = 0                  # model init and noise PRNG seed
  log_every: int = 50            # steps between progress lines / JSONL rows
  checkpoint_every: int = 500    # steps between checkpoints (and at the end)
  keep_checkpoints: int = 2      # checkpoints kept on disk
  parallel: str = "sharded"      # sharded (jit + NamedSharding) or pmap
  mesh_data: int = -1            # devices on the 'data' axis (-1: all)
  mesh_fsdp: int = 1             # devices on the 'fsdp' axis (params sharded)
  max_seconds: float = 0.0       # stop (and checkpoint) after this wall time; 0: no limit


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`diffusion-text eval` settings; its flags are shorthand for these."""
  split: str = "test"            # train | valid | test
  mc_samples: int = 1            # Monte-Carlo time samples per block
  max_blocks: int = 0            # evaluate at most this many blocks (0: all)
  batch_size: int = 32           # blocks per evaluation batch
  use_ema: bool = True           # evaluate the EMA parameters
  seed: int = 0                  # PRNG seed of the Monte-Carlo estimate


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """`diffusion-text sample` settings; its flags are shorthand for these."""
  sampler: str = "default"       # sampler variant (process default: "default")
  num: int = 4                   # sequences to draw
  steps: int = 0                 # reverse steps (0: the process default)
  length: int = 0                # tokens per sample (0: data.seq_len)
  seed: int = 0                  # sampling PRNG seed
  temperature: float = 1.0       # softmax temperature where supported
  top_p: float = 1.0             # nucleus sampling where supported
  top_k: int = 0                 # keep the k likeliest tokens (0: off)
  float64: bool = True           # float64-resolution categorical draws
  block_length: int = 0          # semi-autoregressive blocks (0: off)
  remask_eta: float = 0.02       # ReMDM samplers' eta (remdm_cap/rescale)


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "custom"
  process: ProcessConfig = dataclasses.field(default_factory=ProcessConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


# --------------------------------------------------------------------- dicts
def to_dict(cfg: Config) -> dict:
  return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
  kwargs = {}
  for f in dataclasses.fields(Config):
    if f.name not in d:
      continue
    if f.name == "name":
      kwargs["name"] = d["name"]
      continue
    section_cls = _section_class(f.name)
    known = {g.name for g in dataclasses.fields(section_cls)}
    unknown = sorted(set(d[f.name]) - known)
    if unknown:
      raise ConfigError(f"unknown key(s) {unknown} in config section "
                        f"{f.name!r}; valid keys: {', '.join(sorted(known))}")
    kwargs[f.name] = section_cls(**d[f.name])
  return Config(**kwargs)


def _section_class(section: str) -> type:
  hints = typing.get_type_hints(Config)
  return hints[section]


# ----------------------------------------------------------------- overrides
def _parse_value(raw: str, typ: Any, key: str) -> Any:
  origin = typing.get_origin(typ)
  if origin is typing.Union:  # Optional[X]
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if raw.lower() in ("none", "null", ""):
      return None
    return _parse_value(raw, args[0], key)
  try:
    if typ is bool:
      if raw.lower() in ("1", "true", "yes", "on"):
        return True
      if raw.lower() in ("0", "false", "no", "off"):
        return False
      raise ValueError(raw)
    if typ is int:
      return int(raw)
    if typ is float:
      return float(raw)
    if typ is str:
      return raw
  except ValueError:
    raise ConfigError(f"bad value {raw!r} for {key}: expected "
                      f"{getattr(typ, '__name__', typ)}") from None
  return _literal(raw)


def _literal(raw: str) -> Any:
  """Process options: Python/JSON literals, else the raw string."""
  for parse in (ast.literal_eval, json.loads):
    try:
      return parse(raw)
    except (ValueError, SyntaxError):
      pass
  if raw.lower() in ("true", "false"):
    return raw.lower() == "true"
  return raw


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
  """Apply `section.key=value` strings; unknown keys fail with the fix."""
  for item in overrides or []:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value "
                        "(e.g. train.steps=200)")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if key == "name":
      cfg = dataclasses.replace(cfg, name=raw)
      continue
    if len(parts) != 2 or parts[0] not in _SECTIONS or parts[0] == "name":
      raise ConfigError(
          f"unknown config key {key!r}: keys are section.field with section "
          f"one of {', '.join(s for s in _SECTIONS if s != 'name')} "
          "(see docs/configuration.md)")
    section, field = parts
    sec = getattr(cfg, section)
    if section == "process" and field != "name":
      options = dict(cfg.process.options)
      if field == "options":
        raise ConfigError("set process options one by one: process.KEY=VALUE")
      options[field] = _literal(raw)
      sec = dataclasses.replace(sec, options=options)
    else:
      hints = typing.get_type_hints(type(sec))
      if field not in hints:
        raise ConfigError(
            f"unknown config key {key!r}; valid keys in {section!r}: "
            f"{', '.join(sorted(hints))}")
      sec = dataclasses.replace(sec, **{field: _parse_value(raw, hints[field], key)})
    cfg = dataclasses.replace(cfg, **{section: sec})
  validate(cfg)
  return cfg


def validate(cfg: Config) -> None:
  """Checks that need no data; raise ConfigError naming the fix.

  Process options are checked by run.check_process (it knows the processes).
  """
  m = cfg.model
  if m.d_model % m.num_heads:
    raise ConfigError(f"model.d_model={m.d_model} is not divisible by "
                      f"model.num_heads={m.num_heads}")
  if m.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"model.dtype must be float32 or bfloat16, not {m.dtype!r}")
  if cfg.train.parallel not in ("sharded", "pmap"):
    raise ConfigError("train.parallel must be 'sharded' or 'pmap', not "
                      f"{cfg.train.parallel!r}")
  if cfg.data.seq_len < 2 or cfg.data.batch_size < 1:
    raise ConfigError("data.seq_len must be >= 2 and data.batch_size >= 1")
  if cfg.eval.split not in ("train", "valid", "test"):
    raise ConfigError(f"eval.split must be train, valid or test, not "
                      f"{cfg.eval.split!r}")
  if cfg.eval.mc_samples < 1 or cfg.eval.batch_size < 1:
    raise ConfigError("eval.mc_samples and eval.batch_size must be >= 1")
  s = cfg.sample
  if s.num < 1 or s.steps < 0 or s.length < 0:
    raise ConfigError("sample.num must be >= 1, sample.steps and "
                      "sample.length >= 0 (0: the default)")
  if s.temperature < 0 or not 0.0 < s.top_p <= 1.0:
    raise ConfigError(f"sample.temperature must be >= 0 and sample.top_p in "
                      f"(0, 1], not {s.temperature} and {s.top_p}")


# ------------------------------------------------------------------- presets
EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments"


def preset_names() -> list[str]:
  return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py")
                if not p.stem.startswith("_"))


def load_preset(name: str) -> Config:
  """A preset by name (experiments/NAME.py) or by path to a .py file."""
  path = pathlib.Path(name)
  if path.suffix != ".py":
    path = EXPERIMENTS_DIR / f"{name}.py"
  if not path.exists():
    raise ConfigError(f"unknown config {name!r}; presets: "
                      f"{', '.join(preset_names())} (or a path to a .py file)")
  spec = importlib.util.spec_from_file_location(f"_preset_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.config()
  if cfg.name == "custom":
    cfg = dataclasses.replace(cfg, name=path.stem)
  return cfg


def data_dir(cfg: Config) -> pathlib.Path:
  d = cfg.data.data_dir or os.environ.get("DIFFUSION_TEXT_DATA")
  if not d:
    raise ConfigError("no data directory: set DIFFUSION_TEXT_DATA or "
                      "data.data_dir=PATH (e.g. ../shared/data)")
  return pathlib.Path(d).expanduser()


def cache_dir(cfg: Config) -> pathlib.Path:
  d = (cfg.data.cache_dir or os.environ.get("DIFFUSION_TEXT_CACHE")
       or os.path.join(os.path.expanduser("~"), ".cache", "diffusion_text"))
  return pathlib.Path(d).expanduser()
