"""The method registry (fat.methods): lookup, run order, config checks, and what
each built-in method asks of the loop (the toy method added in one file that
reaches the report: tests/test_main_smoke.py)."""

import dataclasses

import ml_collections
import pytest
from conftest import tiny_net

from configs import default
from experiments import config_checks
from fat import methods


def test_builtin_methods_in_run_order():
  assert [n for n in methods.names() if n in ("ptq_minmax", "ptq_percentile", "ptq_mse", "fat",
                                                "qat")] == ["ptq_minmax", "ptq_percentile",
                                                            "ptq_mse", "fat", "qat"]
  assert methods.get("fat").kind == methods.TRAINED and methods.get("ptq_mse").kind == methods.PTQ
  # PTQ methods run first, whatever order the config lists them in.
  assert methods.ordered(["qat", "fat", "ptq_mse", "ptq_minmax"]) == [
      "ptq_minmax", "ptq_mse", "fat", "qat"]
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    methods.get("nope")
  # The PTQ (or trained) ones among a selection, in its order, by registered kind (AdaRound
  # trains its rounding, whatever its name says); unregistered names left out.
  mixed = ["fat", "ptq_mse", "nope", "qat", "ptq_adaround", "ptq_minmax"]
  assert methods.of_kind(mixed, methods.PTQ) == ["ptq_mse", "ptq_minmax"]
  assert methods.of_kind(mixed, methods.TRAINED) == ["fat", "qat", "ptq_adaround"]


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


@pytest.mark.parametrize("start, extra", [("ptq_mse", ()), ("ptq_adaround", ("ptq_adaround",))])
def test_lsq_starts_from_a_selected_ptq_method(start, extra):
  """A start not in config.methods, or one that trains (AdaRound), is refused."""
  c = default.get_config()
  c.methods = ("ptq_minmax", "fat", "lsq") + extra
  c.lsq.start = "ptq_minmax"
  config_checks.validate(c)
  c.lsq.start = start
  with pytest.raises(ValueError, match=f"config.lsq.start must be a PTQ method .* got '{start}'"):
    config_checks.validate(c)


@pytest.fixture(scope="module")
def tiny():
  """A ``Context`` factory for one W8A8 setting of tiny_net (three MobileNet-v2
  blocks; zero weights, random 16 px images). No test here compiles the network: the
  distillation score is a stub, and ``fat.loop.train`` is replaced by one that
  records what the method asks of it (the loop has its own tests, and the
  end-to-end runs compile everything)."""
  import jax
  import numpy as np
  from fat import calibrate, data, pipeline
  model = tiny_net()
  rng = np.random.default_rng(0)
  split = data.Split(rng.integers(0, 256, (64, 16, 16, 1), dtype=np.uint8),
                     rng.integers(0, 10, 64))
  x = data.normalize(split.images[:1])
  s = pipeline.Setting(name="w8a8", weight_bits=8, act_bits=8, per_channel=True)
  qmodel = calibrate.quantized(model, pipeline.setting_rules(s))
  shapes = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), x)["params"]
  folded = {"params": jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)}
  config = default.get_config("smoke")
  config.fat.batch_size, config.qat.batch_size, config.qat.train_fraction = 16, 16, 1.0

  def make(cfg=config, losses=None):
    qmodel, qvars = pipeline.quantize(model, folded, pipeline.setting_rules(s), x)
    losses = dict(losses or {})
    return methods.Context(config=cfg, setting=s, qmodel=qmodel, variables=qvars,
                           calib=split.head(32), unlabeled=split, train=split,
                           teacher=np.zeros((64, 10), np.float32),
                           act_ranges=lambda m: {}, distill=lambda v: losses[id(v)],
                           results={})
  return config, make


@pytest.fixture
def recorded(monkeypatch):
  """``fat.loop.train`` replaced: records (spec, first batch) and returns the
  start variables with fixed stats."""
  from fat import loop
  calls = []

  def fake_train(step, part, opt_state, batches, spec, writer=None):
    calls.append((spec, next(iter(batches)), part))
    return loop.LoopResult(part.merged(), [(1, 0.5)], {"steps": 1})
  monkeypatch.setattr(loop, "train", fake_train)
  return calls


def test_fat_starts_from_the_ptq_result_with_the_lowest_loss(tiny, recorded, monkeypatch):
  config, make = tiny
  # Scored on the calibration images (holdout_images 0); the held-out score is
  # in tests/test_fat_recipe.py.
  monkeypatch.setitem(config.fat, "holdout_images", 0)
  ctx = make()
  a, b = ctx.variables, {**ctx.variables}
  ctx = make(losses={id(a): 0.7, id(b): 0.3})
  ctx.results.update(ptq_minmax=a, ptq_mse=b)
  result = methods.get("fat").run(ctx)
  spec, (x, target), part = recorded[0]
  assert result.stats["init"] == "ptq_mse" and result.losses == [(1, 0.5)]
  assert result.stats["steps"] == 1 and result.stats["scored_on"] == "calibration"
  assert part.trainable["thresholds"] is b["thresholds"]  # only the thresholds train
  assert (spec.name, spec.tag, spec.knob) == ("fat", "w8a8", "config.fat.learning_rate")
  assert spec.steps_per_epoch == 4 and spec.train_images == 64  # 64 images, batch 16
  assert spec.score is ctx.distill and spec.patience == config.fat.patience
  assert x.shape == (16, 16, 16, 1) and target.shape == (16, 10)  # teacher rows
  config.fat.keep_best, config.fat.patience = False, 0
  methods.get("fat").run(ctx)
  assert recorded[1][0].score is None  # no keep-best: the last thresholds


