"""Pipeline: packing counts, masks, the sharded cache, Grain resume and host slices."""

import os
import pathlib
import shutil
import stat
import sys

import numpy as np
import pytest

from diffusion_text import config as config_lib
from diffusion_text.config import Config, ConfigError, DataConfig
from diffusion_text.data import detokenizers, pipeline, tokenizers

DATA = pathlib.Path(os.environ["DIFFUSION_TEXT_DATA"])   # set by conftest


def _cfg(tmp_path, **data) -> Config:
  data.setdefault("cache_dir", str(tmp_path / "cache"))
  return Config(data=DataConfig(**data))


def test_pack_appends_eos_and_masks_the_tail():
  tokens, lengths = pipeline.pack([[1, 2], [3], []], eos_id=9, seq_len=4)
  np.testing.assert_array_equal(tokens, [[1, 2, 9, 3], [9, 9, 0, 0]])
  np.testing.assert_array_equal(lengths, [4, 2])
  tokens, lengths = pipeline.pack([[1, 2], [3], []], eos_id=9, seq_len=3)
  np.testing.assert_array_equal(tokens, [[1, 2, 9], [3, 9, 9]])
  np.testing.assert_array_equal(lengths, [3, 3])
  tokens, lengths = pipeline.pack([[5, 6, 7]], eos_id=None, seq_len=2)
  np.testing.assert_array_equal(tokens, [[5, 6], [7, 0]])
  np.testing.assert_array_equal(lengths, [2, 1])


@pytest.fixture(scope="module")
def ptb_data(tmp_path_factory):
  """A copy of the PTB files made read-only, and a snapshot of it."""
  src = DATA / "ptb"
  if not src.exists():
    pytest.skip("PTB files not found (set DIFFUSION_TEXT_DATA)")
  root = tmp_path_factory.mktemp("ro_data")
  shutil.copytree(src, root / "ptb")
  for p in [root / "ptb", *(root / "ptb").iterdir()]:
    p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
  return root


def _snapshot(root):
  return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                for p in root.rglob("*"))


@pytest.fixture(scope="module")
def ptb_word(ptb_data, tmp_path_factory):
  cache = tmp_path_factory.mktemp("ptb_cache")
  before = _snapshot(ptb_data)
  cfg = Config(data=DataConfig(source="ptb", tokenizer="word", seq_len=128,
                               data_dir=str(ptb_data), cache_dir=str(cache)))
  prepared = pipeline.prepare(cfg)
  assert _snapshot(ptb_data) == before   # the data dir is only read
  return cfg, prepared


