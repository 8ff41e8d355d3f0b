"""Workdir files: atomic writes, the train lock, the metrics log."""

import json
import os
import socket
import subprocess
import sys

import pytest

from diffusion_text import workdir as wd


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
  path = tmp_path / "r.json"
  wd.atomic_write_json(path, {"a": 1})
  wd.atomic_write_json(path, {"a": 2, "nan": float("nan")})
  assert json.loads(path.read_text()) == {"a": 2, "nan": None}
  assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_write_failure_names_the_path(tmp_path):
  target = tmp_path / "ro" / "eval.json"
  target.parent.mkdir()
  os.chmod(target.parent, 0o500)
  try:
    if os.access(target.parent, os.W_OK):
      pytest.skip("running as a user that ignores permissions")
    with pytest.raises(wd.WriteError, match=str(target)):
      wd.atomic_write_text(target, "x")
  finally:
    os.chmod(target.parent, 0o700)


def test_atomic_write_failure_names_the_path_even_as_root(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(wd.WriteError, match="could not write .*file/out.json"):
    wd.atomic_write_text(blocker / "out.json", "x")


def test_strict_json_has_no_nan_tokens():
  text = wd.dumps({"loss": float("nan"), "x": [float("inf"), 1.0]})
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"loss": None, "x": [None, 1.0]}


def test_lock_is_exclusive_while_the_holder_lives(tmp_path):
  with wd.WorkdirLock(tmp_path, log=lambda m: None):
    # A live holder (a real other process) blocks a second trainer.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
      (tmp_path / wd.LOCK_NAME).write_text(json.dumps(
          {"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
      with pytest.raises(wd.WorkdirBusy, match=f"pid {holder.pid} on host"):
        wd.WorkdirLock(tmp_path).acquire()
    finally:
      holder.kill()
      holder.wait()


def test_stale_lock_is_taken_over_with_a_notice(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / wd.LOCK_NAME).write_text(json.dumps(
      {"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
  notes = []
  with wd.WorkdirLock(tmp_path, log=notes.append):
    assert json.loads((tmp_path / wd.LOCK_NAME).read_text())["pid"] == os.getpid()
  assert any("stale lock" in n for n in notes)
  assert not (tmp_path / wd.LOCK_NAME).exists()


def test_metrics_log_repairs_torn_line_and_drops_rows_past_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "elapsed_s": float(s)} for s in (10, 20, 30)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
  log = wd.MetricsLog(path, resume_step=20)
  assert log.time_offset == 20.0
  log.write({"step": 30, "elapsed_s": 25.0, "loss": float("nan")})
  log.close()
  got = wd.read_rows(path)
  assert [r["step"] for r in got] == [10, 20, 30]
  assert got[-1]["loss"] is None
  json.loads(path.read_text().splitlines()[-1])  # strict JSON


def test_read_rows_refuses_damage_before_the_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="line 2"):
    wd.read_rows(path)
