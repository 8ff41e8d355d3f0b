"""Compute-matched comparison: `diffusion-text compare --processes ... --budget ...`.

Every process trains with the same backbone, data and budget (tokens, FLOPs
or seconds) in DIR/<process>; then each model gets
  - the likelihood evaluation, with the paired per-block SEM of its
    difference from a reference row (the same blocks, so the variation of
    the text between blocks cancels);
  - the generative quality of `sample_quality` (judge: the `ar` row).
Results go to DIR: results.json, results.md, results.tex, quality.md and
plots (PNG and PDF): curves, bound_vs_tokens, quality.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Callable, Optional, Sequence

from diffusion_text import config as config_lib, run as run_lib
from diffusion_text import workdir as workdir_lib
from diffusion_text.checkpoint import CheckpointMismatch
from diffusion_text.data import pipeline
from diffusion_text.eval import likelihood, report, sample_quality


# ---- budgets -------------------------------------------------------------------
def _tokens_per_step(cfg: config_lib.Config) -> int:
  return cfg.data.batch_size * cfg.data.seq_len


def _steps_for_tokens(cfg, value) -> dict:
  return {"train.steps": max(1, int(value // _tokens_per_step(cfg)))}


def _steps_for_flops(cfg, value) -> dict:
  from diffusion_text import flops
  vocab_size = pipeline.prepare(cfg).vocab_size
  per_step = float(flops.train_flops_per_step(cfg, vocab_size))
  return {"train.steps": max(1, int(value // per_step))}


def _steps_for_seconds(cfg, value) -> dict:
  # The learning-rate schedule still spans train.steps (an upper limit).
  del cfg
  return {"train.max_seconds": float(value)}


BUDGETS = {"tokens": _steps_for_tokens, "flops": _steps_for_flops,
           "seconds": _steps_for_seconds}


def parse_budget(text: str) -> tuple[str, float]:
  """'tokens=5e5' -> ('tokens', 500000.0)."""
  kind, _, value = text.partition("=")
  try:
    number = float(value)
  except ValueError:
    number = -1.0
  if kind not in BUDGETS or not number > 0:
    raise config_lib.ConfigError(
        f"--budget {text!r}: write KIND=N with KIND one of "
        f"{', '.join(BUDGETS)} and N > 0, e.g. --budget tokens=512000")
  return kind, number


def budget_overrides(cfg: config_lib.Config,
                     budget: tuple[str, float]) -> list[str]:
  """The --set overrides that give `cfg` the budget."""
  kind, value = budget
  return [f"{k}={v}" for k, v in BUDGETS[kind](cfg, value).items()]


# ---- configs -------------------------------------------------------------------
def process_config(base: str, process: str,
                   overrides: Sequence[str] = ()) -> config_lib.Config:
  """The config of one row: preset `{base}_{process}` when it exists (a
  family of presets sharing one backbone, e.g. ptb_*), else preset `base`
  with its process replaced (and its process options dropped)."""
  family = f"{base}_{process}"
  if family in config_lib.preset_names():
    cfg = config_lib.load_preset(family)
  else:
    cfg = config_lib.load_preset(base)
    cfg = dataclasses.replace(cfg, name=f"{cfg.name}_{process}",
                              process=config_lib.ProcessConfig(name=process))
  return config_lib.apply_overrides(cfg, list(overrides))


# ---- the comparison ----------------------------------------------------------------
@dataclasses.dataclass
class Row:
  process: str
  workdir: pathlib.Path
  cfg: config_lib.Config
  train: dict
  result: dict
  diff: Optional[dict] = None
  quality: Optional[list[dict]] = None


TrainFn = Callable[..., dict]  # train.train(cfg, workdir, log=...) -> summary


def train_row(train_fn: TrainFn, cfg: config_lib.Config,
              workdir: pathlib.Path, log: Callable[[str], None],
              fresh_on_mismatch: bool) -> dict:
  try:
    return train_fn(cfg, workdir, log=log)
  except (config_lib.ConfigError, CheckpointMismatch):
    if not fresh_on_mismatch:
      raise
    log(f"{workdir} holds an older run; starting it afresh")
    shutil.rmtree(workdir)
    return train_fn(cfg, workdir, log=log)


def run_compare(train_fn: TrainFn, processes: Sequence[str],
                budget: tuple[str, float], base: str,
                out, reference: Optional[str] = None,
                steps_list: Sequence[int] = (16, 64, 256), num: int = 8,
                overrides: Sequence[str] = (),
                log: Callable[[str], None] = print,
                fresh_on_mismatch: bool = False,
                dataset: Optional[str] = None) -> dict:
  """Train (with `train_fn`, i.e. `train.train`: the evaluator never
  imports the loop), evaluate and sample every process; write the tables
  and plots."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  reference = reference or processes[0]
  if reference not in processes:
    raise config_lib.ConfigError(f"--reference {reference!r} is not one of "
                                 f"--processes {','.join(processes)}")
  rows = []
  for process in processes:
    cfg = process_config(base, process, overrides)
    cfg = config_lib.apply_overrides(cfg, budget_overrides(cfg, budget))
    workdir = out / process
    log(f"== {process}: budget {budget[0]}={budget[1]:g} -> "
        f"{cfg.train.steps} steps of {cfg.data.batch_size}x{cfg.data.seq_len}"
        + (f", at most {cfg.train.max_seconds:g} s" if cfg.train.max_seconds else ""))
    summary = train_row(train_fn, cfg, workdir, log, fresh_on_mismatch)
    result = likelihood.evaluate_workdir(workdir, overrides, log=log)
    rows.append(Row(process, workdir, cfg, summary, result))
  ref = next(r for r in rows if r.process == reference)
  for r in rows:
    if r is not ref:
      r.diff = likelihood.paired_difference(
          r.result["blocks"]["nats"], ref.result["blocks"]["nats"],
          ref.result["blocks"]["tokens"])
  judge_row = next((r for r in rows if r.process == "ar"), None)
  judge = None
  if judge_row is not None and steps_list:
    judge = sample_quality.Judge.open(judge_row.workdir, log)
    for r in rows:
      run, params, _ = run_lib.open_workdir(r.workdir, overrides, log)
      # The AR sampler takes one step per token whatever is asked.
      steps = [run.cfg.sample.length or run.cfg.data.seq_len] \
          if r.process == "ar" else steps_list
      r.quality = sample_quality.evaluate_samples(run, params, judge, steps,
                                                  num, log)
  elif steps_list:
    log("[compare] no `ar` row: generative quality needs it as the judge")
  return write_results(rows, out, reference, budget, base, judge, dataset)


