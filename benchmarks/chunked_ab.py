"""A/B in one run: a process's loss gradient with the chunked / fused heads
against the dense arithmetic (diagnostic, not a test).

"chunked" is the code as the trainer runs it; "dense" sets
`contract.ROW_CHUNK` beyond any batch (map_rows then applies its function to
all positions at once) and binds the model with `fused_loss=False` (no
`target_nll` / `target_lse` / `map_logits`), i.e. [B, L, V] arrays as before.
Both are jitted value_and_grad of `process.loss` on the benchmark batch;
reported: median seconds, XLA temporaries, the loss (equal in both), and the
same-run matmul peak.

  python -m benchmarks.chunked_ab d3pm_uniform sedd_uniform [--smoke]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import breakdown, run
from diffusion_text import contract
from diffusion_text.models import as_denoiser


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
    out[label] = {"s": breakdown._median_s(compiled, params, repeats=repeats),
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
  args = p.parse_args(argv)
  shape = run.SMOKE if args.smoke else run.Shape()
  for name in args.processes:
    r = compare(name, shape, args.repeats)
    print(f"{name}: " + ", ".join(
        f"{k} {v['s']:.2f} s (temps {v['temp_mb']:.0f} MB, loss {v['loss']:.5f})"
        for k, v in r.items() if isinstance(v, dict))
          + f"; matmul peak {r['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s",
          flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
