"""`make demo`: continuous vs discrete diffusion vs AR on PTB, one table.

A small instance of `diffusion-text compare`: every demo process trains with
the same backbone and token budget on PTB (word level, the ptb_* presets),
is evaluated on PTB test (NLL bound, paired difference to the AR row) and
sampled at a few step counts (generative perplexity under the AR row,
unigram entropy). Writes results.json, results.md, results.tex, curves.png,
bound_vs_tokens.png/pdf, quality.md and quality.png/pdf to --out.
Re-running reuses finished runs in --out.
"""

from __future__ import annotations

import argparse
import sys
import time

from diffusion_text import host_memory, train
from diffusion_text.eval import compare

DEMO = ("ar", "d3pm_absorbing", "d3pm_uniform", "gaussian")
ALL = DEMO + ("masked", "sedd_absorb", "sedd_uniform", "gaussian_vlb")
BUDGET_S = {False: 15 * 60, True: 40 * 60}  # demo, demo-all
# The ptb_* presets' budget: 250 steps of 32 x 64 tokens.
TOKENS = 250 * 32 * 64
SAMPLE_STEPS, SAMPLE_NUM = (8, 32), 8


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--out", default="demo_out")
  p.add_argument("--all", action="store_true", help="every process (longer)")
  p.add_argument("--steps", type=int, default=None, help="steps per process")
  p.add_argument("--set", dest="overrides", action="append", default=[])
  args = p.parse_args(argv)
  host_memory.keep_mapped()  # before JAX starts its CPU backend

  names = ALL if args.all else DEMO
  t_start = time.time()
  budget = BUDGET_S[args.all]

  def say(msg):
    elapsed = time.time() - t_start
    print(f"[demo {elapsed / 60:4.1f}/{budget / 60:.0f} min] {msg}", flush=True)

  tokens = TOKENS if not args.steps else args.steps * TOKENS // 250
  say(f"training {', '.join(names)} on PTB with one backbone and "
      f"{tokens:,} tokens each")
  results = compare.run_compare(
      train.train, names, ("tokens", tokens), "ptb", args.out, reference="ar",
      steps_list=SAMPLE_STEPS, num=SAMPLE_NUM, overrides=args.overrides,
      log=say, fresh_on_mismatch=True, dataset="PTB test")

  print("\n" + results["table"])
  for name, ts in results["samples"].items():
    print(f"samples from {name}:")
    for t in ts:
      # One line per sample; end-of-sentence (EOS) shown as ' / '.
      print("  " + " / ".join(line.strip() for line in t.splitlines()))
  elapsed = time.time() - t_start
  say(f"done in {elapsed / 60:.1f} min; wrote {args.out}/results.json, "
      "results.md, results.tex, curves.png, bound_vs_tokens.png, quality.md, "
      "quality.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
