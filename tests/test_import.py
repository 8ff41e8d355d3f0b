"""`diffusion-text import`: each published-checkpoint fixture becomes a
workdir that `eval` and `sample` accept (tiny models, token-level corpus)."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest

from diffusion_text import cli, config as config_lib, importer, run as run_lib
from diffusion_text.eval import likelihood, samples

from tests.test_convert import CKPT, needs_fixtures

FIXTURES = {
    "sedd_absorb_tiny": ("sedd_absorb", "sedd_dit"),
    "sedd_uniform_tiny": ("sedd_uniform", "sedd_dit"),
    "mdlm_tiny/time_conditioning_false": ("masked", "mdlm_dit"),
    "gpt2_tiny": ("ar", "gpt2"),
}
FAST = ["eval.max_blocks=2", "eval.batch_size=2", "sample.num=1",
        "sample.steps=4", "sample.length=16"]


@needs_fixtures
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_import_eval_sample(name, tmp_path, data_dir):
  process, backbone = FIXTURES[name]
  wd = importer.import_workdir(str(CKPT / name), tmp_path / "w",
                               log=lambda m: None)
  cfg = run_lib.load_config(wd)
  assert (cfg.process.name, cfg.model.backbone) == (process, backbone)
  assert cfg.data.source == "synthetic" and cfg.model.vocab_size == 50
  res = likelihood.evaluate_workdir(wd, FAST, log=lambda m: None)
  assert res["num_blocks"] == 2 and res["num_tokens"] == 2 * 32
  # A random tiny model on 50 ids is no better than a few nats per token.
  assert math.isfinite(res["nats_per_token"]) and res["nats_per_token"] > 1.0
  texts = samples.sample_workdir(wd, FAST, log=lambda m: None)
  ids = [int(w) for w in texts[0].split()]
  assert len(ids) == 16 and all(0 <= i < 50 for i in ids)
  record = json.loads((wd / "import.json").read_text())
  assert record["kind"] in ("sedd", "mdlm", "gpt2") and record["files_sha256"]


@needs_fixtures
def test_cli_import_refuses_a_second_import(tmp_path, data_dir, capsys):
  src = str(CKPT / "sedd_absorb_tiny")
  assert cli.main(["import", src, "--workdir", str(tmp_path / "w")]) == 0
  cfg = run_lib.load_config(tmp_path / "w")
  assert cfg.process.options["time_input"] == "total_noise"
  assert cli.main(["import", src, "--workdir", str(tmp_path / "w")]) == 2
  assert "already holds a checkpoint" in capsys.readouterr().err


@needs_fixtures
def test_vocabulary_that_does_not_fit_is_refused(tmp_path, data_dir):
  # PTB's word vocabulary (10k ids) does not fit a 50-id checkpoint.
  with pytest.raises(config_lib.ConfigError, match="model.vocab_size=50"):
    importer.import_workdir(str(CKPT / "sedd_absorb_tiny"), tmp_path / "w",
                            tokenizer="word", corpus="ptb",
                            log=lambda m: None)


def test_hf_source_without_hub_is_one_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)
  with pytest.raises(config_lib.ConfigError, match="pip install huggingface_hub"):
    importer.resolve_source("hf:louaaron/sedd-small")


def test_hf_source_offline_is_one_clear_error(monkeypatch):
  def offline(*args, **kwargs):
    raise OSError("no network")
  fake = types.SimpleNamespace(snapshot_download=offline)
  monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
  with pytest.raises(config_lib.ConfigError, match="go online"):
    importer.resolve_source("hf:gpt2")


def test_missing_folder_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    importer.resolve_source(str(tmp_path))