def _table_rows(rows: list[Row]) -> list[dict]:
  out = []
  for r in rows:
    drawn = [q for q in (r.quality or []) if q["steps"] is not None]
    out.append({"name": r.process, "result": r.result,
                "tokens_seen": r.train["step"] * _tokens_per_step(r.cfg),
                "wall_s": _wall(r), "reference": None if r.diff is None else
                next(x.process for x in rows if x.diff is None),
                "diff": r.diff, "quality": drawn[-1] if drawn else None})
  return out


def _wall(r: Row) -> float:
  curve = report.read_curve(r.workdir)
  return curve[-1]["elapsed_s"] if curve else r.train.get("wall_s", 0.0)


def write_results(rows: list[Row], out: pathlib.Path, reference: str,
                  budget, base: str, judge, dataset: Optional[str]) -> dict:
  dataset = dataset or f"{rows[0].cfg.data.source} {rows[0].cfg.eval.split}"
  table_rows = _table_rows(rows)
  table = report.markdown_table(table_rows, dataset)
  (out / "results.md").write_text(table)
  (out / "results.tex").write_text(report.latex_table(table_rows, dataset))
  curves = {r.process: report.read_curve(r.workdir) for r in rows}
  report.plot_curves(curves, out / "curves.png",
                     f"{dataset}: same backbone and budget")
  report.plot_curves(curves, [out / "bound_vs_tokens.png",
                              out / "bound_vs_tokens.pdf"],
                     "held-out bound (★) against tokens seen",
                     finals={t["name"]: (t["tokens_seen"], t["result"])
                             for t in table_rows})
  quality = {r.process: r.quality for r in rows if r.quality}
  if quality:
    (out / "quality.md").write_text(report.quality_table(quality))
    report.plot_quality(quality, [out / "quality.png", out / "quality.pdf"])
  results = {
      "budget": {"kind": budget[0], "value": budget[1]}, "base": base,
      "reference": reference,
      "judge": judge.provenance() if judge else None,
      "commit": likelihood.git_commit(),
      "rows": [{**{k: v for k, v in r.result.items() if k != "blocks"},
                "name": t["name"], "workdir": str(r.workdir),
                "tokens_seen": t["tokens_seen"], "wall_s": t["wall_s"],
                "train_steps": r.train["step"], "diff_vs_reference": r.diff,
                "quality": r.quality}
               for r, t in zip(rows, table_rows)],
      # A few samples per model, from its largest step count.
      "samples": {t["name"]: t["quality"]["samples"]
                  for t in table_rows if t["quality"]}}
  # Strict JSON (a one-block SEM is null, not NaN), written atomically.
  workdir_lib.atomic_write_json(out / "results.json", results)
  results["table"] = table
  return results


# ---- a table over existing workdirs ---------------------------------------------
def table_over_workdirs(workdirs: Sequence[str], split: str,
                        log: Callable[[str], None] = print) -> str:
  """`diffusion-text compare DIR...`: one table; paired differences against
  the first workdir where the rows scored the same blocks."""
  rows = []
  for wd in workdirs:
    path = pathlib.Path(wd) / f"eval_{split}.json"
    res = (json.loads(path.read_text()) if path.exists()
           else likelihood.evaluate_workdir(wd, [f"eval.split={split}"], log))
    curve = report.read_curve(wd)
    rows.append({"name": f"{pathlib.Path(wd).name} ({res['process']})",
                 "result": res,
                 "tokens_seen": curve[-1]["tokens_seen"] if curve else 0,
                 "wall_s": curve[-1]["elapsed_s"] if curve else 0})
  ref = rows[0]["result"].get("blocks")
  for r in rows[1:]:
    blocks = r["result"].get("blocks")
    if ref and blocks and len(blocks["nats"]) == len(ref["nats"]):
      r["diff"] = likelihood.paired_difference(blocks["nats"], ref["nats"],
                                               ref["tokens"])
      r["reference"] = rows[0]["name"]
  return report.markdown_table(rows, split)
