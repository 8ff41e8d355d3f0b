"""Catalog datasets: `tfds:NAME` (TensorFlow Datasets) and `hf:NAME` (Hugging Face).

Both stay offline unless data.allow_download=true: TFDS reads only a dataset
already prepared under $TFDS_DATA_DIR (or ~/tensorflow_datasets), and Hugging
Face runs with HF_DATASETS_OFFLINE=1 against its local cache. A dataset that
is not there fails at once with the fix, instead of a client retrying the
network for minutes. Documents are the `text` field of each row, streamed.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterator, Optional

from diffusion_text.data.corpora import DataError


def _tfds_dir() -> pathlib.Path:
  d = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return pathlib.Path(d).expanduser()


@dataclasses.dataclass(frozen=True)
class CatalogSource:
  """Rows of a catalog dataset; `documents` streams the `text` field."""

  name: str
  splits: tuple
  rows: object              # split -> iterable of dicts
  field: str = "text"

  def documents(self, split: str) -> Iterator[str]:
    if split not in self.splits:
      raise DataError(f"source {self.name!r} has no split {split!r}; it has: "
                      f"{', '.join(self.splits)}")
    for row in self.rows(split):
      text = row[self.field]
      yield text.decode("utf-8") if isinstance(text, bytes) else text

  def files(self, split: Optional[str] = None) -> list[pathlib.Path]:
    return []

  def fingerprint(self) -> dict:
    return {"catalog": self.name}


_SPLIT_NAMES = {"validation": "valid"}   # catalog name -> ours


def tfds_source(name: str, opts: dict) -> CatalogSource:
  root = _tfds_dir()
  if not opts.get("allow_download") and not (root / name.split("/")[0]).is_dir():
    raise DataError(f"tfds:{name} is not prepared under {root} and downloads "
                    f"are off: run `tfds build {name}` once online (or set "
                    "TFDS_DATA_DIR), or set data.allow_download=true")
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=str(root), try_gcs=False)
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  theirs = {_SPLIT_NAMES.get(s, s): s for s in builder.info.splits}
  return CatalogSource(f"tfds:{name}", tuple(theirs),
                       lambda s: builder.as_data_source(split=theirs[s]))


def hf_source(name: str, opts: dict) -> CatalogSource:
  if not opts.get("allow_download"):
    # Read when `datasets` / `huggingface_hub` are first imported.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
  try:
    import datasets
  except ImportError:
    raise DataError(f"hf:{name} needs the Hugging Face `datasets` package "
                    "(pip install datasets); or use a local file source") from None
  # hf:NAME, hf:ORG/NAME or hf:ORG/NAME/CONFIG
  path, config = name.rsplit("/", 1) if name.count("/") > 1 else (name, "")
  try:
    ds = datasets.load_dataset(path, config or None, streaming=True)
  except Exception as e:   # offline misses surface as several exception types
    raise DataError(f"hf:{name} is not in the local Hugging Face cache and "
                    f"downloads are off ({type(e).__name__}); set "
                    "data.allow_download=true once online") from None
  theirs = {_SPLIT_NAMES.get(s, s): s for s in ds}
  return CatalogSource(f"hf:{name}", tuple(theirs), lambda s: ds[theirs[s]])


PREFIXES = {"tfds": tfds_source, "hf": hf_source}
