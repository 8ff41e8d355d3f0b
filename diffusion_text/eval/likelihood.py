"""The one likelihood evaluator: NLL upper bounds with standard errors.

For every evaluation block the process's `nll_bound` (an unbiased Monte-Carlo
estimate of an upper bound on -log p(block)) is averaged over K independent
time samples. The corpus figure is the ratio estimator
  mean = sum_b nats_b / sum_b n_b          (nats per token)
with its standard error over blocks (which also carries the Monte-Carlo
noise of each block's estimate):
  SEM = sqrt( sum_b (nats_b - mean n_b)^2 / (N (N - 1)) ) / mean_b(n_b).
Bits and perplexity are derived here and nowhere else.
"""

from __future__ import annotations

import functools
import math
import pathlib
import subprocess
import time
from typing import Callable, Iterable

import jax
import numpy as np

from diffusion_text import config as config_lib, run as run_lib, sharding
from diffusion_text import step as step_lib, workdir as workdir_lib
from diffusion_text.data import pipeline

LN2 = math.log(2.0)


def summarize(nats_b: np.ndarray, tokens_b: np.ndarray,
              terms_b: dict[str, np.ndarray]) -> dict:
  """Per-block nats and token counts -> the reported figures."""
  keep = tokens_b > 0
  nats_b, tokens_b = nats_b[keep], tokens_b[keep]
  n = len(nats_b)
  mean = float(nats_b.sum() / tokens_b.sum())
  if n > 1:
    resid = nats_b - mean * tokens_b
    sem = float(np.sqrt((resid ** 2).sum() / (n * (n - 1))) / tokens_b.mean())
  else:
    sem = float("nan")
  return {
      "bound": "upper",  # every figure below is an upper bound on the NLL
      "nats_per_token": mean,
      "nats_per_token_sem": sem,
      "bits_per_token": mean / LN2,
      "bits_per_token_sem": sem / LN2,
      "perplexity": math.exp(mean),
      # delta method: d exp(m) = exp(m) dm
      "perplexity_sem": math.exp(mean) * sem,
      "num_blocks": int(n),
      "num_tokens": int(tokens_b.sum()),
      "terms": {k: float(v[keep].sum() / tokens_b.sum())
                for k, v in terms_b.items()},
  }


def make_bound_fn(process, graphdef, params, mesh):
  """The bound step jitted over `mesh`, as in training: batch split over the
  data axes, params replicated or fsdp-sharded by the same rules."""
  fn = jax.jit(functools.partial(step_lib.bound_step, graphdef=graphdef,
                                 process=process),
               in_shardings=(sharding.state_shardings(params, mesh),
                             sharding.batch_sharding(mesh),
                             sharding.replicated(mesh)),
               out_shardings=sharding.replicated(mesh))
  return fn, jax.device_put(params, sharding.state_shardings(params, mesh))


