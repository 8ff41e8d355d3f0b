"""Large local corpora: document collections (OpenWebText format), text8, LM1B.

- `files` / `owt`: a file, a directory or a glob of `.txt`, `.jsonl`,
  `.jsonl.gz` (and `.parquet` with pyarrow) files, read in sorted order as one
  document stream; the last `data.valid_docs` documents are held out as
  'valid', as SEDD (Lou et al. 2024) and MDLM (Sahoo et al. 2024) do for
  OpenWebText with 100k documents.
- `text8`: Mahoney's 100M-character file, split 90M/5M/5M (Mikolov et al.
  2014; D3PM, Austin et al. 2021; MD4, Shi et al. 2024), read in pieces.
- `lm1b`: the full One Billion Word benchmark from its release folders.
"""

from __future__ import annotations

import dataclasses
import glob
import pathlib
from typing import Iterator, Optional

from diffusion_text.config import ConfigError


class DataError(ConfigError):
  """A missing or unusable corpus; the message names the fix."""


SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


def _supported(p: pathlib.Path) -> bool:
  return p.is_file() and p.name.endswith(SUFFIXES)


def corpus_files(name: str, path: Optional[str]) -> tuple[pathlib.Path, ...]:
  """data.path as a sorted tuple of corpus files (a file, a directory or a glob)."""
  if not path:
    raise DataError(f"source {name!r} needs its documents: set data.path=FILE, "
                    "DIR or GLOB of .txt/.jsonl/.jsonl.gz files")
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    files = sorted(f for f in p.rglob("*") if _supported(f))
  elif p.is_file():
    files = [p]
  else:
    files = sorted(pathlib.Path(f) for f in glob.glob(str(p), recursive=True)
                   if _supported(pathlib.Path(f)))
  if not files:
    raise DataError(f"data.path={path!r} matches no {'/'.join(SUFFIXES)} "
                    "file; point it at the corpus")
  return tuple(files)


def _parquet_texts(path: pathlib.Path) -> Iterator[str]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise DataError(f"{path.name}: reading .parquet needs pyarrow (pip install "
                    "pyarrow), or convert the files to .jsonl") from None
  for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=1024):
    yield from batch.column(0).to_pylist()


def _whole_file(path: pathlib.Path) -> Iterator[str]:
  yield path.read_text(encoding="utf-8")


def reader(txt_document: str, read_lines, read_jsonl):
  """file -> documents by suffix; a .txt holds one document per line or per file."""
  txt = {"line": read_lines, "file": _whole_file}
  if txt_document not in txt:
    raise DataError(f"data.txt_document must be 'line' or 'file', not "
                    f"{txt_document!r}")

  def read(path: pathlib.Path) -> Iterator[str]:
    if path.name.endswith(".parquet"):
      return _parquet_texts(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
      return read_jsonl(path)
    return txt[txt_document](path)
  return read


def lm1b_benchmark(path: str, read_lines):
  """The release layout: training-monolingual.tokenized.shuffled/news.en-*
  (train, 99 of 100 shards as published) and heldout-...shuffled/news.en.heldout-* (test)."""
  from diffusion_text.data.sources import FileSource
  root = pathlib.Path(path).expanduser()
  train = tuple(sorted(root.glob("training-monolingual.tokenized.shuffled/news.en-*")))
  test = tuple(sorted(root.glob("heldout-monolingual.tokenized.shuffled/news.en.heldout-*")))
  if not train or not test:
    raise DataError(f"data.path={path!r} is not the LM1B release folder "
                    "(it needs training-monolingual.tokenized.shuffled/ and "
                    "heldout-monolingual.tokenized.shuffled/); unset data.path "
                    "to use the heldout shards of the data dir")
  return FileSource("lm1b", {"train": train, "test": test}, read_lines)


@dataclasses.dataclass(frozen=True)
class Text8Source:
  """text8 as one character stream cut 90/5/5 (90M/5M/5M for the real file)."""

  path: pathlib.Path
  piece: int = 1 << 20     # characters per yielded unit (no EOS: any size packs alike)

  name = "text8"
  splits = ("train", "valid", "test")

  @classmethod
  def from_path(cls, path: Optional[str]) -> "Text8Source":
    if not path or not pathlib.Path(path).expanduser().is_file():
      raise DataError(f"source 'text8' needs the text8 file (100M characters, "
                      f"from mattmahoney.net/dc/text8.zip): set data.path=FILE "
                      f"(got {path!r})")
    return cls(pathlib.Path(path).expanduser())

  def _size(self) -> int:
    n = self.path.stat().st_size
    with open(self.path, "rb") as f:   # a trailing newline is not text
      f.seek(max(0, n - 1))
      return n - (f.read(1) == b"\n")

  def ranges(self) -> dict[str, tuple[int, int]]:
    n = self._size()
    a, b = round(0.90 * n), round(0.95 * n)
    return {"train": (0, a), "valid": (a, b), "test": (b, n)}

  def documents(self, split: str) -> Iterator[str]:
    if split not in self.splits:
      raise DataError(f"source 'text8' has no split {split!r}; it has: "
                      "train, valid, test")
    lo, hi = self.ranges()[split]
    with open(self.path, "rb") as f:   # text8 is ASCII: bytes are characters
      f.seek(lo)
      for start in range(lo, hi, self.piece):
        yield f.read(min(self.piece, hi - start)).decode("ascii")

  def files(self, split: Optional[str] = None) -> list[pathlib.Path]:
    return [self.path]
