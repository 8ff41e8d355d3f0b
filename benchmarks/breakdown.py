"""Where one process's train step spends its time, by timed sub-computations.

Diagnostic only (results.json comes from run.py). For a process at the
benchmark configuration it times, each jitted on its own with the same batch:

  step       the trainer's step (run.trainer_step), as run.py times it;
  loss_fwd   process.loss forward only;
  loss_grad  value_and_grad of process.loss w.r.t. the parameters, with
             and without the metrics the step returns kept live;
  calls      each network callable the loss makes (predict, target_nll,
             round_logits, embed, gamma), forward + backward w.r.t. the
             parameters on the exact arguments the loss passes (captured
             by one eager evaluation of the loss).

so optimizer + EMA ~ step - loss_grad with metrics, the metrics' own cost
~ the difference of the two loss_grads, and the process's own work outside
the network ~ loss_grad - sum(calls). Against the fastest of the matmul
peaks measured before and after the process's timings (`run.bracket_peak`)
it also reports `target_step_s`, the longest step that meets run.py's
60%-of-peak target (the model FLOPs per step / (0.6 x that peak)): where
the network calls alone take longer, no faster code around them meets the
target for that objective.

  python -m benchmarks.breakdown gaussian d3pm_uniform [--smoke]

`--ab` instead compares, in one run, the loss gradient as the trainer runs
it ("chunked") with the dense arithmetic ("dense": `contract.ROW_CHUNK`
beyond any batch, so map_rows applies its function to all positions at
once, and the model bound with `fused_loss=False`, so no target_nll /
target_lse / map_logits): median seconds, XLA temporaries and the loss
(equal in both), plus the same-run matmul peak.

  python -m benchmarks.breakdown --ab d3pm_uniform sedd_uniform
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import run
from diffusion_text import contract, flops, host_memory
from diffusion_text.models import as_denoiser

CALLABLES = ("predict", "target_nll", "round_logits", "round_nll", "embed",
             "gamma")


def _median_s(fn, *args, repeats: int = 3) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def capture_calls(process, graphdef, params, key, batch) -> list:
  """(callable name, concrete args) of every network call in one loss."""
  calls = []
  d = as_denoiser(nnx.merge(graphdef, params))

  def spy(name, fn):
    def wrapped(*args, **kwargs):
      calls.append((name, args, kwargs))
      return fn(*args, **kwargs)
    return wrapped
  spied = dataclasses.replace(d, **{n: spy(n, getattr(d, n)) for n in CALLABLES
                                    if getattr(d, n) is not None})
  with jax.disable_jit():
    process.loss(key, spied, batch["tokens"], batch["mask"])
  return calls


def breakdown(name: str, shape: run.Shape, repeats: int) -> dict:
  cfg = shape.config(name)
  ts = run.trainer_step(cfg, shape.vocab)
  process, graphdef = ts.process, ts.graphdef
  params = ts.state.params
  batch = {k: jnp.asarray(v) for k, v in run.random_batch(shape).items()}
  key = jax.random.key(0)
  peaks = [run.matmul_peak(shape.matmul_n, repeats=3)]

  def loss_metrics(p, k):
    out = process.loss(k, as_denoiser(nnx.merge(graphdef, p)),
                       batch["tokens"], batch["mask"])
    return out.loss, out.metrics
  loss = lambda p, k: loss_metrics(p, k)[0]
  with_metrics = jax.value_and_grad(loss_metrics, has_aux=True)
  out = {"process": name,
         "loss_fwd_s": _median_s(jax.jit(loss), params, key, repeats=repeats),
         "loss_grad_s": _median_s(jax.jit(jax.value_and_grad(loss)), params,
                                  key, repeats=repeats),
         # As the step differentiates it: the metrics stay live.
         "loss_grad_metrics_s": _median_s(jax.jit(with_metrics), params, key,
                                          repeats=repeats)}
  calls = []
  for cname, args, kwargs in capture_calls(process, graphdef, params, key,
                                           batch):
    if any(isinstance(leaf, jax.core.Tracer)
           for leaf in jax.tree.leaves((args, kwargs))):
      # Made inside a traced region (a chunked `map_rows`, a checkpoint):
      # its arguments exist only there, so it is timed as part of the loss.
      calls.append({"callable": cname, "inside_traced_region": True})
      continue
    # Arguments go in as jit inputs, not baked-in constants.
    def call(p, args, kwargs, cname=cname):
      fn = getattr(as_denoiser(nnx.merge(graphdef, p)), cname)
      return jnp.sum(fn(*args, **kwargs).astype(jnp.float32))
    shapes = [list(getattr(a, "shape", ())) for a in args]
    calls.append({"callable": cname, "arg_shapes": shapes,
                  "fwd_s": _median_s(jax.jit(call), params, args, kwargs,
                                     repeats=repeats),
                  "fwd_bwd_s": _median_s(jax.jit(jax.value_and_grad(call)),
                                         params, args, kwargs,
                                         repeats=repeats)})
  out["calls"] = calls
  state = ts.state
  step = ts.par.step.lower(state, ts.par.place_batch(run.random_batch(shape)),
                           key).compile()
  placed = ts.par.place_batch(run.random_batch(shape))
  times = []
  for i in range(repeats + 1):
    t0 = time.perf_counter()
    state, m = jax.block_until_ready(step(state, placed,
                                          jax.random.fold_in(key, i)))
    times.append(time.perf_counter() - t0)
  out["step_s"] = statistics.median(times[1:])
  net = sum(c.get("fwd_bwd_s", 0.0) for c in calls)
  out["network_fwd_bwd_s"] = net
  out["metrics_s"] = out["loss_grad_metrics_s"] - out["loss_grad_s"]
  out["optimizer_ema_s"] = out["step_s"] - out["loss_grad_metrics_s"]
  out["process_outside_network_s"] = out["loss_grad_s"] - net
  peaks.append(run.matmul_peak(shape.matmul_n, repeats=3))
  out.update(run.bracket_peak(peaks))
  out["model_flops_per_step"] = flops.train_flops_per_step(cfg, shape.vocab)
  out["target_step_s"] = out["model_flops_per_step"] / (
      run.TARGET_FRACTION_OF_PEAK * out["matmul_peak_flops_per_s"])
  return out


def compare(name: str, shape: run.Shape, repeats: int) -> dict:
  ts = run.trainer_step(shape.config(name), shape.vocab)
  process, graphdef, params = ts.process, ts.graphdef, ts.state.params
  batch = {k: jnp.asarray(v) for k, v in run.random_batch(shape).items()}
  key, chunk, out = jax.random.key(0), contract.ROW_CHUNK, {}
  for label, fused in (("chunked", True), ("dense", False)):
    contract.ROW_CHUNK = chunk if fused else 1 << 40

    def loss(p, fused=fused):
      res = process.loss(key, as_denoiser(nnx.merge(graphdef, p), fused),
                         batch["tokens"], batch["mask"])
      return res.loss, res.metrics
    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(
        params).compile()
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0)
    out[label] = {"s": _median_s(compiled, params, repeats=repeats),
                  "temp_mb": temp / 1e6,
                  "loss": float(compiled(params)[0][0])}
  contract.ROW_CHUNK = chunk
  out["matmul_peak_flops_per_s"] = run.matmul_peak(shape.matmul_n)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("processes", nargs="+")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=None, help="also write JSON here")
  p.add_argument("--ab", action="store_true",
                 help="only the chunked-vs-dense loss gradient A/B")
  args = p.parse_args(argv)
  host_memory.keep_mapped()  # as the trainer's CLI; before JAX starts
  shape = run.SMOKE if args.smoke else run.Shape()
  rows = []
  for name in args.processes:
    if args.ab:
      r = compare(name, shape, args.repeats)
      rows.append(r)
      print(f"{name}: " + ", ".join(
          f"{k} {v['s']:.2f} s (temps {v['temp_mb']:.0f} MB, loss "
          f"{v['loss']:.5f})" for k, v in r.items() if isinstance(v, dict))
            + f"; matmul peak {r['matmul_peak_flops_per_s'] / 1e9:.1f} "
            "GFLOP/s", flush=True)
      continue
    r = breakdown(name, shape, args.repeats)
    rows.append(r)
    print(f"{name}: step {r['step_s']:.3f} s = loss fwd+bwd "
          f"{r['loss_grad_s']:.3f} (fwd {r['loss_fwd_s']:.3f}) + metrics "
          f"{r['metrics_s']:.3f} + optimizer/EMA "
          f"{r['optimizer_ema_s']:.3f}; network calls fwd+bwd "
          f"{r['network_fwd_bwd_s']:.3f}, process work outside them "
          f"{r['process_outside_network_s']:.3f}; the "
          f"{run.TARGET_FRACTION_OF_PEAK:.0%} target allows "
          f"{r['target_step_s']:.3f} s per step (matmul peak "
          f"{r['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s)", flush=True)
    for c in r["calls"]:
      if c.get("inside_traced_region"):
        print(f"  {c['callable']}: inside a chunked map (in the loss's time)",
              flush=True)
        continue
      print(f"  {c['callable']}{tuple(c['arg_shapes'])}: fwd {c['fwd_s']:.3f} s,"
            f" fwd+bwd {c['fwd_bwd_s']:.3f} s", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
