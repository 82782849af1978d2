"""Checkpoints whose meta.json lacks what a stage needs, and bad deployment
inputs, are named errors, not KeyErrors or the runtime's own exceptions."""

import numpy as np
import pytest

from configs import default
from experiments import deploy
from experiments.train import load_float
from fat import checkpoints


def test_round_trip_keeps_variables_and_meta(tmp_path):
  variables = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  checkpoints.save(str(tmp_path / "c"), variables, {"model": "mobilenet_v2", "n": 3})
  got, meta = checkpoints.load(str(tmp_path / "c"))
  np.testing.assert_array_equal(got["params"]["w"], variables["params"]["w"])
  assert meta == {"model": "mobilenet_v2", "n": 3}


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
  path = str(tmp_path / "c")
  checkpoints.save(path, {"w": np.ones(2, np.float32)}, {"model": "old"})
  with pytest.raises(TypeError, match="not JSON serializable"):
    checkpoints.save(path, {"w": np.zeros(3, np.float32)}, {"model": object()})
  got, meta = checkpoints.load(path)
  np.testing.assert_array_equal(got["w"], np.ones(2, np.float32))
  assert meta == {"model": "old"} and sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_error_classes_keep_their_old_names():
  from fat import data, errors
  assert checkpoints.CheckpointError is errors.CheckpointError
  assert data.DataError is errors.DataError
  assert deploy.ExportError is errors.ExportError
  for e in (errors.CheckpointError, errors.DataError, errors.ExportError):
    assert issubclass(e, errors.UserError)


def test_save_barriers_wait_only_for_process_0(tmp_path, monkeypatch):
  """Only process 0 calls save, so every orbax barrier in it must be limited to
  process 0; a barrier over all processes would wait forever on several hosts."""
  from orbax.checkpoint._src.multihost import multihost
  seen, sync = [], multihost.sync_global_processes

  def spy(name, **kwargs):
    seen.append(kwargs.get("processes"))
    return sync(name, **kwargs)
  monkeypatch.setattr(multihost, "sync_global_processes", spy)
  checkpoints.save(str(tmp_path / "c"), {"w": np.zeros(2, np.float32)}, {"model": "m"})
  assert seen and all(p == {0} for p in seen), seen


def test_float_checkpoint_without_model_kwargs_is_named(tmp_path):
  path = str(tmp_path / "c")
  checkpoints.save(path, {"params": {"w": np.zeros(2, np.float32)}}, {"model": "mobilenet_v2"})
  config = default.get_config("smoke")
  config.model_checkpoint = path
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"has no \['model_kwargs'\] in its meta.json; point "
                           "config.model_checkpoint"):
    load_float(config)


def test_setting_checkpoint_without_eval_examples_is_named(tmp_path):
  path = tmp_path / "checkpoints" / "w8"
  meta = {"model": "mobilenet_v2", "model_kwargs": {}, "config": {}, "fat": {},
          "dataset": "fashion_mnist"}
  checkpoints.save(str(path), {"params": {"w": np.zeros(2, np.float32)}}, meta)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"has no \['eval_examples'\] .*re-run the main job"):
    deploy.load_setting(str(tmp_path), "w8")


def test_workdir_without_finished_settings_is_named(tmp_path):
  (tmp_path / "checkpoints" / "w8.tmp").mkdir(parents=True)
  with pytest.raises(checkpoints.CheckpointError, match="no finished setting"):
    deploy.export(str(tmp_path))


def test_unreadable_onnx_file_is_an_export_error(tmp_path):
  from fat import runtime
  from fat.errors import ExportError
  bad = tmp_path / "model_int8.onnx"
  bad.write_bytes(b"not a protobuf")
  for path in (bad, tmp_path / "missing.onnx"):
    with pytest.raises(ExportError, match="cannot load .*re-run python -m experiments.export "
                                          "--workdir=W --setting=w8"):
      deploy.open_exported(runtime.session, str(path), "W", "w8")


def test_integer_examples_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match="--integer_examples must be a positive number"):
    deploy.verify(str(tmp_path), integer_examples=0)
  assert not (tmp_path / "onnx_report.json").exists()
