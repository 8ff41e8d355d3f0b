"""Typed, frozen run configuration; presets are functions; dotted overrides.

A run is fully described by one `Config`. Presets live in `experiments/`
(one module per paper row, each with a `config()` function). Command-line
overrides are `key=value` with dotted keys, e.g. `train.steps=200` or
`process.schedule=cosine_alpha` (keys under `process.` other than `name` are the
process's own options; run.check_process validates them against the
process registry, so this module imports no other part of the package but
`fields`, which holds each field's declared range: `spec`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import pathlib
import tempfile
import typing
from typing import Any, Optional

from diffusion_text import fields
from diffusion_text.fields import spec


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
  num_layers: int = spec(4, lo=1)  # transformer blocks
  d_model: int = spec(256, lo=1)  # residual width
  num_heads: int = spec(4, lo=1)  # attention heads (d_model % num_heads == 0)
  mlp_ratio: int = spec(4, lo=1)  # MLP hidden = mlp_ratio * d_model
  cond_dim: int = spec(128, lo=1)  # width of the time embedding fed to adaLN
  dtype: str = spec("auto", choices=("auto", "float32", "bfloat16"))  # compute dtype
  # (auto: bfloat16 on GPU/TPU, float32 on CPU, chosen when the model is
  # built; parameters stay float32 either way, see compute_dtype)
  remat: bool = False            # rematerialise each block in the backward pass
  scan_layers: bool = False      # stack blocks and jax.lax.scan over them
  backbone: str = spec("dit", choices=("dit", "gpt2", "sedd_dit", "mdlm_dit"))  # dit (ours) | gpt2 | sedd_dit | mdlm_dit (published, models/backbones.py)
  arch: dict = dataclasses.field(default_factory=dict, hash=False)  # a published backbone's own config (written by `import`)
  vocab_size: int = spec(0, lo=0)  # network token table (0: the tokenizer's); an import keeps its checkpoint's


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "ptb"            # corpus name (data.sources.names()), tfds:NAME or hf:NAME
  path: Optional[str] = None     # text/text8: a file; files/owt: a file, dir or glob; lm1b: release dir
  tokenizer: str = "word"        # word | char | gpt2 | bert | text8
  seq_len: int = spec(128, lo=2)  # tokens per training/eval block
  batch_size: int = spec(32, lo=1)  # global batch (sequences per step)
  data_dir: Optional[str] = None   # corpora; default $DIFFUSION_TEXT_DATA
  cache_dir: Optional[str] = None  # prepared data; default $DIFFUSION_TEXT_CACHE
  seed: int = spec(0, lo=0)  # shuffling seed of the training stream
  packing: str = spec("concat", choices=("concat", "pad"))  # concat (units+EOS cut into blocks) | pad (one padded block per unit)
  valid_docs: int = spec(100_000, lo=0)  # files/owt sources: last documents held out as 'valid' (SEDD/MDLM OWT)
  txt_document: str = spec("line", choices=("line", "file"))  # files/owt sources: a .txt holds one document per 'line' or per 'file'
  workers: int = spec(2, lo=1)  # tokenizer processes while preparing corpora over 16 MB (1: in-process)
  shard_blocks: int = spec(8192, lo=1)  # blocks per array_record shard (the resume granularity)
  allow_download: bool = False   # tfds:/hf: sources may download; otherwise local caches only


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = spec(1000, lo=1)  # optimizer steps
  lr: float = spec(1e-3, lo=0, lo_open=True)  # peak learning rate
  warmup_steps: int = spec(100, lo=0)  # linear warmup from 0 to lr
  min_lr_ratio: float = spec(0.1, lo=0, hi=1)  # cosine decay ends at lr * min_lr_ratio
  weight_decay: float = spec(0.01, lo=0)  # AdamW decoupled weight decay
  b1: float = spec(0.9, lo=0, hi=1, hi_open=True)  # Adam beta1
  b2: float = spec(0.98, lo=0, hi=1, hi_open=True)  # Adam beta2
  grad_clip: float = spec(1.0, lo=0)  # global-norm clipping (0 disables)
  ema_decay: float = spec(0.999, lo=0, hi=1, hi_open=True)  # EMA of parameters (0 disables)
  seed: int = spec(0, lo=0)  # model init and noise PRNG seed
  log_every: int = spec(50, lo=1)  # steps between progress lines / JSONL rows
  checkpoint_every: int = spec(500, lo=1)  # steps between checkpoints (and at the end)
  keep_checkpoints: int = spec(2, lo=1)  # checkpoints kept on disk
  parallel: str = spec("sharded", choices=("sharded", "pmap"))  # sharded (jit + NamedSharding) or pmap
  mesh_data: int = spec(-1, lo=-1, not_=0)  # devices on the 'data' axis (-1: all)
  mesh_fsdp: int = spec(1, lo=1)  # devices on the 'fsdp' axis (params sharded)
  max_seconds: float = spec(0.0, lo=0)  # stop (and checkpoint) after this wall time; 0: no limit
  max_consecutive_skips: int = spec(10, lo=0)  # stop after more non-finite steps in a row
  grad_accum: int = spec(1, lo=1)  # micro-batches per step (data.batch_size is the global batch)
  eval_every: int = spec(0, lo=0)  # steps between validation bounds during training (0: never)
  eval_blocks: int = spec(64, lo=0)  # validation blocks per evaluation (0: the whole split)
  tensorboard: bool = True       # write TensorBoard event files beside metrics.jsonl
  peak_flops: float = spec(0.0, lo=0)  # peak FLOP/s per device for MFU (0: look up the chip)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`diffusion-text eval` settings; its flags are shorthand for these."""
  split: str = spec("test", choices=("train", "valid", "test"))  # train | valid | test
  mc_samples: int = spec(1, lo=1)  # Monte-Carlo time samples per block
  max_blocks: int = spec(0, lo=0)  # evaluate at most this many blocks (0: all)
  batch_size: int = spec(32, lo=1)  # blocks per evaluation batch
  use_ema: bool = True           # evaluate the EMA parameters
  seed: int = spec(0, lo=0)  # PRNG seed of the Monte-Carlo estimate
  time_sampling: str = spec("independent", choices=("independent", "stratified"))  # a block's K times: independent, or in K strata (one call)
  target_sem: float = spec(0.0, lo=0)  # adaptive K: raise K per block until its MC error (nats/token) is below this; 0: off
  max_mc_samples: int = spec(256, lo=1)  # adaptive K never exceeds this per block


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """`diffusion-text sample` settings; its flags are shorthand for these."""
  sampler: str = "default"       # sampler variant (process default: "default")
  num: int = spec(4, lo=1)  # sequences to draw
  steps: int = spec(0, lo=0)  # reverse steps (0: the process default)
  length: int = spec(0, lo=0)  # tokens per sample (0: data.seq_len)
  seed: int = spec(0, lo=0)  # sampling PRNG seed
  temperature: float = spec(1.0, lo=0)  # softmax temperature where supported
  top_p: float = spec(1.0, lo=0, hi=1, lo_open=True)  # nucleus sampling where supported
  top_k: int = spec(0, lo=0)  # keep the k likeliest tokens (0: off)
  float64: bool = True           # float64-resolution categorical draws
  block_length: int = spec(0, lo=0)  # semi-autoregressive blocks (0: off)
  remask_eta: float = spec(0.02, lo=0, hi=1)  # ReMDM samplers' eta (remdm_cap/rescale/loop)
  remask_t_on: float = spec(0.55, lo=0, hi=1, lo_open=True, hi_open=True)  # remdm_loop: the held-noise window starts (sampler clock)
  remask_t_off: float = spec(0.05, lo=0, hi=1, lo_open=True, hi_open=True)  # remdm_loop: ... and ends
  remask_alpha_on: float = spec(0.9, lo=0, hi=1, lo_open=True, hi_open=True)  # remdm_loop: keep probability held in the window


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

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def compute_dtype(dtype: str) -> str:
  """The concrete compute dtype of `model.dtype` on this JAX backend.

  "auto" is what a config stores, so a workdir keeps one identity whether it
  trains on CPU or on an accelerator (checkpoints hold float32 parameters in
  both cases); it becomes bfloat16 on GPU/TPU, whose matrix units run bf16
  at several times their float32 rate, and float32 on CPU, which has no such
  units and where the tests pin float32 numbers.
  """
  if dtype != "auto":
    return dtype
  import jax  # here only: config imports nothing heavy at module level
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


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
  return resolve_paths(cfg)


