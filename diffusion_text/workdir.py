"""Workdir files that must never be lost or half-written.

* `atomic_write_text` / `atomic_write_json`: a temporary file in the same
  directory, fsync, then rename, so a reader sees the old file or the new
  one, never a torn one. A failed write raises `WriteError` naming the path.
* `WorkdirLock`: one `train` per workdir. The lock file names the holder's
  pid and host; a lock whose process is dead (same host) is taken over.
* `MetricsLog`: `metrics.jsonl` as an append-only log that survives kills:
  a torn last line is repaired, rows after the restored step are dropped on
  resume (no duplicates), non-finite values are written as JSON `null`, and
  `elapsed_s` keeps counting across resumed segments.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pathlib
import socket
import tempfile
import time
from typing import Any, Callable, Optional

LOCK_NAME = ".train.lock"


class WriteError(OSError):
  """A workdir file could not be written; the message names path and cause."""


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir."""


# ---------------------------------------------------------------- atomic IO
def atomic_write_text(path: str | pathlib.Path, text: str) -> pathlib.Path:
  """Write `text` to `path` atomically (temp file, fsync, rename)."""
  path = pathlib.Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                               dir=path.parent)
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise
  except OSError as e:
    raise WriteError(e.errno or errno.EIO,
                     f"could not write {path}: {e.strerror or e}; check that "
                     "the directory exists and is writable (or choose another "
                     "--workdir / --out)") from e
  return path


def _finite(obj: Any) -> Any:
  """Non-finite floats -> None (strict JSON has no NaN/Infinity)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return obj


def dumps(obj: Any, **kwargs) -> str:
  """Strict JSON: non-finite numbers become null."""
  return json.dumps(_finite(obj), allow_nan=False, default=str, **kwargs)


def atomic_write_json(path: str | pathlib.Path, obj: Any) -> pathlib.Path:
  return atomic_write_text(path, dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------- lock
def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """Exclusive lock on a workdir, created with O_EXCL (no race between two
  starters). Use as a context manager; `log` receives the take-over notice."""

  def __init__(self, workdir: str | pathlib.Path,
               log: Callable[[str], None] = print):
    self.path = pathlib.Path(workdir) / LOCK_NAME
    self.log = log
    self.held = False

  def _holder(self) -> Optional[dict]:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None

  def acquire(self) -> "WorkdirLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is None:
          # Torn or unreadable lock file: its writer died mid-write.
          self.log(f"[train] removing an unreadable lock {self.path}")
        elif holder.get("host") != me["host"] or _alive(int(holder["pid"])):
          raise WorkdirBusy(
              f"{self.path.parent} is in use by pid {holder.get('pid')} on "
              f"host {holder.get('host')} (since {holder.get('since')}); wait "
              f"for it to finish, or use another --workdir. If that process "
              f"is gone, delete {self.path}") from None
        else:
          self.log(f"[train] taking over the stale lock of pid "
                   f"{holder['pid']} on {holder['host']} (process is gone)")
        with contextlib.suppress(FileNotFoundError):
          self.path.unlink()
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise WorkdirBusy(f"could not take the lock {self.path}: another process "
                      "is starting in this workdir; retry in a moment")

  def release(self) -> None:
    if self.held:
      with contextlib.suppress(FileNotFoundError):
        holder = self._holder()
        if holder is None or holder.get("pid") == os.getpid():
          self.path.unlink()
      self.held = False

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ------------------------------------------------------------------ metrics
def read_rows(path: str | pathlib.Path) -> list[dict]:
  """The rows of a JSONL log; a torn (unparseable) last line is ignored."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i == len(lines) - 1:
        break  # a write cut short by a kill
      raise ValueError(f"{path}: line {i + 1} is not JSON; the metrics log "
                       "is damaged (fix or delete that line)") from None
  return rows


class MetricsLog:
  """Append-only `metrics.jsonl`, consistent with the restored checkpoint."""

  def __init__(self, path: str | pathlib.Path, resume_step: int = 0,
               enabled: bool = True):
    self.path = pathlib.Path(path)
    self.enabled = enabled
    self.time_offset = 0.0
    self._file = None
    if not enabled:
      return
    rows = read_rows(self.path)
    kept = [r for r in rows if int(r.get("step", 0)) <= resume_step]
    if kept:
      self.time_offset = float(kept[-1].get("elapsed_s") or 0.0)
    raw = self.path.read_text(encoding="utf-8", errors="replace") \
        if self.path.exists() else ""
    # Rewrite only when something must go (a torn line or rows past the
    # checkpoint): the common case appends without touching the file.
    if len(kept) != len(rows) or (raw and not raw.endswith("\n")):
      atomic_write_text(self.path, "".join(dumps(r) + "\n" for r in kept))
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, row: dict) -> None:
    if self._file is None:
      return
    self._file.write(dumps(row) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
