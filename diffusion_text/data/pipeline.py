"""Data pipeline: source -> tokenizer -> packed blocks (TFDS array_record) -> Grain.

`prepare(cfg)` streams every split once through the tokenizer (worker
processes for large corpora) and a packer (`packing`: each unit followed by
EOS, all units concatenated and cut into non-overlapping seq_len blocks, the
final partial block kept, padded and masked; or one padded block per unit),
into a TFDS dataset of array_record shards of `data.shard_blocks` blocks
(`shards`), read back with `tfds.builder_from_directory(...).as_data_source`.
Memory stays bounded by a few chunks of documents whatever the corpus size; a
killed preparation resumes after its last finished shard, and readers only
ever see a complete dataset. The data directory is only read.

`train_batches` is a Grain MapDataset (source -> shuffle -> repeat -> batch)
indexed by step, so resuming at step k reproduces exactly the batches of an
uninterrupted run, and each host reads only its own slice of the global
batch. `eval_batches` streams a split's blocks in order and keeps a static
batch shape by padding with empty rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import pathlib
import sys
from typing import Iterator, Optional

import numpy as np

from diffusion_text import config as config_lib
from diffusion_text.config import ConfigError
from diffusion_text.data import detokenizers, packing, shards, sources, tokenizers
from diffusion_text.data.packing import pack  # noqa: F401  (the in-memory reference)

FORMAT_VERSION = 3   # bump when the packing rule or layout changes (invalidates caches);
                     # also the TFDS dataset version (token_blocks/3.0.0)
CHUNK_DOCS = 256     # documents per tokenization chunk (and per resume point)
# Below this many bytes of text, starting worker processes costs more than it saves.
PARALLEL_MIN_BYTES = 16 << 20


def _mask(length_N: np.ndarray, seq_len: int) -> np.ndarray:
  return (np.arange(seq_len)[None, :] < length_N[:, None]).astype(np.int32)


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _digest(obj) -> str:
  blob = json.dumps(obj, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  """Inter-process lock so concurrent hosts/tests prepare a cache only once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------- prepared