def validate(cfg: Config) -> None:
  """Every field against its type and its `spec` range, then the few rules
  that tie fields together; raise ConfigError naming the field.

  Process options are checked by run.check_process (it knows the processes).
  """
  for section in _SECTIONS:
    if section == "name":
      continue
    sec = getattr(cfg, section)
    err = fields.first_error(section, sec)
    if err:
      raise ConfigError(err)
  m = cfg.model
  if m.d_model % m.num_heads:
    raise ConfigError(f"model.d_model={m.d_model} is not divisible by "
                      f"model.num_heads={m.num_heads}")
  t = cfg.train
  if cfg.data.batch_size % t.grad_accum:
    raise ConfigError(f"train.grad_accum={t.grad_accum} must divide "
                      f"data.batch_size={cfg.data.batch_size}")


def resolve_paths(cfg: Config) -> Config:
  """data.path / data_dir / cache_dir made absolute once (from the directory
  the command runs in), so a workdir's config works from anywhere."""
  absolute = lambda p: p if p is None else os.path.abspath(
      os.path.expanduser(p))
  d = cfg.data
  return dataclasses.replace(cfg, data=dataclasses.replace(
      d, path=absolute(d.path), data_dir=absolute(d.data_dir),
      cache_dir=absolute(d.cache_dir)))


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
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path} has a syntax error on line "
                      f"{e.lineno}: {e.msg}; fix it") from None
  if not callable(getattr(module, "config", None)):
    raise ConfigError(f"config file {path} defines no config() function; "
                      "add `def config(): return Config(...)` (see "
                      "experiments/synthetic_masked.py)")
  cfg = module.config()
  if not isinstance(cfg, Config):
    raise ConfigError(f"config() in {path} returned {type(cfg).__name__}, "
                      "not a diffusion_text.config.Config")
  if cfg.name == "custom":
    cfg = dataclasses.replace(cfg, name=path.stem)
  return cfg


