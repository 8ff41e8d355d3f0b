"""Run-time signals of a training run: MFU, TensorBoard files, validation.

Hooks of the loop (train.py calls `hook(step, state, row)` per logged row):
  - `TensorBoard`: every numeric field of a row as a scalar, in a TensorBoard
    event file beside metrics.jsonl, written without TensorFlow (TFRecord
    framing with masked CRC32C around hand-encoded `Event` protos);
  - `Validation`: the validation split's NLL bound every `train.eval_every`
    steps, with the evaluator of `diffusion-text eval` on the training mesh,
    emitted as its own row (`val_nll_bound`, ...).
And the figures of the progress line: `Utilisation` turns a step rate into
model FLOP/s (flops.py) and MFU over the chips' peak; `peak_memory` reads the
devices' (or, on CPU, the process's) peak memory.
"""

from __future__ import annotations

import math
import os
import pathlib
import resource
import socket
import struct
import sys
import time
from typing import Callable, Optional, Sequence

import jax

from diffusion_text import config as config_lib, flops as flops_lib
from diffusion_text.data import pipeline
from diffusion_text.eval import likelihood

# ------------------------------------------------------------------- peaks
# Dense peak FLOP/s per chip: (device_kind substrings, bf16, float32). Vendor
# datasheets: NVIDIA H100/H200 SXM 989 TFLOP/s bf16 dense, 495 TF32 dense;
# H100 PCIe 756 / 378; A100 312 / 156 (XLA runs float32 matmuls on GPUs as
# TF32 by default, so TF32 is the float32 peak); Google Cloud TPU system
# architecture pages: v4 275, v5e 197, v5p 459, v6e (Trillium) 918 bf16
# (float32 matmuls on TPU run as bf16 passes: no separate float32 peak).
PEAK_FLOPS: tuple[tuple[tuple[str, ...], float, Optional[float]], ...] = (
    (("h100 pcie",), 756e12, 378e12),
    (("h100", "h200", "gh200"), 989e12, 495e12),
    (("a100",), 312e12, 156e12),
    (("tpu v4",), 275e12, None),
    (("tpu v5 lite", "tpu v5e"), 197e12, None),
    (("tpu v5p", "tpu v5"), 459e12, None),
    (("tpu v6 lite", "tpu v6e", "tpu v6"), 918e12, None),
)


def chip_peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """Known dense peak FLOP/s of one chip in `dtype`, or None."""
  kind = device_kind.lower()
  for names, bf16, fp32 in PEAK_FLOPS:
    if any(n in kind for n in names):
      return bf16 if dtype == "bfloat16" else fp32
  return None


class Utilisation:
  """Model FLOP/s and MFU of a run from its step rate.

  MFU = model FLOPs per second (flops.py, the benchmarks' count) over the
  peak of all devices: `train.peak_flops` per device if set, else the
  detected chip's peak in the compute dtype; None where neither is known
  (CPUs), so no MFU is printed there.
  """

  def __init__(self, cfg: config_lib.Config, vocab: int,
               devices: Optional[Sequence] = None):
    devices = list(devices if devices is not None else jax.devices())
    self.dtype = config_lib.compute_dtype(cfg.model.dtype)
    self.flops_per_step = flops_lib.train_flops_per_step(cfg, vocab)
    per_chip = (cfg.train.peak_flops
                or chip_peak_flops(devices[0].device_kind, self.dtype))
    self.peak = per_chip * len(devices) if per_chip else None

  def __call__(self, steps_per_s: float) -> dict:
    achieved = self.flops_per_step * steps_per_s
    out = {"model_flops_per_s": round(achieved, 1)}
    if self.peak:
      out["mfu"] = round(achieved / self.peak, 4)
    return out


def peak_memory(devices: Optional[Sequence] = None) -> dict:
  """The run's peak memory so far, in GiB, for the metrics row: the largest
  `peak_bytes_in_use` among this process's devices where the backend reports
  it (GPUs, TPUs: `device_peak_gib`), else this process's peak resident set
  (XLA:CPU keeps no such count: `host_peak_rss_gib`)."""
  devices = jax.local_devices() if devices is None else devices
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0)
           for d in devices]
  if max(peaks, default=0):
    return {"device_peak_gib": round(max(peaks) / 2**30, 3)}
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux: KiB
  return {"host_peak_rss_gib": round(rss_bytes / 2**30, 3)}


