"""Run-time signals: TensorBoard files, chip peaks and MFU, the FLOP count,
and a short training run that logs them all (validation rows included).

The event files are read back by a decoder written here from the TFRecord
and protobuf wire formats, independent of the writer: every record's two
masked CRC32Cs are checked and every scalar compared with metrics.jsonl.
"""

import json
import struct

import numpy as np
import pytest

from diffusion_text import config as config_lib, flops, monitoring, train
from diffusion_text.eval import likelihood


# ------------------------------------------------------------- a reader
def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF  # bitwise, not table-driven, unlike the writer
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(raw: bytes):
  pos = 0
  while pos < len(raw):
    header = raw[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
    assert header_crc == _masked(header), "bad length CRC"
    data = raw[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
    assert data_crc == _masked(data), "bad data CRC"
    yield data
    pos += 16 + length


def _varint(buf: bytes, pos: int):
  value = shift = 0
  while True:
    byte = buf[pos]
    value |= (byte & 0x7F) << shift
    pos, shift = pos + 1, shift + 7
    if not byte & 0x80:
      return value, pos


def _fields(buf: bytes) -> dict:
  """Protobuf wire format -> {field number: [raw values]}."""
  out, pos = {}, 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    elif wire == 2:
      n, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    else:
      raise AssertionError(f"unexpected wire type {wire}")
    out.setdefault(number, []).append(value)
  return out


def read_events(path) -> list[dict]:
  """[{'wall_time', 'step', 'file_version', 'scalars': {tag: value}}]."""
  events = []
  for data in _records(path.read_bytes()):
    f = _fields(data)
    ev = {"wall_time": struct.unpack("<d", f[1][0])[0],
          "step": f.get(2, [0])[0],
          "file_version": f[3][0].decode() if 3 in f else None,
          "scalars": {}}
    for summary in f.get(5, []):
      for value in _fields(summary).get(1, []):
        v = _fields(value)
        ev["scalars"][v[1][0].decode()] = struct.unpack("<f", v[2][0])[0]
    events.append(ev)
  return events


# ----------------------------------------------------------------- tests
def test_crc32c_matches_the_castagnoli_check_value():
  assert monitoring.crc32c(b"123456789") == 0xE3069283
  data = bytes(range(256)) * 3
  assert monitoring.crc32c(data) == _crc32c(data)


def test_event_file_parses_back_with_valid_crcs(tmp_path):
  tb = monitoring.TensorBoard(tmp_path)
  tb(3, None, {"step": 3, "loss": 2.5, "mfu": 0.4125, "name": "x",
               "nan": float("nan"), "flag": True})
  tb(1_000_000_000_000, None, {"step": 1_000_000_000_000, "loss": -1e-3})
  tb.close()
  (path,) = tmp_path.glob("events.out.tfevents.*")
  events = read_events(path)
  assert events[0]["file_version"] == "brain.Event:2"
  assert [e["step"] for e in events[1:]] == [3, 1_000_000_000_000]
  # Numbers only; non-finite values and flags are left out.
  assert set(events[1]["scalars"]) == {"loss", "mfu"}
  np.testing.assert_allclose(events[1]["scalars"]["mfu"], 0.4125, rtol=1e-7)
  np.testing.assert_allclose(events[2]["scalars"]["loss"], -1e-3, rtol=1e-7)
  # A corrupted byte is caught by the CRC check of the reader.
  raw = bytearray(path.read_bytes())
  raw[-6] ^= 1
  path.write_bytes(bytes(raw))
  with pytest.raises(AssertionError, match="CRC"):
    read_events(path)


@pytest.mark.parametrize("kind,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
    ("TPU v4", "float32", None),
    ("cpu", "float32", None),
])
def test_chip_peaks(kind, dtype, peak):
  assert monitoring.chip_peak_flops(kind, dtype) == peak


class _Chip:
  def __init__(self, kind):
    self.device_kind = kind


def test_mfu_is_model_flops_over_the_peak_of_all_chips():
  cfg = config_lib.Config(model=config_lib.ModelConfig(dtype="bfloat16"))
  per_step = flops.train_flops_per_step(cfg, 100)
  util = monitoring.Utilisation(cfg, 100, [_Chip("NVIDIA H100 80GB HBM3")] * 4)
  out = util(2.0)
  assert out["model_flops_per_s"] == pytest.approx(2 * per_step)
  assert out["mfu"] == pytest.approx(2 * per_step / (4 * 989e12), abs=1e-4)
  # Unknown chip: MFU only with train.peak_flops (per device).
  assert "mfu" not in monitoring.Utilisation(cfg, 100, [_Chip("cpu")])(2.0)
  cfg = config_lib.apply_overrides(cfg, ["train.peak_flops=1e9"])
  assert monitoring.Utilisation(cfg, 100, [_Chip("cpu")] * 2)(1.0)["mfu"] == (
      pytest.approx(per_step / 2e9, abs=1e-4))


class _Device:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def test_peak_memory_is_the_largest_device_peak_else_the_host_rss():
  devices = [_Device({"peak_bytes_in_use": 3 * 2**30}),
             _Device({"peak_bytes_in_use": 5 * 2**29, "bytes_in_use": 1})]
  assert monitoring.peak_memory(devices) == {"device_peak_gib": 3.0}
  # XLA:CPU reports no memory stats: the process's peak resident set, which
  # holds at least the 256 MiB array made here.
  big = np.ones(2**26, np.float32)
  host = monitoring.peak_memory([_Device(None)])
  assert set(host) == {"host_peak_rss_gib"}
  assert big.nbytes / 2**30 <= host["host_peak_rss_gib"] < 64


def test_model_flops_counts_a_tiny_model_by_hand():
  cfg = config_lib.Config(
      model=config_lib.ModelConfig(num_layers=2, d_model=4, num_heads=2,
                                   mlp_ratio=4),
      data=config_lib.DataConfig(seq_len=3, batch_size=5))
  # per layer: q, k, v, out (4 d^2 = 64) + MLP up/down (2 d 4d = 128)
  weights = 2 * (64 + 128)
  forward = 2 * weights + 4 * 3 * 4 * 2 + 2 * 4 * 10  # + attention + head
  counted = flops.model_flops(cfg, vocab=10)
  assert counted["forward_per_token"] == forward
  assert counted["train_per_token"] == 3 * forward
  assert flops.train_flops_per_step(cfg, 10) == 3 * forward * 15


def test_auto_dtype_is_float32_on_cpu_and_stored_as_auto():
  assert config_lib.ModelConfig().dtype == "auto"
  assert config_lib.compute_dtype("auto") == "float32"  # tests run on CPU
  assert config_lib.compute_dtype("bfloat16") == "bfloat16"
  with pytest.raises(config_lib.ConfigError, match="model.dtype"):
    config_lib.apply_overrides(config_lib.Config(), ["model.dtype=fp8"])


def test_training_logs_timing_validation_and_tensorboard(tmp_path):
  cfg = config_lib.apply_overrides(
      config_lib.load_preset("synthetic_masked"),
      ["train.steps=6", "train.log_every=2", "train.checkpoint_every=100",
       "train.eval_every=3", "train.eval_blocks=8", "eval.batch_size=8",
       "train.grad_accum=2"])
  lines = []
  cached = likelihood._jitted_bound_step.cache_info()
  train.train(cfg, tmp_path, log=lines.append)
  # Both validations ran one jitted bound step: built at most once (an
  # earlier test may have built it), then reused.
  now = likelihood._jitted_bound_step.cache_info()
  assert now.misses - cached.misses <= 1 and now.hits - cached.hits >= 1
  rows = [json.loads(l) for l in
          (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "loss" in r]
  val_rows = [r for r in rows if "val_nll_bound" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 4, 6]
  # Due at 3 and 6: run at the first logged rows at or past them.
  assert [r["step"] for r in val_rows] == [4, 6]
  for r in train_rows:
    assert 0 <= r["data_wait_s"] <= r["step_s"]
    assert r["compute_s"] == pytest.approx(r["step_s"] - r["data_wait_s"],
                                           abs=1e-4)
    assert r["model_flops_per_s"] > 0 and "mfu" not in r  # CPU: no peak
    assert r["host_peak_rss_gib"] > 0 and "device_peak_gib" not in r
  for r in val_rows:
    assert r["val_nll_bound"] > 0 and r["val_tokens"] == 8 * 16
  assert any("[eval] step 4 valid: NLL <=" in l for l in lines)
  progress = [l for l in lines if l.startswith("[train] step")]
  assert progress and all(" ms) | peak mem " in l for l in progress)
  assert any("in 2 micro-batches" in l and "float32 compute" in l
             for l in lines)
  (path,) = tmp_path.glob("events.out.tfevents.*")
  events = read_events(path)[1:]
  assert [e["step"] for e in events] == [r["step"] for r in rows]
  for e, r in zip(events, rows):
    for k in ("loss", "val_nll_bound", "tokens_per_s"):
      if k in r:
        np.testing.assert_allclose(e["scalars"][k], r[k], rtol=1e-6)


def test_validation_without_a_valid_split_names_the_fix():
  from types import SimpleNamespace
  from diffusion_text.data import sources

  def no_valid(split):
    raise sources.DataError(f"source 'x' has no split {split!r}; it has: train")

  cfg = config_lib.apply_overrides(config_lib.Config(),
                                   ["train.eval_every=10"])
  run = SimpleNamespace(cfg=cfg,
                        prepared=SimpleNamespace(num_blocks=no_valid))
  with pytest.raises(config_lib.ConfigError, match="train.eval_every=0"):
    monitoring.Validation(run, None, 0, lambda s: s, [], print)


def test_logged_step_time_includes_the_device_wait(tmp_path, monkeypatch):
  """A step's logged time runs until its results are fetched, so a device
  slower than the host's dispatch shows in step_s (simulated here by a
  fetch that takes 0.2 s, as waiting for a busy accelerator would)."""
  import time as time_lib
  fetch = train.jax.device_get

  def slow_fetch(tree):
    time_lib.sleep(0.2)
    return fetch(tree)

  monkeypatch.setattr(train.jax, "device_get", slow_fetch)
  cfg = config_lib.apply_overrides(
      config_lib.load_preset("synthetic_masked"),
      ["train.steps=4", "train.log_every=1", "train.checkpoint_every=100",
       "train.tensorboard=false"])
  train.train(cfg, tmp_path, log=lambda m: None)
  rows = [json.loads(l) for l in
          (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for r in rows[1:]:
    assert r["step_s"] >= 0.2, r
    assert r["tokens_per_s"] <= r["tokens_seen"] / r["step"] / 0.2 + 1e-6