REPO = pathlib.Path(__file__).resolve().parent.parent


def _source_checkout() -> bool:
  return (REPO / "pyproject.toml").exists()


def default_data_dir() -> Optional[str]:
  """$DIFFUSION_TEXT_DATA, else ../shared/data next to a source checkout
  (where `make` points it too), else None."""
  d = os.environ.get("DIFFUSION_TEXT_DATA")
  shared = REPO.parent / "shared" / "data"
  if not d and _source_checkout() and shared.is_dir():
    d = str(shared)
  return d


def data_dir(cfg: Config) -> pathlib.Path:
  """data.data_dir, else `default_data_dir()`."""
  d = cfg.data.data_dir or default_data_dir()
  if d:
    return pathlib.Path(d).expanduser()
  raise ConfigError("no data directory: set DIFFUSION_TEXT_DATA or "
                    "--data-dir PATH (a source checkout uses ../shared/data "
                    "when it exists)")


def cache_dir(cfg: Config) -> pathlib.Path:
  """data.cache_dir, else $DIFFUSION_TEXT_CACHE, else .cache/ in a source
  checkout, else ~/.cache/diffusion_text; it must be writable."""
  d = cfg.data.cache_dir or os.environ.get("DIFFUSION_TEXT_CACHE")
  if not d:
    d = (REPO / ".cache" if _source_checkout()
         else pathlib.Path("~/.cache/diffusion_text"))
  path = pathlib.Path(d).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe")
    probe.close()
  except OSError as e:
    raise ConfigError(f"cache directory {path} is not writable "
                      f"({e.strerror or e}); set --cache-dir or "
                      "DIFFUSION_TEXT_CACHE to a writable directory") from None
  return path
