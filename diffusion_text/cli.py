"""Command line: diffusion-text {train, eval, sample, sample-eval, compare, data, import}."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys

from diffusion_text import host_memory


def _common_data_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--data-dir", help="corpora directory (default: "
                 "$DIFFUSION_TEXT_DATA, else ../shared/data next to a source "
                 "checkout); sets data.data_dir")
  p.add_argument("--cache-dir", help="writable cache for prepared data "
                 "(default: $DIFFUSION_TEXT_CACHE, else .cache/ in a source "
                 "checkout, else ~/.cache/diffusion_text); sets data.cache_dir")
  p.add_argument("--set", dest="overrides", action="append", default=[],
                 metavar="KEY=VALUE", help="dotted config override, e.g. "
                 "train.steps=200 or process.schedule=cosine_alpha (repeatable)")


def _compare_parser(sub) -> argparse.ArgumentParser:
  c = sub.add_parser(
      "compare", help="train processes on one budget and compare them "
      "(--processes), or one table over existing workdirs (DIR...)")
  c.add_argument("workdirs", nargs="*", help="existing workdirs to tabulate")
  c.add_argument("--processes", help="comma-separated, e.g. masked,sedd_absorb,ar")
  c.add_argument("--budget", help="tokens=N, flops=N or seconds=N per process")
  c.add_argument("--config", help="base preset: NAME_<process> presets when "
                 "they exist (e.g. ptb), else NAME with the process replaced")
  c.add_argument("--reference", help="row the paired differences are taken "
                 "against (default: the first process)")
  c.add_argument("--steps", default="16,64,256",
                 help="sampling step counts of the generative quality ('' skips)")
  c.add_argument("--num", type=int, default=8, help="samples per step count")
  c.add_argument("--split", default="test")
  c.add_argument("--out", help="output folder (--processes) or Markdown file")
  _common_data_flags(c)
  return c


def _sample_eval_parser(sub) -> None:
  q = sub.add_parser("sample-eval", help="generative perplexity under an AR "
                     "judge, entropy, repetition and cost per step count")
  q.add_argument("--workdir", required=True)
  q.add_argument("--judge", required=True, help="an `ar` workdir")
  q.add_argument("--steps", default="16,64,256", help="comma-separated")
  q.add_argument("--num", type=int, help="samples per step count "
                 "(default: sample.num)")
  q.add_argument("--out", help="output folder (default: the workdir)")
  _common_data_flags(q)


def _steps_list(text: str) -> list[int]:
  try:
    return [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--steps {text!r}: write comma-separated integers, "
                     "e.g. --steps 16,64,256") from None


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

  c = _compare_parser(sub)
  _sample_eval_parser(sub)

  _import_parser(sub)
  _suite_flags(e, c)

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
  try:
    train.train(cfg, workdir)
  except train.Preempted:
    return EXIT_PREEMPTED  # checkpoint saved; rerun the command to resume
  return 0


def _import_parser(sub) -> None:
  i = sub.add_parser("import", help="a published checkpoint (GPT-2, SEDD, "
                     "MDLM) as a workdir that eval and sample accept")
  i.add_argument("source", help="folder with config.json + model.safetensors "
                 "or pytorch_model.bin, or hf:NAME (online, huggingface_hub)")
  i.add_argument("--workdir", required=True)
  i.add_argument("--tokenizer", help="tokenizer of the checkpoint's ids "
                 "(default: gpt2 for GPT-2's 50,257 ids, else identity)")
  i.add_argument("--corpus", help="data.source the workdir evaluates and "
                 "samples on (default: wikitext103 for gpt2, else synthetic)")
  _common_data_flags(i)


def _suite_flags(e: argparse.ArgumentParser, c: argparse.ArgumentParser):
  e.add_argument("--suite", choices=["zero-shot"], help="the five-set "
                 "zero-shot table (docs/zero_shot.md) instead of one split")
  e.add_argument("--sets", help="comma-separated subset of lambada,"
                 "wikitext2,ptb,wikitext103,lm1b (with --suite)")
  e.add_argument("--protocol", choices=["sedd", "whole"], default="sedd",
                 help="how rows become blocks (with --suite; default sedd)")
  c.add_argument("--suite", choices=["zero-shot"], help="join the workdirs' "
                 "zero_shot.json files into one table")


def cmd_import(args) -> int:
  from diffusion_text import importer
  importer.import_workdir(args.source, args.workdir, args.tokenizer,
                          args.corpus, _overrides(args))
  return 0


def _cmd_zero_shot(args) -> int:
  from diffusion_text.eval import zero_shot
  sets = args.sets.split(",") if args.sets else None
  zero_shot.evaluate_suite(args.workdir, _with_shorthand(args), sets=sets,
                           protocol=args.protocol)
  return 0


def _cmd_compare_zero_shot(args) -> int:
  from diffusion_text.eval import zero_shot_table
  md, tex = zero_shot_table.compare(args.workdirs)
  print(md)
  if args.out:
    from diffusion_text import workdir as workdir_lib
    workdir_lib.atomic_write_text(args.out, md)
    workdir_lib.atomic_write_text(pathlib.Path(args.out).with_suffix(".tex"), tex)
  return 0


def cmd_eval(args) -> int:
  if args.suite:
    return _cmd_zero_shot(args)
  if args.sets or args.protocol != "sedd":
    raise ValueError("--sets and --protocol belong to --suite zero-shot")
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
  if args.suite:
    return _cmd_compare_zero_shot(args)
  from diffusion_text.config import ConfigError
  from diffusion_text import train
  from diffusion_text.eval import compare
  if not args.processes:
    if not args.workdirs:
      raise ConfigError("compare needs workdirs (compare DIR...) or "
                        "--processes with --budget, --config and --out")
    table = compare.table_over_workdirs(args.workdirs, args.split)
    print(table)
    if args.out:
      from diffusion_text import workdir as workdir_lib
      workdir_lib.atomic_write_text(args.out, table)
    return 0
  missing = [f for f in ("budget", "config", "out") if not getattr(args, f)]
  if missing or args.workdirs:
    raise ConfigError("compare --processes needs --budget, --config and --out "
                      "and no workdirs" + (f" (missing: {', '.join(missing)})"
                                           if missing else ""))
  overrides = _overrides(args) + [f"eval.split={args.split}"]
  results = compare.run_compare(
      train.train, [p.strip() for p in args.processes.split(",") if p.strip()],
      compare.parse_budget(args.budget), args.config, args.out,
      reference=args.reference, steps_list=_steps_list(args.steps),
      num=args.num, overrides=overrides)
  print(results["table"])
  return 0


def cmd_sample_eval(args) -> int:
  from diffusion_text.eval import sample_quality
  sample_quality.sample_eval_workdir(
      args.workdir, args.judge, _steps_list(args.steps), args.num or 0,
      _overrides(args), out=args.out)
  return 0


def cmd_data(args) -> int:
  from diffusion_text import config as config_lib, run
  cfg = config_lib.apply_overrides(config_lib.load_preset(args.config),
                                   _overrides(args))
  prepared = run.prepare(cfg)
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
            "compare": cmd_compare, "sample-eval": cmd_sample_eval,
            "data": cmd_data, "import": cmd_import}


# Exit statuses (docs/reliability.md): 0 done, 2 a user error named in one
# line, 3 training diverged (non-finite), 130 Ctrl-C and 143 SIGTERM, both
# after saving a checkpoint.
EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_PREEMPTED = 2, 3, 130, 143

# What shrinks each command's largest array when the device runs out of memory.
_MEMORY_FIXES = {
    "train": "lower data.batch_size (train.grad_accum=N keeps the global "
             "batch in N micro-batches) or data.seq_len, shard the parameters "
             "with train.mesh_fsdp, or shrink the model (model.d_model, "
             "model.num_layers)",
    "eval": "lower --batch-size (eval.batch_size)",
    "sample": "lower --num or --length",
    "sample-eval": "lower --num",
    "compare": "lower data.batch_size or data.seq_len with --set, or "
               "eval.batch_size",
}


def _out_of_memory(command: str, error: Exception) -> str | None:
  """One line for XLA's RESOURCE_EXHAUSTED, naming the size and the fix; None
  for any other runtime error."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  match = re.search(r"allocat\w* (\d+) bytes", text)
  size = f" ({int(match.group(1)) / 2**30:,.1f} GiB in one allocation)" if match else ""
  fix = _MEMORY_FIXES.get(command, "use smaller shapes")
  return (f"the device ran out of memory{size}: {fix}; "
          f"XLA said: {text.splitlines()[0]}")


