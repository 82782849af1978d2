"""A run's outputs reach the workdir only when it succeeds (experiments/run_dir.py job), and
a folder written with fat.atomic.staged_dir appears whole or not at all."""

import os

import pytest

from experiments import run_dir
from fat import atomic


def test_success_publishes_and_replaces_older_outputs(tmp_path):
  (tmp_path / "checkpoints" / "old_setting").mkdir(parents=True)
  (tmp_path / "report.json").write_text("old")
  (tmp_path / "export").mkdir()  # not written by this run: kept
  with run_dir.job(str(tmp_path), {}) as job:
    stage = job.path
    assert stage == os.path.join(str(tmp_path), run_dir.STAGE)
    os.makedirs(os.path.join(stage, "checkpoints", "w8"))
    with open(os.path.join(stage, "report.json"), "w") as f:
      f.write("new")
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "export", "report.json"]
  assert (tmp_path / "report.json").read_text() == "new"
  assert os.listdir(tmp_path / "checkpoints") == ["w8"]


def test_failure_leaves_the_workdir_as_it_was(tmp_path):
  (tmp_path / "report.json").write_text("old")
  with pytest.raises(FloatingPointError, match="boom"):
    with run_dir.job(str(tmp_path), {}) as job:
      stage = job.path
      with open(os.path.join(stage, "events.out.tfevents.1"), "w") as f:
        f.write("x")
      os.makedirs(os.path.join(stage, "checkpoints", "w8"))
      raise FloatingPointError("boom")
  assert os.listdir(tmp_path) == ["report.json"]
  assert (tmp_path / "report.json").read_text() == "old"


def test_a_stale_stage_from_a_killed_run_is_discarded(tmp_path):
  stale = tmp_path / run_dir.STAGE / "checkpoints" / "old"
  stale.mkdir(parents=True)
  with run_dir.job(str(tmp_path), {}) as job:
    stage = job.path
    assert os.listdir(stage) == [run_dir.RESUME]  # the killed run's files are gone
  assert os.listdir(tmp_path) == []


def test_only_process_0_publishes(tmp_path, monkeypatch):
  import jax
  (tmp_path / "report.json").write_text("old")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with run_dir.job(str(tmp_path), {}) as job:
    stage = job.path
    assert stage == os.path.join(str(tmp_path), f"{run_dir.STAGE}-1")
    with open(os.path.join(stage, "report.json"), "w") as f:
      f.write("new")
  assert os.listdir(tmp_path) == ["report.json"]
  assert (tmp_path / "report.json").read_text() == "old"


def test_staged_dir_replaces_the_folder_whole_or_not_at_all(tmp_path):
  path = tmp_path / "export" / "w8"
  with atomic.staged_dir(str(path)) as tmp:
    assert tmp == str(path) + atomic.TMP_SUFFIX and os.listdir(tmp) == []
    with open(os.path.join(tmp, "a"), "w") as f:
      f.write("1")
    assert not path.exists()  # nothing at the destination before the end
  assert os.listdir(path) == ["a"]
  with pytest.raises(RuntimeError, match="boom"):
    with atomic.staged_dir(str(path)) as tmp:
      with open(os.path.join(tmp, "b"), "w") as f:
        f.write("2")
      raise RuntimeError("boom")
  assert os.listdir(path) == ["a"] and os.listdir(tmp_path / "export") == ["w8"]
  stale = tmp_path / "export" / ("w8" + atomic.TMP_SUFFIX)  # left by a killed run
  stale.mkdir()
  (stale / "c").write_text("3")
  with atomic.staged_dir(str(path)) as tmp:
    with open(os.path.join(tmp, "b"), "w") as f:
      f.write("2")
  assert os.listdir(path) == ["b"] and os.listdir(tmp_path / "export") == ["w8"]


def test_finished_report_only_for_the_same_config(tmp_path):
  import json

  from configs import default
  config = default.get_config("smoke")
  assert run_dir.finished_report(str(tmp_path), config) is None  # nothing there
  atomic.write_json(str(tmp_path / "config.json"), json.loads(config.to_json_best_effort()))
  atomic.write_json(str(tmp_path / "report.json"), {"seed": 0, "settings": []})
  assert run_dir.finished_report(str(tmp_path), config) == {"seed": 0, "settings": []}
  config.seed = 1
  assert run_dir.finished_report(str(tmp_path), config) is None
  config.seed = 0
  (tmp_path / "report.json").write_text("{not json")
  assert run_dir.finished_report(str(tmp_path), config) is None


# --------------------------------------------------------------------------
# run_dir.job: the lock, resume after an interruption, stale exports.
# --------------------------------------------------------------------------


