"""benchmarks/run.py --smoke: every field present, every rate positive.

The benchmark's numbers are never asserted (a timed test on a shared CPU
would be noise); this checks that it runs the trainer's step and the
samplers end to end and reports what it claims to.
"""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import run

REPO = pathlib.Path(__file__).resolve().parent.parent
# Compile fast: the smoke numbers are never compared, only checked for sense.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "results.json"
  env = dict(os.environ, XLA_FLAGS=FAST_XLA)
  subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke",
                  "--processes", "masked", "ar", "--out", str(out)],
                 cwd=REPO, env=env, check=True, capture_output=True)
  return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_host_and_config(result):
  res, _ = result
  for key in ("cpu_count", "jax", "backend", "device_kind"):
    assert res["host"][key]
  assert res["host"]["xla_flags"] == FAST_XLA
  assert res["smoke"] and res["shape"] == dataclasses.asdict(run.SMOKE)


def test_train_rows(result):
  res, _ = result
  assert [r["process"] for r in res["train"]] == ["masked", "ar"]
  flops = run.model_flops(run.SMOKE.config("masked"), run.SMOKE.vocab)
  tokens = run.SMOKE.batch * run.SMOKE.seq_len
  for r in res["train"]:
    for key in ("tokens_per_s", "step_s", "model_flops_per_s",
                "matmul_peak_flops_per_s", "matmul_peak_before",
                "matmul_peak_after", "fraction_of_peak", "compile_s",
                "process_peak_rss_mb", "params"):
      assert _positive(r[key]), (r["process"], key, r[key])
    # One FLOP count for every process: the dense reference model's.
    assert r["model_flops_per_step"] == flops["train_per_token"] * tokens
    assert r["tokens_per_s"] == pytest.approx(tokens / r["step_s"])
    # A peak measured around every timed step; the row's peak is the
    # fastest of them and its fraction is the median step against it.
    peaks = r["matmul_peaks_all"]
    assert len(peaks) == len(r["step_s_all"]) + 1
    assert r["matmul_peak_flops_per_s"] == max(peaks)
    assert r["step_s"] == pytest.approx(float(np.median(r["step_s_all"])))
    assert r["fraction_of_peak"] == pytest.approx(
        r["model_flops_per_s"] / max(peaks))
    assert len(r["step_s_all"]) == res["timed_steps"] == 2
    assert math.isfinite(r["loss_after"])
  assert res["train"][0]["vs_masked"] == 1.0
  for r in res["train"]:
    assert r["tokens_vs_masked"] == pytest.approx(
        r["tokens_per_s"] / res["train"][0]["tokens_per_s"])


def test_sampler_rows(result):
  res, table = result
  rows = {(r["process"], r["sampler"]): r for r in res["samplers"]}
  assert set(rows) == {("masked", "ancestral"), ("masked", "cached"),
                       ("masked", "confidence"), ("masked", "remdm_cap"),
                       ("masked", "remdm_loop"), ("ar", "ancestral")}
  for r in rows.values():
    for key in ("wall_s", "tokens_per_s", "network_calls", "fraction_of_peak",
                "compile_s"):
      assert _positive(r[key]), (r["process"], r["sampler"], key, r[key])
  # The loop structure: one network call per ancestral step (masked, the
  # grid ends at t=0 so decode adds none) and one per position (ar); the
  # cached sampler never calls more often than that.
  steps = run.SMOKE.sample_steps
  assert rows["masked", "ancestral"]["network_calls"] == steps
  assert rows["ar", "ancestral"]["network_calls"] == run.SMOKE.sample_len
  assert rows["ar", "ancestral"]["steps_run"] == run.SMOKE.sample_len
  assert 1 <= rows["masked", "cached"]["network_calls"] <= steps
  assert "cached_over_ancestral" in rows["masked", "cached"]
  assert "| masked |" in table and "| ar | ancestral |" in table


def test_counting_counts_every_network_entry_point():
  import jax
  import jax.numpy as jnp
  from diffusion_text.contract import Denoiser
  # Every Denoiser field but these parts of a network runs it once.
  parts = {"embed", "round_logits", "round_nll", "gamma"}
  fields = {f.name for f in dataclasses.fields(Denoiser)}
  assert fields - parts == set(run.NETWORK_CALLS)
  counter = [0]
  den = run.counting(
      lambda params: Denoiser(**{f: (lambda x: 2 * x) for f in fields}),
      counter)(None)
  for f in sorted(fields):
    jax.jit(lambda x, f=f: getattr(den, f)(x))(jnp.ones(3))
  jax.effects_barrier()
  assert counter[0] == len(run.NETWORK_CALLS)


def test_breakdown_reports_the_step_the_target_allows():
  """benchmarks/breakdown.py --smoke: the step in pieces, and the longest
  step that meets the 60%-of-peak target against its bracketing peaks."""
  from benchmarks import breakdown
  r = breakdown.breakdown("masked", run.SMOKE, repeats=1)
  for key in ("step_s", "loss_fwd_s", "loss_grad_s", "network_fwd_bwd_s",
              "matmul_peak_before", "matmul_peak_after", "target_step_s"):
    assert _positive(r[key]), (key, r[key])
  assert r["matmul_peak_flops_per_s"] == max(r["matmul_peak_before"],
                                             r["matmul_peak_after"])
  tokens = run.SMOKE.batch * run.SMOKE.seq_len
  assert r["model_flops_per_step"] == run.model_flops(
      run.SMOKE.config("masked"), run.SMOKE.vocab)["train_per_token"] * tokens
  assert r["target_step_s"] == pytest.approx(
      r["model_flops_per_step"]
      / (run.TARGET_FRACTION_OF_PEAK * r["matmul_peak_flops_per_s"]))
  assert [c["callable"] for c in r["calls"]].count("target_nll") == 1
