"""The training loop: a pulse through the CLI, exact resume, refusals."""

import json

import numpy as np
import pytest

from diffusion_text import cli, config as config_lib, train

FAST = ["train.steps=12", "train.log_every=4", "train.checkpoint_every=8",
        "eval.max_blocks=8", "eval.mc_samples=1"]


def _cfg(process="masked", extra=()):
  return config_lib.apply_overrides(config_lib.load_preset(f"synthetic_{process}"),
                                    FAST + list(extra))


def _rows(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_eval_sample_pulse(tmp_path, capsys):
  wd = tmp_path / "run"
  args = ["--workdir", str(wd)] + sum((["--set", o] for o in FAST), [])
  assert cli.main(["train", "--config", "synthetic_masked"] + args) == 0
  out = capsys.readouterr().out
  assert "step 12/12" in out and "tok/s" in out and "ETA" in out
  rows = _rows(wd)
  assert rows[-1]["step"] == 12
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
  # (that the bound actually falls with training is test_properties.py's job)

  assert cli.main(["eval", "--workdir", str(wd), "--max-blocks", "8"]) == 0
  printed = capsys.readouterr().out
  result = json.loads((wd / "eval_test.json").read_text())
  assert result["bound"] == "upper" and np.isfinite(result["nats_per_token"])
  # The printed bound is the one written to JSON.
  assert f"NLL <= {result['nats_per_token']:.4f}" in printed

  assert cli.main(["sample", "--workdir", str(wd), "--num", "2",
                   "--steps", "8"]) == 0
  printed = capsys.readouterr().out
  assert printed.count("--- sample") == 2

  # Prefix prompt and infill through the CLI keep the fixed tokens.
  assert cli.main(["sample", "--workdir", str(wd), "--num", "2", "--steps",
                   "8", "--prompt", "1 2 3"]) == 0
  rows = [l for l in capsys.readouterr().out.splitlines() if not l.startswith(("---", "["))]
  assert len(rows) == 2 and all(r.split()[:3] == ["1", "2", "3"] for r in rows)
  assert all(len(r.split()) == 16 for r in rows)
  assert cli.main(["sample", "--workdir", str(wd), "--num", "2", "--steps",
                   "8", "--infill", "4 ___ 5 6"]) == 0
  rows = [l for l in capsys.readouterr().out.splitlines() if not l.startswith(("---", "["))]
  assert all(r.split()[0] == "4" and r.split()[-2:] == ["5", "6"] for r in rows)

  # A prompt longer than the sample fails with the fix, not a traceback.
  assert cli.main(["sample", "--workdir", str(wd), "--length", "4",
                   "--prompt", "1 2 3 4 5 6"]) == 2
  assert "shorten it or raise" in capsys.readouterr().err


def test_wrong_set_key_fails_clearly(tmp_path, capsys):
  code = cli.main(["train", "--config", "synthetic_ar", "--workdir",
                   str(tmp_path / "x"), "--set", "train.stepz=3"])
  assert code == 2
  err = capsys.readouterr().err
  assert "unknown config key 'train.stepz'" in err
  assert not (tmp_path / "x").exists()  # nothing written on a bad config


def test_interrupt_and_resume_reproduce_the_uninterrupted_run(tmp_path):
  cfg = _cfg("masked", ["train.log_every=1"])  # rows of single steps
  ref = tmp_path / "ref"
  train.train(cfg, ref, log=lambda m: None)

  wd = tmp_path / "interrupted"

  def log(msg):
    if "step 8/12" in msg:
      raise KeyboardInterrupt  # as if Ctrl-C arrived mid-run
  with pytest.raises(KeyboardInterrupt):
    train.train(cfg, wd, log=log)
  assert (wd / "checkpoints").exists()
  summary = train.train(cfg, wd, log=lambda m: None)
  assert summary["step"] == 12

  want = {r["step"]: r["loss"] for r in _rows(ref)}
  got = {r["step"]: r["loss"] for r in _rows(wd)}
  assert {10, 11, 12} <= set(got)
  for step in (10, 11, 12):
    assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6)


def test_workdir_refuses_another_config(tmp_path):
  wd = tmp_path / "run"
  train.train(_cfg("ar", ["train.steps=2"]), wd, log=lambda m: None)
  with pytest.raises(config_lib.ConfigError, match="model.d_model"):
    train.train(_cfg("ar", ["train.steps=2", "model.d_model=64"]), wd,
                log=lambda m: None)
  # Extending training on the same workdir is allowed.
  summary = train.train(_cfg("ar", ["train.steps=4"]), wd, log=lambda m: None)
  assert summary["step"] == 4
