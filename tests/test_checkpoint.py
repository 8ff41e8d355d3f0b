"""The Orbax wrapper: state + meta round trip, refusal of foreign checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_text import step as step_lib
from diffusion_text.checkpoint import Checkpointer, CheckpointMismatch


def _state(scale=1.0):
  params = {"w": jnp.arange(6.0).reshape(2, 3) * scale, "b": jnp.ones(3)}
  return step_lib.init_state(params, optax.adam(1e-3))


def test_save_restore_round_trip_keeps_state_and_meta(tmp_path):
  ckpt = Checkpointer(tmp_path, keep=2)
  assert ckpt.latest_step() is None
  state = _state()._replace(step=jnp.asarray(7, jnp.int32))
  meta = {"step": 7, "fingerprint": "abc", "data_seed": 3}
  ckpt.save(7, state, meta)
  ckpt.save(9, _state(2.0), dict(meta, step=9))
  assert ckpt.latest_step() == 9

  restored, got = ckpt.restore(_state(0.0), step=7, expect={"fingerprint": "abc"})
  assert got == meta
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  latest, got = ckpt.restore(_state(0.0))
  assert got["step"] == 9
  np.testing.assert_array_equal(latest.params["w"], _state(2.0).params["w"])
  ckpt.close()


def test_keep_limits_the_checkpoints_on_disk(tmp_path):
  ckpt = Checkpointer(tmp_path, keep=1)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"step": step})
  assert sorted(int(p.name) for p in ckpt.directory.iterdir()
                if p.name.isdigit()) == [3]
  ckpt.close()


def test_foreign_checkpoints_are_refused_with_the_fix(tmp_path):
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, _state(), {"step": 1, "fingerprint": "abc"})
  with pytest.raises(CheckpointMismatch, match="fingerprint.*--workdir"):
    ckpt.restore(_state(), expect={"fingerprint": "xyz"})
  other = step_lib.init_state({"w": jnp.zeros((4, 4))}, optax.adam(1e-3))
  with pytest.raises(CheckpointMismatch, match="does not fit this model"):
    ckpt.restore(other)
  ckpt.close()


def test_restore_without_checkpoint_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpointer(tmp_path).restore(_state())