# ------------------------------------------------------------- TensorBoard
def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: the CRC rotated right by 15 plus a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """uint64 length, masked CRC of the length, data, masked CRC of the data."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    bits, n = n & 0x7F, n >> 7
    out.append(bits | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  if wire == 2:  # length-delimited
    payload = _varint(len(payload)) + payload
  return _varint(number << 3 | wire) + payload


def event(wall_time: float, step: int = 0, file_version: str = "",
          scalars: Optional[dict] = None) -> bytes:
  """A tensorflow.Event proto: wall_time=1 (double), step=2 (int64),
  file_version=3 (string), summary=5 (Summary{value=1: Value{tag=1 string,
  simple_value=2 float}})."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version:
    out += _field(3, 2, file_version.encode())
  if scalars:
    values = b"".join(
        _field(1, 2, _field(1, 2, tag.encode())
               + _field(2, 5, struct.pack("<f", value)))
        for tag, value in scalars.items())
    out += _field(5, 2, values)
  return out


class TensorBoard:
  """Hook: each row's numeric fields as scalars in `<workdir>/events.out.tfevents.*`.

  `tensorboard --logdir runs/` then shows every workdir under runs/ as a run.
  A resumed run opens a new event file; TensorBoard merges them by step.
  """

  def __init__(self, workdir: pathlib.Path | str):
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self.path = pathlib.Path(workdir) / name
    self._file = open(self.path, "ab")
    self._file.write(tfrecord(event(time.time(), file_version="brain.Event:2")))
    self._file.flush()

  def __call__(self, step: int, state, row: dict) -> None:
    del state
    scalars = {k: float(v) for k, v in row.items()
               if k != "step" and isinstance(v, (int, float))
               and not isinstance(v, bool) and math.isfinite(v)}
    self._file.write(tfrecord(event(time.time(), step, scalars=scalars)))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


# -------------------------------------------------------------- validation
class Validation:
  """Hook: the validation NLL bound every `train.eval_every` steps.

  Runs at the first logged row at or past each multiple of eval_every, on
  the first `train.eval_blocks` blocks of the 'valid' split (in order, so
  every evaluation sees the same blocks), with `eval.mc_samples`,
  `eval.batch_size` and `eval.use_ema`; the row it makes goes to `sinks`
  (the metrics writer, TensorBoard). All processes run it together.
  """

  def __init__(self, run, mesh, start_step: int, host_state: Callable,
               sinks: Sequence[Callable], log: Callable[[str], None]):
    cfg = run.cfg
    self.run, self.mesh, self.host_state = run, mesh, host_state
    self.sinks, self.log = sinks, log
    self.every, self.ev = cfg.train.eval_every, cfg.eval
    self.blocks = cfg.train.eval_blocks
    self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    self.next_due = (start_step // self.every + 1) * self.every
    try:
      run.prepared.num_blocks("valid")
    except ValueError as e:  # sources.DataError names the splits there are
      raise config_lib.ConfigError(
          f"train.eval_every needs a 'valid' split: {e}; set "
          "train.eval_every=0 or use a source with one") from None

  def __call__(self, step: int, state, row: dict) -> None:
    del row
    if step < self.next_due:
      return
    self.next_due = (step // self.every + 1) * self.every
    state = self.host_state(state)
    params = state.ema if self.ev.use_ema else state.params
    batches = pipeline.eval_batches(
        self.run.prepared, "valid", self.ev.batch_size, self.blocks)
    r = likelihood.evaluate(
        self.run.process, self.run.graphdef, params, batches,
        self.ev.mc_samples, self.ev.seed, log=lambda msg: None,
        mesh=self.mesh, batch_size=self.ev.batch_size)
    val = {"step": step, "tokens_seen": step * self.tokens_per_step,
           "val_nll_bound": r["nats_per_token"],
           "val_nll_bound_sem": r["nats_per_token_sem"],
           "val_bits_per_token": r["bits_per_token"],
           "val_perplexity_bound": r["perplexity"],
           "val_tokens": r["num_tokens"], "val_seconds": r["seconds"]}
    self.log(f"[eval] step {step} valid: NLL <= {r['nats_per_token']:.4f} "
             f"± {r['nats_per_token_sem']:.4f} nats/tok, perplexity <= "
             f"{r['perplexity']:.2f} ({r['num_tokens']:,} tokens, "
             f"{r['seconds']:.0f}s)")
    for sink in self.sinks:
      sink(step, state, val)
