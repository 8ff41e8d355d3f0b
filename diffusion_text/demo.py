"""`make demo`: continuous vs discrete diffusion vs AR on PTB, one table.

Trains every demo process with the same backbone and token budget on PTB
(word level), evaluates the NLL bound on PTB test, draws a few samples, and
writes results.json, results.md, results.tex and curves.png to --out.
Re-running reuses finished runs in --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

from diffusion_text import config as config_lib
from diffusion_text.checkpoint import CheckpointMismatch

DEMO = ("ar", "d3pm_absorbing", "d3pm_uniform", "gaussian")
ALL = DEMO + ("masked", "sedd_absorb", "sedd_uniform", "gaussian_vlb")
BUDGET_S = {False: 15 * 60, True: 40 * 60}  # demo, demo-all


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--out", default="demo_out")
  p.add_argument("--all", action="store_true", help="every process (longer)")
  p.add_argument("--steps", type=int, default=None, help="steps per process")
  p.add_argument("--set", dest="overrides", action="append", default=[])
  args = p.parse_args(argv)

  from diffusion_text import train
  from diffusion_text.eval import likelihood, report, samples

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  names = ALL if args.all else DEMO
  t_start = time.time()

  budget = BUDGET_S[args.all]

  def say(msg):
    elapsed = time.time() - t_start
    print(f"[demo {elapsed / 60:4.1f}/{budget / 60:.0f} min] {msg}", flush=True)

  say(f"training {', '.join(names)} on PTB with one backbone and token budget")
  rows, texts, curves = [], {}, {}
  for name in names:
    overrides = list(args.overrides)
    if args.steps:
      overrides.append(f"train.steps={args.steps}")
    cfg = config_lib.apply_overrides(config_lib.load_preset(f"ptb_{name}"),
                                     overrides)
    workdir = out / name
    say(f"== {name}: {cfg.train.steps} steps of {cfg.data.batch_size}x"
        f"{cfg.data.seq_len} tokens")
    t0 = time.time()
    try:
      summary = train.train(cfg, workdir, log=say)
    except (config_lib.ConfigError, CheckpointMismatch):
      say(f"{workdir} holds an older demo run; starting it afresh")
      shutil.rmtree(workdir)
      summary = train.train(cfg, workdir, log=say)
    curve = report.read_curve(workdir)
    curves[name] = curve
    wall = curve[-1]["elapsed_s"] if curve else time.time() - t0
    # Evaluation and samples follow the eval/sample sections of the config.
    result = likelihood.evaluate_workdir(workdir, log=say)
    texts[name] = samples.sample_workdir(workdir, log=say)
    rows.append({"name": name, "result": result,
                 "tokens_seen": summary["step"] * cfg.data.batch_size * cfg.data.seq_len,
                 "wall_s": wall})

  table = report.markdown_table(rows, "PTB test")
  (out / "results.md").write_text(table)
  (out / "results.tex").write_text(report.latex_table(rows, "PTB test"))
  report.plot_curves(curves, out / "curves.png", "PTB, same backbone and budget")
  (out / "results.json").write_text(json.dumps(
      {"rows": [{"name": r["name"], "tokens_seen": r["tokens_seen"],
                 "wall_s": r["wall_s"], **r["result"]} for r in rows],
       "samples": texts}, indent=2, default=str))

  print("\n" + table)
  for name, ts in texts.items():
    print(f"samples from {name}:")
    for t in ts:
      # One line per sample; end-of-sentence (EOS) shown as ' / '.
      print("  " + " / ".join(line.strip() for line in t.splitlines()))
  elapsed = time.time() - t_start
  say(f"done in {elapsed / 60:.1f} min; wrote {out}/results.json, results.md, "
      "results.tex, curves.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