@dataclasses.dataclass
class Prepared:
  """Packed blocks of every split of one (source, tokenizer, seq_len).

  `cache_path` is the TFDS dataset folder (`tfds.builder_from_directory`).
  """

  source: object
  tokenizer: tokenizers.Tokenizer
  seq_len: int
  splits: tuple
  cache_path: pathlib.Path
  _info: dict
  _arrays: dict = dataclasses.field(default_factory=dict)
  _builder: object = None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def _check(self, split: str) -> None:
    if split not in self.splits:
      raise sources.DataError(
          f"source {self._info['source']!r} has no split {split!r}; it has: "
          f"{', '.join(self.splits)}")

  def data_source(self, split: str, raw: bool = False):
    """TFDS's random-access array_record source of a split: records
    {'tokens': [L], 'length': ()}, or with raw=True their serialized bytes
    (for `shards.decode_batch`)."""
    if not self.num_blocks(split):
      return ()                        # TFDS opens no source over zero records
    import tensorflow_datasets as tfds
    if self._builder is None:
      self._builder = tfds.builder_from_directory(str(self.cache_path))
    method = tfds.decode.DeserializeMethod
    return self._builder.as_data_source(split=split, deserialize_method=(
        method.RAW_BYTES if raw else method.DESERIALIZE_AND_DECODE))

  def num_blocks(self, split: str) -> int:
    self._check(split)
    return self._info["split_meta"][split]["blocks"]

  def num_tokens(self, split: str) -> int:
    self._check(split)
    return self._info["split_meta"][split]["tokens"]

  def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory: for small splits only (use eval_batches)."""
    if split not in self._arrays:
      records = shards.read(self.data_source(split, raw=True), 0,
                            self.num_blocks(split))
      self._arrays[split] = shards.decode_batch(records, self.seq_len)
    return self._arrays[split]

  def blocks(self, split: str) -> np.ndarray:
    """int32 [N, seq_len] token ids (padding positions hold 0)."""
    return self._load(split)[0]

  def masks(self, split: str) -> np.ndarray:
    """int32 [N, seq_len], 1 on real tokens."""
    return _mask(self._load(split)[1], self.seq_len)

  def provenance(self) -> dict:
    return {k: v for k, v in {**self._info, "cache": str(self.cache_path)}.items()
            if k != "split_meta"}


def _source_options(dc) -> dict:
  return {"valid_docs": dc.valid_docs, "txt_document": dc.txt_document,
          "allow_download": dc.allow_download}


def prepare(cfg: config_lib.Config,
            tokenizer: Optional[tokenizers.Tokenizer] = None) -> Prepared:
  """Tokenize, pack and cache cfg.data's source (cached after the first call)."""
  dc = cfg.data
  if dc.seq_len < 1:
    raise ConfigError("data.seq_len must be positive")
  if dc.shard_blocks < 1 or dc.valid_docs < 0 or dc.workers < 1:
    raise ConfigError("data.shard_blocks and data.workers must be >= 1 and "
                      "data.valid_docs >= 0")
  if dc.packing not in packing.PACKERS:
    raise ConfigError(f"data.packing must be one of {', '.join(packing.PACKERS)}, "
                      f"not {dc.packing!r}")
  data_dir = dc.data_dir or None
  source = sources.get_source(dc.source, data_dir, dc.path, **_source_options(dc))
  cache = config_lib.cache_dir(cfg)
  detok_fn = None

  if getattr(source, "tokenized", False):
    # Token-level sources need no tokenizer: data.tokenizer is ignored.
    if tokenizer is None:
      tokenizer = tokenizers.IdentityTokenizer(source.vocab_size)
    if tokenizer.name != "identity" or tokenizer.vocab_size != source.vocab_size:
      raise ConfigError(f"source {dc.source!r} is token-level and needs the "
                        f"identity tokenizer over {source.vocab_size} ids")
    data_files = {}
    source_id = source.fingerprint()
    split_chunks = lambda s, state: _synthetic_chunks(source, s, dc.seq_len, state)
  else:
    data_files = {str(p): _sha256(p) for p in source.files()}
    source_id = sorted(data_files.values()) or source.fingerprint()
    if tokenizer is None:
      tokenizer = _build_tokenizer(dc.tokenizer, source, data_dir, data_files,
                                   cache)
    elif tokenizer.name != dc.tokenizer:
      raise ConfigError(f"the given tokenizer is {tokenizer.name!r} but "
                        f"data.tokenizer={dc.tokenizer!r}; make them agree")
    detok_fn = detokenizers.detokenizer_for(dc.source, tokenizer.name)
    total_bytes = sum(p.stat().st_size for p in source.files())
    workers = dc.workers if total_bytes >= PARALLEL_MIN_BYTES else 1
    split_chunks = lambda s, state: _text_chunks(
        source, tokenizer, detok_fn, s, dc, state, workers, data_dir)

  info = {
      "source": dc.source,
      "path": dc.path,
      "splits": list(source.splits),
      "tokenizer": tokenizer.name,
      "tokenizer_fingerprint": tokenizer.fingerprint(),
      "vocab_size": tokenizer.vocab_size,
      "eos_id": tokenizer.eos_id,
      "seq_len": dc.seq_len,
      "detokenizer": detok_fn.__name__ if detok_fn else None,
      "protocol": detokenizers.PROTOCOL_NAME if detok_fn else None,
      "files_sha256": data_files,
      "source_options": source_id if not data_files else None,
      "packing": dc.packing,
      "valid_docs": dc.valid_docs if dc.source in ("files", "owt") else None,
      "txt_document": dc.txt_document if dc.source in ("files", "owt") else None,
      "shard_blocks": dc.shard_blocks,
      "format_version": FORMAT_VERSION,
  }
  if hasattr(source, "entropy_per_token"):
    info["entropy_per_token_nats"] = source.entropy_per_token(dc.seq_len)
  key_fields = {k: v for k, v in info.items()
                if k not in ("path", "files_sha256", "entropy_per_token_nats")}
  name = dc.source.replace(":", "_").replace("/", "_")
  key = f"{name}.{tokenizer.name}.L{dc.seq_len}.{_digest([key_fields, source_id])}"
  root = cache / "prepared" / key

  folder = shards.dataset_dir(root, FORMAT_VERSION)
  if shards.read_info(folder) is None:
    with _locked(cache / "prepared" / f"{key}.lock"):
      if shards.read_info(folder) is None:   # another process may have won
        _write_dataset(root, info, split_chunks, dc, tokenizer)
  info = shards.read_info(folder)
  return Prepared(source, tokenizer, dc.seq_len, tuple(info["splits"]), folder, info)


def _write_dataset(root: pathlib.Path, info: dict, split_chunks, dc, tokenizer):
  partial = root.with_name(root.name + ".partial")
  folder = shards.dataset_dir(partial, FORMAT_VERSION)
  resuming = partial.is_dir()
  folder.mkdir(parents=True, exist_ok=True)
  print(f"[data] {'resuming' if resuming else 'preparing'} {dc.source}/"
        f"{tokenizer.name} blocks of {dc.seq_len} into {root} (once; cached "
        "afterwards)", file=sys.stderr)
  if not shards.has_metadata(folder):   # else only the final rename was missed
    meta = {}
    for split in info["splits"]:
      meta[split] = shards.split_done(folder, split)
      if meta[split] is None:
        first, state = shards.resume_state(folder, split)
        shards.write_split(folder, split, dc.seq_len, split_chunks(split, state),
                           dc.shard_blocks, first)
        meta[split] = shards.mark_done(folder, split)
    shards.write_metadata(folder, dc.seq_len, {**info, "split_meta": meta})
  shards.publish(partial, root, FORMAT_VERSION)


