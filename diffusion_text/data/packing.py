"""Units of token ids -> fixed-length blocks, streamed chunk by chunk.

Two conventions, selected by data.packing:
- `concat`: every unit followed by EOS, all concatenated and cut into
  non-overlapping seq_len blocks; the final partial block is kept, padded
  and masked (SEDD's zero-shot protocol; OpenWebText; LM1B "sentence
  packing" as in D3PM, Austin et al. 2021; text8 with no EOS).
- `pad`: every unit (+ EOS) is its own block, truncated to seq_len and
  padded (LM1B as MDLM's Table 1 reports it, Sahoo et al. 2024).

Tokenization runs in worker processes (`encode_chunks`) with a bounded
number of chunks in flight, so memory does not grow with the corpus.
"""

from __future__ import annotations

import itertools
import multiprocessing
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np


def pack(units: Sequence[Sequence[int]], eos_id: Optional[int],
         seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """In memory: units (each + EOS) concatenated and cut: tokens [N, L], lengths [N]."""
  packer = ConcatPacker(seq_len)
  parts = [packer.add(_with_eos(units, eos_id)), packer.flush()]
  return (np.concatenate([p[0] for p in parts]),
          np.concatenate([p[1] for p in parts]))


def _with_eos(units: Iterable[Sequence[int]], eos_id: Optional[int]) -> list[np.ndarray]:
  eos = [] if eos_id is None else [eos_id]
  return [np.asarray(list(u) + eos, np.int32) for u in units]


def _empty(seq_len: int):
  return np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32)


class ConcatPacker:
  """Concatenate units and cut; `carry` holds the < seq_len tokens left over."""

  def __init__(self, seq_len: int, carry: Optional[np.ndarray] = None):
    self.seq_len = seq_len
    self.carry = np.zeros(0, np.int32) if carry is None else carry

  def add(self, units: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    flat = np.concatenate([self.carry, *units]).astype(np.int32)
    n = len(flat) // self.seq_len
    self.carry = flat[n * self.seq_len:].copy()
    tokens_NxL = flat[:n * self.seq_len].reshape(n, self.seq_len)
    return tokens_NxL, np.full(n, self.seq_len, np.int32)

  def flush(self) -> tuple[np.ndarray, np.ndarray]:
    if not len(self.carry):
      return _empty(self.seq_len)
    tokens_1xL = np.zeros((1, self.seq_len), np.int32)
    tokens_1xL[0, :len(self.carry)] = self.carry
    length_1 = np.array([len(self.carry)], np.int32)
    self.carry = np.zeros(0, np.int32)
    return tokens_1xL, length_1


class PadPacker:
  """One block per unit, truncated to seq_len; nothing carries over."""

  def __init__(self, seq_len: int, carry: Optional[np.ndarray] = None):
    self.seq_len = seq_len
    self.carry = np.zeros(0, np.int32)

  def add(self, units: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    units = [u[:self.seq_len] for u in units if len(u)]
    tokens_NxL = np.zeros((len(units), self.seq_len), np.int32)
    for i, u in enumerate(units):
      tokens_NxL[i, :len(u)] = u
    return tokens_NxL, np.array([len(u) for u in units], np.int32)

  def flush(self) -> tuple[np.ndarray, np.ndarray]:
    return _empty(self.seq_len)


PACKERS = {"concat": ConcatPacker, "pad": PadPacker}


# ------------------------------------------------------------ tokenization
_worker: dict = {}


def _init_worker(tokenizer_json: dict, data_dir, detok_fn) -> None:
  from diffusion_text.data import tokenizers
  _worker["tok"] = tokenizers.tokenizer_from_json(tokenizer_json, data_dir)
  _worker["detok"] = detok_fn


def encode_docs(tokenizer, detok_fn: Optional[Callable], docs: list[str]) -> list[np.ndarray]:
  """Detokenize, encode and append EOS to each document of one chunk."""
  if detok_fn is not None:
    docs = [detok_fn(d) for d in docs]
  return _with_eos(tokenizer.encode_batch(docs), tokenizer.eos_id)


def _encode_in_worker(docs: list[str]) -> list[np.ndarray]:
  return encode_docs(_worker["tok"], _worker["detok"], docs)


def chunked(items: Iterable, size: int) -> Iterator[list]:
  it = iter(items)
  while chunk := list(itertools.islice(it, size)):
    yield chunk


def encode_chunks(chunks: Iterable[list[str]], tokenizer, detok_fn,
                  workers: int, data_dir=None) -> Iterator[tuple[int, list[np.ndarray]]]:
  """(number of documents, encoded units) per chunk, in order.

  With workers > 1, chunks go to `workers` spawned processes (fork is unsafe
  once JAX has started threads); at most 2 * workers chunks are in flight.
  """
  if workers <= 1:
    for docs in chunks:
      yield len(docs), encode_docs(tokenizer, detok_fn, docs)
    return
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(workers, _init_worker,
                (tokenizer.to_json(), data_dir, detok_fn)) as pool:
    pending = []
    for docs in chunks:
      pending.append((len(docs), pool.apply_async(_encode_in_worker, (docs,))))
      if len(pending) >= 2 * workers:
        n, res = pending.pop(0)
        yield n, res.get()
    for n, res in pending:
      yield n, res.get()
