"""Checkpoints whose meta.json lacks what a stage needs, damaged or mismatched
checkpoint files, and bad deployment inputs, are named errors, not KeyErrors or
the runtime's own exceptions."""

import json
import logging
import pathlib
import re

import jax
import numpy as np
import pytest

from configs import default
from experiments import deploy
from experiments.train import load_float
from fat import checkpoints


def test_round_trip_keeps_variables_and_meta(tmp_path, caplog):
  variables = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  checkpoints.save(str(tmp_path / "c"), variables, {"model": "mobilenet_v2", "n": 3})
  with caplog.at_level(logging.WARNING):
    got, meta = checkpoints.load(str(tmp_path / "c"))
  np.testing.assert_array_equal(got["params"]["w"], variables["params"]["w"])
  assert meta == {"model": "mobilenet_v2", "n": 3,
                  "checksums": checkpoints.checksums(variables)}
  assert list(meta["checksums"]) == ["params/w"]
  assert meta["checksums"]["params/w"].startswith("sha256:")
  assert "unverified" not in caplog.text


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
  path = str(tmp_path / "c")
  checkpoints.save(path, {"w": np.ones(2, np.float32)}, {"model": "old"})
  with pytest.raises(TypeError, match="not JSON serializable"):
    checkpoints.save(path, {"w": np.zeros(3, np.float32)}, {"model": object()})
  got, meta = checkpoints.load(path)
  np.testing.assert_array_equal(got["w"], np.ones(2, np.float32))
  assert meta["model"] == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# --------------------------------------------------------------------------
# Checksums: damaged files under state/ are caught even where orbax reads them.
# --------------------------------------------------------------------------

TREE = {"params": {"stem": {"kernel": np.arange(1024, dtype=np.float32).reshape(32, 32),
                            "bias": np.zeros(32, np.float32)}},
        "batch_stats": {"mean": np.ones(4, np.float64)}, "step": np.int32(7)}


def _saved(tmp_path, meta=None):
  path = str(tmp_path / "ckpt")
  checkpoints.save(path, TREE, meta or {"model": "m"})
  return path


