"""A run built from a config or a workdir: data, process, model, parameters.

Everything the loop (train.py), the evaluator (eval/) and the sampler need
before their first step lives here, so none of them imports another:
  - `load_config` reads a workdir's config.json (once per command);
  - `check_process` validates the process and its options, the one place
    that does, before anything is written;
  - `check_workdir` refuses to mix runs: a workdir's identity is its
    process, model and data sections (minus data locations);
  - `setup` prepares data, builds the process and the model;
  - `restore_params` loads the trained (EMA) parameters of a workdir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Callable, Optional

from flax import nnx

from diffusion_text import binding, config as config_lib, processes
from diffusion_text import step as step_lib
from diffusion_text.checkpoint import Checkpointer
from diffusion_text.data import pipeline, tokenizers
from diffusion_text.models import count_params

# Sections that define what a checkpoint is; the rest (steps, logging, eval,
# sampling, data locations) may change between runs on the same workdir.
IDENTITY_KEYS = ("process", "model", "data")
_FREE_DATA_KEYS = ("data_dir", "cache_dir")
# Identity keys that change neither the parameters nor the data blocks: the
# compute dtype (parameters are float32 whatever it is), the tokenizer
# processes and whether tfds:/hf: sources may download. `eval` and `sample`
# may override them; a workdir's training keeps them.
READ_FREE_KEYS = ("model.dtype", "data.workers", "data.allow_download")


@dataclasses.dataclass
class Run:
  """Everything built from a config: data, process, model graph and params."""
  cfg: config_lib.Config
  prepared: pipeline.Prepared
  process: processes.Process
  graphdef: nnx.GraphDef
  params: nnx.State

  # The config the checkpoint was trained with, where `cfg` differs from it
  # in READ_FREE_KEYS only (`open_workdir`); None: `cfg` itself.
  trained_cfg: Optional[config_lib.Config] = None

  @property
  def fingerprint(self) -> str:
    files = sorted((self.prepared.provenance().get("files_sha256")
                    or {}).values())
    return run_fingerprint(self.trained_cfg or self.cfg,
                           self.prepared.tokenizer, files)


def identity(cfg: config_lib.Config) -> dict:
  """The config sections a checkpoint depends on."""
  d = config_lib.to_dict(cfg)
  out = {k: d[k] for k in IDENTITY_KEYS}
  out["data"] = {k: v for k, v in out["data"].items() if k not in _FREE_DATA_KEYS}
  return out


def run_fingerprint(cfg: config_lib.Config, tokenizer, files=None) -> str:
  """Hash of the identity and the vocabulary. A data file counts by its
  content checksums (`files`), not by the path it is read from (runs
  without data.path, such as PTB or synthetic, hash as before)."""
  ident = identity(cfg)
  if ident["data"].get("path") is not None:
    ident["data"]["path"] = files
  blob = json.dumps({"identity": ident,
                     "tokenizer": tokenizer.fingerprint()}, sort_keys=True,
                    default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_process(cfg: config_lib.Config) -> None:
  """Process name and options are valid (the one place they are checked)."""
  name, options = cfg.process.name, dict(cfg.process.options)
  if name not in processes.names():
    raise config_lib.ConfigError(
        f"unknown process {name!r} (process.name); choose one of: "
        f"{', '.join(processes.names())}")
  if "vocab_size" in options:
    raise config_lib.ConfigError(
        "process.vocab_size comes from the tokenizer; drop that --set")
  try:
    processes.check_options(name, options)
  except ValueError as e:
    raise config_lib.ConfigError(f"{e} (process.KEY=VALUE)") from None


def build_process(cfg: config_lib.Config, vocab_size: int) -> processes.Process:
  try:
    return processes.make_process(cfg.process.name, vocab_size=vocab_size,
                                  **cfg.process.options)
  except ValueError as e:
    raise config_lib.ConfigError(f"{e} (process.KEY=VALUE)") from None


def model_vocab(cfg: config_lib.Config, data_vocab: int) -> int:
  """The process's vocabulary: the tokenizer's, or `model.vocab_size` (an
  imported checkpoint's table) when the data's ids fit inside it."""
  want = cfg.model.vocab_size
  if not want:
    return data_vocab
  if want < data_vocab:
    raise config_lib.ConfigError(
        f"model.vocab_size={want} is smaller than the tokenizer's "
        f"{data_vocab} ids; pick a tokenizer/corpus whose ids fit "
        "(e.g. data.source=synthetic)")
  return want


def setup(cfg: config_lib.Config, workdir: Optional[pathlib.Path] = None,
          log: Callable[[str], None] = print) -> Run:
  """Prepare data (reusing the workdir's tokenizer), process and model."""
  check_process(cfg)
  tokenizer = None
  if workdir is not None and (workdir / "tokenizer.json").exists():
    tokenizer = tokenizers.tokenizer_from_json(
        read_json(workdir / "tokenizer.json"))
  prepared = prepare(cfg, tokenizer)
  process = build_process(cfg, model_vocab(cfg, prepared.vocab_size))
  try:
    model = binding.build_model(process, cfg.model, seed=cfg.train.seed)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  graphdef, params = nnx.split(model)
  log(f"[setup] {cfg.process.name} on {cfg.data.source}/{cfg.data.tokenizer}: "
      f"vocab {prepared.vocab_size:,}, {count_params(model):,} parameters, "
      f"seq_len {cfg.data.seq_len}")
  return Run(cfg, prepared, process, graphdef, params)


def check_workdir(cfg: config_lib.Config, workdir: pathlib.Path) -> None:
  """Refuse to mix runs: a workdir belongs to one data/model/process config."""
  path = workdir / "config.json"
  if not path.exists():
    return
  diffs = identity_diffs(load_config(workdir), cfg)
  if diffs:
    unsaved = not any(p.name.isdigit()
                      for p in (workdir / "checkpoints").glob("*"))
    raise config_lib.ConfigError(
        f"{workdir} holds a run with a different config "
        f"({'; '.join(f'{k}: {v}' for k, v in diffs.items())}); "
        "use a new --workdir, or drop the conflicting --set overrides"
        + (f" (it has no checkpoint yet: `rm -r {workdir}` loses no "
           "training)" if unsaved else ""))


def identity_diffs(old_cfg: config_lib.Config,
                   new_cfg: config_lib.Config) -> dict[str, str]:
  """'section.key' -> 'old -> new' for each identity key that differs
  (data.path may move: its content is checked by the fingerprint)."""
  old, new = identity(old_cfg), identity(new_cfg)
  for ident in (old, new):
    ident["data"].pop("path", None)
  return {f"{sec}.{k}": f"{old[sec].get(k)!r} -> {new[sec].get(k)!r}"
          for sec in IDENTITY_KEYS
          for k in sorted(set(old[sec]) | set(new[sec]))
          if old[sec].get(k) != new[sec].get(k)}


def load_config(workdir: pathlib.Path, overrides=()) -> config_lib.Config:
  """A workdir's config.json with `overrides` (key=value strings) applied."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{workdir} has no config.json: is it a training "
                            "workdir? (create one with `diffusion-text train`)")
  cfg = config_lib.from_dict(read_json(path))
  return config_lib.apply_overrides(cfg, list(overrides))


def read_json(path: pathlib.Path):
  """A workdir's JSON file; a damaged one is named with the fix."""
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise config_lib.ConfigError(
        f"{path} is damaged ({e}); restore it from a backup or copy it from "
        "a workdir trained with the same config, or train in a new --workdir"
    ) from None


def prepare(cfg: config_lib.Config, tokenizer=None) -> pipeline.Prepared:
  """pipeline.prepare with its data mistakes named: a file that is not
  UTF-8, or text too short for one training block."""
  try:
    prepared = pipeline.prepare(cfg, tokenizer=tokenizer)
  except UnicodeDecodeError as e:
    raise config_lib.ConfigError(
        f"data.path={cfg.data.path} is not UTF-8 text ({e.reason} at byte "
        f"{e.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None
  require_blocks(prepared, "train", cfg)
  return prepared


def require_blocks(prepared: pipeline.Prepared, split: str,
                   cfg: config_lib.Config) -> int:
  """The number of blocks of `split`; none at all is a clear error."""
  n = prepared.num_blocks(split) if split in prepared.splits else 0
  if n < 1:
    raise config_lib.ConfigError(
        f"the {split} split of {cfg.data.source}"
        + (f" ({cfg.data.path})" if cfg.data.path else "")
        + f" has no block of data.seq_len={cfg.data.seq_len} tokens; use a "
        "longer text or a smaller data.seq_len")
  return n


def restore_params(run: Run, workdir: pathlib.Path, use_ema: bool = True):
  """The trained (EMA) parameters of a workdir, checked against its config."""
  tx = step_lib.make_optimizer(run.cfg.train)
  target = step_lib.init_state(run.params, tx)
  ckpt = Checkpointer(workdir)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"{workdir} has no checkpoint; train it first "
                            f"(diffusion-text train --workdir {workdir} ...)")
  state, meta = ckpt.restore(target, expect={"fingerprint": run.fingerprint})
  ckpt.close()
  return (state.ema if use_ema else state.params), int(meta["step"])


def open_workdir(workdir, overrides=(), log: Callable[[str], None] = print):
  """(run, params, step) of a trained workdir; config.json is read once.

  The parameters are the EMA ones unless `eval.use_ema=false` (evaluation
  and sampling read a workdir the same way).
  """
  workdir = pathlib.Path(workdir)
  trained = load_config(workdir)
  cfg = config_lib.apply_overrides(trained, list(overrides))
  diffs = identity_diffs(trained, cfg)
  fixed = [f"{k}: {v}" for k, v in diffs.items() if k not in READ_FREE_KEYS]
  if fixed:
    raise config_lib.ConfigError(
        f"{workdir} was trained with another config than these overrides "
        f"give ({'; '.join(fixed)}); a trained workdir's process, model and "
        f"data stay as trained (of them only {', '.join(READ_FREE_KEYS)} may "
        "change here): drop those --set overrides, or train a new --workdir")
  run = setup(cfg, workdir, log)
  if diffs:
    run.trained_cfg = trained
  params, step = restore_params(run, workdir, use_ema=run.cfg.eval.use_ema)
  return run, params, step
