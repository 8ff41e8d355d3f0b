"""Data pipeline: source -> tokenizer -> packed blocks (TFDS array_record) -> Grain.

`prepare(cfg)` tokenizes every split once (each unit followed by EOS, all
units concatenated and cut into non-overlapping seq_len blocks; the final
partial block is kept, padded and masked so every token is scored), writes
the blocks with a TFDS builder as array_record into the cache directory and
reads them back with random access. The data directory is only read.

`train_batches` is a Grain MapDataset (source -> shuffle -> repeat -> batch)
indexed by step, so resuming at step k reproduces exactly the batches of an
uninterrupted run, and each host reads only its own slice of the global
batch. `eval_batches` keeps a static batch shape by padding with empty rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import pathlib
import sys
from typing import Iterator, Optional, Sequence

import numpy as np

from diffusion_text import config as config_lib
from diffusion_text.config import ConfigError
from diffusion_text.data import sources, tokenizers
from diffusion_text.eval import protocol

FORMAT_VERSION = 1   # bump when the packing rule changes (invalidates caches)


# ------------------------------------------------------------------ packing
def pack(units: Sequence[Sequence[int]], eos_id: Optional[int],
         seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Units (each + EOS) concatenated and cut: tokens [N, L], lengths [N]."""
  eos = [] if eos_id is None else [eos_id]
  sizes = np.fromiter((len(u) + len(eos) for u in units), np.int64, len(units))
  flat = np.empty(int(sizes.sum()), np.int32)
  pos = 0
  for u in units:
    flat[pos:pos + len(u)] = u
    pos += len(u)
    if eos:
      flat[pos] = eos_id
      pos += 1
  n_blocks = -(-len(flat) // seq_len)
  tokens_NxL = np.zeros((n_blocks, seq_len), np.int32)
  tokens_NxL.reshape(-1)[:len(flat)] = flat
  length_N = np.full(n_blocks, seq_len, np.int32)
  if n_blocks and len(flat) % seq_len:
    length_N[-1] = len(flat) % seq_len
  return tokens_NxL, length_N


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


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS warns about every not-yet-written dataset folder it probes."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _open_builder(root: pathlib.Path, seq_len: int, splits, make_split):
  from diffusion_text.data.builders import TokenBlocks  # imports TFDS
  with _quiet_tfds():
    builder = TokenBlocks(seq_len=seq_len, split_names=splits,
                          make_split=make_split, data_dir=str(root))
    return builder, builder.is_prepared()


# ----------------------------------------------------------------- prepared
@dataclasses.dataclass
class Prepared:
  """Packed blocks of every split of one (source, tokenizer, seq_len)."""

  source: object
  tokenizer: tokenizers.Tokenizer
  seq_len: int
  splits: tuple
  cache_path: pathlib.Path
  _builder: object
  _info: dict
  _arrays: dict = dataclasses.field(default_factory=dict)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def _check(self, split: str) -> None:
    if split not in self.splits:
      raise sources.DataError(
          f"source {self._info['source']!r} has no split {split!r}; it has: "
          f"{', '.join(self.splits)}")

  def data_source(self, split: str):
    """Random-access records {'tokens': [L], 'length': ()} (array_record)."""
    self._check(split)
    return self._builder.as_data_source(split=split)

  def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in self._arrays:
      ds = self.data_source(split)
      records = ds.__getitems__(list(range(len(ds)))) if len(ds) else []
      tokens_NxL = np.zeros((len(records), self.seq_len), np.int32)
      length_N = np.zeros(len(records), np.int32)
      for i, r in enumerate(records):
        tokens_NxL[i], length_N[i] = r["tokens"], r["length"]
      self._arrays[split] = (tokens_NxL, length_N)
    return self._arrays[split]

  def blocks(self, split: str) -> np.ndarray:
    """int32 [N, seq_len] token ids (padding positions hold 0)."""
    return self._load(split)[0]

  def masks(self, split: str) -> np.ndarray:
    """int32 [N, seq_len], 1 on real tokens."""
    return _mask(self._load(split)[1], self.seq_len)

  def num_tokens(self, split: str) -> int:
    return int(self._load(split)[1].sum())

  def provenance(self) -> dict:
    return {**self._info, "cache": str(self.cache_path)}


def prepare(cfg: config_lib.Config,
            tokenizer: Optional[tokenizers.Tokenizer] = None) -> Prepared:
  """Tokenize, pack and cache cfg.data's source (cached after the first call)."""
  dc = cfg.data
  if dc.seq_len < 1:
    raise ConfigError("data.seq_len must be positive")
  data_dir = dc.data_dir or None
  source = sources.get_source(dc.source, data_dir, dc.path)
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
    make_split = lambda s: _synthetic_split(source, s, dc.seq_len)
  else:
    data_files = {str(p): _sha256(p) for p in source.files()}
    source_id = sorted(data_files.values())
    if tokenizer is None:
      tokenizer = _build_tokenizer(dc.tokenizer, source, data_dir, data_files,
                                   cache)
    elif tokenizer.name != dc.tokenizer:
      raise ConfigError(f"the given tokenizer is {tokenizer.name!r} but "
                        f"data.tokenizer={dc.tokenizer!r}; make them agree")
    detok_fn = protocol.detokenizer_for(dc.source, tokenizer.name)
    make_split = lambda s: _text_split(source, tokenizer, detok_fn, s,
                                       dc.seq_len)

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
      "protocol": protocol.PROTOCOL["name"] if detok_fn else None,
      "files_sha256": data_files,
      "source_options": source_id if not data_files else None,
      "packing": "unit+EOS concatenated, non-overlapping blocks, "
                 "final partial block padded and masked",
      "format_version": FORMAT_VERSION,
  }
  if hasattr(source, "entropy_per_token"):
    info["entropy_per_token_nats"] = source.entropy_per_token(dc.seq_len)
  key_fields = {k: v for k, v in info.items()
                if k not in ("path", "files_sha256", "entropy_per_token_nats")}
  key = f"{dc.source}.{tokenizer.name}.L{dc.seq_len}.{_digest([key_fields, source_id])}"
  root = cache / "tfds" / key

  args = (root, dc.seq_len, source.splits, make_split)
  builder, ready = _open_builder(*args)
  if not ready:
    with _locked(cache / "tfds" / f"{key}.lock"):
      builder, ready = _open_builder(*args)   # another process may have won
      if not ready:
        print(f"[data] preparing {dc.source}/{tokenizer.name} blocks of "
              f"{dc.seq_len} into {root} (once; cached afterwards)",
              file=sys.stderr)
        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()
        with _quiet_tfds():
          builder.download_and_prepare()
  return Prepared(source, tokenizer, dc.seq_len, tuple(source.splits),
                  pathlib.Path(str(builder.data_path)), builder, info)


