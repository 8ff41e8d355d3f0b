"""Text sources: local corpora as lazy streams of units, plus a synthetic Markov chain.

A source exposes `splits`, `documents(split)` (an iterator over the units to
which the pipeline appends one EOS each; never a whole split in memory) and
`files()` (for provenance). Units follow what the
SEDD reference code loads through HF datasets (see shared/data/README.md):
PTB and LM1B rows are `line.strip()`, WikiText rows are file lines with their
trailing newline (whitespace-only lines become ""), LAMBADA rows are the JSON
texts, Tiny Shakespeare and plain text files are lines (a contiguous 90/5/5
split by lines). Large corpora (`files`, `owt`, `text8`, the full `lm1b`)
live in `corpora`; catalog datasets (`tfds:NAME`, `hf:NAME`) in `remote`.

The synthetic source is token-level: a first-order Markov chain whose block
entropy is known exactly (Cover & Thomas, Thm 4.2.1: for a stationary chain
H(X_1..X_L) = H(pi) + (L-1) H(X_2|X_1)), so tests can check every process's
likelihood bound against the true entropy.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import pathlib
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from diffusion_text.data import corpora, remote
from diffusion_text.data.corpora import DataError
from diffusion_text.data.tokenizers import resolve_data_dir


_FIX = "set DIFFUSION_TEXT_DATA or data.data_dir=PATH (e.g. ../shared/data)"


def _need(path: pathlib.Path) -> pathlib.Path:
  if not path.is_file():
    raise DataError(f"missing data file {path}: {_FIX}")
  return path


def _read_lines(path: pathlib.Path) -> Iterator[str]:
  """Lines without their newline, split on "\n" only (a final newline adds none)."""
  with open(path, encoding="utf-8", newline="\n") as f:
    for line in f:
      yield line[:-1] if line.endswith("\n") else line


def _split_90_5_5(n: int) -> dict[str, tuple[int, int]]:
  a, b = round(0.90 * n), round(0.95 * n)
  return {"train": (0, a), "valid": (a, b), "test": (b, n)}


def held_out_tail(valid_docs: int):
  """OpenWebText's split (SEDD, MDLM): the last `valid_docs` documents are 'valid'."""
  def ranges(n: int) -> dict[str, tuple[int, int]]:
    cut = max(0, n - valid_docs)
    return {"train": (0, cut), "valid": (cut, n)}
  return ranges


@dataclasses.dataclass
class FileSource:
  """A corpus: split name -> files, and a reader file -> units (lazily).

  With `ranges`, all files form one stream ("all") cut into splits by unit
  index; the stream is counted once, so no split is ever held in memory.
  """

  name: str
  split_files: dict[str, tuple[pathlib.Path, ...]]
  read: Callable[[pathlib.Path], Iterable[str]]
  ranges: Optional[Callable[[int], dict[str, tuple[int, int]]]] = None
  _count: list = dataclasses.field(default_factory=list, repr=False)

  @property
  def splits(self) -> tuple[str, ...]:
    if self.ranges is not None:
      return tuple(self.ranges(0))
    return tuple(self.split_files)

  def _check_split(self, split: str) -> None:
    if split not in self.splits:
      raise DataError(f"source {self.name!r} has no split {split!r}; it has: "
                      f"{', '.join(self.splits)}")

  def _stream(self, files) -> Iterator[str]:
    for path in files:
      yield from self.read(path)

  def documents(self, split: str) -> Iterator[str]:
    """The units of `split`, in order, one at a time."""
    self._check_split(split)
    if self.ranges is None:
      return self._stream(self.split_files[split])
    if not self._count:               # one counting pass per source
      self._count.append(sum(1 for _ in self._stream(self.split_files["all"])))
    lo, hi = self.ranges(self._count[0])[split]
    return itertools.islice(self._stream(self.split_files["all"]), lo, hi)

  def files(self, split: Optional[str] = None) -> list[pathlib.Path]:
    if split is not None:
      self._check_split(split)
    if self.ranges is not None or split is None:
      return sorted({p for ps in self.split_files.values() for p in ps})
    return list(self.split_files[split])