def test_qat_trains_params_and_thresholds_on_labels(tiny, recorded):
  config, make = tiny
  ctx = make()
  ctx.results["ptq_minmax"] = ctx.variables
  methods.get("qat").run(ctx)
  spec, (x, y), part = recorded[0]
  assert set(part.trainable) == {"params", "thresholds"}
  assert (spec.name, spec.knob, spec.score) == ("qat", "config.qat.learning_rate", None)
  assert spec.steps_per_epoch == 4 and y.dtype.kind == "i" and x.shape[0] == 16


def test_ptq_methods_write_their_ranges(tiny):
  config, make = tiny
  ctx = make()
  ranges = {"stem/act_q": (-1.0, 3.0)}
  ctx = methods.Context(**{**ctx.__dict__, "act_ranges": lambda m: ranges})
  v = methods.get("ptq_minmax").run(ctx).variables
  stats = v["quant_stats"]["stem"]["act_q"]
  assert (float(stats["x_min"]), float(stats["x_max"])) == (-1.0, 3.0)


@pytest.mark.parametrize("name,what", [("qat", "QAT"), ("lsq", "LSQ")])
def test_labeled_methods_check_their_data_before_anything_runs(tiny, name, what):
  config, make = tiny
  cfg = config.copy_and_resolve_references()
  train = make().train
  n = len(train.sample(cfg[name].train_fraction, cfg.seed))
  cfg[name].batch_size = n
  methods.get(name).check_data(cfg, train)  # one whole batch fits
  cfg[name].batch_size = n + 1
  with pytest.raises(ValueError, match=rf"config.{name}.batch_size {n + 1} exceeds the {n} "
                     rf"{what} train images; lower it or raise config.{name}.train_fraction"):
    methods.get(name).check_data(cfg, train)


def test_lsq_trains_with_scaled_steps_from_its_start(tiny, recorded, monkeypatch):
  import dataclasses
  import optax
  from fat import steps
  from fat.methods import lsq
  made = []
  monkeypatch.setattr(lsq, "optimizer", lambda *a: made.append(a) or optax.identity())
  monkeypatch.setattr(steps, "make_qat_step", lambda qmodel, tx: made.append(qmodel.mode))
  lsq._update.cache_clear()
  config, make = tiny
  ctx = make()
  ctx.results.update(ptq_minmax=ctx.variables, ptq_mse={**ctx.variables})
  cfg = config.copy_and_resolve_references()
  cfg.lsq.batch_size, cfg.lsq.train_fraction = 16, 1.0
  ctx = methods.Context(**{**ctx.__dict__, "config": cfg})
  result = methods.get("lsq").run(ctx)
  spec, (x, y), part = recorded[0]
  assert set(part.trainable) == {"params", "thresholds"} and result.stats["init"] == "ptq_mse"
  assert part.trainable["thresholds"] is ctx.results["ptq_mse"]["thresholds"]
  # The setting is W8A8: the default config's rate for 8-bit weights, named in the
  # loop's messages.
  assert ctx.setting.weight_bits == 8 and dict(cfg.lsq.lr_by_bits)[8] == 1e-4
  assert (spec.name, spec.knob, spec.steps_per_epoch) == ("lsq", "config.lsq.lr_by_bits", 4)
  (name, lr, total, momentum), mode = made  # SGD, cosine over every step; LSQ gradients
  assert (name, lr, total, momentum) == ("sgd", 1e-4, 4, 0.9)
  assert result.stats["learning_rate"] == 1e-4
  assert mode == dataclasses.replace(ctx.qmodel.mode, lsq=True)
  # No rate for the width: learning_rate.
  cfg.lsq.lr_by_bits = ((4, 3e-5),)
  result = methods.get("lsq").run(ctx)
  assert made[2][1] == cfg.lsq.learning_rate == result.stats["learning_rate"] != 1e-4
  assert recorded[1][0].knob == "config.lsq.learning_rate"
  lsq._update.cache_clear()


def test_lsq_rate_by_weight_width():
  from fat.methods import lsq
  c = default.get_config()
  assert lsq.learning_rate(c.lsq, 8) == (1e-4, "config.lsq.lr_by_bits")
  assert lsq.learning_rate(c.lsq, 4) == (c.lsq.learning_rate, "config.lsq.learning_rate")
  c.lsq.lr_by_bits = ()
  assert lsq.learning_rate(c.lsq, 8) == (c.lsq.learning_rate, "config.lsq.learning_rate")