def _synthetic_split(source, split: str, seq_len: int):
  tokens_NxL = source.token_blocks(split, seq_len)
  return tokens_NxL, np.full(len(tokens_NxL), seq_len, np.int32)


def _text_split(source, tokenizer, detok_fn, split: str, seq_len: int):
  docs = source.documents(split)
  if detok_fn is not None:
    docs = [detok_fn(d) for d in docs]
  return pack(tokenizer.encode_batch(docs), tokenizer.eos_id, seq_len)


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
def _with_mask(batch: dict) -> dict:
  tokens_BxL = np.asarray(batch["tokens"], np.int32)
  return {"tokens": tokens_BxL,
          "mask": _mask(np.asarray(batch["length"]), tokens_BxL.shape[1])}


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
  ds = (grain.MapDataset.source(prepared.data_source("train"))
        .shuffle(seed=seed)
        .repeat()                      # reseeds the shuffle every epoch
        .batch(per_host, drop_remainder=True)
        .slice(slice(shard_index, None, shard_count))
        .map(_with_mask))
  # Random access by step makes resuming exact; threads prefetch ahead so
  # the device does not wait on record decoding.
  read = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
  return iter(ds[start_step:].to_iter_dataset(read))


def eval_batches(prepared: Prepared, split: str, batch_size: int,
                 max_blocks: int = 0) -> Iterator[dict]:
  """Blocks of `split` in order; the last batch is padded with empty rows."""
  tokens_NxL, masks_NxL = prepared.blocks(split), prepared.masks(split)
  if max_blocks:
    tokens_NxL, masks_NxL = tokens_NxL[:max_blocks], masks_NxL[:max_blocks]
  for start in range(0, len(tokens_NxL), batch_size):
    tokens_BxL = tokens_NxL[start:start + batch_size]
    mask_BxL = masks_NxL[start:start + batch_size]
    pad = batch_size - len(tokens_BxL)
    if pad:
      tokens_BxL = np.pad(tokens_BxL, ((0, pad), (0, 0)))
      mask_BxL = np.pad(mask_BxL, ((0, pad), (0, 0)))
    yield {"tokens": tokens_BxL, "mask": mask_BxL}
