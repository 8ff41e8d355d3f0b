"""benchmarks/device.sh runs end to end (--smoke: tiny sizes, CPU) and
writes one JSON row per process with train and sampler figures."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_device_benchmark_smoke_writes_json(tmp_path):
  out = tmp_path / "device.json"
  env = dict(os.environ, PYTHON=sys.executable)
  proc = subprocess.run([str(REPO / "benchmarks" / "device.sh"), "--smoke",
                         "--out", str(out)], env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["smoke"] and result["dtype"] == "bfloat16"
  assert [r["process"] for r in result["results"]] == [
      "masked", "sedd_absorb", "gaussian_vlb", "ar"]
  for r in result["results"]:
    t = r["train"]
    assert t["tokens_per_s"] > 0 and t["compile_s"] > 0
    assert t["model_flops_per_s"] == pytest.approx(
        t["model_flops_per_step"] / t["step_s"], rel=1e-3)
    assert [s["steps_requested"] for s in r["samplers"]] == [4, 16]
    assert all(s["tokens_per_s"] > 0 for s in r["samplers"])
  # No peak is known for a CPU: no MFU, and no verdict on the target.
  assert result["meets_target"] is None