def _synthetic_chunks(source, split: str, seq_len: int, state: dict):
  if state["docs"]:                   # resumed after its one shard was written
    return
  tokens_NxL = source.token_blocks(split, seq_len)
  length_N = np.full(len(tokens_NxL), seq_len, np.int32)
  yield tokens_NxL, length_N, {"docs": 1, "carry": np.zeros(0, np.int32),
                               "tokens": int(length_N.sum())}


def _text_chunks(source, tokenizer, detok_fn, split: str, dc, state: dict,
                 workers: int, data_dir):
  """(tokens [N, L], lengths [N], state after) per chunk, from `state` on."""
  docs = itertools.islice(source.documents(split), state["docs"], None)
  packer = packing.PACKERS[dc.packing](dc.seq_len, state["carry"])
  n_docs, n_tokens = state["docs"], state["tokens"]
  encoded = packing.encode_chunks(packing.chunked(docs, CHUNK_DOCS), tokenizer,
                                  detok_fn, workers, data_dir)
  for n, units in encoded:
    tokens_NxL, length_N = packer.add(units)
    n_docs, n_tokens = n_docs + n, n_tokens + int(length_N.sum())
    yield tokens_NxL, length_N, {"docs": n_docs, "carry": packer.carry,
                                 "tokens": n_tokens}
  tokens_NxL, length_N = packer.flush()
  yield tokens_NxL, length_N, {"docs": n_docs, "carry": packer.carry,
                               "tokens": n_tokens + int(length_N.sum())}


def _build_tokenizer(name: str, source, data_dir, data_files: dict,
                     cache: pathlib.Path) -> tokenizers.Tokenizer:
  """Fixed tokenizers load from the data dir; learned ones from train (cached)."""
  if name == "identity":
    raise ConfigError(f"tokenizer 'identity' is for token-level sources "
                      f"(synthetic), not {source.name!r}; use data.tokenizer="
                      "word, char, gpt2 or bert")
  if name not in ("char", "word"):
    return tokenizers.make_tokenizer(name, data_dir)
  if "train" not in source.splits:
    raise ConfigError(f"tokenizer {name!r} learns its vocabulary from the "
                      f"train split, and source {source.name!r} has none "
                      f"(splits: {', '.join(source.splits)}); use "
                      "data.tokenizer=gpt2 or bert")
  train_sha = sorted(data_files[str(p)] for p in source.files("train"))
  path = cache / "tokenizers" / f"{source.name}.{name}.{_digest([train_sha, name])}.json"
  if path.exists():
    return tokenizers.tokenizer_from_json(json.loads(path.read_text()))
  tok = tokenizers.make_tokenizer(name, data_dir, source.documents("train"))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{id(tok)}")
  tmp.write_text(json.dumps(tok.to_json()))
  tmp.replace(path)   # atomic: concurrent writers leave one whole file
  return tok


# ------------------------------------------------------------------ batches
def _decode_with_mask(seq_len: int, records) -> dict:
  tokens_BxL, length_B = shards.decode_batch(records, seq_len)
  return {"tokens": tokens_BxL, "mask": _mask(length_B, seq_len)}


def train_batches(prepared: Prepared, batch_size: int, seed: int,
                  start_step: int = 0, shard_index: int = 0,
                  shard_count: int = 1) -> Iterator[dict]:
  """Infinite training batches; host `shard_index` gets rows of its slice.

  Global batch at step s = elements s*B .. s*B+B-1 of the stream
  shuffle(seed, reshuffled each epoch) of the train blocks; host h of k gets
  rows h*B/k .. (h+1)*B/k - 1 of it.
  """
  import grain
  if batch_size % shard_count:
    raise ConfigError(f"data.batch_size={batch_size} must be divisible by the "
                      f"number of hosts ({shard_count})")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  per_host = batch_size // shard_count
  decode = functools.partial(_decode_with_mask, prepared.seq_len)
  ds = (grain.MapDataset.source(prepared.data_source("train", raw=True))
        .shuffle(seed=seed)
        .repeat()                      # reseeds the shuffle every epoch
        .batch(per_host, drop_remainder=True, batch_fn=decode)
        .slice(slice(shard_index, None, shard_count)))
  # Random access by step makes resuming exact; threads prefetch ahead so
  # the device does not wait on record decoding.
  read = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
  return iter(ds[start_step:].to_iter_dataset(read))


def eval_batches(prepared: Prepared, split: str, batch_size: int,
                 max_blocks: int = 0) -> Iterator[dict]:
  """Blocks of `split` in order, read batch by batch; the last batch is padded with empty rows."""
  source = prepared.data_source(split, raw=True)
  n = len(source) if not max_blocks else min(max_blocks, len(source))
  for start in range(0, n, batch_size):
    records = shards.read(source, start, min(start + batch_size, n))
    tokens_bxL, length_b = shards.decode_batch(records, prepared.seq_len)
    empty = batch_size - len(records)          # rows keeping the shape static
    tokens_BxL = np.pad(tokens_bxL, ((0, empty), (0, 0)))
    yield {"tokens": tokens_BxL,
           "mask": _mask(np.pad(length_b, (0, empty)), prepared.seq_len)}
