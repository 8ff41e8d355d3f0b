"""Fault injection: every failure mode the trainer guards against gets one
clear line or the right behaviour (docs/reliability.md maps each guarantee to its test).

Tiny synthetic runs; the XLA compilation cache is shared by every run of
this module (in-process and the SIGTERM subprocesses) so each distinct
program compiles once.
"""

import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src import compilation_cache

from diffusion_text import cli, config as config_lib, run as run_lib
from diffusion_text import step as step_lib, train, workdir as workdir_lib
from diffusion_text.checkpoint import Checkpointer, CheckpointDamaged
from diffusion_text.data import pipeline
from diffusion_text.eval import likelihood, report
from diffusion_text.processes.masked import MaskedProcess

REPO = pathlib.Path(__file__).resolve().parent.parent
FAST = ["train.steps=8", "train.log_every=2", "train.checkpoint_every=4",
        "train.keep_checkpoints=3", "eval.max_blocks=8", "eval.batch_size=8"]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("xla_cache"))
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()  # pick up the directory set above
  yield path
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  compilation_cache.reset_cache()


def _cfg(extra=()):
  return config_lib.apply_overrides(
      config_lib.load_preset("synthetic_masked"), FAST + list(extra))


def _strict_rows(path):
  """metrics.jsonl parsed as strict JSON (a bare NaN token fails)."""
  def no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")
  return [json.loads(l, parse_constant=no_constants)
          for l in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 8-step run with checkpoints at steps 4 and 8."""
  wd = tmp_path_factory.mktemp("trained") / "run"
  train.train(_cfg(), wd, log=lambda m: None)
  return wd


# ------------------------------------------------------------ 1. NaN guard
def test_a_nonfinite_step_is_skipped_and_a_finite_one_is_bit_exact():
  params = {"w": jnp.arange(4.0)}
  state = step_lib.init_state(params, optax.sgd(0.1))
  update = lambda parts: ({"w": parts[0]["w"] + 1.5}, parts[1],
                          {"w": parts[0]["w"] * 2})
  guarded = jax.jit(step_lib._update_if_finite, static_argnums=3)
  for bad in (jnp.nan, jnp.inf):
    skipped = guarded(state, jnp.float32(bad), 1.0, update)
    np.testing.assert_array_equal(skipped.params["w"], params["w"])
    np.testing.assert_array_equal(skipped.ema["w"], params["w"])
    assert (int(skipped.step), int(skipped.skipped), int(skipped.streak)) == (1, 1, 1)
    twice = guarded(skipped, 1.0, jnp.float32(bad), update)
    assert (int(twice.skipped), int(twice.streak)) == (2, 2)
  kept = guarded(twice, 0.5, 2.0, update)
  want = update((params, state.opt_state, state.ema))
  assert kept.params["w"].tobytes() == want[0]["w"].tobytes()
  assert kept.ema["w"].tobytes() == want[2]["w"].tobytes()
  # The streak resets; the count of skipped steps stays.
  assert (int(kept.step), int(kept.skipped), int(kept.streak)) == (3, 2, 0)
  assert not bool(step_lib.all_finite({"a": jnp.ones(2), "b": jnp.array([1., jnp.nan])}))
  assert bool(step_lib.all_finite({"a": jnp.ones(2), "i": jnp.arange(3)}))


def _poison(monkeypatch, from_step):
  """From `from_step` on every batch is all zeros, and the loss (and so
  every gradient) of such a batch is NaN."""
  loss = MaskedProcess.loss

  def poisoned_loss(self, key, denoiser, tokens, mask):
    out = loss(self, key, denoiser, tokens, mask)
    return out._replace(loss=out.loss * jnp.where(jnp.all(tokens == 0),
                                                  jnp.nan, 1.0))

  batches = pipeline.train_batches

  def poisoned_batches(prepared, batch_size, seed, start_step=0, **kw):
    for step, b in enumerate(batches(prepared, batch_size, seed, start_step,
                                     **kw), start=start_step + 1):
      yield dict(b, tokens=np.zeros_like(b["tokens"])) if step >= from_step else b

  monkeypatch.setattr(MaskedProcess, "loss", poisoned_loss)
  monkeypatch.setattr(pipeline, "train_batches", poisoned_batches)


def test_a_diverging_run_stops_at_the_last_good_checkpoint(tmp_path, capsys,
                                                           monkeypatch):
  # Steps 10.. are NaN: skipped, then the run stops with the fix.
  _poison(monkeypatch, from_step=10)
  wd = tmp_path / "diverging"
  argv = ["train", "--config", "synthetic_masked", "--workdir", str(wd)]
  for o in FAST + ["train.steps=20", "train.max_consecutive_skips=3"]:
    argv += ["--set", o]
  assert cli.main(argv) == cli.EXIT_DIVERGED
  err = capsys.readouterr().err
  assert "non-finite for" in err and "max_consecutive_skips=3" in err
  assert f"{wd.resolve() / 'checkpoints'}/12 (step 12)" in err
  assert "up to step 14" in err and "train.lr" in err
  rows = _strict_rows(wd / "metrics.jsonl")  # NaN logged as null
  assert [r["loss"] for r in rows if r["step"] >= 10] == [None] * len(
      [r for r in rows if r["step"] >= 10])
  assert sum(r["skipped"] for r in rows) == 3  # steps 10, 11, 12
  # Every checkpoint on disk is finite and the newest is the one named.
  ckpt = Checkpointer(wd)
  assert ckpt.latest_step() == 12
  cfg = run_lib.load_config(wd)
  run = run_lib.setup(cfg, wd, log=lambda m: None)
  state, _ = ckpt.restore(step_lib.init_state(run.params, step_lib.make_optimizer(cfg.train)))
  ckpt.close()
  assert bool(step_lib.all_finite(state)) and int(state.skipped) == 3


def test_eval_refuses_to_write_a_nonfinite_bound(trained, capsys, monkeypatch):
  bound = MaskedProcess.nll_bound

  def nan_bound(self, *args):
    out = bound(self, *args)
    return out._replace(nats=out.nats * jnp.nan)

  monkeypatch.setattr(MaskedProcess, "nll_bound", nan_bound)
  # The evaluator keeps one jitted bound step per (process, model, mesh);
  # one traced with the poisoned method must not outlive this test.
  likelihood._jitted_bound_step.cache_clear()
  try:
    assert cli.main(["eval", "--workdir", str(trained), "--split",
                     "valid"]) == 2
  finally:
    likelihood._jitted_bound_step.cache_clear()
  err = capsys.readouterr().err
  assert "is not finite" in err and "eval_valid.json is left as it was" in err
  assert not (trained / "eval_valid.json").exists()


def test_a_checkpoint_is_never_written_from_nonfinite_parameters(
    tmp_path, capsys, monkeypatch):
  # Should the parameters still turn non-finite (here the guard is switched
  # off and every gradient is NaN), no checkpoint is written.
  _poison(monkeypatch, from_step=1)
  monkeypatch.setattr(step_lib, "_update_if_finite",
                      lambda state, loss, gnorm, update: step_lib.TrainState(
                          state.step + 1,
                          *update((state.params, state.opt_state, state.ema)),
                          state.skipped, state.streak))
  wd = tmp_path / "nan"
  with pytest.raises(train.TrainingDiverged, match="parameters are non-finite "
                     "at step 4; no checkpoint written"):
    train.train(_cfg(), wd, log=lambda m: None)
  assert Checkpointer(wd).latest_step() is None


def test_the_train_step_is_stored_in_the_compilation_cache(tmp_path,
                                                           monkeypatch):
  """The compiled train step calls back to the host nowhere (JAX never
  caches a computation that does; `models.folded` warns through one only
  when asked), so with JAX_COMPILATION_CACHE_DIR set a resumed or repeated
  run loads it instead of compiling it again."""
  from diffusion_text.models import folded
  monkeypatch.delenv(folded.WARN_ENV, raising=False)  # the default
  fresh = tmp_path / "xla_cache"
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(fresh))
  compilation_cache.reset_cache()
  try:
    train.train(_cfg(["train.steps=1"]), tmp_path / "wd", log=lambda m: None)
  finally:
    jax.config.update("jax_compilation_cache_dir", old)
    compilation_cache.reset_cache()
  stored = os.listdir(fresh)
  assert any(n.startswith("jit_train_step") for n in stored), stored


# --------------------------------------------------------- 2. preemption
def test_sigterm_saves_and_resume_is_exact(tmp_path, compile_cache):
  """Two SIGTERMs at random steps (the full five: the slow test below)."""
  _sigterm_trials(tmp_path, compile_cache, trials=2)


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_exact_5_of_5(tmp_path, compile_cache):
  _sigterm_trials(tmp_path, compile_cache, trials=5)


def _sigterm_trials(tmp_path, compile_cache, trials):
  """Each trial: a CLI run SIGTERMed at a random step exits as preempted
  with a checkpoint at the step it stopped, and resuming reproduces the
  uninterrupted run's losses exactly."""
  steps = 64
  sets = [f"train.steps={steps}", "train.log_every=1",
          "train.checkpoint_every=1000", "data.batch_size=32",
          "data.seq_len=32", "model.d_model=64", "model.num_layers=2"]
  cfg = config_lib.apply_overrides(config_lib.load_preset("synthetic_masked"),
                                   sets)
  ref = tmp_path / "ref"
  train.train(cfg, ref, log=lambda m: None)
  want = [r["loss"] for r in _strict_rows(ref / "metrics.jsonl")]
  env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
             JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  rng = random.Random(7)
  for trial in range(trials):
    wd = tmp_path / f"trial{trial}"
    at = rng.randint(3, 24)
    argv = [sys.executable, "-m", "diffusion_text.cli", "train", "--config",
            "synthetic_masked", "--workdir", str(wd)]
    for o in sets:
      argv += ["--set", o]
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
      out.append(line)
      if f"step {at}/{steps}" in line:
        # Freeze it, then the real SIGTERM: it lands mid-run, wherever the
        # loop is by now.
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        break
    out += proc.stdout.readlines()
    assert proc.wait(timeout=300) == cli.EXIT_PREEMPTED, "".join(out)
    text = "".join(out)
    assert "SIGTERM at step" in text and "preempted at step" in text
    stopped = int(text.split("SIGTERM at step ")[1].split(";")[0])
    assert at <= stopped < steps
    assert Checkpointer(wd).latest_step() == stopped  # nothing lost
    train.train(cfg, wd, log=lambda m: None)
    rows = _strict_rows(wd / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows] == want, f"trial {trial}, step {stopped}"


def test_an_error_between_steps_saves_first_and_resume_is_exact(trained,
                                                                tmp_path):
  """A hook (as a validation pass out of memory would) raises at step 6: the
  error surfaces after a checkpoint of the steps since the periodic one at
  4, and resuming ends with the uninterrupted run's state, bit for bit."""
  def fails(step, state, row):
    if step == 6:
      raise RuntimeError("RESOURCE_EXHAUSTED: in a hook")
  wd, lines = tmp_path / "run", []
  with pytest.raises(RuntimeError, match="in a hook"):
    train.train(_cfg(), wd, log=lines.append, hooks=[fails])
  saved = Checkpointer(wd).latest_step()
  assert saved > 6  # the row of step 6 is flushed a step late
  assert any(l.startswith(f"[train] error at step {saved}; checkpoint saved,"
                          " so the same command resumes") for l in lines)
  train.train(_cfg(), wd, log=lambda m: None)
  cfg = _cfg()
  run = run_lib.setup(cfg, wd, log=lambda m: None)
  target = step_lib.init_state(run.params, step_lib.make_optimizer(cfg.train))
  states = []
  for workdir in (trained, wd):
    ckpt = Checkpointer(workdir)
    assert ckpt.latest_step() == 8
    states.append(ckpt.restore(target)[0])
    ckpt.close()
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------- 3. checkpoint integrity
def _small_state(scale):
  params = {"w": jnp.arange(4096.0).reshape(64, 64) * scale, "b": jnp.ones(3)}
  return step_lib.init_state(params, optax.adam(1e-3))


def _two_checkpoints(tmp_path):
  ckpt = Checkpointer(tmp_path, keep=3, log=lambda m: None)
  for step in (1, 2):
    ckpt.save(step, _small_state(step), {"step": step})
  ckpt.close()
  return tmp_path / "checkpoints"


def _largest_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  f = _largest_file(step_dir)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _bit_flip(step_dir):
  f = _largest_file(step_dir)
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))


