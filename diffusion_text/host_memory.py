"""Host memory for XLA:CPU: the buffers of one step serve the next.

XLA:CPU allocates an executable's temporary buffers (a train step's
activations and gradients, several hundred MB) with malloc when it runs and
frees them when it returns. glibc serves an allocation above its mmap
threshold (32 MB at most) with a fresh mmap and returns it with munmap, so
every step page-faults its whole working set again: the kernel zeroes and
maps each 4 KiB page on first touch, ~170,000 faults per `masked` train
step at the benchmark size, 11-18% of the step's time.

`keep_mapped()` makes glibc extend its heap instead of mapping (mallopt
M_MMAP_MAX = 0) and never give heap pages back (M_TRIM_THRESHOLD = -1), so
the pages one step frees are the pages the next step reuses. A worker
thread's malloc arena still maps anything over 64 MB afresh, so it also
runs CPU computations on the calling thread (`jax_cpu_enable_async_dispatch`
off; the main thread allocates from the heap): the trainer's prefetching
data threads keep it fed, and the host no longer runs a step ahead of the
CPU it shares. Costs: resident memory stays at its high-water mark until
the process exits.

It must run before JAX starts its CPU backend: the CLI, the demo, the
benchmarks and the test suite call it first thing; call it at the top of a
script of your own. DIFFUSION_TEXT_HOST_MALLOC=system leaves the allocator
and dispatch as they are. It changes no number, only where host buffers
come from; an accelerator's memory is untouched, and off glibc (macOS,
musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
from typing import Mapping

ENV = "DIFFUSION_TEXT_HOST_MALLOC"
CHOICES = ("keep", "system")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_NEVER_TRIM = -1  # mallopt(3): -1 disables trimming

_state = {"mode": None}


def _glibc():
  """The process's glibc, or None (another C library)."""
  try:
    libc = ctypes.CDLL(None)  # the loaded C library; no library search
    libc.gnu_get_libc_version  # only glibc has it
    return libc
  except (OSError, AttributeError):
    return None


def keep_mapped(env: Mapping[str, str] = os.environ) -> str:
  """Configure glibc's malloc as the module docstring says, once per
  process. Returns the mode in force: 'keep'; 'system' (asked for through
  the environment, or glibc refused a setting); 'unavailable' (not glibc)."""
  asked = env.get(ENV, "keep")
  if asked not in CHOICES:
    raise ValueError(f"{ENV}={asked!r}: use one of {', '.join(CHOICES)}")
  if _state["mode"] is None:
    _state["mode"] = _configure() if asked == "keep" else "system"
    if _state["mode"] == "keep":
      import jax  # here: the CLI imports this module before anything heavy
      jax.config.update("jax_cpu_enable_async_dispatch", False)
  return _state["mode"]


def _configure() -> str:
  libc = _glibc()
  if libc is None:
    return "unavailable"
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
  ok = [libc.mallopt(param, value) == 1 for param, value in settings]
  return "keep" if all(ok) else "system"


def mode() -> str:
  """The mode `keep_mapped` set in this process ('system' before it runs)."""
  return _state["mode"] or "system"
