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
  # (here longer than the 16-token training blocks, which it says)
  assert cli.main(["sample", "--workdir", str(wd), "--num", "2", "--steps",
                   "8", "--prompt", "1 2 3", "--length", "20"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert "[sample] length 20 is longer than the 16-token blocks" in "\n".join(lines)
  rows = [l for l in lines if not l.startswith(("---", "["))]
  assert len(rows) == 2 and all(r.split()[:3] == ["1", "2", "3"] for r in rows)
  assert all(len(r.split()) == 20 for r in rows)
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


def test_workdir_refuses_another_config(tmp_path, capsys):
  wd = tmp_path / "run"
  seen = []
  hook = lambda step, state, row: seen.append((step, int(state.step), row))
  train.train(_cfg("ar", ["train.steps=2", "train.log_every=1"]), wd,
              log=lambda m: None, hooks=[hook])
  # Hooks see every logged row, after it was written, with the live state.
  assert [s for s, _, _ in seen] == [1, 2]
  assert [r for _, _, r in seen] == _rows(wd)
  assert all(state_step >= step for step, state_step, _ in seen)
  with pytest.raises(config_lib.ConfigError, match="model.d_model") as info:
    train.train(_cfg("ar", ["train.steps=2", "model.d_model=64"]), wd,
                log=lambda m: None)
  assert "no checkpoint yet" not in str(info.value)  # it has two
  # Extending training on the same workdir is allowed.
  summary = train.train(_cfg("ar", ["train.steps=3"]), wd, log=lambda m: None)
  assert summary["step"] == 3
  # Sampling and evaluation settings are not the run's identity: a changed
  # sample.temperature on the command line resumes the same workdir.
  assert cli.main(["train", "--workdir", str(wd), "--set", "train.steps=4",
                   "--set", "sample.temperature=0.9"]) == 0
  assert "resuming" in capsys.readouterr().out
  saved = json.loads((wd / "config.json").read_text())
  assert saved["sample"]["temperature"] == 0.9 and saved["train"]["steps"] == 4


def test_eval_and_sample_flags_are_config_shorthand():
  parse = lambda argv: cli._with_shorthand(cli._parser().parse_args(argv))
  assert parse(["sample", "--workdir", "w", "--temperature", "0.9",
                "--top-p", "0.5", "--sampler", "ddim", "--num", "3",
                "--no-ema"]) == [
      "sample.num=3", "sample.temperature=0.9", "sample.top_p=0.5",
      "sample.sampler=ddim", "eval.use_ema=false"]
  # flags come after --set, so the flag wins when both are given
  assert parse(["eval", "--workdir", "w", "--set", "eval.split=valid",
                "--split", "train", "--mc-samples", "4"]) == [
      "eval.split=valid", "eval.split=train", "eval.mc_samples=4"]
  cfg = config_lib.apply_overrides(_cfg("ar"), parse(
      ["eval", "--workdir", "w", "--split", "valid", "--batch-size", "8"]))
  assert (cfg.eval.split, cfg.eval.batch_size) == ("valid", 8)
