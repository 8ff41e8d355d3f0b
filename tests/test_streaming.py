"""Streaming preparation: corpora of files, text8, LM1B conventions, shards,
worker tokenization, resume after a kill, atomicity, offline catalog errors."""

import gzip
import json
import sys
import threading
import time

import numpy as np
import pytest

from diffusion_text.config import Config, ConfigError, DataConfig
from diffusion_text.data import packing, pipeline, shards, sources, tokenizers


def _cfg(tmp_path, **data) -> Config:
  data.setdefault("cache_dir", str(tmp_path / "cache"))
  return Config(data=DataConfig(**data))


def _words(rng, n):
  vocab = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]
  return " ".join(rng.choice(vocab, size=n))


@pytest.fixture
def corpus(tmp_path):
  """An OpenWebText-format corpus: .txt, .jsonl and .jsonl.gz files, 40 documents."""
  rng = np.random.default_rng(0)
  docs = [_words(rng, int(rng.integers(1, 30))) for _ in range(40)]
  root = tmp_path / "owt"
  (root / "sub").mkdir(parents=True)
  (root / "a.txt").write_text("\n".join(docs[:10]) + "\n")
  with open(root / "b.jsonl", "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs[10:25])
  with gzip.open(root / "sub" / "c.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs[25:])
  (root / "notes.md").write_text("not a corpus file")
  return root, docs


def _expected(tok, docs, seq_len):
  return pipeline.pack(tok.encode_batch(docs), tok.eos_id, seq_len)


def test_owt_format_holds_out_the_last_documents(tmp_path, corpus, data_dir):
  root, docs = corpus
  cfg = _cfg(tmp_path, source="owt", path=str(root), tokenizer="gpt2",
             seq_len=32, valid_docs=7, shard_blocks=4)
  p = pipeline.prepare(cfg)
  assert p.splits == ("train", "valid")
  for split, part in (("train", docs[:-7]), ("valid", docs[-7:])):
    tokens_NxL, length_N = _expected(p.tokenizer, part, 32)
    np.testing.assert_array_equal(p.blocks(split), tokens_NxL)
    assert p.num_blocks(split) == len(tokens_NxL)
    assert p.num_tokens(split) == length_N.sum()
  # EOS (<|endoftext|>) closes every document.
  assert (p.blocks("valid") == 50256).sum() == 7
  # Several shards under TFDS's names, none half-written, no resume state.
  names = sorted(f.name for f in p.cache_path.iterdir())
  assert "token_blocks-train.array_record-00001-of-00002" in names
  assert not [n for n in names if n.endswith((".tmp", ".npz")) or n == "state"]


def test_prepared_folder_is_a_tfds_dataset(tmp_path, corpus):
  import tensorflow_datasets as tfds
  root, docs = corpus
  p = pipeline.prepare(_cfg(tmp_path, source="files", path=str(root),
                            tokenizer="word", seq_len=8, valid_docs=5,
                            shard_blocks=6))
  builder = tfds.builder_from_directory(str(p.cache_path))
  assert builder.info.name == "token_blocks"
  assert builder.info.features["tokens"].shape == (8,)
  assert builder.info.metadata["tokenizer"] == "word"
  by_name = tfds.data_source("token_blocks", split="valid", download=False,
                             data_dir=str(p.cache_path.parents[1]))
  for split in ("train", "valid"):
    info = builder.info.splits[split]
    assert info.num_examples == p.num_blocks(split) == len(p.blocks(split))
    assert all(n >= 6 for n in info.shard_lengths[:-1])
    ds = builder.as_data_source(split=split)
    tokens = np.stack([r["tokens"] for r in ds])
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, p.blocks(split))
    np.testing.assert_array_equal([r["length"] for r in ds],
                                  p.masks(split).sum(1))
  assert builder.info.splits["train"].num_shards > 1
  np.testing.assert_array_equal(by_name[0]["tokens"], p.blocks("valid")[0])
  assert "tensorflow" not in sys.modules       # array_record without TF


def test_an_empty_split_is_listed_and_reads_empty(tmp_path, corpus):
  import tensorflow_datasets as tfds
  root, _ = corpus
  p = pipeline.prepare(_cfg(tmp_path, source="files", path=str(root),
                            tokenizer="char", seq_len=8, valid_docs=0))
  assert p.num_blocks("valid") == 0 and p.blocks("valid").shape == (0, 8)
  assert list(pipeline.eval_batches(p, "valid", 4)) == []
  splits = tfds.builder_from_directory(str(p.cache_path)).info.splits
  assert splits["valid"].shard_lengths == [0]
  assert splits["train"].num_examples == p.num_blocks("train") > 0


def test_glob_and_file_documents(tmp_path, corpus):
  root, docs = corpus
  src = sources.get_source("files", path=str(root / "*.jsonl"), valid_docs=5)
  assert list(src.documents("train")) + list(src.documents("valid")) == docs[10:25]
  src = sources.get_source("files", path=str(root / "a.txt"), valid_docs=0,
                           txt_document="file")
  assert list(src.documents("train")) == ["\n".join(docs[:10]) + "\n"]
  with pytest.raises(ConfigError, match="data.path"):
    sources.get_source("owt", path=str(tmp_path / "nothing*"))
  with pytest.raises(ConfigError, match="txt_document"):
    sources.get_source("files", path=str(root), txt_document="para")


def test_parquet_documents(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["one doc", "two docs"]}), tmp_path / "d.parquet")
  src = sources.get_source("files", path=str(tmp_path), valid_docs=1)
  assert list(src.documents("train")) == ["one doc"]


