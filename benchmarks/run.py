"""Train-step and sampler throughput of every process, against a matmul peak.

DESIGN.md section 8 and issue "Every process at full speed": at 4 layers,
d=256, 4 heads, V=10,000, L=128, B=32, fp32 AdamW, each process's train step
is built and compiled exactly as `diffusion_text.train` builds it (the
trainer's own parallel wrapper around `step.make_train_step`, state donated)
and timed on a fixed random batch. Right before each measurement a large
fp32 matmul is timed in the same process; every rate is reported as a
fraction of that peak, so runs on a loaded or different host compare by
ratio. Model FLOPs are one analytic count shared by all processes (see
`model_flops`), so "% of peak" compares like with like. Nothing here is a
test; tests/test_benchmarks.py only runs it with --smoke.

  python -m benchmarks.run --out benchmarks/results.json
  python -m benchmarks.run --processes masked ar --steps 3 --out /tmp/b.json
  python -m benchmarks.run --smoke --out /tmp/smoke.json   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_text import config as config_lib, flops, processes, sampling
from diffusion_text import binding, host_memory, run as run_lib, train
from diffusion_text.models import as_denoiser, count_params

# Sampler variants per process: (label, value of the sampler choice or None
# for a process with a single sampler).
SAMPLERS: dict[str, tuple[tuple[str, Optional[str]], ...]] = {
    "masked": (("ancestral", "ancestral"), ("cached", "cached"),
               ("confidence", "confidence"), ("remdm_cap", "remdm_cap"),
               ("remdm_loop", "remdm_loop")),
    "sedd_absorb": (("euler", "euler"), ("analytic", "analytic")),
    "sedd_uniform": (("euler", "euler"), ("analytic", "analytic")),
    "d3pm_absorbing": (("ancestral", None),),
    "d3pm_uniform": (("ancestral", None),),
    "gaussian": (("ddpm", "ddpm"), ("ddim", "ddim")),
    "gaussian_vlb": (("ancestral", None),),
    "ar": (("ancestral", None),),
}

# The project's speed targets; they apply at the full benchmark configuration.
TARGET_FRACTION_OF_PEAK = 0.60
TARGET_VS_MASKED = 0.75
TARGET_SAMPLER_S = 6.5


@dataclasses.dataclass(frozen=True)
class Shape:
  """What is benchmarked: the model, the batch and the sampler workload."""
  layers: int = 4
  d_model: int = 256
  heads: int = 4
  vocab: int = 10_000
  seq_len: int = 128
  batch: int = 32
  sample_num: int = 4
  sample_len: int = 128
  sample_steps: int = 128
  matmul_n: int = 2048

  def config(self, process: str) -> config_lib.Config:
    return config_lib.Config(
        process=config_lib.ProcessConfig(name=process),
        model=config_lib.ModelConfig(num_layers=self.layers,
                                     d_model=self.d_model,
                                     num_heads=self.heads, dtype="float32"),
        data=config_lib.DataConfig(seq_len=self.seq_len,
                                   batch_size=self.batch),
        train=config_lib.TrainConfig(steps=1000))


SMOKE = Shape(layers=1, d_model=32, heads=2, vocab=64, seq_len=16, batch=4,
              sample_num=2, sample_len=16, sample_steps=4, matmul_n=256)


# ------------------------------------------------------------------- FLOPs
model_flops = flops.model_flops  # the one count, shared with the trainer's MFU


# ---------------------------------------------------------------- measuring
def _block(tree):
  return jax.block_until_ready(tree)


@functools.lru_cache(maxsize=None)
def _matmul(n: int):
  a_NxN = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y).lower(a_NxN, a_NxN).compile()
  _block(matmul(a_NxN, a_NxN))
  return matmul, a_NxN


def matmul_peak(n: int, repeats: int = 5) -> float:
  """Median FLOP/s of a jitted n x n x n fp32 matmul, in this process."""
  matmul, a_NxN = _matmul(n)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(matmul(a_NxN, a_NxN))
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times)


def bracket_peak(samples: list[float]) -> dict:
  """The peak for measurements timed among peak samples (the first taken
  before them, the last after): the fastest sample. Noise only ever slows a
  matmul down, so it is the best estimate of the hardware, and fractions
  against it are conservative (on a shared host step times vary by a few
  percent, peak samples by up to 2x)."""
  return {"matmul_peak_flops_per_s": max(samples),
          "matmul_peak_before": samples[0], "matmul_peak_after": samples[-1]}


def memory_now() -> dict:
  """Device allocator peak where the backend reports one, else peak RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rss_mb = rss / (1 << 20) if sys.platform == "darwin" else rss / 1024
  return {"device_peak_bytes": stats.get("peak_bytes_in_use"),
          "process_peak_rss_mb": round(rss_mb, 1)}


