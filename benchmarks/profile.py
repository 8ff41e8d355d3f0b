"""Where a process's train step spends its time, from an XLA profile.

For each process, the trainer's own jitted step (`run.trainer_step`, as
`run.py` times it) runs a few warm steps under `jax.profiler.trace`; the
Perfetto trace it writes holds one event per executed XLA operation. Their
durations are summed per operation and per kind:

  matmul      dot / dot_general and the fusions XLA:CPU hands to its matmul
              library (kCustom fusions around a dot: `ynn_fusion`, ...);
  movement    copies, transposes, pads, concatenates, slices, gathers and
              dynamic-update-slices (layout changes and data shuffling);
  elementwise every other fused loop (activations, norms, softmaxes,
              the optimizer update, reductions);
  control     while / conditional / call bookkeeping.

Seconds are per step (the trace's total over the traced steps divided by
their number). The sum over operations can exceed the step's wall time
where the runtime overlaps independent operations. Diagnostic only, not a
test:

  python -m benchmarks.profile masked gaussian --out /tmp/profile.json
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile
import time

import jax

from benchmarks import run
from diffusion_text import host_memory

_RUNTIME = ("ThunkExecutor", "$", "Slinky", "Pjit", "PjRt", "TfrtCpu",
            "CommonPjRt", "Execute")
_MOVEMENT = ("copy", "transpose", "pad", "concatenate", "slice", "gather",
             "scatter", "dynamic-update", "dynamic_update", "bitcast_pad")
_CONTROL = ("while", "conditional", "call", "cond")


def kind_of(op: str, hlo_line: str) -> str:
  """The kind of one executed XLA operation (see the module docstring)."""
  base = re.sub(r"\.\d+$", "", op)
  if (base.startswith(("dot", "ynn_fusion", "xnn_fusion", "onednn"))
      or " dot(" in hlo_line or "kind=kCustom" in hlo_line):
    return "matmul"
  if base in _CONTROL or base.startswith(_CONTROL):
    return "control"
  if any(m in base for m in _MOVEMENT):
    return "movement"
  return "elementwise"


def _hlo_lines(text: str) -> dict[str, str]:
  lines = {}
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
    if m:
      lines.setdefault(m.group(1), m.group(2))
  return lines


def profile(name: str, shape: run.Shape, steps: int) -> dict:
  cfg = shape.config(name)
  ts = run.trainer_step(cfg, shape.vocab)
  batch = ts.par.place_batch(run.random_batch(shape))
  key = jax.random.key(cfg.train.seed)
  compiled = ts.par.step.lower(ts.state, batch, key).compile()
  state = ts.state
  for i in range(2):  # warm
    state, _ = jax.block_until_ready(compiled(state, batch,
                                              jax.random.fold_in(key, i)))
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for i in range(steps):
        state, _ = jax.block_until_ready(compiled(
            state, batch, jax.random.fold_in(key, 2 + i)))
    wall = (time.perf_counter() - t0) / steps
    (path,) = pathlib.Path(tmp).rglob("*.trace.json.gz")
    events = json.loads(gzip.open(path).read())["traceEvents"]
  hlo = _hlo_lines(compiled.as_text())
  per_op, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(_RUNTIME):
      per_op[e["name"]] += e.get("dur", 0) / 1e6 / steps
      calls[e["name"]] += 1
  kinds = collections.Counter()
  for op, s in per_op.items():
    kinds[kind_of(op, hlo.get(op, ""))] += s
  total = sum(per_op.values())
  top = [{"op": op, "s": round(s, 5), "calls_per_step": calls[op] // steps,
          "kind": kind_of(op, hlo.get(op, "")),
          "hlo": hlo.get(op, "")[:160]}
         for op, s in per_op.most_common(15)]
  return {"process": name, "traced_steps": steps,
          "wall_s_per_step": round(wall, 4),
          "ops_s_per_step": round(total, 4),
          "by_kind_s": {k: round(v, 4) for k, v in kinds.most_common()},
          "by_kind_share": {k: round(v / total, 3)
                            for k, v in kinds.most_common()},
          "top_ops": top}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("processes", nargs="+")
  p.add_argument("--steps", type=int, default=3, help="traced steps")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", default=None, help="also write JSON here")
  args = p.parse_args(argv)
  host_memory.keep_mapped()  # as the trainer's CLI; before JAX starts
  shape = run.SMOKE if args.smoke else run.Shape()
  rows = []
  for name in args.processes:
    r = profile(name, shape, args.steps)
    rows.append(r)
    shares = ", ".join(f"{k} {v:.0%}" for k, v in r["by_kind_share"].items())
    print(f"{name}: {r['wall_s_per_step']:.3f} s/step, ops "
          f"{r['ops_s_per_step']:.3f} s: {shares}", flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(
        {"host": run.host_info(), "shape": shape.__dict__, "rows": rows},
        indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
