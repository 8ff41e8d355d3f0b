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
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_text import step as step_lib

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


def evaluate(process, graphdef, params, batches: Iterable[dict],
             mc_samples: int = 1, seed: int = 0,
             log: Callable[[str], None] = print,
             total_batches: int | None = None) -> dict:
  """Bound over every block of `batches` ({'tokens', 'mask'} dicts)."""
  fn = jax.jit(functools.partial(step_lib.bound_step, graphdef=graphdef,
                                 process=process))
  key = jax.random.key(seed)
  nats, tokens, terms = [], [], {}
  t0 = time.time()
  for i, batch in enumerate(batches):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    acc_nats, acc_terms = 0.0, {}
    for k in range(mc_samples):
      b_nats, b_terms = fn(params, batch, jax.random.fold_in(key, i * mc_samples + k))
      acc_nats = acc_nats + b_nats
      for name, v in b_terms.items():
        acc_terms[name] = acc_terms.get(name, 0.0) + v
    nats.append(np.asarray(acc_nats) / mc_samples)
    tokens.append(np.asarray(batch["mask"]).sum(-1))
    for name, v in acc_terms.items():
      terms.setdefault(name, []).append(np.asarray(v) / mc_samples)
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


def evaluate_workdir(workdir, split: str = "test", mc_samples: int = 1,
                     max_blocks: int = 0, batch_size: int = 32,
                     use_ema: bool = True, seed: int = 0, overrides=(),
                     log: Callable[[str], None] = print) -> dict:
  """Evaluate the checkpoint of a training workdir on one split."""
  import json
  import pathlib
  from diffusion_text import config as config_lib, train
  from diffusion_text.data import pipeline

  workdir = pathlib.Path(workdir)
  cfg = config_lib.apply_overrides(train.load_config(workdir), list(overrides))
  run = train.setup(cfg, workdir, log)
  params, step = train.restore_params(run, workdir, use_ema=use_ema)
  n_blocks = len(run.prepared.blocks(split))
  if max_blocks:
    n_blocks = min(n_blocks, max_blocks)
  total = -(-n_blocks // batch_size)
  log(f"[eval] {split}: {n_blocks} blocks of {cfg.data.seq_len} tokens, "
      f"K={mc_samples} Monte-Carlo samples, step {step}"
      + (" (EMA)" if use_ema else ""))
  batches = pipeline.eval_batches(run.prepared, split, batch_size, max_blocks)
  result = evaluate(run.process, run.graphdef, params, batches, mc_samples,
                    seed, log, total_batches=total)
  result.update({
      "split": split, "process": cfg.process.name, "step": step,
      "ema": use_ema, "config": config_lib.to_dict(cfg),
      "data": run.prepared.provenance(), "commit": _git_commit()})
  out = workdir / f"eval_{split}.json"
  out.write_text(json.dumps(result, indent=2, default=str))
  log(format_result(f"{cfg.name} [{cfg.process.name}] {split}", result))
  log(f"[eval] written {out}")
  return result


def _git_commit() -> str:
  import pathlib
  import subprocess
  try:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
        cwd=pathlib.Path(__file__).resolve().parent, timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
