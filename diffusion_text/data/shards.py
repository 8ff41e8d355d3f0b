"""Sharded array_record storage of packed blocks: resumable, atomic writes.

A prepared dataset is one folder: `<split>-NNNNN.array_record` shards (one
record per block: int32 [1 + L] = length, then the L token ids) and
`info.json`. It is built in `<folder>.partial`, which keeps each finished
shard together with `<split>-NNNNN.state.npz` (how many documents it
consumed and the packer's left-over tokens), so a killed preparation resumes
after its last finished shard. Only a complete dataset is renamed into
place, so a reader never sees a half-written one.

Records are read with Grain's ArrayRecordDataSource (random access over all
shards of a split), which is what the training stream consumes.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Iterable, Optional

import numpy as np


def encode_block(tokens_L: np.ndarray, length: int) -> bytes:
  return np.concatenate([[length], tokens_L]).astype("<i4").tobytes()


def decode_block(record: bytes) -> dict:
  row = np.frombuffer(record, "<i4")
  return {"tokens": row[1:].astype(np.int32), "length": np.int32(row[0])}


def _shard_name(split: str, k: int) -> str:
  return f"{split}-{k:05d}.array_record"


class _Shard:
  """One array_record file written under a temporary name, renamed when closed."""

  def __init__(self, folder: pathlib.Path, split: str, index: int):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.path = folder / _shard_name(split, index)
    self.tmp = self.path.with_suffix(".tmp")
    self.writer = ArrayRecordWriter(str(self.tmp), "group_size:1")
    self.count = 0

  def write(self, tokens_NxL: np.ndarray, length_N: np.ndarray) -> None:
    for tokens_L, n in zip(tokens_NxL, length_N):
      self.writer.write(encode_block(tokens_L, int(n)))
    self.count += len(tokens_NxL)

  def close(self, state: dict) -> None:
    self.writer.close()
    state_path = self.path.with_name(self.path.name.replace(".array_record",
                                                            ".state.npz"))
    with open(state_path.with_suffix(".tmp"), "wb") as f:
      np.savez(f, docs=state["docs"], carry=state["carry"], blocks=self.count,
               tokens=state["tokens"])
    os.replace(state_path.with_suffix(".tmp"), state_path)
    os.replace(self.tmp, self.path)   # the shard counts only once renamed


def resume_state(folder: pathlib.Path, split: str) -> tuple[int, dict]:
  """(next shard index, state after the last finished shard) of a split."""
  for tmp in folder.glob(f"{split}-*.tmp"):
    tmp.unlink()                      # a shard cut short by a kill
  done = sorted(int(m.group(1)) for p in folder.glob(f"{split}-*.array_record")
                if (m := re.fullmatch(rf"{re.escape(split)}-(\d+)\.array_record", p.name)))
  state = {"docs": 0, "carry": np.zeros(0, np.int32), "blocks": 0, "tokens": 0}
  for k in done:                      # totals over every finished shard
    with np.load(folder / f"{split}-{k:05d}.state.npz") as z:
      state = {"docs": int(z["docs"]), "carry": z["carry"],
               "blocks": state["blocks"] + int(z["blocks"]),
               "tokens": int(z["tokens"])}
  return (done[-1] + 1 if done else 0), state


def write_split(folder: pathlib.Path, split: str,
                chunks: Iterable[tuple[np.ndarray, np.ndarray, dict]],
                shard_blocks: int, first_shard: int = 0,
                blocks_before: int = 0) -> dict:
  """Write (tokens [N, L], lengths [N], state-after) chunks into shards.

  A shard closes at the first chunk boundary at or past `shard_blocks`
  blocks, so its state file describes exactly where the stream stands.
  """
  shard, k, blocks, state = None, first_shard, blocks_before, None
  for tokens_NxL, length_N, state in chunks:
    if shard is None and len(tokens_NxL):
      shard = _Shard(folder, split, k)
    if shard is not None:
      shard.write(tokens_NxL, length_N)
      blocks += len(tokens_NxL)
      if shard.count >= shard_blocks:
        shard.close(state)
        shard, k = None, k + 1
  if shard is not None:
    shard.close(state)
    k += 1
  return {"shards": [_shard_name(split, i) for i in range(k)], "blocks": blocks}


class BlockSource:
  """Random-access blocks {'tokens': [L], 'length': ()} over a split's shards."""

  def __init__(self, folder: pathlib.Path, shard_names: list[str], num_blocks: int):
    self._paths = [str(folder / n) for n in shard_names]
    self._num = num_blocks
    self._source = None
    if self._paths:                   # opened once, before any reader thread
      from grain.sources import ArrayRecordDataSource
      self._source = ArrayRecordDataSource(self._paths)

  def _open(self):
    return self._source

  def __len__(self) -> int:
    return self._num

  def __getitem__(self, i: int) -> dict:
    return decode_block(self._open()[i])

  def read(self, start: int, stop: int) -> list[dict]:
    """Blocks start..stop-1 in order (one batched read)."""
    if stop <= start:
      return []
    return [decode_block(r) for r in self._open().__getitems__(list(range(start, stop)))]


def finish(partial: pathlib.Path, final: pathlib.Path, info: dict) -> None:
  """Write info.json and move the complete dataset into place atomically."""
  for state in partial.glob("*.state.npz"):
    state.unlink()                    # only needed to resume
  (partial / "info.json").write_text(json.dumps(info, indent=1, default=str))
  os.replace(partial, final)


def read_info(final: pathlib.Path) -> Optional[dict]:
  path = final / "info.json"
  return json.loads(path.read_text()) if path.is_file() else None
