"""Prepared datasets as TFDS array_record folders: streamed, resumable, atomic.

A prepared dataset is a TFDS dataset `token_blocks` at
`<root>/token_blocks/<version>/`: shards
`token_blocks-<split>.array_record-NNNNN-of-MMMMM`, one record per block
serialized by TFDS's FeaturesDict {"tokens": int32 [L], "length": int32},
and the metadata `tfds.folder_dataset.write_metadata` writes
(dataset_info.json, features.json; metadata.json holds the preparation's
provenance and per-split counts). `tfds.builder_from_directory(folder)` or
`tfds.data_source("token_blocks", data_dir=root)` reads it, without
TensorFlow.

It is built in `<root>.partial`. While a split streams, the number of its
shards is unknown, so each finished shard is kept as
`<split>-NNNNN.array_record` with `state/<split>-NNNNN.npz` (documents
consumed, the packer's left-over tokens), and a killed preparation resumes
after its last finished shard. Once every split is written the shards take
their TFDS names, the metadata is written, and `<root>.partial` is renamed to
`<root>`, so a reader never sees a half-written dataset.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from typing import Iterable, Optional, Sequence

import numpy as np

NAME = "token_blocks"
DESCRIPTION = ("Token ids packed into fixed-length blocks; `length` counts the "
               "real tokens of a block (the rest is padding).")


def dataset_dir(root: pathlib.Path, version: int) -> pathlib.Path:
  """The TFDS dataset folder of a prepared root (data_dir/name/version)."""
  return root / NAME / f"{version}.0.0"


def features(seq_len: int):
  """The record spec. Tokens are stored as their int32 bytes (TFDS's
  Encoding.BYTES, 4 bytes a token): writing and reading them is a copy, where
  int64 varint lists cost about 100 us a 1,024-token block each way."""
  import tensorflow_datasets as tfds
  return tfds.features.FeaturesDict({
      "tokens": tfds.features.Tensor(shape=(seq_len,), dtype=np.int32,
                                     encoding=tfds.features.Encoding.BYTES),
      "length": tfds.features.Scalar(dtype=np.int32),
  })


def decode_batch(records: Sequence[bytes], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Serialized records -> tokens [B, L], lengths [B], in one pass.

  The same values as `features(seq_len).deserialize_example_np` per record,
  which the training stream cannot afford (its generic parser costs ~80 us a
  block): the tf.Example is parsed with TFDS's own proto and the token bytes
  are viewed as int32.
  """
  from tensorflow_datasets.proto import tf_example_pb2
  tokens_BxL = np.zeros((len(records), seq_len), np.int32)
  length_B = np.zeros(len(records), np.int32)
  for i, record in enumerate(records):
    feature = tf_example_pb2.Example.FromString(record).features.feature
    tokens_BxL[i] = np.frombuffer(feature["tokens"].bytes_list.value[0], np.int32)
    length_B[i] = feature["length"].int64_list.value[0]
  return tokens_BxL, length_B


def _pending_name(split: str, k: int) -> str:
  return f"{split}-{k:05d}.array_record"


def _tfds_name(split: str, k: int, n: int) -> str:
  return f"{NAME}-{split}.array_record-{k:05d}-of-{n:05d}"


def _state_path(folder: pathlib.Path, split: str, k: int) -> pathlib.Path:
  return folder / "state" / f"{split}-{k:05d}.npz"


class _Shard:
  """One array_record file written under a temporary name, renamed when closed."""

  def __init__(self, folder: pathlib.Path, split: str, index: int, serialize):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.folder, self.split, self.index = folder, split, index
    self.path = folder / _pending_name(split, index)
    self.tmp = self.path.with_suffix(".tmp")
    self.writer = ArrayRecordWriter(str(self.tmp), "group_size:1")
    self.serialize = serialize
    self.count = 0

  def write(self, tokens_NxL: np.ndarray, length_N: np.ndarray) -> None:
    for tokens_L, n in zip(tokens_NxL, length_N):
      self.writer.write(self.serialize({"tokens": tokens_L, "length": n}))
    self.count += len(tokens_NxL)

  def close(self, state: dict) -> None:
    self.writer.close()
    state_path = _state_path(self.folder, self.split, self.index)
    state_path.parent.mkdir(exist_ok=True)
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
  state = {"docs": 0, "carry": np.zeros(0, np.int32), "shard_lengths": [],
           "tokens": 0}
  for k in done:                      # totals over every finished shard
    with np.load(_state_path(folder, split, k)) as z:
      state = {"docs": int(z["docs"]), "carry": z["carry"],
               "shard_lengths": state["shard_lengths"] + [int(z["blocks"])],
               "tokens": int(z["tokens"])}
  return (done[-1] + 1 if done else 0), state


