"""`diffusion-text import`: a published checkpoint becomes a workdir.

SOURCE is a local folder (config.json + model.safetensors or
pytorch_model.bin, read torch-free by `models.weights`) or `hf:NAME`, fetched
with huggingface_hub when it is installed and the network allows. The
converter (`models.convert`) names the backbone, its config and the process
the model was trained as; the workdir gets:
  * config.json: that process, `model.backbone` / `model.arch` /
    `model.vocab_size` (the checkpoint's table), and the data the user names
    (`--tokenizer`, `--corpus`; GPT-2-vocabulary checkpoints default to GPT-2
    BPE, anything else must name a tokenizer whose ids fit, e.g.
    `--tokenizer identity` on the token-level synthetic corpus);
  * tokenizer.json;
  * checkpoints/0: our Orbax train state (params = EMA = the published
    weights) with the run fingerprint, plus `import.json` (source, sha256
    of every file read).
`eval`, `eval --suite zero-shot` and `sample` then read it like any
trained workdir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Callable, Optional, Sequence

from flax import nnx

from diffusion_text import binding, config as config_lib, run as run_lib
from diffusion_text import step as step_lib
from diffusion_text.checkpoint import Checkpointer
from diffusion_text.data import pipeline
from diffusion_text.models import convert

GPT2_VOCAB = 50257
HF_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")
# SEDD and MDLM's OpenWebText models are scored on WikiText-103 by default.
DEFAULT_CORPUS = {"gpt2": "wikitext103", "identity": "synthetic"}


def resolve_source(source: str) -> pathlib.Path:
  """A local checkpoint folder, downloading `hf:NAME` first."""
  if not source.startswith("hf:"):
    folder = pathlib.Path(source).expanduser()
    if not (folder / "config.json").is_file():
      raise FileNotFoundError(
          f"{folder} has no config.json: SOURCE is a folder with config.json "
          "and model.safetensors or pytorch_model.bin, or hf:NAME")
    return folder
  name = source[3:]
  try:
    import huggingface_hub
  except ImportError:
    raise config_lib.ConfigError(
        f"{source} needs huggingface_hub (pip install huggingface_hub); or "
        "download the folder elsewhere and pass its path") from None
  try:
    # safetensors when published (GPT-2, MDLM), else SEDD's pytorch_model.bin
    folder = pathlib.Path(huggingface_hub.snapshot_download(
        name, allow_patterns=["config.json", "model.safetensors"]))
    if not (folder / "model.safetensors").exists():
      folder = pathlib.Path(huggingface_hub.snapshot_download(
          name, allow_patterns=["config.json", "pytorch_model.bin"]))
    return folder
  except Exception as e:  # offline, unknown repo, gated: one line, the fix
    raise config_lib.ConfigError(
        f"could not fetch {source} ({type(e).__name__}); go online, or "
        "download the folder elsewhere and pass its path") from None


def imported_config(imp: convert.Imported, name: str,
                    tokenizer: Optional[str] = None,
                    corpus: Optional[str] = None,
                    overrides: Sequence[str] = ()) -> config_lib.Config:
  """The workdir config of a converted checkpoint (before `overrides`)."""
  options = dict(imp.process_options)
  vocab = options.pop("vocab_size")
  if tokenizer is None:
    # GPT-2's vocabulary is GPT-2 BPE; any other table gets token ids as
    # text, on a token-level corpus (name another with --tokenizer/--corpus).
    tokenizer = "gpt2" if vocab == GPT2_VOCAB else "identity"
  corpus = corpus or DEFAULT_CORPUS.get(tokenizer, "wikitext103")
  arch = imp.arch
  cfg = config_lib.Config(
      name=name,
      process=config_lib.ProcessConfig(name=imp.process, options=options),
      model=config_lib.ModelConfig(
          num_layers=arch.num_layers, d_model=arch.d_model,
          num_heads=arch.num_heads, backbone=imp.backbone,
          arch=dataclasses.asdict(arch), vocab_size=vocab),
      data=config_lib.DataConfig(source=corpus, tokenizer=tokenizer,
                                 seq_len=arch.max_length, batch_size=8),
      # The checkpoint is step 0; `train --set train.steps=N` fine-tunes it.
      train=config_lib.TrainConfig(steps=1, ema_decay=0.0),
      eval=config_lib.EvalConfig(batch_size=8),
      sample=config_lib.SampleConfig(num=2))
  return config_lib.apply_overrides(cfg, list(overrides))


def _sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def import_workdir(source: str, workdir, tokenizer: Optional[str] = None,
                   corpus: Optional[str] = None, overrides: Sequence[str] = (),
                   log: Callable[[str], None] = print) -> pathlib.Path:
  """Convert `source` and write a workdir that eval and sample accept."""
  workdir = pathlib.Path(workdir)
  folder = resolve_source(source)
  imp = convert.import_checkpoint(folder)
  name = source[3:] if source.startswith("hf:") else folder.name
  cfg = imported_config(imp, name.replace("/", "_"), tokenizer, corpus,
                        overrides)
  run_lib.check_process(cfg)
  if (workdir / "checkpoints").is_dir() and any(
      (workdir / "checkpoints").iterdir()):
    raise config_lib.ConfigError(f"{workdir} already holds a checkpoint; "
                                 "use a new --workdir")
  prepared = pipeline.prepare(cfg)
  process = run_lib.build_process(cfg, run_lib.model_vocab(
      cfg, prepared.vocab_size))
  try:
    model = binding.wrap(imp.backbone, imp.model, process)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  graphdef, params = nnx.split(model)
  run = run_lib.Run(cfg, prepared, process, graphdef, params)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(
      json.dumps(config_lib.to_dict(cfg), indent=2, default=str))
  (workdir / "tokenizer.json").write_text(
      json.dumps(prepared.tokenizer.to_json()))
  files = {p.name: _sha256(p) for p in sorted(folder.iterdir())
           if p.name in HF_FILES}
  record = {"source": source, "kind": imp.kind, "backbone": imp.backbone,
            "process": imp.process, "files_sha256": files,
            "checkpoint_fingerprint": _digest(files)}
  (workdir / "import.json").write_text(json.dumps(record, indent=2))
  state = step_lib.init_state(params, step_lib.make_optimizer(cfg.train))
  ckpt = Checkpointer(workdir, keep=1)
  ckpt.save(0, state, {"step": 0, "fingerprint": run.fingerprint,
                       "imported_from": source,
                       "checkpoint_fingerprint": record[
                           "checkpoint_fingerprint"]})
  ckpt.close()
  log(f"[import] {source}: {imp.kind} -> {imp.process} on backbone "
      f"{imp.backbone}, data {cfg.data.source}/{cfg.data.tokenizer}; "
      f"written {workdir}")
  return workdir


def _digest(files: dict) -> str:
  return hashlib.sha256(json.dumps(files, sort_keys=True).encode()
                        ).hexdigest()[:16]


__all__ = ["imported_config", "import_workdir", "resolve_source"]
