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

import pathlib
import signal
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from diffusion_text import config as config_lib, distributed, monitoring, sharding
from diffusion_text import run as run_lib, step as step_lib
from diffusion_text import workdir as workdir_lib
from diffusion_text.checkpoint import Checkpointer
from diffusion_text.data import pipeline

Hook = Callable[[int, Any, dict], None]


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Hook: append each row to `<workdir>/metrics.jsonl` (process 0 only).

  A `workdir.MetricsLog`: rows past the restored step are dropped, a torn
  last line is repaired and non-finite values are written as null.
  """

  def __init__(self, path: pathlib.Path | str, resume_step: int = 0,
               enabled: bool = True):
    self._log = workdir_lib.MetricsLog(path, resume_step, enabled)
    self.time_offset = self._log.time_offset  # elapsed_s of earlier segments

  def __call__(self, step: int, state, row: dict) -> None:
    del step, state
    self._log.write(row)

  def close(self) -> None:
    self._log.close()


class TrainingDiverged(RuntimeError):
  """Too many consecutive non-finite steps; the message names the last good
  checkpoint."""


class Preempted(Exception):
  """SIGTERM (or a multi-host preemption notice): saved, then stopped."""


class _Preemption:
  """SIGTERM sets a flag the loop checks once per step (no device sync); on
  several hosts JAX's preemption sync point makes all agree on the step."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    if jax.process_count() == 1 and \
        threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._on_term)
    return self

  def _on_term(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.flag

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


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
    skipped = (f" | {row['skipped']:.0f} non-finite step(s) skipped"
               if row.get("skipped") else "")
    mfu = f" | MFU {row['mfu']:.1%}" if "mfu" in row else ""
    memory = row.get("device_peak_gib", row.get("host_peak_rss_gib"))
    memory = f" | peak mem {memory:.2f} GiB" if memory is not None else ""
    self.log(f"[train] step {step}/{self.total} | loss {row['loss']:.4f} | "
             f"bound <= {bound:.4f} nats/tok | {rate:,.0f} tok/s{mfu} | "
             f"step {row['step_s'] * 1e3:.0f} ms (data "
             f"{row['data_wait_s'] * 1e3:.0f} ms){memory} | "
             f"ETA {_fmt_time(eta)}{skipped}")


def _prepare_workdir(cfg, workdir: pathlib.Path, log) -> run_lib.Run:
  """Build the run and write config + tokenizer (after `_check`)."""
  run = run_lib.setup(cfg, workdir, log)
  # Every process has read the workdir before the primary rewrites it.
  distributed.barrier("train_setup")
  if distributed.is_primary():
    workdir_lib.atomic_write_json(workdir / "config.json",
                                  config_lib.to_dict(cfg))
    workdir_lib.atomic_write_text(
        workdir / "tokenizer.json",
        workdir_lib.dumps(run.prepared.tokenizer.to_json()))
  return run


def _check(cfg, workdir: pathlib.Path) -> None:
  """Everything that needs no data, before anything is written."""
  config_lib.validate(cfg)
  run_lib.check_process(cfg)
  run_lib.check_workdir(cfg, workdir)


def _accumulate(acc, metrics):
  """Interval sums of the metrics on device; the skip streak keeps its max."""
  if acc is None:
    return metrics
  return {k: (jnp.maximum if k == "streak" else jnp.add)(acc[k], v)
          for k, v in metrics.items()}


def train(cfg: config_lib.Config, workdir: str | pathlib.Path,
          log: Callable[[str], None] = print,
          hooks: Sequence[Hook] = ()) -> dict:
  """Train (or resume) `cfg` in `workdir`; returns a summary dict.

  Raises KeyboardInterrupt (Ctrl-C) or `Preempted` (SIGTERM) after saving
  a checkpoint, and `TrainingDiverged` when more than
  train.max_consecutive_skips steps in a row were non-finite.
  """
  workdir = pathlib.Path(workdir).absolute()
  primary = distributed.is_primary()
  if not primary:
    log = lambda msg: None
  _check(cfg, workdir)
  lock = workdir_lib.WorkdirLock(workdir, log)
  if primary:
    lock.acquire()
  try:
    return _train(cfg, workdir, log, hooks, primary)
  finally:
    lock.release()


def parallel_step(cfg, graphdef, process, params):
  """The trainer's jitted step on its mesh, and the initial (host) state:
  (mesh, parallel wrapper with `.step`, TrainState). benchmarks/ times
  exactly this."""
  tc = cfg.train
  tx = step_lib.make_optimizer(tc)
  state = step_lib.init_state(params, tx)
  factory = lambda axis: step_lib.make_train_step(
      graphdef, process, tx, tc.ema_decay, axis_name=axis,
      grad_accum=tc.grad_accum)
  mesh = sharding.mesh_from_config(tc)
  devices = sharding.batch_devices(mesh)
  if cfg.data.batch_size % devices:
    raise config_lib.ConfigError(
        f"data.batch_size={cfg.data.batch_size} is not divisible by the "
        f"{devices} devices of the batch axes; use a multiple of {devices} "
        "(or set train.mesh_data)")
  return mesh, sharding.PARALLEL[tc.parallel](mesh, factory, state), state


def _train(cfg, workdir, log, hooks, primary) -> dict:
  run = _prepare_workdir(cfg, workdir, log)
  tc = cfg.train
  mesh, par, state = parallel_step(cfg, run.graphdef, run.process, run.params)

  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, log=log)
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
  saved = [start if start else None]  # step of the last good checkpoint

  def diverged(streak, step_no):
    if streak > tc.max_consecutive_skips:
      raise TrainingDiverged(
          f"the loss or gradient norm was non-finite for {streak} consecutive "
          f"steps up to step {step_no} (more than train.max_consecutive_skips="
          f"{tc.max_consecutive_skips}). {_last_good(ckpt, saved[0])} Lower "
          "train.lr (or raise train.warmup_steps) and resume or start anew")

  def save(state_dev, step_no):
    if saved[0] == step_no:
      return  # e.g. Ctrl-C or SIGTERM right after a periodic checkpoint
    host = par.host_state(state_dev)
    diverged(int(host.streak), step_no)
    # Never a non-finite checkpoint: one device reduction per save.
    if not bool(step_lib.all_finite((host.params, host.ema))):
      raise TrainingDiverged(
          f"the parameters are non-finite at step {step_no}; no checkpoint "
          f"written. {_last_good(ckpt, saved[0])}")
    ckpt.save(step_no, host,
              {"step": step_no, "fingerprint": run.fingerprint,
               "data_seed": cfg.data.seed, "batch_size": cfg.data.batch_size})
    saved[0] = step_no

  writer = MetricsWriter(workdir / "metrics.jsonl", start, enabled=primary)
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
  # Time, step and total data wait where the previous row's interval ended.
  last = [t0, start, 0.0]
  pending = None  # (step, summed metrics, count) fetched one step late
  acc, n_acc = None, 0  # device-side sum of metrics since the last log
  waited = 0.0  # seconds spent waiting for batches, in total
  step_no = start
  status = "done"

  def flush(pending, state_dev):
    p_step, p_sum, p_count = pending
    sums = {k: float(np.mean(v)) for k, v in jax.device_get(p_sum).items()}
    # After the fetch, which waits for the device to finish the step: the
    # interval then holds the device's time, not only the host's dispatch.
    now = time.time()
    diverged(int(sums.pop("streak")), p_step)
    m = {k: v if k == "skipped" else v / p_count for k, v in sums.items()}
    steps = max(p_step - last[1], 1)
    step_s = max(now - last[0], 1e-9) / steps
    # The batch waits inside the same interval (the next step's included,
    # as its wait precedes this flush), so the wait never exceeds the step.
    wait_s = (waited - last[2]) / steps
    # Compute is the rest of the step: dispatch runs ahead of the device,
    # so time not spent waiting for data is time the device set the pace.
    row = {"step": p_step,
           "elapsed_s": round(writer.time_offset + now - t0, 2),
           "tokens_seen": p_step * tokens_per_step,
           "tokens_per_s": round(tokens_per_step / step_s, 1),
           "step_s": round(step_s, 5), "data_wait_s": round(wait_s, 5),
           "compute_s": round(step_s - wait_s, 5),
           **utilisation(1.0 / step_s), **monitoring.peak_memory(), **m}
    for hook in all_hooks:
      hook(p_step, state_dev, row)
    # The next interval starts after the hooks: a validation pass is not
    # step time.
    last[:] = [time.time(), p_step, waited]

  try:
    with _Preemption() as preemption:
      while step_no < tc.steps:
        w0 = time.time()
        batch = par.place_batch(next(batches))
        waited += time.time() - w0
        key = jax.random.fold_in(base_key, step_no)
        state, metrics = par.step(state, batch, key)
        step_no += 1
        # Summed on device (asynchronously): logged rows are interval means.
        acc = _accumulate(acc, metrics)
        n_acc += 1
        if step_no % tc.checkpoint_every == 0 and step_no < tc.steps:
          save(state, step_no)
        if pending is not None:
          row_due, pending = pending, None
          flush(row_due, state)
        if step_no % tc.log_every == 0 or step_no == tc.steps or step_no == start + 1:
          pending = (step_no, acc, n_acc)
          acc, n_acc = None, 0
        if preemption.reached(step_no):
          status = "preempted"
          log(f"[train] SIGTERM at step {step_no}; saving a checkpoint")
          break
        if tc.max_seconds and time.time() - t0 > tc.max_seconds:
          status = "time_limit"
          log(f"[train] train.max_seconds={tc.max_seconds} reached at step {step_no}")
          break
  except KeyboardInterrupt:
    status = "interrupted"
    log(f"\n[train] interrupted at step {step_no}; saving a checkpoint")
  except TrainingDiverged:
    for sink in sinks:
      sink.close()
    ckpt.close()
    raise
  except Exception:
    # Raised between steps (a validation pass out of memory, a hook, the
    # data stream): the state is whole, so the steps since the last
    # checkpoint are kept before the error surfaces.
    if step_no > start:  # else there is nothing new to keep
      _save_before_raising(save, state, step_no, log)
    for sink in sinks:
      sink.close()
    ckpt.close()
    raise
  try:
    save(state, step_no)
    if pending is not None:
      flush(pending, state)
  finally:
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
  if status == "preempted":
    raise Preempted(f"preempted at step {step_no}; checkpoint saved")
  return summary


def _save_before_raising(save, state, step_no: int, log) -> None:
  """Checkpoint `state` at `step_no` on the way out of an error, when its
  buffers are intact (a failed step may have consumed them) and one process
  runs (a save on many hosts needs all of them). A save that fails too is
  reported and the original error goes on."""
  if jax.process_count() > 1 or any(
      leaf.is_deleted() for leaf in jax.tree.leaves(state)
      if isinstance(leaf, jax.Array)):
    return
  try:
    save(state, step_no)
    log(f"[train] error at step {step_no}; checkpoint saved, so the same "
        "command resumes from here once it is fixed")
  except Exception as e:  # the original error is the one to report
    log(f"[train] error at step {step_no}; no checkpoint saved ({e})")


def _last_good(ckpt: Checkpointer, step: Optional[int]) -> str:
  if step is None:
    return "There is no earlier checkpoint."
  return f"The last good checkpoint is {ckpt.directory / str(step)} (step {step})."
