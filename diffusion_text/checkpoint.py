"""The one Orbax wrapper: train state + data position + run fingerprint.

A checkpoint holds the full `TrainState` (params, optimizer state, EMA, step)
and a JSON record with the data-iterator position and the fingerprint of the
config and vocabulary it was trained with, so a run resumes exactly and a
checkpoint from another config is refused with a clear message.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(RuntimeError):
  """A checkpoint that does not belong to the requested run."""


class Checkpointer:
  """Save/restore `TrainState` pytrees under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str | pathlib.Path, keep: int = 2):
    self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)),
        force=True)
    self._manager.wait_until_finished()

  def restore(self, target: Any, step: Optional[int] = None,
              expect: Optional[dict] = None) -> tuple[Any, dict]:
    """Restore into the structure/shardings of `target` (arrays or
    ShapeDtypeStructs). `expect`: meta entries that must match."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    meta = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    for key, want in (expect or {}).items():
      if meta.get(key) != want:
        raise CheckpointMismatch(
            f"checkpoint {self.directory}/{step} was written with {key}="
            f"{meta.get(key)!r} but this run has {key}={want!r}; use a new "
            "--workdir, or the config the checkpoint was trained with")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except (ValueError, KeyError) as e:
      raise CheckpointMismatch(
          f"checkpoint {self.directory}/{step} does not fit this model "
          f"({e}); use a new --workdir or the matching config") from e
    return restored.state, meta

  def close(self) -> None:
    self._manager.close()
