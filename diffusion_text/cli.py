"""Command line: diffusion-text {train, eval, sample, compare, data}."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


def _common_data_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--data-dir", help="corpora directory (default: "
                 "$DIFFUSION_TEXT_DATA); sets data.data_dir")
  p.add_argument("--cache-dir", help="writable cache for prepared data "
                 "(default: $DIFFUSION_TEXT_CACHE); sets data.cache_dir")
  p.add_argument("--set", dest="overrides", action="append", default=[],
                 metavar="KEY=VALUE", help="dotted config override, e.g. "
                 "train.steps=200 or process.schedule=cosine_alpha (repeatable)")


def _overrides(args) -> list[str]:
  out = list(args.overrides)
  if args.data_dir:
    out.append(f"data.data_dir={args.data_dir}")
  if args.cache_dir:
    out.append(f"data.cache_dir={args.cache_dir}")
  return out


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="diffusion-text",
      description="Continuous and discrete text diffusion in one JAX core.")
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train (or resume) a run in a workdir")
  t.add_argument("--config", help="preset name in experiments/ or a .py file "
                 "(optional when resuming a workdir)")
  t.add_argument("--workdir", required=True)
  _common_data_flags(t)
  m = t.add_argument_group(
      "multi-process", "run the same command once per process (host); "
      "default: $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID")
  m.add_argument("--coordinator", metavar="HOST:PORT", help="address of "
                 "process 0 (all processes pass the same); 'auto' detects "
                 "TPU pods, Slurm and Open MPI jobs")
  m.add_argument("--num-processes", type=int, metavar="N")
  m.add_argument("--process-id", type=int, metavar="I", help="0 .. N-1")

  e = sub.add_parser("eval", help="NLL bound of a trained workdir; flags "
                     "are shorthand for --set eval.KEY=VALUE")
  e.add_argument("--workdir", required=True)
  e.add_argument("--split", help="train | valid | test")
  e.add_argument("--mc-samples", type=int,
                 help="Monte-Carlo time samples per block")
  e.add_argument("--max-blocks", type=int)
  e.add_argument("--batch-size", type=int)
  e.add_argument("--no-ema", action="store_true", help="raw, not EMA, params")
  _common_data_flags(e)

  s = sub.add_parser("sample", help="draw text from a trained workdir; flags "
                     "are shorthand for --set sample.KEY=VALUE")
  s.add_argument("--workdir", required=True)
  s.add_argument("--num", type=int)
  s.add_argument("--steps", type=int, help="reverse steps "
                 "(0: the process default)")
  s.add_argument("--length", type=int, help="tokens per sample")
  s.add_argument("--seed", type=int)
  s.add_argument("--prompt", help="fixed prefix text")
  s.add_argument("--infill", help='template with ___ gaps, e.g. "A ___ B"')
  s.add_argument("--temperature", type=float)
  s.add_argument("--top-p", type=float)
  s.add_argument("--top-k", type=int, help="keep the k likeliest tokens "
                 "(0: off)")
  s.add_argument("--sampler", help="sampler variant where the process has "
                 "several (e.g. ddpm/ddim, ancestral/cached, euler/analytic)")
  s.add_argument("--no-ema", action="store_true")
  _common_data_flags(s)

  c = sub.add_parser("compare", help="one table over several workdirs")
  c.add_argument("workdirs", nargs="+")
  c.add_argument("--split", default="test")
  c.add_argument("--out", help="write the Markdown table here")

  d = sub.add_parser("data", help="prepare a config's data and print stats")
  d.add_argument("--config", required=True)
  _common_data_flags(d)
  return p


# Flags that are shorthand for a config field: argparse dest -> dotted key.
SHORTHAND = {
    "eval": {"split": "eval.split", "mc_samples": "eval.mc_samples",
             "max_blocks": "eval.max_blocks", "batch_size": "eval.batch_size"},
    "sample": {"num": "sample.num", "steps": "sample.steps",
               "length": "sample.length", "seed": "sample.seed",
               "temperature": "sample.temperature", "top_p": "sample.top_p",
               "top_k": "sample.top_k", "sampler": "sample.sampler"},
}


def _with_shorthand(args) -> list[str]:
  """--set overrides, then the command's shorthand flags (which win)."""
  out = _overrides(args)
  for dest, key in SHORTHAND.get(args.command, {}).items():
    if getattr(args, dest) is not None:
      out.append(f"{key}={getattr(args, dest)}")
  if getattr(args, "no_ema", False):
    out.append("eval.use_ema=false")
  return out


