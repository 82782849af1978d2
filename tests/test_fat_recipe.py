"""FAT's recipe (fat.recipes, fat.methods.fat_training): the paper's exact recipe
one switch away, its ablation additions, held-out scoring, and the validation
of the recipe fields. No test here compiles a network: rules are resolved on
a traced (eval_shape) tiny_net, and the loop is a toy or a recorder."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import default
from conftest import tiny_net
from experiments import config_checks
from fat import calibrate, data, layers, loop, methods, pipeline, recipes, rules, steps, variables
from fat.methods import fat_training


# --------------------------------------------------------------------------
# The switch: config.fat.recipe
# --------------------------------------------------------------------------


def test_paper_recipe_is_the_exact_recipe():
  c = default.get_config()
  ours = recipes.resolve(c.fat)
  assert (ours.best_start, ours.project, ours.keep_best, ours.holdout, ours.relu_beta) == (
      True, True, True, c.fat.holdout_images, True)
  c.fat.recipe = "paper"
  paper = recipes.resolve(c.fat)
  assert (paper.best_start, paper.project, paper.keep_best, paper.patience, paper.holdout) == (
      False, False, False, 0, 0)
  assert paper.unsigned_relu and not ours.unsigned_relu
  # A checkpoint's meta.json from before the field existed reads as "ours".
  old = {k: v for k, v in c.fat.to_dict().items() if k != "recipe"}
  assert recipes.resolve(old).name == "ours"


@pytest.mark.parametrize("addition, field", sorted(recipes.ADDITIONS.items()))
def test_each_addition_switches_one_thing_back_on(addition, field):
  c = default.get_config()
  c.fat.holdout_images = 500  # as configs/fashion_mnist/fat_hard.py
  c.fat.recipe = f"paper+{addition}"
  paper = dataclasses.replace(recipes.resolve(c.fat), name="paper")
  c.fat.recipe = "paper"
  base = recipes.resolve(c.fat)
  changed = {f.name for f in dataclasses.fields(base)
             if getattr(base, f.name) != getattr(paper, f.name)}
  # keep_best brings its held-out images and patience along.
  extra = {"patience", "holdout"} if addition == "keep_best" else set()
  assert changed == {field} | extra and getattr(paper, field) is True


@pytest.mark.parametrize("value, message", [
    ("papr", "config.fat.recipe must be one of ('ours', 'paper')"),
    ("ours+projection", "additions go with 'paper' only"),
    ("paper+projection+projection", "each addition once"),
    ("paper+rescaling", "each addition once, from ('projection'"),
])
def test_validation_rejects_a_bad_recipe(value, message):
  c = default.get_config()
  c.fat.recipe = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_checks.validate(c)


def test_validation_of_holdout_images():
  c = default.get_config()
  c.fat.holdout_images = -1
  with pytest.raises(ValueError, match=r"config.fat.holdout_images must be an integer >= 0"):
    config_checks.validate(c)
  c.fat.holdout_images = 10
  config_checks.validate(c)
  # The data check: it must fit outside the calibration images.
  c.fat.holdout_images = 150
  c.fat.train_fraction, c.calibration_images = 0.5, 100  # 250 of 500 images
  train = data.Split(np.zeros((500, 4, 4, 1), np.uint8), np.zeros(500, np.int64))
  methods.get("fat").check_data(c, train)
  c.fat.holdout_images = 151
  with pytest.raises(ValueError, match=r"config.fat.holdout_images 151 exceeds the 150 "
                                       r"unlabeled images outside the calibration images"):
    methods.get("fat").check_data(c, train)
  c.fat.recipe = "paper"  # no held-out images: nothing to check
  methods.get("fat").check_data(c, train)


def test_patience_without_keep_best_is_only_an_error_for_ours():
  c = default.get_config()
  c.fat.keep_best = False
  with pytest.raises(ValueError, match="config.fat.patience needs config.fat.keep_best=True"):
    config_checks.validate(c)
  c.fat.recipe = "paper"  # the recipe decides keep-best and patience
  config_checks.validate(c)


# --------------------------------------------------------------------------
# Unsigned ReLU outputs without beta (the paper's recipe)
# --------------------------------------------------------------------------


def _signed_outputs():
  """{ActQuant path: signed} of tiny_net, found by tracing it (no compile)."""
  found = {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, layers.ActQuant) and context.method_name == "__call__":
      found[layers.layer_path(m)] = m.signed
    return next_fun(*args, **kwargs)

  s = pipeline.Setting(name="w8a8", weight_bits=8, act_bits=8, per_channel=False)
  qmodel = calibrate.quantized(tiny_net(), pipeline.setting_rules(s))
  with nn.intercept_methods(record):
    jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
  return found


def _act_specs(rules_, signed_outputs):
  """{path: (signed, the spec ActQuant quantizes with)} under ``rules_``."""
  return {path: (signed, layers.act_spec(rules.resolve(tuple(rules_), path, "act"), signed))
          for path, signed in signed_outputs.items()}


def test_paper_recipe_quantizes_relu_outputs_unsigned_without_beta():
  outputs = _signed_outputs()
  c = default.get_config()
  s = default.setting("w8a8_asym", 8, 8, False, weight_kind="asymmetric",
                      act_kind="asymmetric")
  ours = _act_specs(pipeline.config_rules(s, c.fat), outputs)
  c.fat.recipe = "paper"
  paper = _act_specs(pipeline.config_rules(s, c.fat), outputs)
  relu = sorted(p for p, (signed, _) in paper.items() if not signed)
  assert relu == ["block_0/dw/act_q", "block_1/dw/act_q", "block_1/expand/act_q",
                  "block_2/dw/act_q", "block_2/expand/act_q", "head/act_q", "pool_q",
                  "stem/act_q"]
  for path, (signed, spec) in paper.items():
    if signed:  # linear outputs: the setting's asymmetric quantizer (input: symmetric)
      assert dataclasses.replace(spec, unsigned_relu=False) == ours[path][1]
      assert spec.kind == ("symmetric" if path == "input_q" else "asymmetric")
    else:  # the unsigned grid 0..255: no zero point, no beta
      assert spec.kind == "unsigned" and (spec.qmin, spec.qmax) == (0, 255), path
      assert ours[path][1].kind == "asymmetric" and ours[path][1].beta_range == (0.0, 0.4)
  # Symmetric settings quantize ReLU outputs unsigned in both recipes.
  sym = default.setting("w8a8", 8, 8, True)
  c.fat.recipe = "ours"
  assert _act_specs(pipeline.config_rules(sym, c.fat), outputs)["head/act_q"][1].kind == (
      "unsigned")


def test_unsigned_relu_spec_has_no_beta():
  from fat import quant
  spec = quant.QuantSpec(bits=4, kind="asymmetric", unsigned_relu=True)
  relu = layers.act_spec(spec, signed=False)
  assert relu.kind == "unsigned" and not quant.KINDS[relu.kind].shifted  # beta: no effect
  assert layers.act_spec(spec, signed=True) is spec
  with pytest.raises(ValueError, match="QuantSpec.unsigned_relu must be True or False"):
    quant.QuantSpec(unsigned_relu="yes")


# --------------------------------------------------------------------------
# What the FAT method asks of the loop under each recipe
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  """A Context factory for a W8A8 setting of tiny_net (zero weights, random
  16 px images, 64 unlabeled of which 32 calibration), and the config."""
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
  config.fat.batch_size, config.fat.holdout_images = 8, 16

  def make(cfg=config, losses=None):
    qmodel, qvars = pipeline.quantize(model, folded, pipeline.setting_rules(s), x)
    teacher = np.arange(64 * 10, dtype=np.float32).reshape(64, 10)
    ctx = methods.Context(config=cfg, setting=s, qmodel=qmodel, variables=qvars,
                          calib=split.head(32), unlabeled=split, train=split, teacher=teacher,
                          act_ranges=lambda m: {}, distill=lambda v: losses[id(v)],
                          results={})
    return ctx
  return config, make


@pytest.fixture
def recorded(monkeypatch):
  """``fat.loop.train`` and the FAT step builder replaced by recorders."""
  calls = {"loop": [], "update": []}

  def fake_train(step, part, opt_state, batches, spec, writer=None):
    calls["loop"].append((spec, list(batches), part))
    return loop.LoopResult(part.merged(), [(1, 0.5)], {"steps": 1})

  def fake_update(qmodel, learning_rate, reset_steps, lr_decay, loss, project, scales=()):
    calls["update"].append({"project": project, "scales": dict(scales)})
    return optax.sgd(0.1), None
  monkeypatch.setattr(loop, "train", fake_train)
  monkeypatch.setattr(fat_training, "_update", fake_update)
  return calls


def _with(config, **fat):
  c = config.copy_and_resolve_references()
  for k, v in fat.items():
    c.fat[k] = v
  return c


def test_paper_recipe_starts_from_minmax_without_projection_or_keep_best(tiny, recorded):
  config, make = tiny
  ctx = make(_with(config, recipe="paper"))
  a, b = ctx.variables, {**ctx.variables}
  ctx.results.update(ptq_minmax=a, ptq_mse=b)  # ptq_mse would score lower: not asked
  result = methods.get("fat").run(ctx)
  spec, batches, part = recorded["loop"][0]
  assert result.stats["init"] == "ptq_minmax" and result.stats["recipe"] == "paper"
  assert part.trainable["thresholds"] is a["thresholds"]
  flat = traverse_util.flatten_dict(a["thresholds"], sep="/")
  assert all(np.all(np.asarray(v) == (1.0 if k.endswith("alpha") else 0.0))
             for k, v in flat.items())  # alpha = 1, beta = 0
  assert spec.score is None and spec.patience == 0 and "scored_on" not in result.stats
  assert recorded["update"][0] == {"project": False, "scales": {}}
  assert spec.train_images == 64 and sum(len(x) for x, _ in batches) == 64 * config.fat.epochs


def test_ours_scores_start_and_keep_best_on_held_out_images(tiny, recorded, monkeypatch):
  config, make = tiny
  ctx = make()
  n, k = len(ctx.unlabeled), config.fat.holdout_images
  # The held-out score: logits of a stub network = the mean pixel, against the teacher rows.
  seen = []
  def fake_apply(qmodel):
    def apply(v, x):
      seen.append(len(x))
      return jnp.full((len(x), 10), float(v["thresholds"]["stem"]["act_q"]["alpha"]))
    return apply
  monkeypatch.setattr(fat_training, "_jit_apply", fake_apply)
  a = ctx.variables
  b = jax.tree.map(lambda x: x, a)
  b["thresholds"]["stem"]["act_q"]["alpha"] = jnp.float32(900.0)  # closer to the teacher
  ctx.results.update(ptq_minmax=a, ptq_mse=b)
  result = methods.get("fat").run(ctx)
  spec, batches, part = recorded["loop"][0]
  assert result.stats["init"] == "ptq_mse" and sum(seen) == 2 * k
  assert result.stats["scored_on"] == f"held-out ({k} images)"
  assert spec.train_images == n - k and spec.score is not None
  assert recorded["update"][0]["project"] is True
  # Training batches carry their own teacher rows, and no held-out or repeated image.
  held = fat_training.holdout_indices(n, len(ctx.calib), k, config.seed)
  assert held.min() >= len(ctx.calib) and len(set(held)) == k
  rows = set()
  for x, target in batches[:spec.steps_per_epoch]:
    r = (target[:, 0] / 10).astype(int)
    np.testing.assert_allclose(x, data.normalize(ctx.unlabeled.images[r]))
    rows |= set(r)
  assert rows == set(range(n)) - set(held)


def test_held_out_keep_best_never_returns_worse_than_the_start():
  """A toy step that diverges (SGD far above its stable rate): every scored
  iterate is worse on the held-out score, so the start comes back; with a
  stable rate the kept one is no worse than the start either."""
  def loss_fn(trainable, frozen, x, target):
    return jnp.mean((trainable["w"]["v"] * x - target) ** 2), {}
  rng = np.random.default_rng(0)
  train_x = rng.normal(size=(16, 4, 3)).astype(np.float32)
  held_x = rng.normal(size=(64, 3)).astype(np.float32)
  score = lambda v: float(np.mean((np.asarray(v["w"]["v"]) * held_x - 2.0 * held_x) ** 2))
  p = variables.Partition(trainable={"w": {"v": jnp.full(3, 1.5)}}, frozen={})
  for lr, diverges in ((10.0, True), (0.05, False)):
    tx = optax.sgd(lr)
    step = steps._make_guarded_step(loss_fn, tx, project=False)
    batches = ((x, 2.0 * x) for x in train_x)
    spec = loop.LoopSpec(name="toy", tag="t", steps_per_epoch=4, epochs=4, train_images=16,
                         knob="config.toy.learning_rate", score=score, select_every=2)
    out = loop.train(step, p, tx.init(p.trainable), batches, spec)
    scores = dict(out.stats["calibration_loss_by_step"])
    assert score(out.variables) == min(scores.values()) <= scores[0]
    if diverges:
      assert out.stats["kept_step"] == 0 and max(scores.values()) > 10 * scores[0]
      np.testing.assert_array_equal(out.variables["w"]["v"], p.trainable["w"]["v"])
    else:
      assert out.stats["kept_step"] > 0 and score(out.variables) < scores[0]


# --------------------------------------------------------------------------
# One learning rate per quantizer width (config.fat.lr_by_width)
# --------------------------------------------------------------------------


def test_width_factors_follow_each_quantizers_bits(tiny, recorded):
  config, make = tiny
  s = pipeline.Setting(name="w3a8", weight_bits=3, act_bits=8, per_channel=True)
  qmodel = calibrate.quantized(tiny_net(), pipeline.setting_rules(s))
  x = np.zeros((1, 16, 16, 1), np.float32)
  trainable = {"thresholds": jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), x)["thresholds"]}
  f = fat_training.lr_factors(qmodel, trainable, x)
  assert f["thresholds/stem/conv/alpha"] == pytest.approx(7 / 3)  # 3-bit weights
  assert f["thresholds/block_2/add_q/alpha"] == pytest.approx(7 / 127)  # 8-bit activations
  assert f["thresholds/classifier/alpha"] == pytest.approx(7 / 3)
  assert len(f) == len(traverse_util.flatten_dict(trainable["thresholds"]))
  assert fat_training.width_factor(4) == 1.0
  # The method hands them to the optimizer only with lr_by_width.
  ctx = make(_with(config, lr_by_width=True, holdout_images=0), losses={})
  ctx.results["ptq_minmax"] = ctx.variables
  ctx = dataclasses.replace(ctx, distill=lambda v: 0.0)
  methods.get("fat").run(ctx)
  scales = recorded["update"][0]["scales"]
  assert len(scales) == len(f)
  np.testing.assert_allclose(list(scales.values()), 7 / 127)  # W8A8


def test_scale_by_tree_scales_each_leafs_adam_step():
  from fat import schedules
  tx = schedules.fat_optimizer(0.1, scales={"a": 1.0, "b": 0.25})
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  updates, _ = tx.update({"a": jnp.ones(2), "b": jnp.full(2, 1e-6)}, tx.init(params), params)
  # Adam's first step is -lr * sign(g) whatever |g|; b's is a quarter of it.
  np.testing.assert_allclose(updates["a"], -0.1, rtol=1e-3)
  np.testing.assert_allclose(updates["b"], -0.025, rtol=1e-2)


def test_validation_of_lr_by_width():
  import ml_collections
  c = default.get_config()
  c.fat = ml_collections.ConfigDict({**c.fat.to_dict(), "lr_by_width": 1})
  with pytest.raises(ValueError, match="config.fat.lr_by_width must be True or False"):
    config_checks.validate(c)
