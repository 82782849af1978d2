"""A run's outputs reach the workdir only when it succeeds (experiments/run_dir.py)."""

import os

import pytest

from experiments import run_dir


def test_success_publishes_and_replaces_older_outputs(tmp_path):
  (tmp_path / "checkpoints" / "old_setting").mkdir(parents=True)
  (tmp_path / "report.json").write_text("old")
  (tmp_path / "export").mkdir()  # not written by this run: kept
  with run_dir.staged(str(tmp_path)) as stage:
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
    with run_dir.staged(str(tmp_path)) as stage:
      with open(os.path.join(stage, "events.out.tfevents.1"), "w") as f:
        f.write("x")
      os.makedirs(os.path.join(stage, "checkpoints", "w8"))
      raise FloatingPointError("boom")
  assert os.listdir(tmp_path) == ["report.json"]
  assert (tmp_path / "report.json").read_text() == "old"


def test_a_stale_stage_from_a_killed_run_is_discarded(tmp_path):
  stale = tmp_path / run_dir.STAGE / "checkpoints" / "old"
  stale.mkdir(parents=True)
  with run_dir.staged(str(tmp_path)) as stage:
    assert os.listdir(stage) == []
  assert os.listdir(tmp_path) == []


def test_finished_report_only_for_the_same_config(tmp_path):
  import json

  from configs import default
  from fat import report
  config = default.get_config("smoke")
  assert run_dir.finished_report(str(tmp_path), config) is None  # nothing there
  report.write_json(str(tmp_path / "config.json"), json.loads(config.to_json_best_effort()))
  report.write_json(str(tmp_path / "report.json"), {"seed": 0, "settings": []})
  assert run_dir.finished_report(str(tmp_path), config) == {"seed": 0, "settings": []}
  config.seed = 1
  assert run_dir.finished_report(str(tmp_path), config) is None
  config.seed = 0
  (tmp_path / "report.json").write_text("{not json")
  assert run_dir.finished_report(str(tmp_path), config) is None