# ----------------------------------------------------------------- readers
def _stripped_lines(path: pathlib.Path) -> Iterator[str]:
  return (line.strip() for line in _read_lines(path))


def _wikitext_rows(path: pathlib.Path) -> Iterator[str]:
  # HF `wikitext` rows: each file line keeps its "\n"; blank lines become "".
  with open(path, encoding="utf-8") as f:
    for row in f:
      yield row if row.strip() else ""


def _jsonl_texts(path: pathlib.Path) -> Iterator[str]:
  opener = gzip.open if path.name.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    for line in f:
      if line.strip():
        yield json.loads(line)["text"]


# ---------------------------------------------------------------- registry
def _ptb(root, path, opts):
  return FileSource("ptb", {s: (_need(root / "ptb" / f"ptb.{s}.txt"),)
                            for s in ("train", "valid", "test")}, _stripped_lines)


def _wikitext(name, folder):
  def make(root, path, opts):
    return FileSource(name, {s: (_need(root / folder / f"wiki.{s}.raw"),)
                             for s in ("valid", "test")}, _wikitext_rows)
  return make


def _lambada(root, path, opts):
  return FileSource("lambada", {"test": (_need(root / "lambada" / "lambada_test.jsonl"),)},
                    _jsonl_texts)


def _lm1b(root, path, opts):
  """The 5 heldout shards of the data dir, or the full benchmark at data.path."""
  if path:
    return corpora.lm1b_benchmark(path, _stripped_lines)
  shards = tuple(sorted((root / "lm1b").glob("news.en.heldout-*-of-00050")))
  if not shards:
    _need(root / "lm1b" / "news.en.heldout-00000-of-00050")
  return FileSource("lm1b", {"test": shards}, _stripped_lines)


def _tinyshakespeare(root, path, opts):
  return FileSource("tinyshakespeare",
                    {"all": (_need(root / "tinyshakespeare" / "input.txt"),)},
                    _read_lines, ranges=_split_90_5_5)


def _text(root, path, opts):
  if not path:
    raise DataError("source 'text' needs a file: set data.path=FILE (UTF-8 text)")
  p = pathlib.Path(path).expanduser()
  if not p.is_file():
    raise DataError(f"data.path={path!r} is not a file; set data.path to a "
                    "UTF-8 text file")
  return FileSource("text", {"all": (p,)}, _read_lines, ranges=_split_90_5_5)


def _corpus(name):
  def make(root, path, opts):
    files = corpora.corpus_files(name, path)
    read = corpora.reader(opts.get("txt_document", "line"), _read_lines,
                          _jsonl_texts)
    return FileSource(name, {"all": files}, read,
                      ranges=held_out_tail(int(opts.get("valid_docs", 100_000))))
  return make


def _synthetic(root, path, opts):
  return MarkovSource()


_REGISTRY: dict[str, Callable] = {
    "ptb": _ptb,
    "wikitext2": _wikitext("wikitext2", "wikitext-2-raw"),
    "wikitext103": _wikitext("wikitext103", "wikitext-103-raw"),
    "lambada": _lambada,
    "lm1b": _lm1b,
    "tinyshakespeare": _tinyshakespeare,
    "text": _text,
    "files": _corpus("files"),
    "owt": _corpus("owt"),
    "text8": lambda root, path, opts: corpora.Text8Source.from_path(path),
    "synthetic": _synthetic,
}
_NEEDS_DATA_DIR = {"ptb", "wikitext2", "wikitext103", "lambada", "lm1b",
                   "tinyshakespeare"}


def names() -> list[str]:
  return list(_REGISTRY)


