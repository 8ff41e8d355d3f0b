"""TFDS builder storing packed token blocks as array_record (no TensorFlow).

One dataset per (source, tokenizer, seq_len) key, written once into the
cache directory and read back with random access (`as_data_source`), which is
what Grain consumes. Each record is one block: `tokens` int32 [L] and
`length` (the number of real tokens; only the final block of a split is
short), from which the pipeline derives the mask.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds

# split -> (tokens int32 [N, L], length int32 [N])
MakeSplit = Callable[[str], tuple[np.ndarray, np.ndarray]]


class TokenBlocks(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Packed blocks of one (source, tokenizer, seq_len) configuration."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, seq_len: int, split_names: Sequence[str] = (),
               make_split: MakeSplit | None = None, **kwargs):
    self._seq_len = int(seq_len)
    self._split_names = tuple(split_names)
    self._make_split = make_split
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Token ids packed into fixed-length blocks "
                    "(units each followed by EOS, concatenated, cut).",
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(self._seq_len,),
                                           dtype=np.int32),
            "length": tfds.features.Scalar(dtype=np.int32),
        }),
        # Keep block order: eval reads the blocks in corpus order.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    if self._make_split is None:
      raise ValueError("TokenBlocks needs make_split to generate data")
    return {s: self._generate_examples(s) for s in self._split_names}

  def _generate_examples(self, split: str):
    tokens_NxL, length_N = self._make_split(split)
    for i in range(len(tokens_NxL)):
      yield i, {"tokens": tokens_NxL[i], "length": length_N[i]}

  # The pipeline prints its own one-line progress; TFDS's download banners
  # ("Downloading and preparing dataset ...") do not apply to local data.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass
