"""The training loop: data, the jitted step, progress, metrics, checkpoints.

All IO lives here; the step itself (step.py) is pure. A workdir holds
`config.json`, `tokenizer.json`, `metrics.jsonl` and `checkpoints/`; running
`train` on an existing workdir resumes from its last checkpoint with the same
data position, and Ctrl-C saves a checkpoint before exiting. In a
multi-process run (distributed.py) every process runs this loop on its own
rows of each batch; only process 0 logs and writes workdir files, and all
processes save checkpoints together (Orbax).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_text import config as config_lib
from diffusion_text import distributed, sharding, step as step_lib
from diffusion_text.checkpoint import Checkpointer
from diffusion_text.data import pipeline, tokenizers
from diffusion_text.models import build_model, count_params
from diffusion_text.processes import Process, make_process, option_names

# Sections that define what a checkpoint is; the rest (steps, logging, eval,
# sampling, data locations) may change between runs on the same workdir.
_IDENTITY_KEYS = ("process", "model", "data")
_FREE_DATA_KEYS = ("data_dir", "cache_dir")


# ------------------------------------------------------------------- set-up
@dataclasses.dataclass
class Run:
  """Everything built from a config: data, process, model graph and params."""
  cfg: config_lib.Config
  prepared: pipeline.Prepared
  process: Process
  graphdef: nnx.GraphDef
  params: nnx.State

  @property
  def fingerprint(self) -> str:
    return run_fingerprint(self.cfg, self.prepared.tokenizer)


def identity(cfg: config_lib.Config) -> dict:
  d = config_lib.to_dict(cfg)
  out = {k: d[k] for k in _IDENTITY_KEYS}
  out["data"] = {k: v for k, v in out["data"].items() if k not in _FREE_DATA_KEYS}
  return out


def run_fingerprint(cfg: config_lib.Config, tokenizer) -> str:
  blob = json.dumps({"identity": identity(cfg),
                     "tokenizer": tokenizer.fingerprint()}, sort_keys=True,
                    default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_process(cfg: config_lib.Config, vocab_size: int) -> Process:
  options = dict(cfg.process.options)
  # Processes with latent token embeddings take their width from the model.
  if "latent_dim" in option_names(cfg.process.name):
    options.setdefault("latent_dim", cfg.model.latent_dim)
  return make_process(cfg.process.name, vocab_size=vocab_size, **options)


def setup(cfg: config_lib.Config, workdir: Optional[pathlib.Path] = None,
          log: Callable[[str], None] = print) -> Run:
  """Prepare data (reusing the workdir's tokenizer), process and model."""
  tokenizer = None
  if workdir is not None and (workdir / "tokenizer.json").exists():
    tokenizer = tokenizers.tokenizer_from_json(
        json.loads((workdir / "tokenizer.json").read_text()))
  prepared = pipeline.prepare(cfg, tokenizer=tokenizer)
  process = build_process(cfg, prepared.vocab_size)
  model = build_model(process.model_spec, cfg.model, seed=cfg.train.seed)
  graphdef, params = nnx.split(model)
  log(f"[setup] {cfg.process.name} on {cfg.data.source}/{cfg.data.tokenizer}: "
      f"vocab {prepared.vocab_size:,}, {count_params(model):,} parameters, "
      f"seq_len {cfg.data.seq_len}")
  return Run(cfg, prepared, process, graphdef, params)


def check_workdir(cfg: config_lib.Config, workdir: pathlib.Path) -> None:
  """Refuse to mix runs: a workdir belongs to one data/model/process config."""
  path = workdir / "config.json"
  if not path.exists():
    return
  saved = config_lib.from_dict(json.loads(path.read_text()))
  old, new = identity(saved), identity(cfg)
  diffs = [f"{sec}.{k}: {old[sec].get(k)!r} -> {new[sec].get(k)!r}"
           for sec in _IDENTITY_KEYS
           for k in sorted(set(old[sec]) | set(new[sec]))
           if old[sec].get(k) != new[sec].get(k)]
  if diffs:
    raise config_lib.ConfigError(
        f"{workdir} holds a run with a different config ({'; '.join(diffs)}); "
        "use a new --workdir, or drop the conflicting --set overrides")


def load_config(workdir: pathlib.Path) -> config_lib.Config:
  path = workdir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{workdir} has no config.json: is it a training "
                            "workdir? (create one with `diffusion-text train`)")
  return config_lib.from_dict(json.loads(path.read_text()))


# --------------------------------------------------------------- parallelism
class _Sharded:
  """jax.jit with NamedShardings over a ('data', 'fsdp') mesh."""

  def __init__(self, cfg, step_fn_factory, state):
    self.mesh = sharding.make_mesh(cfg.train.mesh_data, cfg.train.mesh_fsdp)
    self.state_sharding = sharding.state_shardings(state, self.mesh)
    batch_sh = sharding.batch_sharding(self.mesh)
    self.step = jax.jit(
        step_fn_factory(None),
        in_shardings=(self.state_sharding, batch_sh, sharding.replicated(self.mesh)),
        out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
        donate_argnums=(0,))

  def place_state(self, state):
    return jax.device_put(state, self.state_sharding)

  def place_batch(self, batch):
    return sharding.global_batch(batch, self.mesh)

  def host_state(self, state):
    return state

  def target(self, state):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, self.state_sharding)


class _Pmap:
  """jax.pmap data parallelism (kept for users who rely on it)."""

  def __init__(self, cfg, step_fn_factory, state):
    del state
    if jax.process_count() > 1:
      # Multi-process pmap stalls (2 CPU processes, JAX 0.10); the sharded
      # mode is the multi-process path.
      raise config_lib.ConfigError(
          "train.parallel=pmap runs in one process only; use "
          "train.parallel=sharded for multi-process training")
    self.n = jax.local_device_count()
    if cfg.data.batch_size % self.n:
      raise config_lib.ConfigError(
          f"data.batch_size={cfg.data.batch_size} must be divisible by the "
          f"{self.n} local devices for train.parallel=pmap")
    self.step = jax.pmap(step_fn_factory("batch"), axis_name="batch",
                         in_axes=(0, 0, None), donate_argnums=(0,))

  def place_state(self, state):
    # A leading device axis; pmap splits it across the local devices.
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.n,) + x.shape),
                        state)

  def place_batch(self, batch):
    return {k: np.asarray(v).reshape((self.n, -1) + v.shape[1:])
            for k, v in batch.items()}

  def host_state(self, state):
    return jax.tree.map(lambda x: x[0], state)

  def target(self, state):
    return state


PARALLEL = {"sharded": _Sharded, "pmap": _Pmap}


# ---------------------------------------------------------------------- loop
def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train(cfg: config_lib.Config, workdir: str | pathlib.Path,
          log: Callable[[str], None] = print) -> dict:
  """Train (or resume) `cfg` in `workdir`; returns a summary dict."""
  workdir = pathlib.Path(workdir)
  primary = distributed.is_primary()
  if not primary:
    log = lambda msg: None
  config_lib.validate(cfg)
  check_workdir(cfg, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  run = setup(cfg, workdir, log)
  # Every process has read the workdir before the primary rewrites it.
  distributed.barrier("train_setup")
  if primary:
    (workdir / "config.json").write_text(
        json.dumps(config_lib.to_dict(cfg), indent=2, default=str))
    (workdir / "tokenizer.json").write_text(
        json.dumps(run.prepared.tokenizer.to_json()))

  tc = cfg.train
  tx = step_lib.make_optimizer(tc)
  state = step_lib.init_state(run.params, tx)
  factory = lambda axis: step_lib.make_train_step(
      run.graphdef, run.process, tx, tc.ema_decay, axis_name=axis)
  par = PARALLEL[tc.parallel](cfg, factory, state)

  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints)
  meta_expect = {"fingerprint": run.fingerprint}
  start = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(par.target(state), expect=meta_expect)
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
    host = par.host_state(state_dev)
    ckpt.save(step_no, host, {"step": step_no, "fingerprint": run.fingerprint,
                              "data_seed": cfg.data.seed,
                              "batch_size": cfg.data.batch_size})

  metrics_file = open(workdir / "metrics.jsonl" if primary else os.devnull, "a")
  log(f"[train] {tc.steps - start} steps of {cfg.data.batch_size}x"
      f"{cfg.data.seq_len} tokens on {jax.device_count()} device(s) "
      + (f"in {jax.process_count()} processes " if jax.process_count() > 1 else "")
      + f"({tc.parallel}); first step compiles")
  t0 = time.time()
  t_last, step_last = t0, start
  pending = None  # (step, summed metrics, count) fetched one step late
  acc, n_acc = None, 0  # device-side sum of metrics since the last log
  step_no = start
  status = "done"

  def flush(pending, now):
    nonlocal t_last, step_last
    p_step, p_sum, p_count = pending
    m = {k: float(np.mean(v)) / p_count
         for k, v in jax.device_get(p_sum).items()}
    rate = (p_step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
    eta = (tc.steps - p_step) * tokens_per_step / max(rate, 1e-9)
    row = {"step": p_step, "elapsed_s": round(now - t0, 2),
           "tokens_seen": p_step * tokens_per_step,
           "tokens_per_s": round(rate, 1), **m}
    metrics_file.write(json.dumps(row) + "\n")
    metrics_file.flush()
    bound = m.get("nll_bound", float("nan"))
    log(f"[train] step {p_step}/{tc.steps} | loss {m['loss']:.4f} | "
        f"bound <= {bound:.4f} nats/tok | {rate:,.0f} tok/s | "
        f"ETA {_fmt_time(eta)}")
    t_last, step_last = now, p_step

  try:
    while step_no < tc.steps:
      batch = par.place_batch(next(batches))
      key = jax.random.fold_in(base_key, step_no)
      state, metrics = par.step(state, batch, key)
      step_no += 1
      # Summed on device (asynchronously): logged rows are interval means.
      acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
      n_acc += 1
      if pending is not None:
        flush(pending, time.time())
        pending = None
      if step_no % tc.log_every == 0 or step_no == tc.steps or step_no == start + 1:
        pending = (step_no, acc, n_acc)
        acc, n_acc = None, 0
      if step_no % tc.checkpoint_every == 0 and step_no < tc.steps:
        save(state, step_no)
      if tc.max_seconds and time.time() - t0 > tc.max_seconds:
        status = "time_limit"
        log(f"[train] train.max_seconds={tc.max_seconds} reached at step {step_no}")
        break
  except KeyboardInterrupt:
    status = "interrupted"
    log(f"\n[train] interrupted at step {step_no}; saving a checkpoint")
  if pending is not None:
    flush(pending, time.time())
  save(state, step_no)
  metrics_file.close()
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


def restore_params(run: Run, workdir: pathlib.Path, use_ema: bool = True):
  """The trained (EMA) parameters of a workdir, checked against its config."""
  tx = step_lib.make_optimizer(run.cfg.train)
  target = step_lib.init_state(run.params, tx)
  ckpt = Checkpointer(workdir)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"{workdir} has no checkpoint; train it first "
                            f"(diffusion-text train --workdir {workdir} ...)")
  state, meta = ckpt.restore(target, expect={"fingerprint": run.fingerprint})
  ckpt.close()
  return (state.ema if use_ema else state.params), int(meta["step"])