def test_ptb_word_counts_and_masks(ptb_word, ptb_data):
  _, p = ptb_word
  assert p.vocab_size == 10_000 and p.seq_len == 128
  assert p.num_tokens("test") == 82_430   # Mikolov: words + one <eos> per line
  assert p.num_tokens("valid") == 73_760
  blocks, masks = p.blocks("test"), p.masks("test")
  assert blocks.dtype == np.int32 and masks.dtype == np.int32
  assert blocks.shape == masks.shape == (-(-82_430 // 128), 128)
  # Only the tail of the final block is padding.
  assert masks[:-1].all() and masks[-1].sum() == 82_430 % 128
  assert (masks[-1][: 82_430 % 128] == 1).all() and (blocks[masks == 0] == 0).all()
  # The real tokens are exactly the units each followed by EOS, in order.
  lines = (ptb_data / "ptb" / "ptb.test.txt").read_text("utf-8").splitlines()
  expected = [i for line in lines for i in p.tokenizer.encode(line) + [p.tokenizer.eos_id]]
  np.testing.assert_array_equal(blocks[masks == 1], expected)


def test_provenance(ptb_word, ptb_data):
  _, p = ptb_word
  prov = p.provenance()
  assert prov["source"] == "ptb" and prov["tokenizer"] == "word"
  assert prov["seq_len"] == 128 and prov["detokenizer"] is None
  assert prov["tokenizer_fingerprint"] == p.tokenizer.fingerprint()
  sums = {}   # the data directory's own checksum list
  for line in (DATA / "SHA256SUMS").read_text().splitlines():
    digest, name = line.split()
    sums[name.lstrip("./")] = digest
  for path, digest in prov["files_sha256"].items():
    rel = os.path.relpath(path, ptb_data)
    assert sums[rel] == digest
  # The blocks live in the cache as a TFDS dataset of array_record shards.
  assert {f.name for f in p.cache_path.iterdir()} >= {
      "dataset_info.json", "metadata.json",
      "token_blocks-test.array_record-00000-of-00001"}
  assert p.num_blocks("test") == len(p.blocks("test"))


def test_second_prepare_reads_the_cache(ptb_word, ptb_data, monkeypatch):
  cfg, first = ptb_word
  before = _snapshot(ptb_data)

  def no_tokenizing(*args, **kwargs):
    raise AssertionError("the cached blocks should have been used")
  monkeypatch.setattr(pipeline, "_text_chunks", no_tokenizing)
  monkeypatch.setattr(tokenizers.WordTokenizer, "from_text", no_tokenizing)
  again = pipeline.prepare(cfg)
  np.testing.assert_array_equal(again.blocks("valid"), first.blocks("valid"))
  assert again.tokenizer.fingerprint() == first.tokenizer.fingerprint()
  # A restored tokenizer (as from a workdir) is used as given.
  restored = tokenizers.tokenizer_from_json(first.tokenizer.to_json())
  third = pipeline.prepare(cfg, tokenizer=restored)
  assert third.tokenizer is restored
  np.testing.assert_array_equal(third.blocks("test"), first.blocks("test"))
  assert _snapshot(ptb_data) == before
  assert "tensorflow" not in sys.modules   # array_record without TF


def test_wrong_tokenizer_for_config(ptb_word):
  cfg, _ = ptb_word
  char = tokenizers.make_tokenizer("char", None, "abc")
  with pytest.raises(ConfigError, match="data.tokenizer"):
    pipeline.prepare(cfg, tokenizer=char)


def test_gpt2_protocol_applies_the_detokenizer(tmp_path, data_dir):
  cfg = _cfg(tmp_path, source="lambada", tokenizer="gpt2", seq_len=1024)
  p = pipeline.prepare(cfg)
  prov = p.provenance()
  assert prov["detokenizer"] == "lambada_detokenizer"
  assert prov["protocol"] == "sedd_zero_shot"
  docs = list(p.source.documents("test"))
  first = p.tokenizer.encode("\n" + docs[0].replace("“", '"').replace("”", '"').strip())
  np.testing.assert_array_equal(p.blocks("test")[0, :len(first)], first)
  assert p.blocks("test")[0, len(first)] == 50256
  assert p.num_tokens("test") == sum(map(len, p.tokenizer.encode_batch(
      [detokenizers.lambada_detokenizer(d) for d in docs]))) + len(docs)
  with pytest.raises(ConfigError, match="no split 'train'"):
    p.blocks("train")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  cache = tmp_path_factory.mktemp("syn_cache")
  cfg = Config(data=DataConfig(source="synthetic", tokenizer="identity",
                               seq_len=64, cache_dir=str(cache)))
  return pipeline.prepare(cfg)


def test_synthetic_blocks(synthetic):
  p = synthetic
  assert p.vocab_size == 8 and p.tokenizer.name == "identity"
  np.testing.assert_array_equal(p.blocks("train"),
                                p.source.token_blocks("train", 64))
  assert p.masks("valid").all()
  assert p.provenance()["entropy_per_token_nats"] == pytest.approx(
      p.source.entropy_per_token(64))


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_resume_exactly_and_reshuffle(synthetic):
  p = synthetic
  n = len(p.blocks("train"))                      # 1024 blocks
  steps_per_epoch = n // 32
  stream = _take(pipeline.train_batches(p, 32, seed=7), 2 * steps_per_epoch + 3)
  b = stream[0]
  assert b["tokens"].shape == b["mask"].shape == (32, 64)
  assert b["tokens"].dtype == np.int32 and b["mask"].dtype == np.int32
  again = _take(pipeline.train_batches(p, 32, seed=7), 3)
  for x, y in zip(again, stream):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  k = steps_per_epoch - 1                         # resume across an epoch edge
  resumed = _take(pipeline.train_batches(p, 32, seed=7, start_step=k), 4)
  for x, y in zip(resumed, stream[k:]):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["mask"], y["mask"])
  # Each epoch is a permutation of the blocks, and a different one.
  def epoch(e):
    return np.concatenate([s["tokens"] for s in
                           stream[e * steps_per_epoch:(e + 1) * steps_per_epoch]])
  rows = lambda a: sorted(map(bytes, a))
  assert rows(epoch(0)) == rows(epoch(1)) == rows(p.blocks("train"))
  assert not np.array_equal(epoch(0), epoch(1))
  other = next(pipeline.train_batches(p, 32, seed=8))
  assert not np.array_equal(other["tokens"], stream[0]["tokens"])


def test_host_slices_partition_the_global_batch(synthetic):
  p = synthetic
  glob = _take(pipeline.train_batches(p, 32, seed=1, start_step=5), 2)
  for shards in (2, 4):
    parts = [_take(pipeline.train_batches(p, 32, seed=1, start_step=5,
                                          shard_index=h, shard_count=shards), 2)
             for h in range(shards)]
    for step in range(2):
      np.testing.assert_array_equal(
          np.concatenate([parts[h][step]["tokens"] for h in range(shards)]),
          glob[step]["tokens"])
  with pytest.raises(ConfigError, match="divisible"):
    pipeline.train_batches(p, 30, seed=1, shard_count=4)


def test_eval_batches_have_static_shape(ptb_word):
  _, p = ptb_word
  n = len(p.blocks("test"))                       # 644 blocks
  batches = list(pipeline.eval_batches(p, "test", 100))
  assert len(batches) == -(-n // 100)
  assert all(b["tokens"].shape == b["mask"].shape == (100, 128) for b in batches)
  tokens = np.concatenate([b["tokens"] for b in batches])
  masks = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(tokens[:n], p.blocks("test"))
  assert masks.sum() == p.num_tokens("test") and not masks[n:].any()
  few = list(pipeline.eval_batches(p, "test", 8, max_blocks=10))
  assert len(few) == 2 and few[1]["mask"][2:].sum() == 0
  np.testing.assert_array_equal(few[1]["tokens"][:2], p.blocks("test")[8:10])


def test_clear_errors(tmp_path, data_dir, monkeypatch):
  with pytest.raises(ConfigError, match="unknown source"):
    pipeline.prepare(_cfg(tmp_path, source="nope"))
  with pytest.raises(ConfigError, match="unknown tokenizer"):
    pipeline.prepare(_cfg(tmp_path, source="lambada", tokenizer="nope"))
  with pytest.raises(ConfigError, match="train split"):
    pipeline.prepare(_cfg(tmp_path, source="wikitext2", tokenizer="char"))
  with pytest.raises(ConfigError, match="token-level"):
    pipeline.prepare(_cfg(tmp_path, source="lambada", tokenizer="identity"))
  with pytest.raises(ConfigError, match="DIFFUSION_TEXT_DATA or data.data_dir"):
    pipeline.prepare(_cfg(tmp_path, data_dir=str(tmp_path / "missing")))
  monkeypatch.delenv("DIFFUSION_TEXT_DATA")
  # Outside a source checkout (no ../shared/data default) and no env var.
  monkeypatch.setattr(config_lib, "_source_checkout", lambda: False)
  with pytest.raises(ConfigError, match="DIFFUSION_TEXT_DATA"):
    pipeline.prepare(_cfg(tmp_path))
