"""The main job end to end: one in-process smoke run (``smoke_run`` in conftest.py)
feeds the report, output, export, verify and cross-process determinism checks;
then a toy method added in one file, and bad input. All slow tier."""

import json
import os
import random
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from conftest import (REPO, TINY_MODEL, run_main, run_module, run_parallel, smoke_config,
                      smoke_flags)
from fat import checkpoints

pytestmark = pytest.mark.slow


def test_report_schema_and_values(smoke_run):
  workdir, report = smoke_run
  on_disk = json.load(open(os.path.join(workdir, "report.json")))
  assert on_disk["settings"][0]["name"] == report["settings"][0]["name"]
  assert on_disk["model"] == TINY_MODEL and on_disk["dataset"] == "fashion_mnist"
  assert on_disk["eval_examples"] == 200 and on_disk["width"] == 1.0
  assert (on_disk["fp32"]["top1_pct"] * 2).is_integer()  # of 200 images
  names = [s["name"] for s in on_disk["settings"]]
  assert names == ["w8a8_per_channel", "w4a8_per_channel"]
  for s in on_disk["settings"]:
    assert list(s["methods"]) == ["ptq_minmax", "ptq_percentile", "ptq_mse", "fat"]
    assert s["best_ptq"] in ("ptq_percentile", "ptq_mse")
    for m in s["methods"].values():
      # Percentages of 200 images are multiples of 0.5.
      assert (m["top1_pct"] * 2).is_integer() and (m["agreement_pct"] * 2).is_integer()
    fat = s["methods"]["fat"]
    for name in ("ptq_minmax", "ptq_percentile", "ptq_mse"):
      # The paired test's discordant counts explain the top-1 difference exactly.
      t = s["methods"][name]["vs_fat"]
      diff = (t["fat_only_correct"] - t["method_only_correct"]) * 100 / 200
      assert diff == pytest.approx(fat["top1_pct"] - s["methods"][name]["top1_pct"])
      assert 0.0 < t["p_value"] <= 1.0
    assert "vs_fat" not in fat
    # The smoke config withholds 32 of the 240 unlabeled images for FAT's
    # start and keep-best (config.fat.holdout_images); it trains on the rest.
    assert fat["train_images"] == 240 - 32 and fat["epochs"] == 1 and fat["train_seconds"] > 0
    assert fat["scored_on"] == "held-out (32 images)"
    assert fat["init"] in s["methods"]
    # keep_best: the held-out loss before training, every select_every steps
    # and at the end; the thresholds kept are those of its minimum.
    steps, losses = zip(*fat["calibration_loss_by_step"])
    want = sorted({0, fat["steps"], *range(20, fat["steps"], 20)})
    assert list(steps) == want and all(np.isfinite(losses))
    assert fat["kept_step"] == steps[int(np.argmin(losses))]
  w8 = on_disk["settings"][0]["methods"]["ptq_minmax"]["agreement_pct"]
  w4 = on_disk["settings"][1]["methods"]["ptq_minmax"]["agreement_pct"]
  assert w8 >= w4  # 8-bit weights disagree with float no more than 4-bit ones


def test_outputs_written(smoke_run):
  workdir, _ = smoke_run
  files = os.listdir(workdir)
  for name in ("report.md", "config.json", "thresholds.png", "weight_ranges.png", "loss.png"):
    assert name in files, name
  assert any(f.startswith("events.out.tfevents") for f in files)
  assert json.load(open(os.path.join(workdir, "config.json")))["fat"]["loss"] == "rmse"
  variables, meta = checkpoints.load(os.path.join(workdir, "checkpoints", "w8a8_per_channel"))
  assert meta["setting"] == "w8a8_per_channel"
  assert set(variables) == {"params", "quant_stats", "thresholds"}
  alphas = [v for k, v in _leaves(variables["thresholds"]) if k.endswith("alpha")]
  assert alphas and all(np.all(np.isfinite(a)) for a in alphas)


