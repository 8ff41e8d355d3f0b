"""Multi-process (multi-host) start-up for training (DESIGN.md section 4).

Every process runs the same command; `initialize` joins them into one JAX
runtime (`jax.distributed.initialize`) before anything touches a device.
After that `jax.devices()` lists the devices of all processes, each process
feeds its own rows of the global batch (`sharding.global_batch`), Orbax
writes checkpoints collectively, and only the primary process (index 0)
writes logs and workdir files. On CPU the cross-process collectives are
Gloo's (`jax_cpu_collectives_implementation`, JAX's default).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from jax.experimental import multihost_utils

from diffusion_text.config import ConfigError

# The coordinator variable is JAX's own; the other two complete the set so a
# launcher can configure every process through its environment alone.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"${name}={value!r} must be an integer") from None


def initialize(coordinator: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               timeout_s: int = 300) -> bool:
  """Join a multi-process run; returns False (a no-op) for a single process.

  Arguments default to $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and
  $JAX_PROCESS_ID. `coordinator="auto"` lets JAX detect a TPU pod, Slurm or
  Open MPI job. Must run before any JAX computation or device query.
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  if coordinator is None and num_processes is None and process_id is None:
    return False
  if coordinator == "auto":
    jax.distributed.initialize(coordinator_address=None,
                               num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=timeout_s)
    return True
  if coordinator is None or num_processes is None or process_id is None:
    raise ConfigError(
        "a multi-process run needs all of --coordinator HOST:PORT, "
        "--num-processes N and --process-id I (or $JAX_COORDINATOR_ADDRESS, "
        "$JAX_NUM_PROCESSES, $JAX_PROCESS_ID); --coordinator auto detects "
        "TPU pods, Slurm and Open MPI jobs")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"--process-id {process_id} must be in "
                      f"[0, --num-processes {num_processes})")
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=timeout_s)
  return True


def is_primary() -> bool:
  """The process that writes logs, metrics and workdir files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Wait until every process reaches `name` (no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
