"""The method registry (fat.methods): lookup, run order, config checks, and a
toy method added in one file that reaches the report without editing the main job."""

import json

import pytest

from configs import default
from experiments import config_checks
from fat import methods


def test_builtin_methods_in_run_order():
  assert methods.names()[:5] == ["ptq_minmax", "ptq_percentile", "ptq_mse", "fat", "qat"]
  assert methods.get("fat").kind == methods.TRAINED and methods.get("ptq_mse").kind == methods.PTQ
  # PTQ methods run first, whatever order the config lists them in.
  assert methods.ordered(["qat", "fat", "ptq_mse", "ptq_minmax"]) == [
      "ptq_minmax", "ptq_mse", "fat", "qat"]
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    methods.get("nope")


def test_register_rejects_a_second_method_of_the_same_name():
  m = methods.Method(name="ptq_test_dup", run=lambda ctx: None)
  methods.register(m)
  try:
    methods.register(m)  # the same object again: fine
    with pytest.raises(ValueError, match="already registered"):
      methods.register(methods.Method(name="ptq_test_dup", run=lambda ctx: None))
    with pytest.raises(ValueError, match="kind must be one of"):
      methods.Method(name="x", run=lambda ctx: None, kind="other")
  finally:
    methods.unregister("ptq_test_dup")
  assert "ptq_test_dup" not in methods.names()


@pytest.mark.parametrize("selected, message", [
    (("ptq_minmax", "fat", "ptq_typo"), r"config.methods has unknown \['ptq_typo'\]"),
    (("ptq_mse", "fat"), r"config.methods must include \['ptq_minmax'\]"),
    (("ptq_minmax", "fat", "fat"), "names a method twice"),
])
def test_config_checks_read_the_registry(selected, message):
  c = default.get_config()
  c.methods = selected
  with pytest.raises(ValueError, match=message):
    config_checks.validate(c)


def test_selected_methods_validate_their_own_fields():
  c = default.get_config()
  c.qat.batch_size = 0  # QAT not selected: not checked
  config_checks.validate(c)
  c.methods += ("qat",)
  with pytest.raises(ValueError, match="config.qat.batch_size must be a positive integer"):
    config_checks.validate(c)


def test_toy_method_reaches_the_report(float_ckpt, tmp_path):
  """tests/toy_method.py registers PTQ with alpha = 0.9; a config naming it runs
  it through the unchanged main job, and the report, its markdown and FAT's
  choice of start see it."""
  from tests import toy_method
  from experiments.train import train_and_evaluate
  config = default.get_config("smoke")
  config.model_checkpoint = float_ckpt
  config.settings = config.settings[:1]
  config.methods = ("ptq_minmax", "ptq_alpha09", "fat")
  config.eval_examples = 100
  config.fat.epochs = 1
  try:
    report = train_and_evaluate(config, str(tmp_path))
  finally:
    methods.unregister(toy_method.METHOD.name)
  entry = report["settings"][0]
  assert list(entry["methods"]) == ["ptq_minmax", "ptq_alpha09", "fat"]
  toy = entry["methods"]["ptq_alpha09"]
  assert toy["mean_alpha"] == pytest.approx(0.9) and set(toy["vs_fat"]) == {"fat_only_correct",
                                                       "method_only_correct", "p_value"}
  assert entry["best_ptq"] == "ptq_alpha09"  # the only PTQ method besides min/max
  assert entry["methods"]["fat"]["init"] in ("ptq_minmax", "ptq_alpha09")
  on_disk = json.load(open(tmp_path / "report.json"))
  assert on_disk["settings"][0]["methods"]["ptq_alpha09"]["top1_pct"] == toy["top1_pct"]
  assert "| ptq_alpha09" in (tmp_path / "report.md").read_text().replace("**", "")