def write_split(folder: pathlib.Path, split: str, seq_len: int,
                chunks: Iterable[tuple[np.ndarray, np.ndarray, dict]],
                shard_blocks: int, first_shard: int = 0) -> None:
  """Write (tokens [N, L], lengths [N], state-after) chunks into shards.

  A shard closes at the first chunk boundary at or past `shard_blocks`
  blocks, so its state file describes exactly where the stream stands. A
  split without blocks gets one empty shard, so TFDS still lists it.
  """
  serialize = features(seq_len).serialize_example
  shard, k, state = None, first_shard, None
  for tokens_NxL, length_N, state in chunks:
    if shard is None and len(tokens_NxL):
      shard = _Shard(folder, split, k, serialize)
    if shard is not None:
      shard.write(tokens_NxL, length_N)
      if shard.count >= shard_blocks:
        shard.close(state)
        shard, k = None, k + 1
  if shard is None and k == 0 and state is not None:
    shard = _Shard(folder, split, k, serialize)
  if shard is not None:
    shard.close(state)


def split_done(folder: pathlib.Path, split: str) -> Optional[dict]:
  """{shard_lengths, blocks, tokens} of a split written to its end, else None."""
  path = folder / "state" / f"{split}.done.json"
  return json.loads(path.read_text()) if path.is_file() else None


def mark_done(folder: pathlib.Path, split: str) -> dict:
  state = resume_state(folder, split)[1]
  meta = {"shard_lengths": state["shard_lengths"],
          "blocks": sum(state["shard_lengths"]), "tokens": state["tokens"]}
  (folder / "state" / f"{split}.done.json").write_text(json.dumps(meta))
  return meta


def write_metadata(folder: pathlib.Path, seq_len: int, info: dict) -> None:
  """Give the shards their TFDS names and write the TFDS metadata.

  Safe to repeat after a kill: a shard already renamed is left as it is.
  """
  import tensorflow_datasets as tfds
  template = tfds.core.ShardedFileTemplate(
      data_dir=folder, template=tfds.core.naming.DEFAULT_FILENAME_TEMPLATE,
      dataset_name=NAME, filetype_suffix="array_record")
  split_infos = []
  for split, meta in info["split_meta"].items():
    lengths = meta["shard_lengths"]
    for k in range(len(lengths)):
      pending = folder / _pending_name(split, k)
      if pending.exists():
        os.replace(pending, folder / _tfds_name(split, k, len(lengths)))
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=lengths, num_bytes=sum(
            (folder / _tfds_name(split, k, len(lengths))).stat().st_size
            for k in range(len(lengths))),
        filename_template=template))
  provenance = json.loads(json.dumps(info, default=str))
  tfds.folder_dataset.write_metadata(
      data_dir=folder, features=features(seq_len), split_infos=split_infos,
      filename_template=template, check_data=False,   # checking needs TF
      description=DESCRIPTION, disable_shuffling=True,  # eval reads in order
      metadata=tfds.core.MetadataDict(provenance))


def publish(partial: pathlib.Path, final: pathlib.Path, version: int) -> None:
  """Drop the resume state and move the complete dataset into place atomically."""
  shutil.rmtree(dataset_dir(partial, version) / "state", ignore_errors=True)
  if final.exists():
    shutil.rmtree(final)              # an unreadable leftover (no metadata)
  os.replace(partial, final)


def has_metadata(folder: pathlib.Path) -> bool:
  return (folder / "dataset_info.json").is_file()


def read_info(folder: pathlib.Path) -> Optional[dict]:
  """The provenance of a complete dataset folder, or None."""
  path = folder / "metadata.json"
  return json.loads(path.read_text()) if has_metadata(folder) and path.is_file() else None


def read(source, start: int, stop: int) -> list:
  """Records start..stop-1 of a data source in order (one batched read)."""
  return list(source.__getitems__(list(range(start, stop)))) if stop > start else []