def _largest_data_file(path):
  files = [p for p in pathlib.Path(path, "state").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def test_checksums_hash_dtype_shape_and_bytes():
  got = checkpoints.checksums(TREE)
  assert sorted(got) == ["batch_stats/mean", "params/stem/bias", "params/stem/kernel", "step"]
  assert got == checkpoints.checksums(jax.tree.map(np.copy, TREE))
  w = TREE["params"]["stem"]["kernel"]
  k = "params/stem/kernel"
  for changed in (w.astype(np.int32), w.reshape(64, 16), w.T.copy(), w + 1):
    assert checkpoints.checksums({"params": {"stem": {"kernel": changed}}})[k] != got[k]


@pytest.mark.parametrize("damage", ["random_file", "random_prefix", "flipped_bytes"])
def test_damaged_data_file_is_a_checkpoint_error(tmp_path, damage):
  """Random bytes make orbax fail; flipped bytes inside the array data are read
  back as wrong numbers, which only the checksum catches. Both are named."""
  path = _saved(tmp_path)
  data = _largest_data_file(path)
  rng = np.random.default_rng(0)
  if damage == "random_file":
    data.write_bytes(rng.bytes(4096))
  elif damage == "random_prefix":
    with open(data, "r+b") as f:
      f.write(rng.bytes(min(4096, data.stat().st_size)))
  else:
    b = bytearray(data.read_bytes())
    for off in range(len(b) // 4, len(b) // 2, 97):
      b[off] ^= 0xFF
    data.write_bytes(bytes(b))
  with pytest.raises(checkpoints.CheckpointError,
                     match=rf"checkpoint '{re.escape(path)}'.*under {re.escape(path)}/state/ "
                           r"is .*corrupted.*git checkout -- .* or retrain it"):
    checkpoints.load(path)


def test_flipped_bytes_are_caught_by_the_checksum(tmp_path):
  """Flips inside the array data that orbax reads without complaint."""
  path = _saved(tmp_path)
  data = _largest_data_file(path)
  b = bytearray(data.read_bytes())
  b[len(b) // 2] ^= 0xFF
  data.write_bytes(bytes(b))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"array 'params/stem/kernel' does not match its checksum in "
                           r"meta.json; a file under .*/state/ is corrupted"):
    checkpoints.load(path)


def _edit_meta(path, edit):
  meta_path = pathlib.Path(path, "meta.json")
  meta = json.loads(meta_path.read_text())
  edit(meta)
  meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def test_tampered_or_missing_checksum_names_the_array(tmp_path):
  path = _saved(tmp_path)
  good = checkpoints.load(path)[1]["checksums"]
  _edit_meta(path, lambda m: m["checksums"].update({"params/stem/bias": "sha256:00"}))
  with pytest.raises(checkpoints.CheckpointError,
                     match=rf"checkpoint '{re.escape(path)}': array 'params/stem/bias' "
                           "does not match"):
    checkpoints.load(path)
  _edit_meta(path, lambda m: m["checksums"].update(good, **{"params/gone": "sha256:00"}))
  with pytest.raises(checkpoints.CheckpointError, match=r"has no array 'params/gone'"):
    checkpoints.load(path)
  _edit_meta(path, lambda m: [m["checksums"].pop("params/gone"), m["checksums"].pop("step")])
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"has arrays \['step'\] that its meta.json does not list"):
    checkpoints.load(path)


def test_checkpoint_without_checksums_loads_with_one_warning(tmp_path, caplog):
  path = _saved(tmp_path, {"model": "old"})
  _edit_meta(path, lambda m: m.pop("checksums"))
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      got, meta = checkpoints.load(path)
  warnings = [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()]
  assert meta == {"model": "old"}
  np.testing.assert_array_equal(got["params"]["stem"]["kernel"], TREE["params"]["stem"]["kernel"])
  assert len(warnings) == 1 and path in warnings[0], warnings
  assert "re-saving" in warnings[0]
  checkpoints.save(path, got, meta)  # re-saving adds them
  assert checkpoints.load(path)[1]["checksums"] == checkpoints.checksums(TREE)
  with pytest.raises(checkpoints.CheckpointError, match="has no 'checksums'.*re-save it"):
    checkpoints.fingerprint({"model": "old"})


def test_fingerprint_follows_the_arrays(tmp_path):
  meta = checkpoints.load(_saved(tmp_path))[1]
  fp = checkpoints.fingerprint(meta)
  assert len(fp) == 16 and int(fp, 16) >= 0
  same = {"model": "other", "checksums": dict(reversed(meta["checksums"].items()))}
  assert checkpoints.fingerprint(same) == fp
  changed = jax.tree.map(np.copy, TREE)
  changed["params"]["stem"]["bias"][3] = 1e-7
  assert checkpoints.fingerprint({"checksums": checkpoints.checksums(changed)}) != fp


# --------------------------------------------------------------------------
# check_shapes: a checkpoint that does not fit the model.
# --------------------------------------------------------------------------


def test_check_shapes_accepts_matching_shapes_structs_and_arrays():
  expected = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.result_type(a)), TREE)
  checkpoints.check_shapes(expected, TREE, "ckpt")
  checkpoints.check_shapes(TREE, TREE, "ckpt")
  checkpoints.check_shapes({"params": {"w": (2, 3), "s": ()}},
                           {"params": {"w": np.zeros((2, 3)), "s": np.float32(1)}}, "ckpt")


def test_check_shapes_names_the_first_mismatch_and_both_shapes():
  model = {"params": {"a": (3, 3, 1, 8), "b": (8,), "c": (8, 10)}}
  ckpt = {"params": {"a": np.zeros((3, 3, 3, 8)), "b": np.zeros(8), "c": np.zeros((8, 5))}}
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"checkpoint 'runs/c' does not fit the model: tensor 'params/a' has "
                           r"shape \(3, 3, 3, 8\) in the checkpoint but \(3, 3, 1, 8\) in the "
                           r"model \(1 more tensors differ\); check .*runs/c/meta.json.*channels"):
    checkpoints.check_shapes(model, ckpt, "runs/c")


def test_check_shapes_names_missing_and_extra_tensors():
  model = {"params": {"a": (2,), "b": (2,)}, "batch_stats": {"m": (2,)}}
  ckpt = {"params": {"a": np.zeros(2), "z": np.zeros(2)}}
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"checkpoint 'c' does not fit the model: it lacks 2 tensor\(s\) the "
                           r"model has: 'batch_stats/m', 'params/b'; it has 1 tensor\(s\) the "
                           r"model lacks: 'params/z'; check that the model and model_kwargs"):
    checkpoints.check_shapes(model, ckpt, "c")


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
