"""host_memory: a step's host buffers are reused by the next, not re-faulted."""

import json
import os
import subprocess
import sys

import pytest

from diffusion_text import host_memory

# An MLP's forward + backward at the benchmark's size (4,096 tokens, d = 256,
# hidden 1,024): XLA:CPU allocates its temporaries (64 MB) on every call.
# Prints their size, the minor page faults of three calls after a warm-up,
# and the mode.
_SCRIPT = r"""
import json, resource
from diffusion_text import host_memory
mode = host_memory.keep_mapped()
import jax, jax.numpy as jnp
def loss(x, w1, w2):
  return jnp.sum((jax.nn.gelu(x @ w1) @ w2) ** 2)
x = jnp.linspace(-1.0, 1.0, 4096 * 256).reshape(4096, 256)
w1 = jnp.linspace(-0.1, 0.1, 256 * 1024).reshape(256, 1024)
w2 = w1.T
f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
temp = f.lower(x, w1, w2).compile().memory_analysis().temp_size_in_bytes
for _ in range(8):  # the heap settles into its layout over a few calls
  jax.block_until_ready(f(x, w1, w2))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  jax.block_until_ready(f(x, w1, w2))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"mode": mode, "faults_per_call": faults / 3, "temp": temp,
                  "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def _run(mode: str) -> dict:
  env = dict(os.environ, **{host_memory.ENV: mode})
  out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, check=True,
                       capture_output=True, text=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or host_memory._glibc() is None, reason="glibc only")
def test_keep_mapped_reuses_the_pages_a_call_freed():
  system, keep = _run("system"), _run("keep")
  assert (system["mode"], keep["mode"]) == ("system", "keep")
  assert system["async"] and not keep["async"]
  # glibc maps the temporaries afresh on every call, so about every one of
  # their 4 KiB pages faults again ...
  pages = system["temp"] / 4096
  assert system["temp"] >= 48 * 2**20, system
  assert system["faults_per_call"] > 0.5 * pages, system
  # ... and serves them from its kept heap once keep_mapped has run.
  assert keep["faults_per_call"] < 0.05 * system["faults_per_call"], keep


def test_the_environment_chooses_the_mode(monkeypatch):
  monkeypatch.setattr(host_memory, "_state", {"mode": None})
  with pytest.raises(ValueError, match="use one of keep, system"):
    host_memory.keep_mapped({host_memory.ENV: "jemalloc"})
  assert host_memory.mode() == "system"  # not configured: the default
  assert host_memory.keep_mapped({host_memory.ENV: "system"}) == "system"
  # Once per process: a later call reports what is in force.
  assert host_memory.keep_mapped({}) == "system"
