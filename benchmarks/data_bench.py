"""Data preparation throughput and memory on a generated OpenWebText-format corpus.

For each corpus size, a fresh process generates a multi-file .jsonl corpus
(random documents over a fixed word list), prepares it through the real code
path (`pipeline.prepare`: source `owt`, GPT-2 tokens, 1,024-token blocks,
worker processes, array_record shards) and reports tokens/s and the peak
resident memory of the preparing process and of its largest worker
(`resource.getrusage`). Memory must not grow with the corpus: the JSON gives
the ratio of the largest to the smallest size's peak. It then prepares the
same corpus in 128-token blocks, times the training stream alone
(`train_batches`, B=32, L=128 as benchmarks/run.py) and trains on it with
the real trainer (`train.train`, the benchmark backbone: 4 layers, d=256,
GPT-2's 50,257 tokens, B=32, L=128) for a few steps, reporting the
trainer's own data-wait and step times: training must not wait on data.

  python -m benchmarks.data_bench --sizes-mb 200 1000      # the full run
  python -m benchmarks.data_bench --smoke                   # a few MB, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

WORDS = ("the of and to in is was for on that with as by at from his her an "
         "were which are this be has had not but they their one also its new "
         "after first two who been more time would she when year there city "
         "government people world state music school season war game team "
         "river station church film album song company university history")


def generate(root: pathlib.Path, size_mb: float, file_mb: float = 64) -> int:
  """Write ~size_mb of {"text": ...} lines over files of ~file_mb; returns docs."""
  rng = np.random.default_rng(0)
  words = np.array(WORDS.split())
  target, written, docs, k = size_mb * 2**20, 0, 0, 0
  while written < target:
    with open(root / f"part-{k:04d}.jsonl", "w") as f:
      file_bytes = 0
      while file_bytes < file_mb * 2**20 and written + file_bytes < target:
        text = " ".join(words[rng.integers(0, len(words), rng.integers(50, 800))])
        line = json.dumps({"text": text}) + "\n"
        f.write(line)
        file_bytes += len(line)
        docs += 1
    written += file_bytes
    k += 1
  return docs


def _rss_mb(who) -> float:
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(who).ru_maxrss / 1024


def child(size_mb: float, workers: int, shard_blocks: int,
          train_steps: int) -> dict:
  """One size, in this (fresh) process: generate, prepare, time the stream,
  train on it."""
  from diffusion_text.config import Config, DataConfig
  from diffusion_text.data import pipeline
  pipeline.PARALLEL_MIN_BYTES = 0     # use the workers at every size
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / "corpus").mkdir()
    docs = generate(tmp / "corpus", size_mb)
    rss_before = _rss_mb(resource.RUSAGE_SELF)
    cfg = Config(data=DataConfig(source="owt", path=str(tmp / "corpus"),
                                 tokenizer="gpt2", seq_len=1024,
                                 valid_docs=max(1, docs // 1000),
                                 workers=workers, shard_blocks=shard_blocks,
                                 cache_dir=str(tmp / "cache")))
    t0 = time.perf_counter()
    prepared = pipeline.prepare(cfg)
    seconds = time.perf_counter() - t0
    tokens = sum(prepared.num_tokens(s) for s in prepared.splits)
    out = {
        "size_mb": size_mb, "documents": docs, "tokens": tokens,
        "blocks": sum(prepared.num_blocks(s) for s in prepared.splits),
        "prepare_seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "peak_rss_mb_main_before_prepare": round(rss_before, 1),
        "peak_rss_mb_main": round(_rss_mb(resource.RUSAGE_SELF), 1),
        "peak_rss_mb_largest_worker": round(_rss_mb(resource.RUSAGE_CHILDREN), 1),
    }
    out.update(_stream_timing(tmp, cfg))
    out.update(_train_on_it(tmp, cfg, train_steps))
  return out


def _train_on_it(tmp: pathlib.Path, cfg, steps: int) -> dict:
  """A short run of the real trainer on the prepared corpus (L=128)."""
  import dataclasses
  from diffusion_text import config as config_lib, train, workdir
  if steps < 1:
    return {}
  run_cfg = dataclasses.replace(
      cfg,
      process=config_lib.ProcessConfig(name="masked"),
      model=config_lib.ModelConfig(num_layers=4, d_model=256, num_heads=4,
                                   dtype="float32"),
      data=dataclasses.replace(cfg.data, seq_len=128, batch_size=32),
      train=config_lib.TrainConfig(steps=steps, log_every=1,
                                   checkpoint_every=10 * steps))
  t0 = time.perf_counter()
  train.train(run_cfg, tmp / "run", log=lambda msg: None)
  rows = [r for r in workdir.read_rows(tmp / "run" / "metrics.jsonl")
          if "data_wait_s" in r]
  # The first step carries the compile and the last the final checkpoint.
  rows = rows[1:-1] if len(rows) > 2 else rows
  wait = sum(r["data_wait_s"] for r in rows)
  step = sum(r["step_s"] for r in rows)
  return {"train_steps": steps, "train_seconds": round(time.perf_counter() - t0, 1),
          "train_step_s_median": round(float(np.median([r["step_s"] for r in rows])), 4),
          "train_data_wait_s_mean": round(wait / len(rows), 5),
          "train_data_wait_fraction": round(wait / step, 5),
          "train_final_loss": rows[-1]["loss"]}


def _stream_timing(tmp: pathlib.Path, cfg, batch_size=32, seq_len=128, n=50) -> dict:
  """ms per training batch at the CPU benchmark shape (B=32, L=128)."""
  import dataclasses
  from diffusion_text.data import pipeline
  small = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len))
  prepared = pipeline.prepare(small)
  it = pipeline.train_batches(prepared, batch_size, seed=0)
  next(it)                            # start the reader threads
  t0 = time.perf_counter()
  for _ in range(n):
    next(it)
  ms = (time.perf_counter() - t0) / n * 1e3
  out = {"train_batch_ms_B32_L128": round(ms, 3)}
  ref = pathlib.Path(__file__).with_name("results.json")
  try:   # the masked train step of benchmarks/run.py at the same shape
    step_tok_s = next(r["tokens_per_s"] for r in json.loads(ref.read_text())["train"]
                      if r["process"] == "masked")
    out["data_wait_fraction_of_step"] = round(ms / 1e3 / (batch_size * seq_len / step_tok_s), 4)
  except (OSError, KeyError, StopIteration, TypeError):
    pass
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes-mb", type=float, nargs="+", default=[200, 1000])
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--shard-blocks", type=int, default=8192)
  ap.add_argument("--smoke", action="store_true",
                  help="2 and 8 MB corpora, 2 training steps")
  ap.add_argument("--train-steps", type=int, default=12,
                  help="steps of the real trainer on each prepared corpus")
  ap.add_argument("--out", default=str(pathlib.Path(__file__).with_name("data_results.json")))
  ap.add_argument("--child", type=float, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child is not None:
    print(json.dumps(child(args.child, args.workers, args.shard_blocks,
                           args.train_steps)))
    return
  if "DIFFUSION_TEXT_DATA" not in os.environ:
    sys.exit("set DIFFUSION_TEXT_DATA to the data directory (GPT-2 tokenizer files)")
  sizes = [2, 8] if args.smoke else args.sizes_mb
  train_steps = 3 if args.smoke else args.train_steps
  runs = []
  for size in sizes:
    cmd = [sys.executable, "-m", "benchmarks.data_bench", "--child", str(size),
           "--workers", str(args.workers), "--shard-blocks", str(args.shard_blocks),
           "--train-steps", str(train_steps)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(json.dumps(runs[-1]), flush=True)
  peak = [max(r["peak_rss_mb_main"], r["peak_rss_mb_largest_worker"]) for r in runs]
  result = {
      "smoke": args.smoke, "workers": args.workers,
      "load_avg_1m": round(os.getloadavg()[0], 2),
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
      "runs": runs,
      "peak_rss_growth_largest_vs_smallest": round(peak[-1] / peak[0], 3),
  }
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