def cmd_train(args) -> int:
  from diffusion_text import config as config_lib, distributed, run, train
  # Before anything queries a device: the runtime spans all processes.
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  workdir = pathlib.Path(args.workdir)
  if args.config:
    cfg = config_lib.apply_overrides(config_lib.load_preset(args.config),
                                     _overrides(args))
  elif (workdir / "config.json").exists():
    cfg = run.load_config(workdir, _overrides(args))
  else:
    raise config_lib.ConfigError(
        f"--config is required for a new workdir; presets: "
        f"{', '.join(config_lib.preset_names())}")
  train.train(cfg, workdir)
  return 0


def cmd_eval(args) -> int:
  from diffusion_text.eval import likelihood
  likelihood.evaluate_workdir(args.workdir, _with_shorthand(args))
  return 0


def cmd_sample(args) -> int:
  from diffusion_text.eval import samples
  texts = samples.sample_workdir(args.workdir, _with_shorthand(args),
                                 prompt=args.prompt, infill=args.infill)
  for i, text in enumerate(texts):
    print(f"--- sample {i} ---\n{text}")
  return 0


def cmd_compare(args) -> int:
  from diffusion_text.eval import likelihood, report
  rows = []
  for wd in args.workdirs:
    path = pathlib.Path(wd) / f"eval_{args.split}.json"
    res = (json.loads(path.read_text()) if path.exists()
           else likelihood.evaluate_workdir(wd, [f"eval.split={args.split}"]))
    curve = report.read_curve(wd)
    rows.append({"name": f"{pathlib.Path(wd).name} ({res['process']})",
                 "result": res,
                 "tokens_seen": curve[-1]["tokens_seen"] if curve else 0,
                 "wall_s": curve[-1]["elapsed_s"] if curve else 0})
  table = report.markdown_table(rows, args.split)
  print(table)
  if args.out:
    pathlib.Path(args.out).write_text(table)
  return 0


def cmd_data(args) -> int:
  from diffusion_text import config as config_lib
  from diffusion_text.data import pipeline
  cfg = config_lib.apply_overrides(config_lib.load_preset(args.config),
                                   _overrides(args))
  prepared = pipeline.prepare(cfg)
  info = {"vocab_size": prepared.vocab_size, "seq_len": prepared.seq_len,
          "tokens": {s: prepared.num_tokens(s)
                     for s in ("train", "valid", "test")
                     if _has_split(prepared, s)},
          "provenance": prepared.provenance()}
  print(json.dumps(info, indent=2, default=str))
  return 0


def _has_split(prepared, split) -> bool:
  try:
    prepared.blocks(split)
    return True
  except (KeyError, ValueError):
    return False


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample,
            "compare": cmd_compare, "data": cmd_data}


def main(argv=None) -> int:
  from diffusion_text.config import ConfigError
  from diffusion_text.checkpoint import CheckpointMismatch
  args = _parser().parse_args(argv)
  try:
    return COMMANDS[args.command](args)
  except KeyboardInterrupt:
    return 130
  except (ConfigError, CheckpointMismatch, FileNotFoundError, ValueError) as e:
    if os.environ.get("DIFFUSION_TEXT_DEBUG"):
      raise
    print(f"error: {e}\n(set DIFFUSION_TEXT_DEBUG=1 for a traceback)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