def get_source(name: str, data_dir=None, path: Optional[str] = None,
               **opts):
  """The source `name`; corpora are read from `data_dir` (or the env var).

  `tfds:NAME` and `hf:NAME` are catalog datasets (see `data.remote`); `opts`
  are DataConfig's source options (valid_docs, txt_document, allow_download).
  """
  prefix = name.split(":", 1)[0] if ":" in name else None
  if prefix in remote.PREFIXES:
    return remote.PREFIXES[prefix](name.split(":", 1)[1], opts)
  if name not in _REGISTRY:
    raise DataError(f"unknown source {name!r} (data.source); choose one of: "
                    f"{', '.join(_REGISTRY)}, tfds:NAME or hf:NAME")
  root = resolve_data_dir(data_dir) if name in _NEEDS_DATA_DIR and not (
      name == "lm1b" and path) else None
  return _REGISTRY[name](root, path, opts)


# --------------------------------------------------------------- synthetic
@dataclasses.dataclass(frozen=True)
class MarkovSource:
  """First-order Markov chain over `vocab_size` symbols, stationary start.

  Each block of a split is an independent chain of length L, so the exact
  entropy of a block is H(pi) + (L-1) * H_rate (nats).
  """

  vocab_size: int = 8
  seed: int = 0
  concentration: float = 0.3   # Dirichlet rows: small -> sparse-ish rows
  floor: float = 0.01          # keeps the chain irreducible and aperiodic
  split_tokens: tuple = (("train", 1 << 16), ("valid", 1 << 13), ("test", 1 << 13))

  name = "synthetic"
  tokenized = True             # yields token blocks; no tokenizer needed

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(s for s, _ in self.split_tokens)

  @property
  def transition(self) -> np.ndarray:
    """Row-stochastic P[i, j] = p(x_{t+1} = j | x_t = i), float64 [V, V]."""
    rng = np.random.default_rng(self.seed)
    p_VxV = rng.dirichlet(np.full(self.vocab_size, self.concentration),
                          size=self.vocab_size)
    p_VxV = (1 - self.floor) * p_VxV + self.floor / self.vocab_size
    return p_VxV / p_VxV.sum(axis=1, keepdims=True)

  @property
  def stationary(self) -> np.ndarray:
    """pi with pi P = pi: the left eigenvector for eigenvalue 1."""
    w, v = np.linalg.eig(self.transition.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1.0))])
    return pi / pi.sum()

  def entropy_rate(self) -> float:
    """H(X_2 | X_1) = sum_i pi_i H(P_i) in nats."""
    p = self.transition
    row_h = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(self.stationary @ row_h)

  def entropy_per_token(self, seq_len: int) -> float:
    """Exact H(X_1..X_L) / L in nats for one length-L block."""
    pi = self.stationary
    h_pi = float(-np.sum(np.where(pi > 0, pi * np.log(pi), 0.0)))
    return (h_pi + (seq_len - 1) * self.entropy_rate()) / seq_len

  def token_blocks(self, split: str, seq_len: int) -> np.ndarray:
    """int32 [N, seq_len] independent chains; fixed seed per (split, L)."""
    budget = dict(self.split_tokens)
    if split not in budget:
      raise DataError(f"source 'synthetic' has no split {split!r}; it has: "
                      f"{', '.join(self.splits)}")
    n = max(1, budget[split] // seq_len)
    split_id = self.splits.index(split)
    rng = np.random.default_rng([self.seed, 1 + split_id, seq_len])
    cdf_VxV = np.cumsum(self.transition, axis=1)
    x_NxL = np.empty((n, seq_len), np.int32)
    x_NxL[:, 0] = rng.choice(self.vocab_size, size=n, p=self.stationary)
    for t in range(1, seq_len):
      u_N = rng.random(n)
      nxt = (u_N[:, None] > cdf_VxV[x_NxL[:, t - 1]]).sum(axis=1)
      x_NxL[:, t] = np.minimum(nxt, self.vocab_size - 1)
    return x_NxL

  def documents(self, split: str) -> Iterator[str]:
    raise DataError("the synthetic source is token-level: use "
                    "token_blocks(split, seq_len) (the pipeline does)")

  def files(self, split: Optional[str] = None) -> list[pathlib.Path]:
    return []

  def fingerprint(self) -> dict:
    return {"vocab_size": self.vocab_size, "seed": self.seed,
            "concentration": self.concentration, "floor": self.floor,
            "split_tokens": [list(x) for x in self.split_tokens]}