def main(argv=None) -> int:
  from diffusion_text.config import ConfigError
  from diffusion_text.checkpoint import CheckpointDamaged, CheckpointMismatch
  from diffusion_text.train import TrainingDiverged
  from diffusion_text.workdir import WorkdirBusy, WriteError
  args = _parser().parse_args(argv)
  try:
    host_memory.keep_mapped()  # before JAX starts its CPU backend
    return COMMANDS[args.command](args)
  except KeyboardInterrupt:
    return EXIT_INTERRUPTED
  except (ConfigError, CheckpointMismatch, CheckpointDamaged, WorkdirBusy,
          WriteError, TrainingDiverged, FileNotFoundError, ValueError) as e:
    if os.environ.get("DIFFUSION_TEXT_DEBUG"):
      raise
    print(f"error: {e}\n(set DIFFUSION_TEXT_DEBUG=1 for a traceback)",
          file=sys.stderr)
    return EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_USAGE
  except RuntimeError as e:  # jax.errors.JaxRuntimeError (JAX loads later)
    message = _out_of_memory(args.command, e)
    if message is None or os.environ.get("DIFFUSION_TEXT_DEBUG"):
      raise
    print(f"error: {message}\n(set DIFFUSION_TEXT_DEBUG=1 for a traceback)",
          file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
  sys.exit(main())