def compiled_memory(compiled) -> Optional[dict]:
  """XLA's buffer sizes for one call of a compiled executable."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if mem is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "temp_size_in_bytes")
  return {f: int(getattr(mem, f)) for f in fields if hasattr(mem, f)}


def xla_flops(compiled) -> Optional[float]:
  """XLA's own FLOP count (loops counted once: informative only)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


# -------------------------------------------------------------- train step
@dataclasses.dataclass
class TrainerStep:
  """The trainer's parallel wrapper (`.step`, `.place_state`, ...) + state."""
  par: Any
  state: Any
  process: processes.Process
  graphdef: nnx.GraphDef
  params: int


def trainer_step(cfg: config_lib.Config, vocab: int) -> TrainerStep:
  """Process, model, optimizer state and jitted step exactly as train.train
  builds them (run.build_process, binding.build_model, train.parallel_step)."""
  process = run_lib.build_process(cfg, vocab)
  model = binding.build_model(process, cfg.model, seed=cfg.train.seed)
  graphdef, params = nnx.split(model)
  _, par, state = train.parallel_step(cfg, graphdef, process, params)
  return TrainerStep(par, par.place_state(state), process, graphdef,
                     count_params(model))


def random_batch(shape: Shape, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(0, shape.vocab, (shape.batch, shape.seq_len),
                                 dtype=np.int32),
          "mask": np.ones((shape.batch, shape.seq_len), np.int32)}


def bench_train(name: str, shape: Shape, steps: int, warmup: int) -> dict:
  cfg = shape.config(name)
  ts = trainer_step(cfg, shape.vocab)
  batch = ts.par.place_batch(random_batch(shape))
  base_key = jax.random.key(cfg.train.seed)
  t0 = time.perf_counter()
  lowered = ts.par.step.lower(ts.state, batch, base_key)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  state, times, first_step_s = ts.state, [], None
  for i in range(warmup):
    s0 = time.perf_counter()
    state, metrics = _block(compiled(state, batch, jax.random.fold_in(base_key, i)))
    first_step_s = first_step_s or time.perf_counter() - s0
  # A peak measurement before and after every timed step.
  flops = model_flops(cfg, shape.vocab)
  tokens = shape.batch * shape.seq_len
  step_flops = flops["train_per_token"] * tokens
  peaks = [matmul_peak(shape.matmul_n, repeats=3)]
  for i in range(warmup, warmup + steps):
    key = jax.random.fold_in(base_key, i)  # as the trainer keys its steps
    s0 = time.perf_counter()
    state, metrics = _block(compiled(state, batch, key))
    times.append(time.perf_counter() - s0)
    peaks.append(matmul_peak(shape.matmul_n, repeats=3))
  loss = float(np.mean(jax.device_get(metrics["loss"])))
  step_s = statistics.median(times)
  peak = bracket_peak(peaks)
  return {
      "process": name, "params": ts.params,
      "step_s": step_s, "step_s_all": times,
      "tokens_per_s": tokens / step_s,
      "model_flops_per_step": step_flops,
      "model_flops_per_s": step_flops / step_s,
      **peak, "matmul_peaks_all": peaks,
      "fraction_of_peak": (step_flops / step_s
                           / peak["matmul_peak_flops_per_s"]),
      "xla_flops_per_step": xla_flops(compiled),
      "trace_lower_s": t1 - t0, "compile_s": t2 - t1,
      "first_step_s": first_step_s, "loss_after": loss,
      "compiled_memory": compiled_memory(compiled), **memory_now(),
  }


# ----------------------------------------------------------------- samplers
def make_sampler(process, sampler: Optional[str], num: int, length: int,
                 steps: int, build_denoiser: Callable):
  """`sampling.make_sampler` with the sampler variant `sampler` (None: the
  process's default)."""
  options = processes.SamplingOptions(sampler=sampler or "default")
  return sampling.make_sampler(process, num, length, steps, build_denoiser,
                               options=options)


# The Denoiser fields that run the network once per call.
NETWORK_CALLS = ("predict", "target_nll", "target_lse", "map_logits")


def counting(build_denoiser: Callable, counter: list) -> Callable:
  """A denoiser builder whose network calls bump `counter` at run time.

  A `jax.debug.callback` per call of the network (`predict`, `target_nll`,
  `target_lse`, `map_logits`) fires each time the call executes, so skipped
  branches (the cached sampler's `cond`) and every loop trip are counted
  exactly. Used in a separate, untimed run.
  """
  def bump():
    counter[0] += 1

  def wrap(fn):
    if fn is None:
      return None
    def counted(*args, **kwargs):
      jax.debug.callback(bump)
      return fn(*args, **kwargs)
    return counted

  def build(params):
    d = build_denoiser(params)
    return dataclasses.replace(
        d, **{f: wrap(getattr(d, f)) for f in NETWORK_CALLS})
  return build