def test_predictions_reproduce_the_reports_paired_tests(smoke_run):
  """predictions/<setting>.npz holds every method's eval argmax: its top-1 and
  its McNemar against FAT are the report's, so any two methods can be compared."""
  from fat import evaluate
  workdir, report = smoke_run
  for s in report["settings"]:
    with np.load(os.path.join(workdir, "predictions", f"{s['name']}.npz")) as f:
      arrays = dict(f)
    labels = arrays.pop("labels")
    assert len(labels) == 200 and arrays.pop("fp32").shape == labels.shape
    assert sorted(arrays) == sorted(f"method/{m}" for m in s["methods"])
    fat = arrays["method/fat"]
    for m, entry in s["methods"].items():
      assert evaluate.top1_pct(arrays[f"method/{m}"], labels) == pytest.approx(entry["top1_pct"])
      if m != "fat":
        got = evaluate.mcnemar(fat, arrays[f"method/{m}"], labels)
        want = entry["vs_fat"]
        assert got == (want["fat_only_correct"], want["method_only_correct"],
                       pytest.approx(want["p_value"]))


def _leaves(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", v


def test_bad_config_exits_with_message(tmp_path):
  """The exit plumbing of the entry point (one line, status 2, nothing written); the
  config checks' other messages are tested in-process (tests/test_configs.py)."""
  workdir = tmp_path / "w"
  r = run_main("--config=configs/default.py:smoke", f"--workdir={workdir}",
               "--config.model_checkpoint=/nonexistent/ckpt")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "error: no checkpoint at '/nonexistent/ckpt'" in r.stderr, r.stderr[-2000:]
  assert not workdir.exists()  # nothing written


def test_late_failure_leaves_no_outputs(float_ckpt, tmp_path, monkeypatch):
  """A failure after the first outputs were written (here: in BN folding, after the
  TensorBoard writer opened its file) leaves the workdir as it was."""
  from experiments import train
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  config = smoke_config(float_ckpt)

  def fail(*args, **kwargs):
    raise FloatingPointError("late failure")
  monkeypatch.setattr(train.fold, "fold_variables", fail)
  with pytest.raises(FloatingPointError, match="late failure"):
    train.train_and_evaluate(config, str(workdir))
  assert os.listdir(workdir) == ["notes.txt"]


def test_corrupt_checkpoint_and_unwritable_workdir(float_ckpt, tmp_path):
  from experiments.train import train_and_evaluate
  bad = tmp_path / "bad_ckpt"
  bad.mkdir()
  (bad / "meta.json").write_text("{not json")
  config = smoke_config(str(bad))
  with pytest.raises(checkpoints.CheckpointError, match="corrupt meta.json"):
    train_and_evaluate(config, str(tmp_path / "w1"))
  (bad / "meta.json").write_text(json.dumps({"model": "mobilenet_v2"}))
  with pytest.raises(checkpoints.CheckpointError, match="cannot be read"):
    train_and_evaluate(config, str(tmp_path / "w2"))
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(OSError, match="cannot be written"):
    train_and_evaluate(smoke_config(float_ckpt), str(blocker / "sub"))
  assert sorted(os.listdir(tmp_path)) == ["bad_ckpt", "file"]  # no workdir made


def test_settings_share_activation_ranges(float_ckpt, monkeypatch):
  """One calibration pass per method serves every setting that quantizes the same
  activations, and gives the ranges that setting's own pass would."""
  from fat import calibrate, data, fold, models, pipeline
  variables, meta = checkpoints.load(float_ckpt)
  model = models.create(meta["model"], **meta["model_kwargs"])
  folded = fold.fold_variables(variables, model.bn_eps)
  config = default.get_config("smoke")
  calib = data.load_fashion_mnist("test").take(np.arange(48))
  passes = []
  original = calibrate.activation_ranges
  monkeypatch.setattr(calibrate, "activation_ranges",
                      lambda *a, **k: passes.append(k["method"]) or original(*a, **k))
  ranges = calibrate.SharedRanges(folded["params"], calib, batch_size=config.calibration_batch_size)
  qmodels = [calibrate.quantized(model, pipeline.config_rules(s, config.fat))
             for s in config.settings]
  assert len(qmodels) == 2
  first = {m: ranges(qmodels[0], m) for m in ("minmax", "percentile")}
  second = {m: ranges(qmodels[1], m) for m in ("minmax", "percentile")}
  assert passes == ["minmax", "percentile"]
  assert first == second and first["minmax"] != first["percentile"]
  own = original(qmodels[1], folded["params"], [x for x, _ in calib.batches(32)],
                 method="minmax", progress=False)
  assert second["minmax"] == own and len(own) > 10


def test_export_and_verify_onnx(smoke_run, tmp_path):
  """The deployment commands on the smoke main job's output: export with no
  --setting writes both settings (W4A8 with int4 weights), verify reports both."""
  workdir, report = smoke_run
  r = run_module("experiments.export", f"--workdir={workdir}")
  assert r.returncode == 0 and "skipped" not in r.stderr, r.stderr[-3000:]
  names = ["w4a8_per_channel", "w8a8_per_channel"]
  for setting in names:
    out = os.path.join(workdir, "export", setting)
    assert f"wrote {out}: model_int8.onnx (" in r.stdout, r.stdout
    for name in ("model_int8.onnx", "model_fp32.onnx", "export.json"):
      assert os.path.isfile(os.path.join(out, name)), name
  r = run_module("experiments.verify_onnx", f"--workdir={workdir}", "--integer_examples=200")
  assert r.returncode == 0, r.stderr[-3000:]
  onnx_report = json.load(open(os.path.join(workdir, "onnx_report.json")))
  by_name = {s["setting"]: s for s in onnx_report["settings"]}
  assert sorted(by_name) == names
  fat = {s["name"]: s["methods"]["fat"]["top1_pct"] for s in report["settings"]}
  for setting, s in by_name.items():
    assert s["eval_examples"] == 200
    assert s["fake_quant"]["top1_pct"] == fat[setting] == s["fake_quant"]["report_top1_pct"]
    assert s["int8"]["agreement_pct"] >= 95.0, setting
    assert abs(s["int8"]["top1_pct"] - fat[setting]) <= 2.0, setting
    assert s["fp32"]["agreement_pct"] >= 99.0
    assert s["integer_reference"]["ort_int8_agreement_pct"] >= 95.0, setting
    for key, name in (("int8", "model_int8.onnx"), ("fp32", "model_fp32.onnx")):
      path = os.path.join(workdir, "export", setting, name)
      assert s[key]["file_bytes"] == os.path.getsize(path)
  w8, w4 = by_name["w8a8_per_channel"], by_name["w4a8_per_channel"]
  # mobilenet_v2_tiny: stem, 2 + 3 + 3 block convs, head and classifier; one residual add.
  assert w8["opset"] == 17 and w8["weight_types"] == {"int8": 11}
  assert w8["int8_ops"]["QLinearConv"] == 11 and not w8["float_fallback_ops"]
  # int4 weights at opset 21: ORT dequantizes them and convolves in float.
  assert w4["opset"] == 21 and w4["weight_types"] == {"int4": 11}
  assert w4["int8_ops"]["QLinearAdd"] == 1 and w4["float_fallback_ops"]
  # Two weights a byte; scales, zero points and int32 biases stay as they were, so
  # the file shrinks by half a byte a weight (up to a few bytes of each tensor's
  # header): 0.57 of the W8A8 file on the whole network (docs/deployment.md).
  params, _ = checkpoints.load(os.path.join(workdir, "checkpoints", "w4a8_per_channel"))
  kernels = [v for k, v in _leaves(params["params"]) if k.endswith("kernel")]
  assert len(kernels) == 11
  # The weights and their per-channel zero points (the weight's type) are halved.
  saved = sum(v.size // 2 + v.shape[-1] // 2 for v in kernels)
  assert abs(w8["int8"]["file_bytes"] - w4["int8"]["file_bytes"] - saved) <= 4 * 11, saved
  # A checkpoint saved after the export (the main job ran again) makes it stale.
  from experiments import deploy
  from fat.errors import ExportError
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  path = os.path.join(copy, "checkpoints", "w8a8_per_channel")
  variables, meta = checkpoints.load(path)
  variables["thresholds"] = jax.tree.map(lambda t: t * 0.5, variables["thresholds"])
  checkpoints.save(path, variables, meta)
  with pytest.raises(ExportError, match="re-export it: python -m experiments.export "
                                        f"--workdir={copy} --setting=w8a8_per_channel"):
    deploy.verify(copy)


def test_export_refusals(smoke_run, tmp_path):
  """A setting ONNX cannot represent (4-bit activations: the W8A8 checkpoint under
  act_bits=4) is skipped with one line naming it and the reason, or is the error
  when asked for by name; a workdir with nothing exportable exits 2."""
  workdir, _ = smoke_run
  both, only = tmp_path / "both" / "checkpoints", tmp_path / "only" / "checkpoints"
  shutil.copytree(os.path.join(workdir, "checkpoints", "w8a8_per_channel"),
                  both / "w8a8_per_channel")
  variables, meta = checkpoints.load(str(both / "w8a8_per_channel"))
  meta = {**meta, "setting": "w8a4_per_channel",
          "config": {**meta["config"], "name": "w8a4_per_channel", "act_bits": 4}}
  checkpoints.save(str(both / "w8a4_per_channel"), variables, meta)
  shutil.copytree(both / "w8a4_per_channel", only / "w8a4_per_channel")
  skip, named, none = run_parallel([
      ["experiments.export", f"--workdir={both.parent}"],
      ["experiments.export", f"--workdir={both.parent}", "--setting=w8a4_per_channel"],
      ["experiments.export", f"--workdir={only.parent}"]])
  reason = ("input_q: activations on a 4-bit grid [-7, 7]; ONNX export needs 8-bit "
            "activations (act_bits=8")
  assert skip.returncode == 0, skip.stderr[-2000:]
  lines = [line for line in skip.stderr.splitlines() if line.startswith("skipped")]
  assert len(lines) == 1 and lines[0].startswith(f"skipped w8a4_per_channel: {reason}"), lines
  assert sorted(os.listdir(both.parent / "export")) == ["w8a8_per_channel"]
  assert named.returncode == 2, named.stderr[-2000:]
  errors = [line for line in named.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(
      f"error: cannot export setting 'w8a4_per_channel': {reason}"), named.stderr[-2000:]
  assert none.returncode == 2 and f"skipped w8a4_per_channel: {reason}" in none.stderr
  assert "error: no setting under" in none.stderr, none.stderr[-2000:]
  assert not os.path.exists(only.parent / "export" / "w8a4_per_channel")
  # The other refusals in-process: the same messages, without a JAX start each.
  from experiments import deploy
  with pytest.raises(checkpoints.CheckpointError, match="no setting 'nope'"):
    deploy.export(workdir, "nope")
  with pytest.raises(checkpoints.CheckpointError, match="run the main job"):
    deploy.export(str(tmp_path))
  with pytest.raises(ValueError, match="nothing exported"):
    deploy.verify(str(tmp_path))


def _without_timings(report):
  """The settings of ``report`` as report.json holds them, timings left out."""
  return [{k: {kk: vv for kk, vv in m.items() if not kk.endswith("_seconds")}
           for k, m in s["methods"].items()} for s in json.loads(json.dumps(report))["settings"]]


def test_a_killed_run_resumes_to_the_same_report_in_another_process(smoke_run, float_ckpt,
                                                                    tmp_path, optimized):
  """The smoke run's config in a separate process with another hash seed,
  killed (SIGKILL) at a random FAT step of its second setting, then started
  again with the same command: it resumes (the first setting is not rerun, FAT
  continues from its last step checkpoint), and its report (timings aside) and
  checkpoints equal the uninterrupted in-process run's, bit for bit."""
  workdir, a = smoke_run
  kill_after = random.randint(1, 6)  # of the 7 FAT steps
  args = [*smoke_flags(float_ckpt), f"--workdir={tmp_path / 'b'}", "--config.checkpoint_every=1"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONHASHSEED": "12345"}
  marker = tmp_path / "b" / ".partial" / "steps" / "w4a8_per_channel" / "fat" / str(kill_after)
  proc = subprocess.Popen([sys.executable, "-m", "experiments.main", *args], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.kill()
  _, err = proc.communicate()
  assert marker.exists(), (kill_after, err[-3000:])
  assert not (tmp_path / "b" / "report.json").exists()
  r = run_main(*args, env={"PYTHONHASHSEED": "12345"}, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming" in r.stderr and "w8a8_per_channel ptq" not in r.stderr, r.stderr[-3000:]
  b = json.load(open(tmp_path / "b" / "report.json"))
  assert _without_timings(a) == _without_timings(b) and len(b["settings"]) == 2, kill_after
  assert a["fp32"] == b["fp32"]
  for s in ("w8a8_per_channel", "w4a8_per_channel"):
    mine, theirs = (checkpoints.load(os.path.join(w, "checkpoints", s))[0]
                    for w in (workdir, tmp_path / "b"))
    jax.tree.map(np.testing.assert_array_equal, mine, theirs)
  # The same outputs, and nothing of the interrupted run left over.
  public = lambda w: sorted(f for f in os.listdir(w) if not f.startswith("events"))
  assert public(tmp_path / "b") == [f for f in public(workdir)
                                    if f not in ("export", "onnx_report.json")]


def test_a_second_job_on_the_same_workdir_is_refused(float_ckpt, tmp_path):
  from experiments import run_dir, train
  work = tmp_path / "w"
  with run_dir.lock(str(work)):
    (work / "notes.txt").write_text("first job's")
    with pytest.raises(run_dir.WorkdirBusy, match=f"pid {os.getpid()}"):
      train.train_and_evaluate(smoke_config(float_ckpt), str(work))
    assert sorted(os.listdir(work)) == [run_dir.LOCK, "notes.txt"]


def test_toy_method_reaches_the_report(float_ckpt, tmp_path, optimized):
  """tests/toy_method.py registers PTQ with alpha = 0.9; a config naming it runs
  it through the unchanged main job, and the report, its markdown and FAT's
  choice of start see it."""
  import toy_method
  from experiments.train import train_and_evaluate
  from fat import methods
  config = smoke_config(float_ckpt)
  config.settings = config.settings[:1]
  config.methods = ("ptq_minmax", "ptq_alpha09", "fat")
  config.eval_examples = 100
  try:
    report = train_and_evaluate(config, str(tmp_path))
  finally:
    methods.unregister(toy_method.METHOD.name)
  entry = report["settings"][0]
  assert list(entry["methods"]) == ["ptq_minmax", "ptq_alpha09", "fat"]
  toy = entry["methods"]["ptq_alpha09"]
  assert toy["mean_alpha"] == pytest.approx(0.9) and set(toy["vs_fat"]) == {
      "fat_only_correct", "method_only_correct", "p_value"}
  assert entry["best_ptq"] == "ptq_alpha09"  # the only PTQ method besides min/max
  assert entry["methods"]["fat"]["init"] in ("ptq_minmax", "ptq_alpha09")
  on_disk = json.load(open(tmp_path / "report.json"))
  assert on_disk["settings"][0]["methods"]["ptq_alpha09"]["top1_pct"] == toy["top1_pct"]
  assert "| ptq_alpha09" in (tmp_path / "report.md").read_text().replace("**", "")


def test_float_tensors_that_do_not_fit_the_model_are_named(float_ckpt):
  """3-channel images with the 1-channel checkpoint: the first mismatched
  tensor and both shapes, before anything runs."""
  from experiments import train
  from fat import models
  name, kwargs, variables, _ = train.load_float(smoke_config(float_ckpt))
  model = models.create(name, **kwargs)
  train._check_shapes(model, variables, np.zeros((1, 28, 28, 1), np.float32), float_ckpt)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"'params/stem/conv/kernel' has shape \(3, 3, 1, 8\) in the "
                           r"checkpoint but \(3, 3, 3, 8\) in the model"):
    train._check_shapes(model, variables, np.zeros((1, 28, 28, 3), np.float32), float_ckpt)


def test_a_batch_larger_than_the_data_is_clamped_and_recorded():
  from experiments import train
  config = default.get_config("smoke")
  assert train.effective_config(config, 240) is config  # batch 32 fits: unchanged
  config.fat.batch_size = 1000
  clamped = train.effective_config(config, 240)
  assert clamped.fat.batch_size == 240 and config.fat.batch_size == 1000
  assert json.loads(clamped.to_json_best_effort())["fat"]["batch_size"] == 240  # config.json