@pytest.mark.parametrize("pairs, message", [
    (((8, 1e-4), (8, 1e-3)), "gives 8-bit weights two rates"),
    (((8, 0.0),), r"rate of 8-bit weights must be a number in \(0.0, inf\)"),
    (((8, "fast"),), r"rate of 8-bit weights must be a number"),
    (((1, 1e-4),), r"\(1, 0.0001\) is not a \(weight bits in 2..16, rate\) pair"),
    (((8,),), "is not a"),
    (8e-4, "must be pairs"),
])
def test_lsq_rates_by_width_are_checked(pairs, message):
  c = default.get_config()
  c.methods += ("lsq",)
  # Built anew: a ConfigDict keeps a field's type, and a config read from JSON need not.
  c.lsq = ml_collections.ConfigDict({**c.lsq.to_dict(), "lr_by_bits": pairs})
  with pytest.raises(ValueError, match=message):
    config_checks.validate(c)


def test_fat_adaround_starts_from_adaround_with_weight_thresholds_frozen(tiny, recorded,
                                                                         monkeypatch):
  import optax
  from fat.methods import adaround, fat_training
  config, make = tiny
  built = []
  monkeypatch.setattr(fat_training, "_update",
                      lambda *args: built.append(dict(args[-1])) or (optax.identity(), None))
  ctx = make()
  ctx.results["ptq_adaround"] = ctx.variables
  result = methods.get("fat_adaround").run(ctx)
  spec, _, part = recorded[0]
  assert result.stats["init"] == "ptq_adaround" and spec.name == "fat_adaround"
  assert part.trainable["thresholds"] is ctx.variables["thresholds"]
  mask = adaround.weight_threshold_mask(ctx.variables)
  assert mask["stem"]["conv"]["alpha"] == 0.0 and mask["stem"]["act_q"]["alpha"] == 1.0
  # Learning-rate factors: 0 on weight thresholds (their grids keep the learned integers),
  # the 8-bit width factor (config.fat.lr_by_width) on the activations'.
  assert config.fat.lr_by_width
  assert built[0]["thresholds/block_1/expand/conv/alpha"] == 0.0
  assert built[0]["thresholds/block_1/expand/act_q/alpha"] == pytest.approx(7 / 127)
  methods.get("fat_adaround_all").run(ctx)
  assert recorded[1][0].name == "fat_adaround_all"
  assert sorted(built[1].values()) == pytest.approx([7 / 127] * len(built[1]))


def test_ptq_adaround_reconstructs_from_its_start(tiny, monkeypatch):
  from fat import reconstruction
  config, make = tiny
  ctx = make()
  minmax, mse = {**ctx.variables}, {**ctx.variables}
  ctx.results.update(ptq_minmax=minmax, ptq_mse=mse)
  # "best" (the default): the PTQ result with the lowest distillation loss.
  ctx = dataclasses.replace(ctx, distill=lambda v: 0.5 if v is mse else 1.0)
  calls = []

  def fake(qmodel, variables, images, spec, batch_size, pattern):
    calls.append((variables, len(images), spec, pattern))
    return variables, {"train_seconds": 1.0, "train_images": len(images)}, [(1, 0.1)]
  monkeypatch.setattr(reconstruction, "reconstruct", fake)
  assert config.adaround.start == "best"
  result = methods.get("ptq_adaround").run(ctx)
  variables, n, spec, pattern = calls[0]
  assert variables is mse and n == len(ctx.calib) and pattern == ".*"
  assert spec.granularity == config.adaround.granularity and spec.seed == config.seed
  assert result.stats["init"] == "ptq_mse" and result.losses == [(1, 0.1)]
  named = config.copy_and_resolve_references()
  named.adaround.start = "ptq_minmax"  # a named start is taken as it is
  assert methods.get("ptq_adaround").run(
      dataclasses.replace(ctx, config=named)).stats["init"] == "ptq_minmax"
  assert calls[1][0] is minmax
  assert not (spec.act_thresholds or spec.quantize_output)
  # The joint variant: the same start and images, its output quantizers in the
  # loss and their thresholds trained.
  joint = methods.get("fat_adaround_joint").run(ctx)
  variables, n, spec, _ = calls[2]
  assert variables is mse and n == len(ctx.calib) and joint.stats["init"] == "ptq_mse"
  assert spec.act_thresholds and spec.quantize_output
  assert spec.threshold_learning_rate == config.adaround.threshold_learning_rate
  # QDrop's recipe: the joint spec, by block, on dropped activation quantization.
  qdrop = methods.get("fat_qdrop").run(ctx)
  variables, n, spec, _ = calls[3]
  assert variables is mse and n == len(ctx.calib) and qdrop.stats["init"] == "ptq_mse"
  assert spec == dataclasses.replace(calls[2][2], granularity="block", input="qdrop")
  assert spec.drop_prob == config.adaround.drop_prob
