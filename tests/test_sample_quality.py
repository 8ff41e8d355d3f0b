"""Generative quality: judge perplexity, entropy, repetition, call counts."""

import math

import numpy as np
import pytest

from diffusion_text import config as config_lib, train
from diffusion_text.data import pipeline
from diffusion_text.eval import likelihood, sample_quality as sq
from tests.conftest import DATA
from tests.helpers import strict_json

TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2",
        "model.mlp_ratio=2", "model.cond_dim=16", "data.seq_len=32",
        "data.batch_size=8", "train.steps=6", "train.warmup_steps=2",
        "train.log_every=3", "train.checkpoint_every=6", "eval.batch_size=4",
        "eval.max_blocks=6", "sample.num=2", "sample.length=12"]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
  if not DATA.exists():
    pytest.skip(f"data directory {DATA} not found (set DIFFUSION_TEXT_DATA)")
  cfg = config_lib.apply_overrides(config_lib.load_preset("ptb_ar"), TINY)
  workdir = tmp_path_factory.mktemp("judge")
  train.train(cfg, workdir, log=lambda m: None)
  return workdir


def test_unigram_entropy_and_repeats():
  assert math.isclose(sq.unigram_entropy([3, 1, 4, 2]), math.log(4))
  assert sq.unigram_entropy([5, 5, 5]) == 0.0
  # bigrams (1,2) (2,1) (1,2) (2,1) (1,2): 2 distinct of 5.
  assert math.isclose(sq.repeated_ngram_fraction([1, 2, 1, 2, 1, 2], 2), 0.6)
  assert sq.repeated_ngram_fraction([1, 2, 3, 4], 2) == 0.0
  assert sq.repeated_ngram_fraction([1], 4) == 0.0


def test_judge_perplexity_of_held_out_text_equals_its_eval(judge_dir):
  own = likelihood.evaluate_workdir(judge_dir, log=lambda m: None)
  judge = sq.Judge.open(judge_dir, log=lambda m: None)
  tok = judge.tokenizer
  seqs = [t[m.astype(bool)]
          for b in pipeline.eval_batches(judge.run.prepared, "test", 4, 6)
          for t, m in zip(b["tokens"], b["mask"]) if m.any()]
  # Through text: decoded with the tokenizer, encoded again by the judge
  # (EOS written as a line break comes back as EOS).
  texts_ids = judge.to_judge_ids(seqs, tok, retokenize=True)
  assert [list(s) for s in seqs] == texts_ids
  for retokenize in (True, False):
    g = sq.generative_perplexity(judge, seqs, tok, retokenize)
    assert g["judge_tokens"] == own["num_tokens"]
    assert math.isclose(g["gen_ppl"], own["perplexity"], rel_tol=1e-6)
    assert math.isclose(g["gen_nll"], own["nats_per_token"], rel_tol=1e-6)


def test_blocks_split_long_sequences_and_mask_padding(judge_dir):
  judge = sq.Judge.open(judge_dir, log=lambda m: None)
  b = judge.blocks([list(range(1, 40)), [7, 8]])
  assert b["tokens"].shape == (3, 32)
  assert b["mask"].sum(-1).tolist() == [32, 7, 2]
  assert b["tokens"][1, :7].tolist() == list(range(33, 40))


def test_sample_eval_writes_rows_and_counts_network_calls(judge_dir, tmp_path):
  out = sq.sample_eval_workdir(judge_dir, judge_dir, steps_list=[4], num=2,
                               out=tmp_path, log=lambda m: None)
  row, data = out["rows"]
  # The AR sampler calls the network once per position, whatever `steps`.
  assert row["network_calls"] == 12 and row["num"] == 2
  assert row["gen_ppl"] > 1 and 0 <= row["repeated_4grams"] <= 1
  assert data["steps"] is None and data["num"] == 2
  saved = strict_json((tmp_path / "sample_eval.json").read_text())
  assert saved["judge"]["fingerprint"] and saved["commit"]
  assert (tmp_path / "sample_eval.png").stat().st_size > 0
  assert "| ar | 4 |" in (tmp_path / "sample_eval.md").read_text()