def evaluate(process, graphdef, params, batches: Iterable[dict],
             mc_samples: int = 1, seed: int = 0,
             log: Callable[[str], None] = print,
             total_batches: int | None = None, mesh=None,
             batch_size: int = 0) -> dict:
  """Bound over every block of `batches` ({'tokens', 'mask'} dicts).

  Runs on `mesh` (default: every device). Every batch is padded with
  masked-out rows to one shape, `batch_size` (default: the first batch's)
  rounded up to the mesh's device count, so it compiles once; padded rows
  are dropped, and a batch's figures depend only on that padded shape, not
  on how many devices share it.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh()
  fn, params = make_bound_fn(process, graphdef, params, mesh)
  key = jax.random.key(seed)
  nats, tokens, terms = [], [], {}
  t0 = time.time()
  for i, batch in enumerate(batches):
    batch_size = batch_size or len(batch["mask"])
    rows = len(batch["mask"])
    batch, _ = sharding.pad_batch(batch, batch_size)
    batch, _ = sharding.pad_batch(batch, sharding.batch_devices(mesh))
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    acc_nats, acc_terms = 0.0, {}
    for k in range(mc_samples):
      b_nats, b_terms = fn(params, batch, jax.random.fold_in(key, i * mc_samples + k))
      acc_nats = acc_nats + b_nats
      for name, v in b_terms.items():
        acc_terms[name] = acc_terms.get(name, 0.0) + v
    nats.append(np.asarray(acc_nats)[:rows] / mc_samples)
    tokens.append(np.asarray(batch["mask"])[:rows].sum(-1))
    for name, v in acc_terms.items():
      terms.setdefault(name, []).append(np.asarray(v)[:rows] / mc_samples)
    if total_batches and (i + 1) % max(total_batches // 5, 1) == 0:
      log(f"[eval] {i + 1}/{total_batches} batches ({time.time() - t0:.0f}s)")
  result = summarize(np.concatenate(nats), np.concatenate(tokens),
                     {k: np.concatenate(v) for k, v in terms.items()})
  result["mc_samples"] = mc_samples
  result["seconds"] = round(time.time() - t0, 1)
  return result


def format_result(name: str, r: dict) -> str:
  return (f"{name}: NLL <= {r['nats_per_token']:.4f} ± "
          f"{r['nats_per_token_sem']:.4f} nats/token "
          f"(<= {r['bits_per_token']:.4f} bits/token), perplexity <= "
          f"{r['perplexity']:.2f} ± {r['perplexity_sem']:.2f} "
          f"[{r['num_tokens']:,} tokens, {r['num_blocks']} blocks, "
          f"K={r['mc_samples']}]")


def evaluate_workdir(workdir, overrides=(),
                     log: Callable[[str], None] = print) -> dict:
  """Evaluate the checkpoint of a training workdir with its `eval` settings.

  `overrides` (key=value strings, e.g. eval.split=valid) apply on top of the
  workdir's config.json, which is read once.
  """
  workdir = pathlib.Path(workdir)
  run, params, step = run_lib.open_workdir(workdir, overrides, log)
  cfg, ev = run.cfg, run.cfg.eval
  n_blocks = run_lib.require_blocks(run.prepared, ev.split, cfg)
  if ev.max_blocks:
    n_blocks = min(n_blocks, ev.max_blocks)
  total = -(-n_blocks // ev.batch_size)
  log(f"[eval] {ev.split}: {n_blocks} blocks of {cfg.data.seq_len} tokens, "
      f"K={ev.mc_samples} Monte-Carlo samples, step {step}"
      + (" (EMA)" if ev.use_ema else ""))
  batches = pipeline.eval_batches(run.prepared, ev.split, ev.batch_size,
                                  ev.max_blocks)
  result = evaluate(run.process, run.graphdef, params, batches, ev.mc_samples,
                    ev.seed, log, total_batches=total,
                    mesh=sharding.mesh_from_config(cfg.train),
                    batch_size=ev.batch_size)
  result.update({
      "split": ev.split, "process": cfg.process.name, "step": step,
      "ema": ev.use_ema, "config": config_lib.to_dict(cfg),
      "data": run.prepared.provenance(), "commit": _git_commit()})
  out = workdir / f"eval_{ev.split}.json"
  if not math.isfinite(result["nats_per_token"]):
    raise NonFiniteBound(
        f"the {ev.split} bound of {workdir} (step {step}) is not finite "
        f"({result['nats_per_token']}); {out} is left as it was. The "
        "checkpoint's parameters are finite, so the model overflows: train "
        "with a lower train.lr or evaluate an earlier workdir")
  # Printed first: a failed write (read-only workdir) loses nothing.
  log(format_result(f"{cfg.name} [{cfg.process.name}] {ev.split}", result))
  workdir_lib.atomic_write_json(out, result)
  log(f"[eval] written {out}")
  return result


class NonFiniteBound(ValueError):
  """The evaluated bound is NaN/inf; nothing is written."""


def _git_commit() -> str:
  try:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
        cwd=pathlib.Path(__file__).resolve().parent, timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