@pytest.fixture(scope="module")
def tiny():
  """A tiny float MobileNet-v2 (random weights) on random 16 px images, and a
  ``Context`` factory for one W8A8 setting: each built-in method runs on it."""
  import jax
  import ml_collections
  import numpy as np
  from fat import calibrate, data, evaluate, models, pipeline, steps
  model = models.MobileNetV2(num_classes=10, width=0.35, small_input=True)
  rng = np.random.default_rng(0)
  split = data.Split(rng.integers(0, 256, (64, 16, 16, 1), dtype=np.uint8),
                     rng.integers(0, 10, 64))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), data.normalize(split.images[:1]))
  config = default.get_config("smoke")
  config.calibration_images, config.calibration_batch_size = 32, 16
  config.fat.batch_size, config.qat.batch_size, config.log_every = 16, 16, 1
  config.qat.train_fraction = 1.0
  s = pipeline.Setting(name="w8a8", weight_bits=8, act_bits=8, per_channel=True)
  p = pipeline.prepare(model, variables, pipeline.setting_rules(s), split.head(32))
  qmodel = p.qmodel
  ranges = calibrate.SharedRanges(p.folded["params"], split.head(32), batch_size=16)
  teacher = evaluate.logits(jax.jit(p.fmodel.apply), p.folded, split, 64)
  apply = jax.jit(qmodel.apply)

  def make(cfg=config, teacher=teacher):
    distill = lambda v: float(steps.distillation_loss(
        evaluate.logits(apply, v, split.head(32), 16), teacher[:32]))
    qvars = pipeline.quantize(model, p.folded, qmodel.mode.rules, split.images[:1] / 1.0)[1]
    return methods.Context(config=cfg, setting=s, qmodel=qmodel, variables=qvars,
                           calib=split.head(32), unlabeled=split, train=split, teacher=teacher,
                           act_ranges=lambda m: ranges(qmodel, m), distill=distill, results={})
  return config, make


def test_each_method_runs_on_a_context(tiny):
  config, make = tiny
  ctx = make()
  for name in methods.ordered(methods.names()):
    result = methods.get(name).run(ctx)
    ctx.results[name] = result.variables
  minmax = ctx.results["ptq_minmax"]["quant_stats"]["stem"]["act_q"]
  assert float(minmax["x_max"]) > 0 and float(minmax["x_min"]) <= 0
  fat = methods.get("fat").run(ctx)
  assert fat.stats["init"] in ("ptq_minmax", "ptq_percentile", "ptq_mse")
  assert fat.stats["steps"] == 4 and fat.stats["train_images"] == 64  # 64 / 16, one epoch
  assert [s for s, _ in fat.losses][-1] == fat.stats["steps"]
  qat = methods.get("qat").run(ctx)
  assert qat.stats["steps"] == 4 and qat.stats["epochs"] == 1.0


def test_all_nan_epoch_names_the_methods_knob(tiny):
  import numpy as np
  config, make = tiny
  ctx = make(teacher=np.full((64, 10), np.nan, np.float32))
  ctx.results["ptq_minmax"] = methods.get("ptq_minmax").run(ctx).variables
  with pytest.raises(FloatingPointError, match=r"FAT w8a8: every step of epoch 1 gave a "
                                               r"non-finite .* config\.fat\.learning_rate"):
    methods.get("fat").run(ctx)
  cfg = config.copy_and_resolve_references()
  cfg.qat.learning_rate = float("nan")
  ctx = make(cfg)
  ctx.results["ptq_minmax"] = methods.get("ptq_minmax").run(ctx).variables
  with pytest.raises(FloatingPointError, match=r"QAT w8a8: every step of epoch 1 .* "
                                               r"config\.qat\.learning_rate"):
    methods.get("qat").run(ctx)


def test_qat_checks_its_data_before_anything_runs(tiny):
  config, make = tiny
  cfg = config.copy_and_resolve_references()
  cfg.qat.batch_size = 100
  with pytest.raises(ValueError, match="config.qat.batch_size 100 exceeds the 64 QAT train"):
    methods.get("qat").check_data(cfg, make().train)
