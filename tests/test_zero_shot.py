"""The zero-shot suite: SEDD's block rule, per-block keys, the AR identity
and a suite run on a tiny GPT-2-vocabulary model trained here."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_text import cli, config as config_lib, models, processes
from diffusion_text import run as run_lib, train
from diffusion_text.eval import zero_shot, zero_shot_table
from tests.helpers import strict_json

QUIET = lambda m: None
L = 16
MAX_BLOCKS = 3


# ------------------------------------------------------------ block rules


def test_sedd_groups_follow_hf_contiguous_shards():
  # 8 shards of 17 rows: the first 17 % 8 = 1 shard holds 3 rows, the rest 2.
  groups = zero_shot.sedd_groups(17, num_proc=8, batch=1000)
  assert [b - a for a, b in groups] == [3] + [2] * 7
  assert groups[0] == (0, 3) and groups[-1] == (15, 17)
  # 2,503 rows: shards of 313 (7 of them) and 312; no batch spans a shard.
  groups = zero_shot.sedd_groups(2503, num_proc=8, batch=100)
  assert sum(b - a for a, b in groups) == 2503 and len(groups) == 8 * 4
  assert groups[3] == (300, 313) and groups[4] == (313, 413)


def test_sedd_blocks_drop_each_groups_remainder():
  units = [np.full(n, i, np.int32) for i, n in enumerate([5, 4, 3, 9])]
  # 4 rows -> shards of one row each; a row of 9 gives two blocks of 4.
  tokens_NxL, length_N = zero_shot.sedd_blocks(units, seq_len=4)
  assert tokens_NxL.tolist() == [[0] * 4, [1] * 4, [3] * 4, [3] * 4]
  assert length_N.tolist() == [4] * 4
  c = zero_shot.counts(units, seq_len=4)
  assert c["sedd"] == {"tokens": 16, "blocks": 4}
  assert c["whole"] == {"tokens": 21, "blocks": 6}


# ------------------------------------------------- per-block Monte-Carlo keys
@pytest.fixture(scope="module")
def tiny_masked():
  process = processes.make_process("masked", vocab_size=20)
  model = models.build_model(process.model_spec, config_lib.ModelConfig(
      num_layers=1, d_model=16, num_heads=2, mlp_ratio=2, cond_dim=8), seed=0)
  graphdef, params = nnx.split(model)
  tokens_NxL = np.asarray(jax.random.randint(jax.random.key(1), (7, 8), 0, 20),
                          np.int32)
  return process, graphdef, params, tokens_NxL


def _score(tiny, batch_size, seed=0):
  process, graphdef, params, tokens_NxL = tiny
  batches = zero_shot._array_batches(tokens_NxL, np.full(7, 8), batch_size, 0)
  return zero_shot.score_blocks(process, graphdef, params, batches,
                                mc_samples=3, seed=seed)


def test_block_figures_do_not_depend_on_batch_size(tiny_masked):
  a, b = _score(tiny_masked, 2), _score(tiny_masked, 7)
  assert a["num_blocks"] == b["num_blocks"] == 7
  assert a["nats_per_token"] == pytest.approx(b["nats_per_token"], rel=1e-5)
  # The SEM is over per-block figures: equal only if every block is.
  assert a["nats_per_token_sem"] == pytest.approx(b["nats_per_token_sem"],
                                                  rel=1e-4)
  c = _score(tiny_masked, 7, seed=1)
  assert abs(c["nats_per_token"] - b["nats_per_token"]) > 1e-4


# -------------------------------------------------------------- tables
def _result(name, ppl):
  entry = lambda p: {"perplexity_bound": p, "perplexity_sem": 0.5}
  return {"model": name, "process": "masked",
          "manifest": {"protocol": {"name": "sedd"}},
          "sets": {k: entry(p) for k, p in ppl.items()}}


def test_tables_bold_the_best_bound_per_column():
  rows = [_result("a", {"ptb": 100.0, "lm1b": 50.0}),
          _result("b", {"ptb": 90.0})]
  md, tex = zero_shot_table.tables(rows)
  assert md.splitlines()[0] == "| model | PTB | 1BW |"
  assert "**≤ 90.00 ± 0.50**" in md and "| ≤ 100.00 ± 0.50 |" in md
  assert "**≤ 50.00 ± 0.50**" in md and "| – |" in md
  assert "\\textbf{$\\le$ 90.00 $\\pm$ 0.50}" in tex


# ------------------------------------- a tiny GPT-2-vocabulary model, trained
@pytest.fixture(scope="module")
def ar_workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("zs")
  text = config_lib.data_dir(config_lib.Config()) / "tinyshakespeare" / "input.txt"
  if not text.exists():
    pytest.skip(f"{text} not found")
  corpus = root / "tiny.txt"
  corpus.write_text(text.read_text()[:40_000])
  cfg = config_lib.apply_overrides(config_lib.load_preset("synthetic_ar"), [
      "data.source=text", f"data.path={corpus}", "data.tokenizer=gpt2",
      f"data.seq_len={L}", "train.steps=2", "train.checkpoint_every=2",
      "eval.batch_size=2"])
  train.train(cfg, root / "ar", log=QUIET)
  return root / "ar"


def test_suite_on_a_trained_gpt2_vocabulary_model(ar_workdir, capsys):
  assert cli.main(["eval", "--suite", "zero-shot", "--workdir",
                   str(ar_workdir), "--sets", "ptb,wikitext2",
                   "--max-blocks", str(MAX_BLOCKS)]) == 0
  out = strict_json((ar_workdir / "zero_shot.json").read_text())
  assert set(out["sets"]) == {"ptb", "wikitext2"}
  for name, r in out["sets"].items():
    assert r["blocks"] == MAX_BLOCKS and r["tokens"] == MAX_BLOCKS * L
    assert r["perplexity_bound"] == pytest.approx(math.exp(r["nll_bound"]))
    counts = out["manifest"]["sets"][name]["counts"]
    assert r["blocks_in_set"] == counts["sedd"]["blocks"]
    assert counts["sedd"]["tokens"] <= counts["whole"]["tokens"]
  m = out["manifest"]
  assert m["protocol"]["name"] == "sedd" and m["protocol"]["block_length"] == L
  assert m["tokenizer"]["name"] == "gpt2" and m["commit"]
  assert m["sets"]["ptb"]["detokenizer"] == "ptb_detokenizer"
  assert "ptb.test.txt" in m["sets"]["ptb"]["files_sha256"]
  assert "≤" in (ar_workdir / "zero_shot.md").read_text()
  assert "\\le" in (ar_workdir / "zero_shot.tex").read_text()
  capsys.readouterr()
  assert cli.main(["compare", "--suite", "zero-shot", str(ar_workdir)]) == 0
  assert "| model | WikiText2 | PTB |" in capsys.readouterr().out


def test_ar_suite_perplexity_is_exp_of_its_mean_token_nll(ar_workdir):
  res = zero_shot.evaluate_suite(ar_workdir, [f"eval.max_blocks={MAX_BLOCKS}"],
                                 sets=["ptb"], log=QUIET)
  run, params, _ = run_lib.open_workdir(ar_workdir, log=QUIET)
  units, _ = zero_shot.set_units("ptb", run.prepared.tokenizer)
  x_NxL = zero_shot.sedd_blocks(units, L)[0][:MAX_BLOCKS]
  # Independently: the causal network behind BOS (= V), log-softmax by hand.
  bos = np.full((MAX_BLOCKS, 1), run.process.vocab_size, np.int32)
  inputs = np.concatenate([bos, x_NxL[:, :-1]], axis=1)
  model = nnx.merge(run.graphdef, params)
  logits = np.asarray(model(jnp.asarray(inputs), jnp.zeros(MAX_BLOCKS)),
                      np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, x_NxL[..., None], -1).mean()
  assert res["sets"]["ptb"]["perplexity_bound"] == pytest.approx(
      math.exp(nll), rel=1e-4)


def test_whole_rule_keeps_every_token(ar_workdir):
  res = zero_shot.evaluate_suite(ar_workdir, ["eval.max_blocks=2"],
                                 sets=["wikitext2"], protocol="whole",
                                 log=QUIET)
  counts = res["manifest"]["sets"]["wikitext2"]["counts"]
  # The pipeline's packing and the row count agree on the block count.
  assert res["sets"]["wikitext2"]["blocks_in_set"] == counts["whole"]["blocks"]
  assert counts["whole"]["blocks"] > counts["sedd"]["blocks"]
  assert res["manifest"]["protocol"]["name"] == "whole"


def test_unknown_set_names_the_choices(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="lambada,wikitext2"):
    zero_shot.evaluate_suite(tmp_path, sets=["ptb", "wt2"], log=QUIET)
