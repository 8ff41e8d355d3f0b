"""Throughput of the train step and the sampler, against a dense-matmul peak.

DESIGN.md section 8: at 4 layers, d=256, V=10,000, L=128, B=32 the reference
masked-diffusion implementations reach ~2,500-2,900 tokens/s in a train step
on a 2-core CPU (~30% of the machine's matmul peak). This measures, in one
run: a dense f32 matmul's FLOP/s (the peak), the train step's tokens/s and
achieved FLOP/s (XLA's own FLOP count of the compiled step), and sampler
tokens/s. Results go to JSON; nothing here is a test.

  python -m benchmarks.run --out benchmarks/results.json [--processes masked ar]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_text import config as config_lib, models, sampling, step as step_lib
from diffusion_text.models import as_denoiser, build_model, count_params
from diffusion_text.processes import make_process

REFERENCE_TOKENS_PER_S = 2900.0  # best reference figure quoted in DESIGN.md


def _time(fn, *args, repeats: int):
  out = fn(*args)  # compile + warm up
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats, out


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  secs, _ = _time(f, a, a, repeats=repeats)
  return 2 * n ** 3 / secs


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _dense_flops(graphdef, process, tx, state, data, key) -> float:
  """XLA's FLOP count of the train step with the head dense at every position.

  The fused head (`Transformer.target_nll`) runs a loop whose trip count
  depends on the batch, which XLA counts once; the dense step's count is the
  model's FLOPs per step as the references define them, so tokens/s and this
  figure stay comparable with them (an absorbing process executes fewer).
  """
  dense = functools.partial(models.as_denoiser, fused_loss=False)
  with mock.patch.object(step_lib, "as_denoiser", dense):
    step = jax.jit(step_lib.make_train_step(graphdef, process, tx, 0.999))
    return _flops(step.lower(state, data, key).compile())


def bench_process(name: str, model_cfg, vocab: int, seq_len: int, batch: int,
                  repeats: int, sample_steps: int) -> dict:
  process = make_process(name, vocab_size=vocab)
  model = build_model(process.model_spec, model_cfg, seed=0)
  graphdef, params = nnx.split(model)
  tx = step_lib.make_optimizer(config_lib.TrainConfig(steps=1000))
  state = step_lib.init_state(params, tx)
  rng = np.random.default_rng(0)
  data = {"tokens": jnp.asarray(rng.integers(0, vocab, (batch, seq_len)), jnp.int32),
          "mask": jnp.ones((batch, seq_len), jnp.int32)}
  step = jax.jit(step_lib.make_train_step(graphdef, process, tx, 0.999),
                 donate_argnums=0)
  key = jax.random.key(0)
  compiled = step.lower(state, data, key).compile()
  flops = _dense_flops(graphdef, process, tx, state, data, key)

  def run(state):
    for i in range(repeats):
      state, m = compiled(state, data, jax.random.fold_in(key, i))
    return state, m
  state, m = compiled(state, data, key)  # warm up
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  state, m = run(state)
  jax.block_until_ready(m)
  secs = (time.perf_counter() - t0) / repeats

  @jax.jit
  def sample(params, key):
    return sampling.sample(key, process, as_denoiser(nnx.merge(graphdef, params)),
                           batch, seq_len, sample_steps)
  s_secs, _ = _time(sample, state.params, key, repeats=1)
  return {
      "process": name, "params": count_params(model),
      "train_step_s": secs, "train_tokens_per_s": batch * seq_len / secs,
      "train_flops_per_step": flops, "train_flops_per_s": flops / secs,
      "sample_steps": sample_steps, "sample_s": s_secs,
      "sample_tokens_per_s": batch * seq_len / s_secs,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--out", default="benchmarks/results.json")
  p.add_argument("--processes", nargs="+", default=["masked", "ar", "d3pm_absorbing"])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--vocab", type=int, default=10_000)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--sample-steps", type=int, default=32)
  p.add_argument("--dtype", default="float32")
  args = p.parse_args(argv)

  model_cfg = config_lib.ModelConfig(num_layers=args.layers, d_model=args.d_model,
                                     num_heads=4, dtype=args.dtype)
  peak = matmul_peak()
  print(f"dense matmul peak: {peak / 1e9:.1f} GFLOP/s on {jax.devices()[0]}")
  rows = []
  for name in args.processes:
    r = bench_process(name, model_cfg, args.vocab, args.seq_len, args.batch,
                      args.repeats, args.sample_steps)
    r["fraction_of_matmul_peak"] = r["train_flops_per_s"] / peak
    r["speedup_vs_reference"] = r["train_tokens_per_s"] / REFERENCE_TOKENS_PER_S
    rows.append(r)
    print(f"{name}: {r['train_tokens_per_s']:,.0f} train tok/s "
          f"({r['fraction_of_matmul_peak']:.0%} of matmul peak, "
          f"{r['speedup_vs_reference']:.2f}x reference), "
          f"sampler {r['sample_tokens_per_s']:,.0f} tok/s")
  out = {"config": dataclasses.asdict(model_cfg) | vars(args),
         "device": str(jax.devices()[0]), "platform": platform.platform(),
         "matmul_peak_flops_per_s": peak, "results": rows,
         "reference_tokens_per_s": REFERENCE_TOKENS_PER_S}
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
