"""1-device, 8-device sharded (data and fsdp) and pmap steps agree.

Runs tests/equivalence_worker.py in a subprocess with 8 fake CPU devices.
`ar` has a noise-free objective, so all four modes must agree; for a
diffusion process the sharded modes draw the same noise as one device
(sharding-invariant RNG) while pmap draws per-device noise by design.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).with_name("equivalence_worker.py")


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(WORKER), "ar", "masked"],
                       capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_noise_free_objective_agrees_in_every_mode(results):
  r = results["ar"]
  for mode in ("8", "fsdp", "pmap"):
    assert abs(r[f"loss_{mode}"] - r["loss_1"]) < 1e-5, (mode, r)
    assert r[f"param_diff_{mode}"] < 1e-5, (mode, r)


def test_sharded_diffusion_step_matches_one_device(results):
  r = results["masked"]
  for mode in ("8", "fsdp"):
    assert abs(r[f"loss_{mode}"] - r["loss_1"]) < 1e-5, (mode, r)
    assert r[f"param_diff_{mode}"] < 1e-5, (mode, r)


def test_sharded_evaluation_matches_one_device(results):
  # 13 blocks: the second batch of 5 is padded to 8 rows and still counted
  # as 5 blocks; its bound is the same on 1, 8 and 2x4 devices.
  for name in ("ar", "masked"):
    r = results[name]
    assert r["eval_blocks"] == 13, r
    for mode in ("8", "fsdp"):
      assert r[f"eval_diff_{mode}"] < 1e-5, (name, mode, r)
