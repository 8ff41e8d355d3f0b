"""The training loop: steps, progress, metrics, checkpoints, hooks.

All IO lives here; the step itself (step.py) is pure, the run is built by
run.py and the parallelism mode comes from sharding.py. A workdir holds
`config.json`, `tokenizer.json`, `metrics.jsonl` and `checkpoints/`; running
`train` on an existing workdir resumes from its last checkpoint with the same
data position, and Ctrl-C saves a checkpoint before exiting. In a
multi-process run (distributed.py) every process runs this loop on its own
rows of each batch; only process 0 logs and writes workdir files, and all
processes save checkpoints together (Orbax).

Hooks: `train(..., hooks=[h])` calls `h(step, state, row)` for every logged
row, after the row is written and after any checkpoint of that step. `row`
is the dict written to metrics.jsonl (interval-mean metrics, tokens/s, the
step time split into data wait and compute, model FLOP/s and MFU);
`state` is the live (device) TrainState, which may be one step past
`step` since metrics are fetched a step late. The metrics writer and the
progress line are themselves hooks (`MetricsWriter`, `ProgressPrinter`), as
are TensorBoard files and the periodic validation bound (monitoring.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_text import config as config_lib, distributed, monitoring, sharding
from diffusion_text import run as run_lib, step as step_lib
from diffusion_text.checkpoint import Checkpointer
from diffusion_text.data import pipeline

Hook = Callable[[int, Any, dict], None]


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Hook: append each row to `<workdir>/metrics.jsonl` (process 0 only)."""

  def __init__(self, path: pathlib.Path | str):
    self._file = open(path, "a")

  def __call__(self, step: int, state, row: dict) -> None:
    del step, state
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class ProgressPrinter:
  """Hook: one progress line per row (loss, bound, tokens/s, ETA)."""

  def __init__(self, total_steps: int, tokens_per_step: int,
               log: Callable[[str], None]):
    self.total, self.tokens_per_step, self.log = (total_steps, tokens_per_step,
                                                  log)

  def __call__(self, step: int, state, row: dict) -> None:
    del state
    rate = row["tokens_per_s"]
    eta = (self.total - step) * self.tokens_per_step / max(rate, 1e-9)
    bound = row.get("nll_bound", float("nan"))
    mfu = f" | MFU {row['mfu']:.1%}" if "mfu" in row else ""
    self.log(f"[train] step {step}/{self.total} | loss {row['loss']:.4f} | "
             f"bound <= {bound:.4f} nats/tok | {rate:,.0f} tok/s{mfu} | "
             f"step {row['step_s'] * 1e3:.0f} ms (data "
             f"{row['data_wait_s'] * 1e3:.0f} ms) | ETA {_fmt_time(eta)}")