def test_a_second_job_on_a_locked_workdir_is_refused(tmp_path):
  work = tmp_path / "w"
  with run_dir.job(str(work), {"config": 1}) as stage:
    (tmp_path / "w" / run_dir.STAGE / "report.json").write_text("first")
    with pytest.raises(run_dir.WorkdirBusy, match=rf"in use by another job \(pid {os.getpid()}\)"):
      with run_dir.job(str(work), {"config": 1}):
        pass
    assert sorted(os.listdir(stage.path)) == ["report.json", run_dir.RESUME]  # untouched
  assert sorted(os.listdir(work)) == ["report.json"]  # published; lock released
  with run_dir.job(str(work), {"config": 1}):  # free again
    pass


def test_a_workdir_the_job_created_is_removed_when_it_fails(tmp_path):
  with pytest.raises(FloatingPointError):
    with run_dir.job(str(tmp_path / "w"), {}):
      raise FloatingPointError("nan")
  assert not (tmp_path / "w").exists()
  (tmp_path / "file").write_text("")
  with pytest.raises(OSError, match="cannot be written.*writable --workdir"):
    with run_dir.job(str(tmp_path / "file" / "w"), {}):
      pass


def test_an_interrupted_job_resumes_with_the_same_key_only(tmp_path):
  work = str(tmp_path)
  with pytest.raises(KeyboardInterrupt):
    with run_dir.job(work, {"seed": 0}) as stage:
      assert not stage.resumed and stage.done("w8") is None
      stage.finish("w8", {"top1": 91.5})
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == [run_dir.STAGE]  # kept for the next run
  with pytest.raises(KeyboardInterrupt):
    with run_dir.job(work, {"seed": 0}) as stage:
      assert stage.resumed and stage.done("w8") == {"top1": 91.5}
      raise KeyboardInterrupt
  with run_dir.job(work, {"seed": 0}, fresh=True) as stage:  # --fresh: start over
    assert not stage.resumed and stage.done("w8") is None
    stage.finish("w8", {"top1": 90.0})
  assert os.listdir(tmp_path) == []  # private records are not published
  with pytest.raises(KeyboardInterrupt):
    with run_dir.job(work, {"seed": 0}) as stage:
      stage.finish("w8", {"top1": 91.5})
      raise KeyboardInterrupt
  with run_dir.job(work, {"seed": 1}) as stage:  # another config: not resumed
    assert not stage.resumed and stage.done("w8") is None


def test_publishing_a_setting_removes_its_old_export(tmp_path):
  for name in ("w8", "w4"):
    (tmp_path / "export" / name).mkdir(parents=True)
  with run_dir.job(str(tmp_path), {}) as stage:
    os.makedirs(os.path.join(stage.path, "checkpoints", "w8"))
  assert os.listdir(tmp_path / "export") == ["w4"]


# A job whose Ctrl-C lands in a garbage-collector callback: the callback's
# KeyboardInterrupt is dropped by Python ("Exception ignored"); cli.run must still
# stop the job with exit status 130 and its one line. Without the hook the loop
# runs to its end and prints "not stopped". With GC_JOB_WORKDIR set, SIGINT is
# ignored (as under nohup) and the job holds a workdir: SIGTERM's handler delivers it.
_GC_INTERRUPT_JOB = """
import gc, os, signal, time
from experiments import cli, run_dir

def callback(phase, info):
  if phase == "start":
    gc.callbacks.remove(callback)
    raise KeyboardInterrupt  # as a SIGINT handled inside the callback does

def spin():
  gc.callbacks.append(callback)
  gc.collect()
  deadline = time.time() + 5
  while time.time() < deadline:
    pass
  print("not stopped")

def main(argv):
  workdir = os.environ.get("GC_JOB_WORKDIR")
  if workdir is None:
    spin()
    return
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  with run_dir.job(workdir, {}):
    spin()

cli.run(main)
"""


@pytest.mark.parametrize("sigterm_job", [False, True])
def test_an_interrupt_dropped_in_a_gc_callback_still_stops_the_job(tmp_path, sigterm_job):
  import signal
  import subprocess
  import sys
  from conftest import REPO
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if sigterm_job:
    env["GC_JOB_WORKDIR"] = str(tmp_path / "w")
  proc = subprocess.run([sys.executable, "-c", _GC_INTERRUPT_JOB], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  assert proc.returncode == 130, (proc.returncode, proc.stdout, proc.stderr[-2000:])
  assert "not stopped" not in proc.stdout and proc.stderr.strip().endswith("interrupted.")