def bench_sampler(name: str, label: str, sampler: Optional[str],
                  shape: Shape, count_calls: bool, repeats: int) -> dict:
  cfg = shape.config(name)
  process = run_lib.build_process(cfg, shape.vocab)
  graphdef, params = nnx.split(
      binding.build_model(process, cfg.model, seed=cfg.train.seed))
  build = lambda p: as_denoiser(nnx.merge(graphdef, p))
  num, length = shape.sample_num, shape.sample_len
  key = jax.random.key(0)
  fn = make_sampler(process, sampler, num, length, shape.sample_steps, build)
  t0 = time.perf_counter()
  compiled = fn.lower(key, params).compile()
  t1 = time.perf_counter()
  _block(compiled(key, params))
  t2 = time.perf_counter()
  times = []
  peak_before = matmul_peak(shape.matmul_n)
  for i in range(repeats):
    s0 = time.perf_counter()
    _block(compiled(jax.random.key(1 + i), params))
    times.append(time.perf_counter() - s0)
  wall = statistics.median(times)
  peak = bracket_peak([peak_before, matmul_peak(shape.matmul_n)])
  calls = None
  if count_calls:
    counter = [0]
    counted = make_sampler(process, sampler, num, length, shape.sample_steps,
                           counting(build, counter))
    _block(counted(jax.random.key(1), params))
    jax.effects_barrier()
    calls = counter[0]
  steps = process.num_sampling_steps(shape.sample_steps, length)
  row = {"process": name, "sampler": label, "num": num, "length": length,
         "steps_requested": shape.sample_steps, "steps_run": steps,
         "compile_s": t1 - t0, "first_call_s": t2 - t1, "wall_s": wall,
         "wall_s_all": times,
         "tokens_per_s": num * length / wall, "network_calls": calls,
         "calls_method": "runtime jax.debug.callback count, untimed run"
                         if count_calls else None,
         **peak}
  if calls is not None:
    fwd = model_flops(cfg, shape.vocab)["forward_per_token"]
    row["model_flops"] = calls * fwd * num * length
    row["fraction_of_peak"] = (row["model_flops"] / wall
                               / peak["matmul_peak_flops_per_s"])
  return row


# ------------------------------------------------------------------ report
def host_info() -> dict:
  dev = jax.devices()[0]
  return {"cpu_count": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "device_kind": dev.device_kind,
          "devices": jax.device_count(), "platform": platform.platform(),
          "python": platform.python_version(),
          "xla_flags": os.environ.get("XLA_FLAGS"),
          "host_malloc": host_memory.mode(),
          "load_avg_1m": (round(os.getloadavg()[0], 2)
                          if hasattr(os, "getloadavg") else None)}


def add_targets(result: dict) -> None:
  rows = result["train"]
  masked = next((r for r in rows if r["process"] == "masked"), None)
  for r in rows:
    # Peak-normalised: every process is credited the same FLOPs per token,
    # so on a steady machine this is the tokens/s ratio, and on a drifting
    # one it does not depend on when each row ran.
    r["vs_masked"] = (r["fraction_of_peak"] / masked["fraction_of_peak"]
                      if masked else None)
    # The plain ratio, for comparison: it also moves with the load on the
    # machine while each row ran.
    r["tokens_vs_masked"] = (r["tokens_per_s"] / masked["tokens_per_s"]
                             if masked else None)
    r["meets_peak_target"] = r["fraction_of_peak"] >= TARGET_FRACTION_OF_PEAK
    r["meets_vs_masked_target"] = (None if masked is None
                                   else r["vs_masked"] >= TARGET_VS_MASKED)
  by_name = {(r["process"], r["sampler"]): r for r in result["samplers"]}
  # The wall-time target is for the benchmark workload only.
  full = result["shape"] == dataclasses.asdict(Shape())
  for r in result["samplers"]:
    r["meets_time_target"] = r["wall_s"] <= TARGET_SAMPLER_S if full else None
    ancestral = by_name.get((r["process"], "ancestral"))
    if r["sampler"] == "cached" and ancestral:
      r["cached_over_ancestral"] = r["wall_s"] / ancestral["wall_s"]


def _yes(flag) -> str:
  return "-" if flag is None else ("yes" if flag else "**no**")


