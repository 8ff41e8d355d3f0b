"""Compute-matched comparison: budgets, configs, paired rows, outputs."""

import pytest

from diffusion_text import cli, config as config_lib, train
from diffusion_text.eval import compare
from tests.helpers import strict_json


def _cfg():
  return config_lib.apply_overrides(config_lib.load_preset("synthetic_masked"),
                                    ["data.batch_size=16", "data.seq_len=16"])


def test_budget_parsing_and_clear_errors():
  assert compare.parse_budget("tokens=5e5") == ("tokens", 500000.0)
  for bad in ("tokens", "tokens=0", "parameters=5", "seconds=abc"):
    with pytest.raises(config_lib.ConfigError, match="KIND=N"):
      compare.parse_budget(bad)


def test_tokens_and_seconds_budgets():
  cfg = _cfg()  # 16 x 16 = 256 tokens per step
  assert compare.budget_overrides(cfg, ("tokens", 256 * 30 + 100)) == [
      "train.steps=30"]
  assert compare.budget_overrides(cfg, ("seconds", 90.0)) == [
      "train.max_seconds=90.0"]


def test_flops_budget_uses_the_shared_counter():
  from diffusion_text import flops
  from diffusion_text.data import pipeline
  cfg = _cfg()
  per_step = flops.train_flops_per_step(cfg, pipeline.prepare(cfg).vocab_size)
  assert per_step > 0
  assert compare.budget_overrides(cfg, ("flops", 25.5 * per_step)) == [
      "train.steps=25"]


def test_rows_share_backbone_and_data():
  family = compare.process_config("ptb", "gaussian")
  assert family.name == "ptb_gaussian" and family.process.options
  swapped = compare.process_config("synthetic_ar", "masked", ["train.lr=1e-3"])
  assert swapped.process.name == "masked" and not swapped.process.options
  base = config_lib.load_preset("synthetic_ar")
  assert swapped.model == base.model and swapped.data == base.data
  assert swapped.train.lr == 1e-3


def test_cli_refuses_half_a_comparison(capsys):
  assert cli.main(["compare", "--processes", "masked,ar"]) == 2
  assert "--budget" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_trains_evaluates_and_writes(tmp_path):
  out = tmp_path / "cmp"
  res = compare.run_compare(train.train, ["masked", "ar"],
                            ("tokens", 256 * 12), "synthetic", out,
                            reference="ar", steps_list=[2, 4], num=2,
                            overrides=["eval.max_blocks=32"],
                            log=lambda m: None)
  rows = {r["name"]: r for r in res["rows"]}
  assert rows["masked"]["train_steps"] == 12 == rows["ar"]["train_steps"]
  d = rows["masked"]["diff_vs_reference"]
  assert abs(d["diff_nats_per_token"] - (rows["masked"]["nats_per_token"]
                                         - rows["ar"]["nats_per_token"])) < 1e-6
  assert rows["ar"]["diff_vs_reference"] is None
  assert [q["steps"] for q in rows["masked"]["quality"]] == [2, 4, None]
  assert res["judge"]["workdir"].endswith("ar")
  saved = strict_json((out / "results.json").read_text())
  assert saved["budget"] == {"kind": "tokens", "value": 3072.0}
  md = (out / "results.md").read_text()
  assert "**" in md and "Δ NLL vs ar" in md and "gen. perplexity" in md
  assert "\\mathbf" in (out / "results.tex").read_text()
  for name in ("curves.png", "bound_vs_tokens.png", "bound_vs_tokens.pdf",
               "quality.png", "quality.pdf", "quality.md"):
    assert (out / name).stat().st_size > 0, name
  # The table over existing workdirs still works, with paired differences.
  table = compare.table_over_workdirs([out / "ar", out / "masked"], "test")
  assert "Δ NLL vs ar (ar)" in table
