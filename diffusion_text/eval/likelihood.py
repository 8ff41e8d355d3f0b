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


# A block whose estimate exceeds this share of the total (and HEAVY_FACTOR
# times its share of the tokens) marks the estimator as heavy-tailed there.
HEAVY_SHARE, HEAVY_FACTOR = 0.01, 5.0


def summarize(nats_b: np.ndarray, tokens_b: np.ndarray,
              terms_b: dict[str, np.ndarray]) -> dict:
  """Per-block nats and token counts -> the reported figures."""
  keep = tokens_b > 0
  nats_b, tokens_b = nats_b[keep], tokens_b[keep]
  n = len(nats_b)
  mean = float(nats_b.sum() / tokens_b.sum())
  sem = ratio_sem(nats_b, tokens_b, mean)
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
      "tail": tail_check(nats_b, tokens_b),
  }


def ratio_sem(nats_b: np.ndarray, tokens_b: np.ndarray, mean: float) -> float:
  """Standard error over blocks of the ratio estimator sum nats / sum n."""
  n = len(nats_b)
  if n < 2:
    return float("nan")
  resid = nats_b - mean * tokens_b
  return float(np.sqrt((resid ** 2).sum() / (n * (n - 1))) / tokens_b.mean())


def tail_check(nats_b: np.ndarray, tokens_b: np.ndarray) -> dict:
  """How much the largest block estimate carries of the total.

  An unbiased but heavy-tailed estimator (one draw of 556 nats/token against
  a mean of 2.65) shows up as one block holding far more than its share of
  the tokens; its SEM then understates the real uncertainty.
  """
  share_b = nats_b / max(float(nats_b.sum()), 1e-30)
  b = int(np.argmax(share_b))
  token_share = float(tokens_b[b] / tokens_b.sum())
  share = float(share_b[b])
  return {"largest_block_share": share, "its_token_share": token_share,
          "heavy_tailed": bool(share > HEAVY_SHARE
                               and share > HEAVY_FACTOR * token_share)}


def paired_difference(nats_b: np.ndarray, ref_nats_b: np.ndarray,
                      tokens_b: np.ndarray) -> dict:
  """(row - reference) nats/token with the SEM of the paired difference.

  Both rows score the same blocks, so the block-to-block variation of the
  text cancels in d_b = nats_b - ref_b and only the processes' disagreement
  (and Monte-Carlo noise) remains: far sharper than two independent SEMs.
  """
  nats_b, ref_nats_b, tokens_b = map(np.asarray, (nats_b, ref_nats_b, tokens_b))
  if nats_b.shape != ref_nats_b.shape:
    raise ValueError("paired difference needs the same blocks: evaluate both "
                     "rows on the same split and eval.max_blocks")
  keep = tokens_b > 0
  d_b, n_b = nats_b[keep] - ref_nats_b[keep], tokens_b[keep]
  mean = float(d_b.sum() / n_b.sum())
  return {"diff_nats_per_token": mean,
          "diff_nats_per_token_sem": ratio_sem(d_b, n_b, mean)}


def make_bound_fn(process, graphdef, params, mesh):
  """The bound step jitted over `mesh`, as in training: batch split over the
  data axes, params replicated or fsdp-sharded by the same rules. One jitted
  function per (process, model structure, mesh), so evaluating again (the
  trainer's validation every eval_every steps) reuses its compilation."""
  shardings = sharding.state_shardings(params, mesh)
  fn = _jitted_bound_step(process, graphdef, mesh,
                          jax.tree.structure(shardings),
                          tuple(jax.tree.leaves(shardings)))
  return fn, jax.device_put(params, shardings)


@functools.lru_cache(maxsize=16)
def _jitted_bound_step(process, graphdef, mesh, treedef, leaves):
  return jax.jit(functools.partial(step_lib.bound_step, graphdef=graphdef,
                                   process=process),
                 in_shardings=(jax.tree.unflatten(treedef, leaves),
                               sharding.batch_sharding(mesh),
                               sharding.replicated(mesh)),
                 out_shardings=sharding.replicated(mesh))


# Adaptive K: rounds of K draws spent estimating each block's variance; they
# only choose the number of further rounds and are not averaged into the
# block's estimate (a stopping rule that looked at the draws it averages
# would bias the bound down exactly where the estimator is heavy-tailed).
PILOT_ROUNDS = 4
TIME_SAMPLING = ("independent", "stratified")


