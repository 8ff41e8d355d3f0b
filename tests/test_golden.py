"""Golden numbers: one train step's loss and one bound per process.

Recorded before any refactor or optimisation (tests/golden.json) on a fixed
tiny batch, seed and backbone; every later change to the code must leave
them equal to float tolerance (DESIGN.md section 7, STYLE.md item 13).
Regenerate only for a deliberate change of the math:
  DIFFUSION_TEXT_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_text import config as config_lib, processes, step as step_lib
from diffusion_text.models import as_denoiser, build_model

GOLDEN = pathlib.Path(__file__).with_name("golden.json")
VOCAB, BATCH, LENGTH = 12, 4, 16


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
  mask = np.ones((BATCH, LENGTH), np.int32)
  mask[-1, LENGTH - 5:] = 0  # one padded row
  return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}


def _numbers(name: str) -> dict:
  cfg = config_lib.apply_overrides(config_lib.load_preset(f"synthetic_{name}"),
                                   ["train.warmup_steps=0", "train.ema_decay=0.9"])
  process = processes.make_process(name, vocab_size=VOCAB, **cfg.process.options)
  graphdef, params = nnx.split(build_model(process.model_spec, cfg.model, seed=0))
  tx = step_lib.make_optimizer(cfg.train)
  state = step_lib.init_state(params, tx)
  step = jax.jit(step_lib.make_train_step(graphdef, process, tx,
                                          cfg.train.ema_decay))
  batch = _batch()
  key = jax.random.key(0)
  bound = jax.jit(lambda p, k: process.nll_bound(
      k, as_denoiser(nnx.merge(graphdef, p)), batch["tokens"], batch["mask"]).nats)
  nats0 = bound(state.params, jax.random.key(1))
  state, m1 = step(state, batch, jax.random.fold_in(key, 0))
  state, m2 = step(state, batch, jax.random.fold_in(key, 1))
  nats2 = bound(state.params, jax.random.key(1))
  return {"loss_step1": float(m1["loss"]), "loss_step2": float(m2["loss"]),
          "grad_norm_step1": float(m1["grad_norm"]),
          "bound_init": [float(x) for x in nats0],
          "bound_step2": [float(x) for x in nats2]}


@pytest.mark.parametrize("name", sorted(processes.names()))
def test_golden_numbers_unchanged(name):
  got = _numbers(name)
  if os.environ.get("DIFFUSION_TEXT_WRITE_GOLDEN"):
    table = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    table[name] = got
    GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return
  want = json.loads(GOLDEN.read_text())[name]
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=2e-4, atol=2e-5, err_msg=k)