def test_workers_give_the_same_blocks(tmp_path, corpus, monkeypatch):
  root, docs = corpus
  tok = tokenizers.make_tokenizer("word", None, docs)
  chunks = list(packing.chunked(docs, 3))
  inline = list(packing.encode_chunks(chunks, tok, None, workers=1))
  parallel = list(packing.encode_chunks(chunks, tok, None, workers=2))
  assert [n for n, _ in parallel] == [len(c) for c in chunks]
  for (_, a), (_, b) in zip(inline, parallel):
    assert [u.tolist() for u in a] == [u.tolist() for u in b]


def test_text8_split_and_chunks(tmp_path):
  rng = np.random.default_rng(1)
  chars = np.array(list("abcdefghijklmnopqrstuvwxyz "))
  text = "".join(rng.choice(chars, size=20_000))
  path = tmp_path / "text8"
  path.write_text(text)                      # no newline, as the real file
  cfg = _cfg(tmp_path, source="text8", path=str(path), tokenizer="text8",
             seq_len=256)
  p = pipeline.prepare(cfg)
  assert p.vocab_size == 27 and p.tokenizer.eos_id is None
  spans = {"train": text[:18_000], "valid": text[18_000:19_000],
           "test": text[19_000:]}            # 90% / 5% / 5%
  for split, span in spans.items():
    assert p.num_tokens(split) == len(span)
    assert p.num_blocks(split) == -(-len(span) // 256)
    assert p.tokenizer.decode(p.blocks(split)[p.masks(split) == 1]) == span
  with pytest.raises(ConfigError, match="text8 file"):
    sources.get_source("text8", path=None)
  with pytest.raises(ConfigError, match="a-z and space"):
    p.tokenizer.encode("Hello")


def _lm1b_release(root, sentences):
  train = root / "training-monolingual.tokenized.shuffled"
  test = root / "heldout-monolingual.tokenized.shuffled"
  train.mkdir(parents=True)
  test.mkdir()
  (train / "news.en-00001-of-00100").write_text("\n".join(sentences[:6]) + "\n")
  (test / "news.en.heldout-00000-of-00050").write_text("\n".join(sentences[6:]) + "\n")


def test_lm1b_padding_and_packing_conventions(tmp_path, data_dir):
  rng = np.random.default_rng(2)
  sentences = [_words(rng, int(n)) + " ." for n in rng.integers(2, 40, size=9)]
  _lm1b_release(tmp_path / "lm1b", sentences)
  base = dict(source="lm1b", path=str(tmp_path / "lm1b"), tokenizer="bert",
              seq_len=16)
  pad = pipeline.prepare(_cfg(tmp_path, packing="pad", **base))
  cat = pipeline.prepare(_cfg(tmp_path, packing="concat", **base))
  tok = pad.tokenizer
  units = [ids + [tok.eos_id] for ids in tok.encode_batch(sentences[:6])]
  # pad: one block per sentence, [SEP]-terminated, truncated to 16
  assert pad.num_blocks("train") == 6
  for row, mask, unit in zip(pad.blocks("train"), pad.masks("train"), units):
    assert row[mask == 1].tolist() == unit[:16]
  # concat: sentences packed back to back
  np.testing.assert_array_equal(cat.blocks("train"),
                                _expected(tok, sentences[:6], 16)[0])
  assert pad.provenance()["packing"] == "pad"
  with pytest.raises(ConfigError, match="data.packing"):
    pipeline.prepare(_cfg(tmp_path, packing="wrap", **base))
  with pytest.raises(ConfigError, match="data.shard_blocks"):
    pipeline.prepare(_cfg(tmp_path, shard_blocks=0, **base))


def _prepare_fresh(tmp_path, cfg):
  """The same dataset prepared uninterrupted in another cache."""
  return pipeline.prepare(_cfg(tmp_path / "fresh", **{
      k: getattr(cfg.data, k) for k in ("source", "path", "tokenizer", "seq_len",
                                        "valid_docs", "shard_blocks")}))


def test_resume_after_a_kill_keeps_finished_shards(tmp_path, corpus, monkeypatch):
  root, docs = corpus
  cfg = _cfg(tmp_path, source="files", path=str(root), tokenizer="char",
             seq_len=8, valid_docs=4, shard_blocks=10)
  monkeypatch.setattr(pipeline, "CHUNK_DOCS", 4)
  real, calls = packing.encode_chunks, []

  def killed(*args, **kwargs):
    for i, item in enumerate(real(*args, **kwargs)):
      if len(calls) == 6:
        raise KeyboardInterrupt
      calls.append(i)
      yield item
  monkeypatch.setattr(packing, "encode_chunks", killed)
  with pytest.raises(KeyboardInterrupt):
    pipeline.prepare(cfg)
  prepared_dir = tmp_path / "cache" / "prepared"
  (partial,) = prepared_dir.glob("*.partial")
  finished = sorted(partial.rglob("train-*.array_record"))
  # Finished shards are kept; no complete dataset is visible yet.
  assert finished
  assert {f.suffix for f in prepared_dir.iterdir()} == {".partial", ".lock"}
  stamps = [f.stat().st_mtime_ns for f in finished]

  monkeypatch.setattr(packing, "encode_chunks", real)
  resumed = pipeline.prepare(cfg)
  published = sorted(resumed.cache_path.glob("token_blocks-train.*"))
  assert len(published) > len(finished)
  for path, stamp in zip(published, stamps):  # kept (renamed), not rewritten
    assert path.stat().st_mtime_ns == stamp
  fresh = _prepare_fresh(tmp_path, cfg)
  for split in ("train", "valid"):
    np.testing.assert_array_equal(resumed.blocks(split), fresh.blocks(split))
    assert resumed.num_tokens(split) == fresh.num_tokens(split)


def test_concurrent_preparers_agree(tmp_path, corpus):
  root, _ = corpus
  cfg = _cfg(tmp_path, source="files", path=str(root), tokenizer="word",
             seq_len=8, valid_docs=4)
  out = []
  threads = [threading.Thread(target=lambda: out.append(pipeline.prepare(cfg)))
             for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(out) == 2 and out[0].cache_path == out[1].cache_path
  np.testing.assert_array_equal(out[0].blocks("train"), out[1].blocks("train"))


def test_eval_batches_stream_without_loading_the_split(tmp_path, corpus, monkeypatch):
  root, docs = corpus
  p = pipeline.prepare(_cfg(tmp_path, source="files", path=str(root),
                            tokenizer="word", seq_len=8, valid_docs=4))
  whole = p.blocks("train").copy()
  monkeypatch.setattr(pipeline.Prepared, "_load", lambda *a: pytest.fail("loaded"))
  batches = list(pipeline.eval_batches(p, "train", 5))
  tokens = np.concatenate([b["tokens"] for b in batches])[:len(whole)]
  np.testing.assert_array_equal(tokens, whole)
  assert sum(b["mask"].sum() for b in batches) == p.num_tokens("train")


@pytest.mark.parametrize("name", ["tfds:lm1b", "hf:openwebtext"])
def test_catalog_sources_fail_fast_offline(name, tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):   # restored afterwards
    monkeypatch.setenv(var, "1")
  start = time.monotonic()
  with pytest.raises(ConfigError, match="allow_download|pip install datasets"):
    pipeline.prepare(_cfg(tmp_path, source=name, tokenizer="gpt2"))
  assert time.monotonic() - start < 5


def test_a_kill_while_publishing_resumes(tmp_path, corpus, monkeypatch):
  import tensorflow_datasets as tfds
  root, _ = corpus
  cfg = _cfg(tmp_path, source="files", path=str(root), tokenizer="char",
             seq_len=8, valid_docs=4, shard_blocks=10)
  real = tfds.folder_dataset.write_metadata

  def killed(**kwargs):
    raise KeyboardInterrupt           # after the shards took their TFDS names
  monkeypatch.setattr(tfds.folder_dataset, "write_metadata", killed)
  with pytest.raises(KeyboardInterrupt):
    pipeline.prepare(cfg)
  (partial,) = (tmp_path / "cache" / "prepared").glob("*.partial")
  assert list(partial.rglob("token_blocks-train.array_record-00000-of-*"))
  monkeypatch.setattr(tfds.folder_dataset, "write_metadata", real)
  encode = packing.encode_chunks
  monkeypatch.setattr(packing, "encode_chunks", lambda *a, **k: pytest.fail("re-encoded"))
  resumed = pipeline.prepare(cfg)
  monkeypatch.setattr(packing, "encode_chunks", encode)
  fresh = _prepare_fresh(tmp_path, cfg)
  np.testing.assert_array_equal(resumed.blocks("train"), fresh.blocks("train"))


def test_batch_decoding_matches_tfds():
  feats = shards.features(4)
  rows = [({"tokens": np.array([3, 1, 4, 0], np.int32), "length": 3}),
          ({"tokens": np.array([2**31 - 1, 0, 7, 9], np.int32), "length": 4})]
  records = [feats.serialize_example(r) for r in rows]
  tokens_BxL, length_B = shards.decode_batch(records, 4)
  for row, tokens_L, n, record in zip(rows, tokens_BxL, length_B, records):
    ref = feats.deserialize_example_np(record)
    np.testing.assert_array_equal(tokens_L, ref["tokens"])
    np.testing.assert_array_equal(tokens_L, row["tokens"])
    assert n == ref["length"] == row["length"]
  with pytest.raises(ValueError):               # a block of another length
    shards.decode_batch(records, 5)