def markdown(result: dict) -> str:
  h, c = result["host"], result["shape"]
  lines = [
      "# Benchmark results", "",
      f"{h['backend']} ({h['device_kind']}), {h['cpu_count']} CPUs, "
      f"jax {h['jax']}, load {h['load_avg_1m']}; "
      f"{c['layers']} layers, d={c['d_model']}, {c['heads']} heads, "
      f"V={c['vocab']:,}, L={c['seq_len']}, B={c['batch']}, fp32 AdamW"
      + (" (smoke configuration: numbers mean nothing)" if result["smoke"] else ""),
      "", "## Train step", "",
      "| process | tokens/s | × masked | × masked tokens/s "
      "| model GFLOP/step | GFLOP/s "
      "| % of matmul peak | ≥ 60% | ≥ 0.75× masked | compile s | peak RSS MB |",
      "|---|---:|---:|---:|---:|---:|---:|:-:|:-:|---:|---:|"]
  ratio = lambda x: "-" if x is None else f"{x:.2f}"
  for r in result["train"]:
    lines.append(
        f"| {r['process']} | {r['tokens_per_s']:,.0f} "
        f"| {ratio(r['vs_masked'])} | {ratio(r['tokens_vs_masked'])} "
        f"| {r['model_flops_per_step'] / 1e9:.1f} "
        f"| {r['model_flops_per_s'] / 1e9:.1f} | {r['fraction_of_peak']:.0%} "
        f"| {_yes(r['meets_peak_target'])} | {_yes(r['meets_vs_masked_target'])} "
        f"| {r['compile_s']:.1f} | {r['process_peak_rss_mb']:,.0f} |")
  lines += [
      "", f"## Samplers ({c['sample_num']} × {c['sample_len']} tokens, "
      f"{c['sample_steps']} steps requested)", "",
      "| process | sampler | steps run | network calls | wall s | tokens/s "
      "| % of matmul peak | ≤ 6.5 s | compile s |",
      "|---|---|---:|---:|---:|---:|---:|:-:|---:|"]
  for r in result["samplers"]:
    frac = r.get("fraction_of_peak")
    lines.append(
        f"| {r['process']} | {r['sampler']} | {r['steps_run']} "
        f"| {r['network_calls'] if r['network_calls'] is not None else '-'} "
        f"| {r['wall_s']:.2f} | {r['tokens_per_s']:,.0f} "
        f"| {'-' if frac is None else f'{frac:.0%}'} "
        f"| {_yes(r['meets_time_target'])} | {r['compile_s']:.1f} |")
  cached = [r for r in result["samplers"] if "cached_over_ancestral" in r]
  for r in cached:
    lines.append(f"\n`{r['process']}` cached / ancestral wall time: "
                 f"{r['cached_over_ancestral']:.2f} (target ≤ 1).")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results.json",
                 help="JSON output; the Markdown table goes next to it (.md)")
  p.add_argument("--processes", nargs="+", default=processes.names(),
                 choices=processes.names(), metavar="NAME")
  p.add_argument("--steps", type=int, default=5, help="timed train steps")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
  p.add_argument("--smoke", action="store_true",
                 help="tiny model and workload (seconds; for tests)")
  p.add_argument("--sample-repeats", type=int, default=1,
                 help="timed sampler calls after the first (median)")
  p.add_argument("--no-train", action="store_true")
  p.add_argument("--no-samplers", action="store_true")
  p.add_argument("--no-count-calls", action="store_true",
                 help="skip the untimed run that counts network calls")
  args = p.parse_args(argv)
  host_memory.keep_mapped()  # as the trainer's CLI; before JAX starts
  shape = SMOKE if args.smoke else Shape()
  steps = min(args.steps, 2) if args.smoke else args.steps

  result = {"host": host_info(), "shape": dataclasses.asdict(shape),
            "smoke": args.smoke, "timed_steps": steps, "warmup": args.warmup,
            "sample_repeats": args.sample_repeats,
            "flop_count": model_flops.__doc__.strip(),
            "model_flops_per_token": model_flops(shape.config("masked"),
                                                 shape.vocab),
            "train": [], "samplers": []}
  print(f"[bench] {result['host']['backend']} "
        f"({result['host']['device_kind']}), {shape}", flush=True)
  for name in [] if args.no_train else args.processes:
    r = bench_train(name, shape, steps, args.warmup)
    result["train"].append(r)
    print(f"[bench] train {name}: {r['tokens_per_s']:,.0f} tok/s, "
          f"{r['fraction_of_peak']:.0%} of matmul peak, "
          f"compile {r['compile_s']:.1f} s", flush=True)
  for name in [] if args.no_samplers else args.processes:
    for label, sampler in SAMPLERS[name]:
      r = bench_sampler(name, label, sampler, shape, not args.no_count_calls,
                        args.sample_repeats)
      result["samplers"].append(r)
      print(f"[bench] sample {name}/{label}: {r['wall_s']:.2f} s, "
            f"{r['network_calls']} network calls", flush=True)
  add_targets(result)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  table = markdown(result)
  out.with_suffix(".md").write_text(table)
  print(table)
  print(f"[bench] wrote {out} and {out.with_suffix('.md')}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