def _draws(fn, params, batch, keys, stratified: bool, place) -> tuple:
  """len(keys) draws of every row's bound: nats [K, B], terms {name: [K, B]}.

  stratified: one call on K stacked copies, row j*B + b being draw j of
  block b; a process that draws its times antithetically over the batch
  (u + i/(K B) mod 1, as `masked`, `sedd_*` and `gaussian_vlb` do) then puts
  block b's K times in K distinct strata, each time still uniform, so the
  block's average stays unbiased with a smaller variance.
  """
  rows, k = len(batch["mask"]), len(keys)
  if stratified:
    tiled = {n: np.tile(v, (k,) + (1,) * (v.ndim - 1)) for n, v in batch.items()}
    nats, terms = fn(params, place(tiled), keys[0])
    split = lambda v: np.asarray(v)[:k * rows].reshape(k, rows)
    return split(nats), {n: split(v) for n, v in terms.items()}
  placed = place(batch)
  outs = [fn(params, placed, key) for key in keys]
  stack = lambda vs: np.stack([np.asarray(v)[:rows] for v in vs])
  return (stack([o[0] for o in outs]),
          {n: stack([o[1][n] for o in outs]) for n in outs[0][1]})


def evaluate(process, graphdef, params, batches: Iterable[dict],
             mc_samples: int = 1, seed: int = 0,
             log: Callable[[str], None] = print,
             total_batches: int | None = None, mesh=None,
             batch_size: int = 0, time_sampling: str = "independent",
             target_sem: float = 0.0, max_mc_samples: int = 256) -> dict:
  """Bound over every block of `batches` ({'tokens', 'mask'} dicts).

  Runs on `mesh` (default: every device). Every batch is padded with
  masked-out rows to one shape, `batch_size` (default: the first batch's)
  rounded up to the mesh's device count, so it compiles once; padded rows
  are dropped, and a batch's figures depend only on that padded shape, not
  on how many devices share it.

  Each block averages K = `mc_samples` draws (`time_sampling`: independent
  calls, or stratified in one call). With `target_sem` > 0 the number of
  K-draw rounds per block is raised, from a pilot estimate of its variance,
  until the block's Monte-Carlo standard error (nats/token) is below
  `target_sem`, at most `max_mc_samples` draws; the Monte-Carlo part of the
  corpus SEM is then below `target_sem` too.
  """
  if time_sampling not in TIME_SAMPLING:
    raise ValueError(f"eval.time_sampling={time_sampling!r}; choose one of "
                     f"{', '.join(TIME_SAMPLING)}")
  mesh = mesh if mesh is not None else sharding.make_mesh()
  fn, params = make_bound_fn(process, graphdef, params, mesh)
  key = jax.random.key(seed)
  adapt_key = jax.random.fold_in(key, 2 ** 31 - 1)
  stratified = time_sampling == "stratified"
  max_rounds = max(1, max_mc_samples // mc_samples)
  nats, tokens, terms, mc_var, draws_b = [], [], {}, [], []
  t0 = time.time()
  for i, batch in enumerate(batches):
    batch_size = batch_size or len(batch["mask"])
    rows = len(batch["mask"])
    batch, _ = sharding.pad_batch(batch, batch_size)

    def place(b):
      b, _ = sharding.pad_batch(b, sharding.batch_devices(mesh))
      return jax.device_put(b, sharding.batch_sharding(mesh))

    def round_(r):
      keys = [jax.random.fold_in(key, i * mc_samples + j) if r == 0 else
              jax.random.fold_in(jax.random.fold_in(adapt_key, r),
                                 i * mc_samples + j)
              for j in range(mc_samples)]
      n_KxB, t_KxB = _draws(fn, params, batch, keys, stratified, place)
      return n_KxB[:, :rows], {n: v[:, :rows] for n, v in t_KxB.items()}

    n_b = np.asarray(batch["mask"])[:rows].sum(-1)
    if target_sem > 0:
      pilot_RxB = np.stack([round_(r)[0].mean(0) for r in range(PILOT_ROUNDS)])
      var_b = pilot_RxB.var(0, ddof=1)  # of one round's mean
      need_b = np.ceil(var_b / np.maximum(target_sem * n_b, 1e-30) ** 2)
      need_b = np.clip(need_b, 1, max_rounds).astype(int)
      kept = [round_(PILOT_ROUNDS + r) for r in range(need_b.max())]
      use_RxB = np.arange(len(kept))[:, None] < need_b[None]
      avg = lambda vs: (np.stack([v.mean(0) for v in vs]) * use_RxB).sum(0) / need_b
      b_nats = avg([k[0] for k in kept])
      b_terms = {n: avg([k[1][n] for k in kept]) for n in kept[0][1]}
      mc_var.append(var_b / need_b)
      draws_b.append(need_b * mc_samples)
    else:
      n_KxB, t_KxB = round_(0)
      b_nats, b_terms = n_KxB.mean(0), {n: v.mean(0) for n, v in t_KxB.items()}
      # Within-block spread; stratified draws make it an over-estimate.
      mc_var.append(n_KxB.var(0, ddof=1) / mc_samples if mc_samples > 1
                    else np.full(rows, np.nan))
      draws_b.append(np.full(rows, mc_samples))
    nats.append(b_nats)
    tokens.append(n_b)
    for name, v in b_terms.items():
      terms.setdefault(name, []).append(v)
    if total_batches and (i + 1) % max(total_batches // 5, 1) == 0:
      log(f"[eval] {i + 1}/{total_batches} batches ({time.time() - t0:.0f}s)")
  nats_b, tokens_b = np.concatenate(nats), np.concatenate(tokens)
  result = summarize(nats_b, tokens_b,
                     {k: np.concatenate(v) for k, v in terms.items()})
  keep = tokens_b > 0
  result.update({
      "mc_samples": mc_samples, "time_sampling": time_sampling,
      "target_sem": target_sem,
      "mc_samples_per_block": float(np.concatenate(draws_b)[keep].mean()),
      # The Monte-Carlo part of the SEM (nan with one independent draw).
      "mc_sem": float(np.sqrt(np.concatenate(mc_var)[keep].sum())
                      / tokens_b[keep].sum()),
      "seconds": round(time.time() - t0, 1),
      # Per-block figures, for paired differences between rows.
      "blocks": {"nats": nats_b[keep].tolist(),
                 "tokens": tokens_b[keep].tolist()}})
  tail = result["tail"]
  if tail["heavy_tailed"]:
    log(f"[eval] warning: heavy-tailed bound estimates: one block carries "
        f"{tail['largest_block_share']:.1%} of the total NLL with "
        f"{tail['its_token_share']:.1%} of the tokens, so the SEM understates "
        "the uncertainty; raise eval.mc_samples, set "
        "eval.time_sampling=stratified or eval.target_sem")
  return result


def format_result(name: str, r: dict) -> str:
  return (f"{name}: NLL <= {r['nats_per_token']:.4f} ± "
          f"{r['nats_per_token_sem']:.4f} nats/token "
          f"(<= {r['bits_per_token']:.4f} bits/token), perplexity <= "
          f"{r['perplexity']:.2f} ± {r['perplexity_sem']:.2f} "
          f"[{r['num_tokens']:,} tokens, {r['num_blocks']} blocks, "
          f"{r.get('time_sampling', 'independent')} "
          + (f"K={r['mc_samples']}]" if not r.get("target_sem") else
             f"K={r['mc_samples_per_block']:.1f} per block on average, "
             f"MC error <= {r['target_sem']}]"))


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
      f"K={ev.mc_samples} Monte-Carlo samples ({ev.time_sampling}"
      + (f", adaptive to MC error {ev.target_sem}" if ev.target_sem else "")
      + f"), step {step}"
      + (" (EMA)" if ev.use_ema else ""))
  batches = pipeline.eval_batches(run.prepared, ev.split, ev.batch_size,
                                  ev.max_blocks)
  result = evaluate(run.process, run.graphdef, params, batches, ev.mc_samples,
                    ev.seed, log, total_batches=total,
                    mesh=sharding.mesh_from_config(cfg.train),
                    batch_size=ev.batch_size, time_sampling=ev.time_sampling,
                    target_sem=ev.target_sem,
                    max_mc_samples=ev.max_mc_samples)
  result.update({
      "split": ev.split, "process": cfg.process.name, "step": step,
      "ema": ev.use_ema, "config": config_lib.to_dict(cfg),
      "data": run.prepared.provenance(), "commit": git_commit()})
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


def git_commit() -> str:
  try:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
        cwd=pathlib.Path(__file__).resolve().parent, timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