def _prepare_workdir(cfg, workdir: pathlib.Path, log) -> run_lib.Run:
  """Validate, check the workdir, build the run, write config + tokenizer."""
  config_lib.validate(cfg)
  run_lib.check_process(cfg)
  run_lib.check_workdir(cfg, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  run = run_lib.setup(cfg, workdir, log)
  # Every process has read the workdir before the primary rewrites it.
  distributed.barrier("train_setup")
  if distributed.is_primary():
    (workdir / "config.json").write_text(
        json.dumps(config_lib.to_dict(cfg), indent=2, default=str))
    (workdir / "tokenizer.json").write_text(
        json.dumps(run.prepared.tokenizer.to_json()))
  return run


def train(cfg: config_lib.Config, workdir: str | pathlib.Path,
          log: Callable[[str], None] = print,
          hooks: Sequence[Hook] = ()) -> dict:
  """Train (or resume) `cfg` in `workdir`; returns a summary dict."""
  workdir = pathlib.Path(workdir)
  primary = distributed.is_primary()
  if not primary:
    log = lambda msg: None
  run = _prepare_workdir(cfg, workdir, log)

  tc = cfg.train
  tx = step_lib.make_optimizer(tc)
  state = step_lib.init_state(run.params, tx)
  factory = lambda axis: step_lib.make_train_step(
      run.graphdef, run.process, tx, tc.ema_decay, axis_name=axis,
      grad_accum=tc.grad_accum)
  mesh = sharding.mesh_from_config(tc)
  par = sharding.PARALLEL[tc.parallel](mesh, factory, state)

  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints)
  start = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(par.target(state),
                               expect={"fingerprint": run.fingerprint})
    start = int(meta["step"])
    log(f"[train] resuming {workdir} from step {start}")
  state = par.place_state(state)
  if start >= tc.steps:
    log(f"[train] {workdir} already trained to step {start} (train.steps={tc.steps})")
    ckpt.close()
    return {"step": start, "workdir": str(workdir)}

  batches = pipeline.train_batches(
      run.prepared, cfg.data.batch_size, cfg.data.seed, start_step=start,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  base_key = jax.random.key(tc.seed)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len

  def save(state_dev, step_no):
    ckpt.save(step_no, par.host_state(state_dev),
              {"step": step_no, "fingerprint": run.fingerprint,
               "data_seed": cfg.data.seed, "batch_size": cfg.data.batch_size})

  writer = MetricsWriter(workdir / "metrics.jsonl" if primary else os.devnull)
  sinks = [writer] + ([monitoring.TensorBoard(workdir)]
                      if primary and tc.tensorboard else [])
  validation = ([monitoring.Validation(run, mesh, start, par.host_state,
                                       sinks, log)] if tc.eval_every else [])
  all_hooks = [*sinks, ProgressPrinter(tc.steps, tokens_per_step, log),
               *validation, *hooks]
  utilisation = monitoring.Utilisation(cfg, run.prepared.vocab_size)
  log(f"[train] {tc.steps - start} steps of {cfg.data.batch_size}x"
      f"{cfg.data.seq_len} tokens"
      + (f" in {tc.grad_accum} micro-batches" if tc.grad_accum > 1 else "")
      + f" on {jax.device_count()} device(s) "
      + (f"in {jax.process_count()} processes " if jax.process_count() > 1 else "")
      + f"({tc.parallel}, {utilisation.dtype} compute); first step compiles")
  t0 = time.time()
  last = [t0, start]  # time and step of the previous row
  pending = None  # (step, summed metrics, count, data wait) fetched one step late
  acc, n_acc = None, 0  # device-side sum of metrics since the last log
  wait = 0.0  # seconds spent waiting for batches since the last log
  step_no = start
  status = "done"

  def flush(pending, state_dev):
    p_step, p_sum, p_count, p_wait = pending
    now = time.time()
    m = {k: float(np.mean(v)) / p_count
         for k, v in jax.device_get(p_sum).items()}
    step_s = max(now - last[0], 1e-9) / max(p_step - last[1], 1)
    # Compute is the rest of the step: dispatch runs ahead of the device,
    # so time not spent waiting for data is time the device set the pace.
    row = {"step": p_step, "elapsed_s": round(now - t0, 2),
           "tokens_seen": p_step * tokens_per_step,
           "tokens_per_s": round(tokens_per_step / step_s, 1),
           "step_s": round(step_s, 5), "data_wait_s": round(p_wait / p_count, 5),
           "compute_s": round(step_s - p_wait / p_count, 5),
           **utilisation(1.0 / step_s), **m}
    for hook in all_hooks:
      hook(p_step, state_dev, row)
    # The next interval starts after the hooks: a validation pass is not
    # step time.
    last[:] = [time.time(), p_step]

  try:
    while step_no < tc.steps:
      w0 = time.time()
      batch = par.place_batch(next(batches))
      wait += time.time() - w0
      key = jax.random.fold_in(base_key, step_no)
      state, metrics = par.step(state, batch, key)
      step_no += 1
      # Summed on device (asynchronously): logged rows are interval means.
      acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
      n_acc += 1
      if step_no % tc.checkpoint_every == 0 and step_no < tc.steps:
        save(state, step_no)
      if pending is not None:
        row_due, pending = pending, None
        flush(row_due, state)
      if step_no % tc.log_every == 0 or step_no == tc.steps or step_no == start + 1:
        pending = (step_no, acc, n_acc, wait)
        acc, n_acc, wait = None, 0, 0.0
      if tc.max_seconds and time.time() - t0 > tc.max_seconds:
        status = "time_limit"
        log(f"[train] train.max_seconds={tc.max_seconds} reached at step {step_no}")
        break
  except KeyboardInterrupt:
    status = "interrupted"
    log(f"\n[train] interrupted at step {step_no}; saving a checkpoint")
  save(state, step_no)
  if pending is not None:
    flush(pending, state)
  for sink in sinks:
    sink.close()
  ckpt.close()
  wall = time.time() - t0
  summary = {"step": step_no, "status": status, "wall_s": round(wall, 1),
             "tokens_seen": step_no * tokens_per_step, "workdir": str(workdir)}
  log(f"[train] {status} at step {step_no} in {_fmt_time(wall)}; "
      f"checkpoint in {workdir / 'checkpoints'}"
      + ("; run the same command to resume" if status != "done" else ""))
  if status == "interrupted":
    raise KeyboardInterrupt
  return summary
