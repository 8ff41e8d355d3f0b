#!/usr/bin/env bash
# The accelerator benchmark of the 125M presets (benchmarks/device.py):
# train-step tokens/s, MFU, peak memory and compile time in bf16, and sampler
# tokens/s at 128 and 1,024 steps, for masked, sedd_absorb, gaussian_vlb, ar.
#
#   benchmarks/device.sh                    # one GPU/TPU chip, under 8 minutes
#   benchmarks/device.sh --smoke            # tiny sizes on CPU, about a minute
#   benchmarks/device.sh --out results.json --processes masked ar
#
# Python: $PYTHON, else the repository's .venv, else python3 (it needs the
# package's dependencies and, on a GPU, jax[cuda12]).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# The benchmark runs the processes one after another in one process: let the
# allocator grow on demand so its peak is what the steps used.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec "$PYTHON" -m benchmarks.device "$@"
