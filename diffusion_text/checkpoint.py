"""The one Orbax wrapper: train state + data position + run fingerprint.

A checkpoint holds the full `TrainState` (params, optimizer state, EMA, step)
and a JSON record with the data-iterator position and the fingerprint of the
config and vocabulary it was trained with, so a run resumes exactly and a
checkpoint from another config is refused with a clear message.

Integrity: after each save the primary process writes `<step>.crc32`, a
checksum of every file of the step; a restore verifies it, and a newest
checkpoint that is damaged (truncated, bit-flipped, parts deleted) is
reported in one line and skipped for the newest intact one. Temporary
directories left by an interrupted save are removed on start.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import zlib
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

MANIFEST = ".crc32"


class CheckpointMismatch(RuntimeError):
  """A checkpoint that does not belong to the requested run."""


class CheckpointDamaged(RuntimeError):
  """No intact checkpoint is left; the message names the directory."""


def _crc(path: pathlib.Path) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def checksums(step_dir: pathlib.Path) -> dict[str, int]:
  """crc32 of every file under a step directory, by relative path."""
  return {str(p.relative_to(step_dir)): _crc(p)
          for p in sorted(step_dir.rglob("*")) if p.is_file()}


def verify(step_dir: pathlib.Path) -> Optional[str]:
  """Why `step_dir` is damaged, or None when it matches its manifest (or has
  none, as for a kill between the save and the manifest)."""
  for part in ("state", "meta"):
    if not (step_dir / part).is_dir():
      return f"its {part}/ directory is missing"
  manifest = step_dir.parent / f"{step_dir.name}{MANIFEST}"
  if not manifest.exists():
    return None
  want = json.loads(manifest.read_text())
  got = checksums(step_dir)
  for name, crc in want.items():
    if name not in got:
      return f"{name} is missing"
    if got[name] != crc:
      return f"{name} does not match its checksum"
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class Checkpointer:
  """Save/restore `TrainState` pytrees under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str | pathlib.Path, keep: int = 2,
               log: Callable[[str], None] = print):
    if keep < 1:
      raise ValueError(f"train.keep_checkpoints={keep} keeps no checkpoint; "
                       "use train.keep_checkpoints=1 or more")
    self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
    self.log = log
    if jax.process_index() == 0 and self.directory.exists():
      for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
        self.log(f"[checkpoint] removing {tmp.name}, left by an interrupted save")
        shutil.rmtree(tmp, ignore_errors=True)
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
    if jax.process_index() == 0:
      self._write_manifest(step)

  def _write_manifest(self, step: int) -> None:
    from diffusion_text import workdir as workdir_lib
    steps = {str(s) for s in self._manager.all_steps()}
    for old in self.directory.glob(f"*{MANIFEST}"):
      if old.name[:-len(MANIFEST)] not in steps:
        old.unlink(missing_ok=True)  # its checkpoint was rotated out
    workdir_lib.atomic_write_json(self.directory / f"{step}{MANIFEST}",
                                  checksums(self.directory / str(step)))

  def restore(self, target: Any, step: Optional[int] = None,
              expect: Optional[dict] = None) -> tuple[Any, dict]:
    """Restore into the structure/shardings of `target` (arrays or
    ShapeDtypeStructs). `expect`: meta entries that must match. Without
    `step`, the newest intact checkpoint (damaged newer ones are reported
    and skipped)."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    if step is not None:
      steps = [step]
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    damage = []
    for s in steps:
      why = verify(self.directory / str(s))
      if why is None:
        try:
          return self._restore(s, target, expect)
        except CheckpointMismatch:
          raise
        except (ValueError, KeyError) as e:
          if self._has_manifest(s):  # intact files: the structure differs
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{s} does not fit this model "
                f"({_first_line(e)}); use a new --workdir or the matching "
                "config") from e
          why = _first_line(e)
        except Exception as e:  # pylint: disable=broad-except
          why = _first_line(e)
      damage.append(s)
      self.log(f"[checkpoint] skipping damaged checkpoint {self.directory}/{s}"
               f" ({why})")
    raise CheckpointDamaged(
        f"no intact checkpoint in {self.directory} (damaged: "
        f"{', '.join(map(str, damage))}; or written by another version); "
        "delete the damaged step directories to start again from step 0, or "
        "use a new --workdir")

  def _has_manifest(self, step: int) -> bool:
    return (self.directory / f"{step}{MANIFEST}").exists()

  def _restore(self, step: int, target: Any, expect: Optional[dict]):
    meta = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    for key, want in (expect or {}).items():
      if meta.get(key) != want:
        raise CheckpointMismatch(
            f"checkpoint {self.directory}/{step} was written with {key}="
            f"{meta.get(key)!r} but this run has {key}={want!r}; use a new "
            "--workdir, or the config the checkpoint was trained with")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored.state, meta

  def close(self) -> None:
    self._manager.close()