def _delete_state(step_dir):
  shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("damage, words", [
    (_truncate, "does not match its checksum"),
    (_bit_flip, "does not match its checksum"),
    (_delete_state, "state/ directory is missing"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(
    tmp_path, damage, words):
  directory = _two_checkpoints(tmp_path)
  damage(directory / "2")
  lines = []
  ckpt = Checkpointer(tmp_path, log=lines.append)
  state, meta = ckpt.restore(_small_state(0.0))
  assert meta["step"] == 1
  np.testing.assert_array_equal(state.params["w"], _small_state(1).params["w"])
  assert len(lines) == 1 and "skipping damaged checkpoint" in lines[0]
  assert lines[0].endswith(f"/2 ({words})") or words in lines[0]
  # With every checkpoint damaged: one error naming the directory and fix.
  damage(directory / "1")
  with pytest.raises(CheckpointDamaged, match="no intact checkpoint.*--workdir"):
    ckpt.restore(_small_state(0.0))
  ckpt.close()


def test_a_damaged_checkpoint_without_manifest_is_skipped_too(tmp_path):
  # A kill between the save and its manifest leaves no .crc32: the restore
  # itself must notice the damage.
  directory = _two_checkpoints(tmp_path)
  (directory / f"2.crc32").unlink()
  _delete_state(directory / "2")
  ckpt = Checkpointer(tmp_path, log=lambda m: None)
  assert ckpt.restore(_small_state(0.0))[1]["step"] == 1
  ckpt.close()


def test_stray_temporary_checkpoints_are_removed(tmp_path):
  directory = _two_checkpoints(tmp_path)
  stray = directory / "3.orbax-checkpoint-tmp-1234"
  (stray / "state").mkdir(parents=True)
  lines = []
  Checkpointer(tmp_path, log=lines.append).close()
  assert not stray.exists() and "interrupted save" in lines[0]


def test_keep_checkpoints_must_be_at_least_one(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="train.keep_checkpoints=0"):
    _cfg(["train.keep_checkpoints=0"])
  with pytest.raises(ValueError, match="keep_checkpoints=1 or more"):
    Checkpointer(tmp_path, keep=0)


# ------------------------------------------------------------- 4. lock
def test_a_second_trainer_on_a_busy_workdir_stops_at_once(tmp_path, capsys):
  wd = tmp_path / "busy"
  wd.mkdir()
  other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (wd / workdir_lib.LOCK_NAME).write_text(json.dumps(
        {"pid": other.pid, "host": socket.gethostname(), "since": "now"}))
    argv = ["train", "--config", "synthetic_masked", "--workdir", str(wd)]
    assert cli.main(argv + ["--set", "train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert f"in use by pid {other.pid} on host {socket.gethostname()}" in err
    assert not (wd / "checkpoints").exists()
  finally:
    other.kill()
    other.wait()
  # Its process is gone: the stale lock is taken over with a notice.
  lines = []
  lock = workdir_lib.WorkdirLock(wd, lines.append).acquire()
  assert "stale lock" in lines[0] and str(other.pid) in lines[0]
  lock.release()
  assert not (wd / workdir_lib.LOCK_NAME).exists()


def test_train_holds_the_lock_while_it_runs(tmp_path):
  wd = tmp_path / "run"
  seen = []
  hook = lambda step, state, row: seen.append(
      json.loads((wd / workdir_lib.LOCK_NAME).read_text())["pid"])
  train.train(_cfg(["train.steps=2", "train.log_every=1"]), wd,
              log=lambda m: None, hooks=[hook])
  assert seen == [os.getpid()] * 2
  assert not (wd / workdir_lib.LOCK_NAME).exists()  # released at the end


# ---------------------------------------------- 5. results before writes
def test_a_failed_eval_write_names_the_path_and_keeps_the_result(
    trained, capsys):
  # eval_test.json cannot be replaced (a directory stands in its way, as a
  # read-only workdir would for a non-root user).
  blocker = trained / "eval_test.json"
  blocker.mkdir()
  try:
    assert cli.main(["eval", "--workdir", str(trained)]) == 2
  finally:
    blocker.rmdir()
  captured = capsys.readouterr()
  assert "NLL <= " in captured.out  # the result reached stdout first
  assert f"could not write {blocker}" in captured.err
  assert not list(trained.glob(".eval_test.json.*"))  # no temp file left


def test_an_unwritable_cache_is_one_clear_line(tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  cfg = _cfg([f"data.cache_dir={not_a_dir / 'cache'}"])
  with pytest.raises(config_lib.ConfigError, match="not writable.*--cache-dir"):
    config_lib.cache_dir(cfg)


def test_atomic_writes_are_used_for_every_workdir_file(trained):
  # config.json and tokenizer.json are strict JSON written by rename.
  for name in ("config.json", "tokenizer.json"):
    json.loads((trained / name).read_text(),
               parse_constant=lambda c: pytest.fail(c))
  assert not list(trained.glob(".*.tmp"))


# ------------------------------------------------------- 6. validation
@pytest.mark.parametrize("override, words", [
    ("train.checkpoint_every=0", "train.checkpoint_every=0 must be >= 1"),
    ("train.log_every=0", "train.log_every=0 must be >= 1"),
    ("model.d_model=0", "model.d_model=0 must be >= 1"),
    ("model.num_heads=0", "model.num_heads=0 must be >= 1"),
    ("train.steps=0", "train.steps=0 must be >= 1"),
    ("train.steps=-5", "train.steps=-5 must be >= 1"),
    ("train.lr=nan", "train.lr=nan must be a finite number"),
    ("train.lr=-0.1", "train.lr=-0.1 must be > 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be >= 1"),
    ("train.mesh_data=0", "must be >= -1 and not 0"),
    ("train.b2=1.0", "train.b2=1.0 must be in [0, 1)"),
    ("sample.num=0", "sample.num=0 must be >= 1"),
    ("sample.steps=-1", "sample.steps=-1 must be >= 0"),
    ("eval.max_blocks=-1", "eval.max_blocks=-1 must be >= 0"),
    ("eval.mc_samples=0", "eval.mc_samples=0 must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
    ("data.packing=zip", "data.packing must be one of concat, pad"),
])
def test_every_field_is_checked_against_its_range(override, words):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.apply_overrides(config_lib.load_preset("synthetic_ar"), [override])
  assert words in str(e.value)


def test_every_numeric_field_declares_its_range():
  for section in (config_lib.ModelConfig, config_lib.DataConfig,
                  config_lib.TrainConfig, config_lib.EvalConfig,
                  config_lib.SampleConfig):
    for f in __import__("dataclasses").fields(section):
      if f.type in ("int", "float"):
        assert f.metadata.get("lo") is not None, f"{section.__name__}.{f.name}"


def test_a_preset_file_read_from_config_json_is_validated_too(tmp_path):
  d = config_lib.to_dict(_cfg())
  d["train"]["steps"] = "many"
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(config_lib.ConfigError, match="train.steps='many' must be int"):
    run_lib.load_config(tmp_path)


def test_process_options_are_typed_by_the_process():
  for override, words in (("process.antithetic=maybe", "antithetic.*must be true or false"),
                          ("process.t_min=abc", "t_min.*must be a .*number"),
                          ("process.num_steps=1.5", "num_steps.*must be an integer")):
    cfg = _cfg([override])
    with pytest.raises(config_lib.ConfigError, match=words):
      run_lib.check_process(cfg)


@pytest.fixture
def workdir_with_config(tmp_path):
  """A workdir holding only config.json: flags are checked before loading."""
  workdir_lib.atomic_write_json(tmp_path / "config.json",
                                config_lib.to_dict(_cfg()))
  return tmp_path


@pytest.mark.parametrize("argv, words", [
    (["sample", "--steps", "-1"], "sample.steps=-1 must be >= 0"),
    (["sample", "--num", "-2"], "sample.num=-2 must be >= 1"),
    (["sample", "--num", "0"], "sample.num=0 must be >= 1"),
    (["sample", "--length", "-3"], "sample.length=-3 must be >= 0"),
    (["eval", "--max-blocks", "-1"], "eval.max_blocks=-1 must be >= 0"),
    (["eval", "--mc-samples", "0"], "eval.mc_samples=0 must be >= 1"),
    (["eval", "--batch-size", "0"], "eval.batch_size=0 must be >= 1"),
])
def test_every_cli_number_is_checked(workdir_with_config, capsys, argv, words):
  assert cli.main(argv[:1] + ["--workdir", str(workdir_with_config)]
                  + argv[1:]) == 2
  err = capsys.readouterr().err
  assert words in err and len(err.strip().splitlines()) == 2


@pytest.mark.parametrize("text, words", [
    ("x = 1\n", "defines no config() function"),
    ("def config(:\n", "syntax error on line 1"),
])
def test_a_broken_preset_file_is_one_line(tmp_path, capsys, text, words):
  path = tmp_path / "mine.py"
  path.write_text(text)
  assert cli.main(["train", "--config", str(path), "--workdir",
                   str(tmp_path / "w")]) == 2
  assert words in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("content, split, words", [
    (b"", "train", "train split of text"),
    (b"one short line\n", "test", "test split of text"),
    (b"caf\xe9 au lait\n" * 50, "train", "is not UTF-8 text"),
])
def test_bad_text_files_are_named(tmp_path, content, split, words):
  path = tmp_path / "corpus.txt"
  path.write_bytes(content)
  cfg = config_lib.apply_overrides(config_lib.load_preset("ptb_masked"), [
      "data.source=text", f"data.path={path}", "data.tokenizer=char",
      "data.seq_len=64", f"data.cache_dir={tmp_path / 'cache'}"])
  with pytest.raises(config_lib.ConfigError) as e:
    # One line trains (one padded block) but leaves nothing to evaluate.
    run_lib.require_blocks(run_lib.prepare(cfg), split, cfg)
  assert words in str(e.value) and str(path) in str(e.value)
  if "UTF-8" not in words:
    assert "has no block of data.seq_len=64 tokens" in str(e.value)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_truncated_workdir_file_is_named_with_the_fix(trained, tmp_path,
                                                        capsys, name):
  wd = tmp_path / "copy"
  shutil.copytree(trained, wd)
  text = (wd / name).read_text()
  (wd / name).write_text(text[: len(text) // 2])
  assert cli.main(["sample", "--workdir", str(wd), "--num", "1"]) == 2
  err = capsys.readouterr().err
  assert f"{wd / name} is damaged" in err and "new --workdir" in err


def test_relative_paths_are_stored_absolute_and_move_freely(tmp_path,
                                                            monkeypatch):
  monkeypatch.chdir(tmp_path)
  cfg = _cfg(["data.path=corpus.txt", "data.cache_dir=cache"])
  assert cfg.data.path == str(tmp_path / "corpus.txt")
  assert cfg.data.cache_dir == str(tmp_path / "cache")
  workdir_lib.atomic_write_json(tmp_path / "config.json", config_lib.to_dict(cfg))
  monkeypatch.chdir(REPO)  # from elsewhere, and naming it absolutely
  run_lib.check_workdir(_cfg([f"data.path={tmp_path / 'corpus.txt'}"]), tmp_path)
  # The fingerprint follows the file's content, not the path it is read from.
  tok = type("Tok", (), {"fingerprint": lambda self: "t"})()
  moved = _cfg(["data.path=/elsewhere/corpus.txt"])
  assert (run_lib.run_fingerprint(cfg, tok, ["abc"])
          == run_lib.run_fingerprint(moved, tok, ["abc"])
          != run_lib.run_fingerprint(cfg, tok, ["abd"]))


def test_a_workdir_without_checkpoints_says_removing_it_loses_nothing(
    tmp_path):
  workdir_lib.atomic_write_json(tmp_path / "config.json",
                                config_lib.to_dict(_cfg()))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(config_lib.ConfigError) as info:
    run_lib.check_workdir(_cfg(["data.seq_len=8"]), tmp_path)
  assert "data.seq_len: 16 -> 8" in str(info.value)
  assert f"no checkpoint yet: `rm -r {tmp_path}` loses no" in str(info.value)


def test_eval_and_sample_keep_the_trained_identity(trained, capsys):
  # A key the checkpoint depends on is refused naming it, not by hash.
  assert cli.main(["eval", "--workdir", str(trained), "--set",
                   "data.seq_len=8"]) == 2
  err = capsys.readouterr().err
  assert "(data.seq_len: 16 -> 8)" in err and "drop those --set" in err
  # The compute dtype and data.workers may change: the checkpoint restores.
  run, params, step = run_lib.open_workdir(
      trained, ["model.dtype=bfloat16", "data.workers=1"], log=lambda m: None)
  assert (run.cfg.model.dtype, run.cfg.data.workers, step) == ("bfloat16", 1, 8)
  assert run.fingerprint == run_lib.open_workdir(
      trained, log=lambda m: None)[0].fingerprint
  # Training the workdir keeps them as trained.
  with pytest.raises(config_lib.ConfigError, match="model.dtype"):
    run_lib.check_workdir(_cfg(["model.dtype=bfloat16"]), trained)


def test_out_of_memory_is_one_line_naming_the_size_and_the_fix(monkeypatch,
                                                               capsys):
  def exhausts(args):  # a real XLA allocation failure: 32 TiB
    jnp.zeros((2**43,), jnp.float32).block_until_ready()
  monkeypatch.setitem(cli.COMMANDS, "train", exhausts)
  assert cli.main(["train", "--workdir", "unused"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert err[0].startswith("error: the device ran out of memory "
                           "(32,768.0 GiB in one allocation): lower "
                           "data.batch_size (train.grad_accum=N")
  assert "XLA said: RESOURCE_EXHAUSTED" in err[0]
  # Any other runtime error keeps its traceback.
  def fails(args):
    raise RuntimeError("INTERNAL: something else")
  monkeypatch.setitem(cli.COMMANDS, "train", fails)
  with pytest.raises(RuntimeError, match="something else"):
    cli.main(["train", "--workdir", "unused"])


def test_batch_not_divisible_by_the_devices_is_one_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(
      [sys.executable, "-m", "diffusion_text.cli", "train", "--config",
       "synthetic_masked", "--workdir", str(tmp_path / "w"), "--set",
       "data.batch_size=3"], env=env, cwd=REPO, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert ("data.batch_size=3 is not divisible by the 2 devices"
          in proc.stderr.splitlines()[0])


# -------------------------------------------------------- 7. metrics log
def test_metrics_survive_a_kill_and_time_adds_up(trained, tmp_path):
  # As after SIGKILL between the checkpoint at 4 and the end: the newest
  # checkpoint is gone, the log runs past step 4 and ends in a torn line.
  wd = tmp_path / "killed"
  shutil.copytree(trained, wd)
  shutil.rmtree(wd / "checkpoints" / "8")
  (wd / "checkpoints" / "8.crc32").unlink()
  rows = _strict_rows(wd / "metrics.jsonl")
  rows[[r["step"] for r in rows].index(4)]["elapsed_s"] = 1000.0  # long segment
  (wd / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
  assert [r["step"] for r in report.read_curve(wd)] == [1, 2, 4, 6, 8]
  train.train(_cfg(), wd, log=lambda m: None)
  rows = _strict_rows(wd / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 4, 5, 6, 8]  # no duplicates
  assert rows[-1]["elapsed_s"] >= 1000.0  # cumulative over both segments
  assert report.read_curve(wd)[-1]["elapsed_s"] == rows[-1]["elapsed_s"]


# ------------------------------------------------------------ 8. defaults
def test_default_data_and_cache_directories(tmp_path, monkeypatch):
  repo = tmp_path / "checkout" / "repo"
  repo.mkdir(parents=True)
  monkeypatch.setattr(config_lib, "REPO", repo)
  monkeypatch.delenv("DIFFUSION_TEXT_DATA", raising=False)
  monkeypatch.delenv("DIFFUSION_TEXT_CACHE", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  cfg = config_lib.Config()
  # Installed (no pyproject.toml next to the package): ~/.cache, no data dir.
  assert config_lib.cache_dir(cfg) == tmp_path / "home/.cache/diffusion_text"
  with pytest.raises(config_lib.ConfigError, match="DIFFUSION_TEXT_DATA"):
    config_lib.data_dir(cfg)
  # A source checkout: ../shared/data and .cache/, as under make.
  (repo / "pyproject.toml").write_text("")
  (tmp_path / "checkout" / "shared" / "data").mkdir(parents=True)
  assert config_lib.data_dir(cfg) == tmp_path / "checkout/shared/data"
  assert config_lib.cache_dir(cfg) == repo / ".cache"
  # The environment wins over both.
  monkeypatch.setenv("DIFFUSION_TEXT_DATA", str(tmp_path / "d"))
  monkeypatch.setenv("DIFFUSION_TEXT_CACHE", str(tmp_path / "c"))
  assert config_lib.data_dir(cfg) == tmp_path / "d"
  assert config_lib.cache_dir(cfg) == tmp_path / "c"
  readme = (REPO / "README.md").read_text()
  assert "$DIFFUSION_TEXT_DATA, else `../shared/data`" in readme
  assert "$DIFFUSION_TEXT_CACHE, else `.cache/`" in readme
  assert "`~/.cache/diffusion_text`" in readme
