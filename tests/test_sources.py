"""Sources: row rules against published counts; the synthetic chain's exact entropy."""

import itertools

import numpy as np
import pytest

from diffusion_text import config as config_lib
from diffusion_text.config import ConfigError
from diffusion_text.data import sources


def test_registry():
  assert set(sources.names()) >= {"ptb", "tinyshakespeare", "text", "wikitext2",
                                  "wikitext103", "lambada", "lm1b", "synthetic"}


def test_ptb_rows(data_dir):
  src = sources.get_source("ptb", data_dir)
  assert src.splits == ("train", "valid", "test")
  test = list(src.documents("test"))
  assert len(test) == 3761
  # Mikolov's count: words plus one <eos> per row.
  assert sum(len(d.split()) + 1 for d in test) == 82_430
  assert all(d == d.strip() for d in test)
  assert [p.name for p in src.files("test")] == ["ptb.test.txt"]


@pytest.mark.parametrize("name", ["wikitext2", "wikitext103"])
def test_wikitext_rows_match_hf_sizes(name, data_dir):
  src = sources.get_source(name, data_dir)
  assert src.splits == ("valid", "test")
  # HF dataset_infos.json of wikitext-*-raw-v1: rows and Arrow num_bytes,
  # which is the UTF-8 text plus one 4-byte offset per row plus one more.
  for split, rows, nbytes in (("test", 4358, 1_305_092), ("valid", 3760, 1_159_292)):
    docs = list(src.documents(split))
    assert len(docs) == rows
    assert sum(len(d.encode("utf-8")) for d in docs) + 4 * (rows + 1) == nbytes
  docs = list(src.documents("test"))
  assert "" in docs and all(d == "" or d.endswith("\n") for d in docs)


def test_lambada_and_lm1b(data_dir):
  lam = sources.get_source("lambada", data_dir)
  assert lam.splits == ("test",) and len(list(lam.documents("test"))) == 5153
  lm1b = sources.get_source("lm1b", data_dir)
  files = lm1b.files("test")
  assert [f.name for f in files] == sorted(f.name for f in files) and len(files) == 5
  docs = list(lm1b.documents("test"))
  assert len(docs) == 30_396
  first = files[0].read_text("utf-8").split("\n")[0].strip()
  assert docs[0] == first


def test_tinyshakespeare_contiguous_split(data_dir):
  src = sources.get_source("tinyshakespeare", data_dir)
  parts = [list(src.documents(s)) for s in ("train", "valid", "test")]
  assert [len(p) for p in parts] == [36_000, 2_000, 2_000]
  text = (data_dir / "tinyshakespeare" / "input.txt").read_text("utf-8")
  assert "\n".join(sum(parts, [])) + "\n" == text


def test_text_source(tmp_path):
  path = tmp_path / "corpus.txt"
  lines = [f"line {i}" for i in range(100)]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  src = sources.get_source("text", None, str(path))
  assert list(src.documents("train")) == lines[:90]
  assert list(src.documents("valid")) == lines[90:95]
  assert list(src.documents("test")) == lines[95:]
  assert src.files() == [path]
  with pytest.raises(ConfigError, match="data.path"):
    sources.get_source("text", None, None)
  with pytest.raises(ConfigError, match="data.path"):
    sources.get_source("text", None, str(tmp_path / "missing.txt"))


def test_clear_errors(tmp_path, monkeypatch, data_dir):
  with pytest.raises(ConfigError, match="unknown source 'ptbb'.*wikitext2"):
    sources.get_source("ptbb", data_dir)
  with pytest.raises(ConfigError, match="DIFFUSION_TEXT_DATA or data.data_dir"):
    sources.get_source("ptb", tmp_path / "nowhere")
  with pytest.raises(ConfigError, match="ptb.train.txt.*DIFFUSION_TEXT_DATA"):
    sources.get_source("ptb", tmp_path)   # exists, but holds no corpus
  monkeypatch.delenv("DIFFUSION_TEXT_DATA")
  # Outside a source checkout (no ../shared/data default) and no env var.
  monkeypatch.setattr(config_lib, "_source_checkout", lambda: False)
  with pytest.raises(ConfigError, match="DIFFUSION_TEXT_DATA"):
    sources.get_source("lambada")
  with pytest.raises(ConfigError, match="no split 'train'"):
    sources.get_source("lambada", data_dir).documents("train")
  sources.get_source("synthetic")   # needs no data directory


# ------------------------------------------------------------------ synthetic
def _block_log_prob(src, x_NxL):
  p, pi = src.transition, src.stationary
  logp = np.log(pi[x_NxL[:, 0]])
  return logp + np.log(p[x_NxL[:, :-1], x_NxL[:, 1:]]).sum(axis=1)


def test_chain_is_stochastic_and_stationary():
  src = sources.MarkovSource(vocab_size=8, seed=3)
  p, pi = src.transition, src.stationary
  np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
  np.testing.assert_allclose(pi @ p, pi, atol=1e-12)
  assert (pi > 0).all() and abs(pi.sum() - 1) < 1e-12
  # "Sparse-ish": most mass of a row on few symbols, so the chain is far
  # from uniform (entropy rate well below log V).
  assert src.entropy_rate() < 0.8 * np.log(8)


@pytest.mark.parametrize("length", [1, 2, 4])
def test_block_entropy_matches_brute_force(length):
  src = sources.MarkovSource(vocab_size=3, seed=1)
  seqs = np.array(list(itertools.product(range(3), repeat=length)))
  logp = _block_log_prob(src, seqs)
  assert abs(np.exp(logp).sum() - 1) < 1e-12
  brute = -(np.exp(logp) * logp).sum() / length
  assert abs(src.entropy_per_token(length) - brute) < 1e-12


def test_generated_blocks_follow_the_chain():
  src = sources.MarkovSource()
  x_NxL = src.token_blocks("train", 16)
  assert x_NxL.dtype == np.int32 and x_NxL.shape == (65536 // 16, 16)
  assert x_NxL.min() >= 0 and x_NxL.max() < src.vocab_size
  np.testing.assert_array_equal(x_NxL, src.token_blocks("train", 16))
  assert not np.array_equal(src.token_blocks("valid", 16),
                            src.token_blocks("test", 16))
  # Monte-Carlo entropy of the generated blocks agrees with the exact value.
  nll_N = -_block_log_prob(src, x_NxL) / 16
  sem = nll_N.std() / np.sqrt(len(nll_N))
  assert abs(nll_N.mean() - src.entropy_per_token(16)) < 4 * sem
  # First tokens follow the stationary distribution.
  freq = np.bincount(x_NxL[:, 0], minlength=src.vocab_size) / len(x_NxL)
  assert np.abs(freq - src.stationary).max() < 4 * np.sqrt(0.25 / len(x_NxL))
