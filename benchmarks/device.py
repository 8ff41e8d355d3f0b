"""Accelerator benchmark of the 125M presets (run through benchmarks/device.sh).

For `masked`, `sedd_absorb`, `gaussian_vlb` and `ar` at GPT-2-small size
(12 layers, d=768, 12 heads, L=1,024, the GPT-2 vocabulary of 50,257: the
backbone of the owt_* presets), in bf16 compute with fp32 master weights:
  - train step: tokens/s, model FLOP/s and MFU (diffusion_text.flops over
    the chip's peak from diffusion_text.monitoring), compile time, XLA's
    buffer sizes and the device allocator's peak;
  - sampler: tokens/s at 128 and 1,024 reverse steps (`ar` always runs one
    step per position).
The step is the trainer's (step.make_train_step under sharding.Sharded,
state donated) on a fixed random batch. Output: one JSON file.

  benchmarks/device.sh                       # about 6 minutes on one H100/H200
  benchmarks/device.sh --smoke               # tiny sizes, CPU, about a minute
  benchmarks/device.sh --processes masked --batch 64 --out /tmp/d.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import resource
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_text import config as config_lib, flops, monitoring, run as run_lib
from diffusion_text import binding, host_memory, sampling, sharding
from diffusion_text import step as step_lib
from diffusion_text.models import as_denoiser, count_params

PROCESSES = ("masked", "sedd_absorb", "gaussian_vlb", "ar")
TARGET_MFU_MASKED = 0.50  # masked at 125M on an H100/H200-class GPU


@dataclasses.dataclass(frozen=True)
class Size:
  layers: int = 12
  d_model: int = 768
  heads: int = 12
  seq_len: int = 1024
  vocab: int = 50_257
  batch: int = 32
  steps: int = 10              # timed train steps (after 2 untimed)
  sample_num: int = 8
  sample_steps: tuple = (128, 1024)


SMOKE = Size(layers=1, d_model=32, heads=2, seq_len=16, vocab=64, batch=4,
             steps=2, sample_num=2, sample_steps=(4, 16))


def config(process: str, size: Size, dtype: str) -> config_lib.Config:
  return config_lib.Config(
      name=f"bench_{process}",
      process=config_lib.ProcessConfig(name=process),
      model=config_lib.ModelConfig(num_layers=size.layers,
                                   d_model=size.d_model, num_heads=size.heads,
                                   mlp_ratio=4, cond_dim=128, dtype=dtype),
      data=config_lib.DataConfig(seq_len=size.seq_len, batch_size=size.batch),
      train=config_lib.TrainConfig(steps=1000, lr=3e-4, b2=0.999,
                                   weight_decay=0.0, ema_decay=0.9999))


def _memory() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"device_peak_bytes": stats.get("peak_bytes_in_use"),
          "process_peak_rss_mb": round(rss_kb / 1024, 1)}


def _compiled_bytes(compiled) -> Optional[dict]:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend reports it
    return None
  names = ("argument_size_in_bytes", "output_size_in_bytes",
           "alias_size_in_bytes", "temp_size_in_bytes")
  return {n: int(getattr(mem, n)) for n in names if hasattr(mem, n)}


def bench_train(cfg, process, graphdef, params, size: Size) -> dict:
  tc = cfg.train
  tx = step_lib.make_optimizer(tc)
  factory = lambda axis: step_lib.make_train_step(graphdef, process, tx,
                                                  tc.ema_decay, axis_name=axis)
  # The step donates its state: train on a copy, sample from `params`.
  state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx)
  par = sharding.Sharded(sharding.make_mesh(), factory, state)
  state = par.place_state(state)
  rng = np.random.default_rng(0)
  batch = par.place_batch({
      "tokens": rng.integers(0, size.vocab, (size.batch, size.seq_len),
                             dtype=np.int32),
      "mask": np.ones((size.batch, size.seq_len), np.int32)})
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = par.step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  for i in range(2):  # allocation and autotuning settle
    state, metrics = compiled(state, batch, jax.random.fold_in(key, i))
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for i in range(size.steps):  # dispatched ahead, as the trainer does
    state, metrics = compiled(state, batch, jax.random.fold_in(key, 2 + i))
  loss = float(jax.device_get(metrics["loss"]))
  step_s = (time.perf_counter() - t0) / size.steps
  util = monitoring.Utilisation(cfg, size.vocab)(1.0 / step_s)
  return {"step_s": step_s,
          "tokens_per_s": size.batch * size.seq_len / step_s,
          "model_flops_per_step": flops.train_flops_per_step(cfg, size.vocab),
          **util, "mfu": util.get("mfu"), "compile_s": compile_s,
          "loss": loss, "compiled_bytes": _compiled_bytes(compiled),
          **_memory()}


def bench_sampler(process, graphdef, params, size: Size, steps: int) -> dict:
  build = lambda p: as_denoiser(nnx.merge(graphdef, p))
  fn = sampling.make_sampler(process, size.sample_num, size.seq_len, steps,
                             build)
  key = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = fn.lower(key, params).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(key, params))
  wall = time.perf_counter() - t0
  tokens = size.sample_num * size.seq_len
  return {"steps_requested": steps,
          "steps_run": process.num_sampling_steps(steps, size.seq_len),
          "compile_s": compile_s, "wall_s": wall, "tokens_per_s": tokens / wall}


def bench_process(name: str, size: Size, dtype: str, log) -> dict:
  cfg = config(name, size, dtype)
  process = run_lib.build_process(cfg, size.vocab)
  model = binding.build_model(process, cfg.model, seed=0)
  graphdef, params = nnx.split(model)
  row = {"process": name, "params": count_params(model),
         "train": bench_train(cfg, process, graphdef, params, size)}
  t = row["train"]
  mfu = "-" if t["mfu"] is None else f"{t['mfu']:.1%}"
  peak = (f"device peak {t['device_peak_bytes'] / 2**30:.2f} GiB"
          if t["device_peak_bytes"] is not None
          else f"peak RSS {t['process_peak_rss_mb']:,.0f} MB")
  log(f"[device] {name}: {row['params'] / 1e6:.1f}M params, "
      f"{t['tokens_per_s']:,.0f} tok/s, MFU {mfu}, compile "
      f"{t['compile_s']:.1f}s, {peak}")
  row["samplers"] = []
  for steps in size.sample_steps:
    s = bench_sampler(process, graphdef, params, size, steps)
    row["samplers"].append(s)
    log(f"[device] {name} sampler {s['steps_run']} steps: "
        f"{s['tokens_per_s']:,.0f} tok/s (compile {s['compile_s']:.1f}s)")
  return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes: checks the script end to end (CPU, ~1 min)")
  p.add_argument("--processes", nargs="+", default=list(PROCESSES))
  p.add_argument("--batch", type=int, help="sequences per train step")
  p.add_argument("--dtype", default="bfloat16",
                 choices=config_lib.COMPUTE_DTYPES[1:])
  p.add_argument("--out", default="benchmarks/device_results.json")
  args = p.parse_args(argv)
  host_memory.keep_mapped()  # as the trainer's CLI; before JAX starts
  size = SMOKE if args.smoke else Size()
  if args.batch:
    size = dataclasses.replace(size, batch=args.batch)
  dev = jax.devices()[0]
  log = lambda msg: print(msg, flush=True)
  log(f"[device] {jax.device_count()} x {dev.device_kind} ({jax.default_backend()}), "
      f"{args.dtype} compute, {size}")
  t0 = time.perf_counter()
  rows = [bench_process(name, size, args.dtype, log) for name in args.processes]
  masked = next((r for r in rows if r["process"] == "masked"), None)
  result = {
      "smoke": args.smoke, "size": dataclasses.asdict(size),
      "dtype": args.dtype, "wall_s": round(time.perf_counter() - t0, 1),
      "host": {"backend": jax.default_backend(), "device_kind": dev.device_kind,
               "devices": jax.device_count(), "jax": jax.__version__,
               "python": platform.python_version(),
               "chip_peak_flops": monitoring.chip_peak_flops(dev.device_kind,
                                                             args.dtype)},
      "target_mfu_masked": TARGET_MFU_MASKED,
      "meets_target": (None if masked is None or masked["train"]["mfu"] is None
                       else masked["train"]["mfu"] >= TARGET_MFU_MASKED),
      "results": rows}
  pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
  log(f"[device] wrote {args.out} in {result['wall_s']:.0f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
