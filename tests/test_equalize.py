"""Mutual rescaling (fat/equalize.py) and bias correction (fat/bias_correction.py).

Function preservation runs on random networks whose BN statistics come from the
test batch and whose BN scales span 0.2-3, so that channel ranges differ by
an order of magnitude and rescaling moves them. Such a network amplifies a
relative weight change of 1e-7 (float32 rounding) into about 1e-4 of its
logits, so the two whole networks are checked in float64, where rescaling
changes their logits by about 1e-13; tiny_net is checked in float32 too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import assert_integer_layers_match, tiny_net
from experiments import config_checks
from fat import (bias_correction, calibrate, equalize, fold, graph, methods, models,
                 pipeline, quant, rules)

ATOL_REL = 1e-4  # the largest logit change allowed, relative to the largest logit


def _images(n, size, seed, dtype=np.float32):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 1)).astype(dtype)


def _float_vars(model, x, seed=0):
  """Random float variables in ``x``'s dtype: He-normal kernels, BN scale in
  [0.2, 3], BN offset ~ N(0, 0.5), and the BN statistics of batch ``x``.
  (Drawn in numpy from the shapes: ``jax.jit(model.init)`` of a whole network
  compiles for 20 s.)"""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])

  def draw(path, a):
    name, parent = path[-1].key, path[-2].key if len(path) > 1 else ""
    if name == "kernel":
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(a.shape[:-1])), a.shape)
    elif parent == "bn" and name == "scale":
      value = rng.uniform(0.2, 3.0, a.shape)
    elif name in ("bias", "mean"):
      value = rng.normal(0.0, 0.5, a.shape) if parent == "bn" and name == "bias" else \
          np.zeros(a.shape)
    else:  # var
      value = np.ones(a.shape)
    return value.astype(x.dtype)

  v = jax.tree_util.tree_map_with_path(draw, shapes)
  stats = jax.jit(lambda v, x: model.clone(bn_momentum=0.0).apply(
      v, x, train=True, mutable=["batch_stats"])[1])
  state = stats(v, x)
  return {"params": v["params"], "batch_stats": jax.tree.map(lambda a: np.asarray(a, x.dtype),
                                                             state["batch_stats"])}


def _fold(model, v):
  return jax.jit(fold.fold_variables, static_argnums=1)(v, model.bn_eps)


def _relative_change(model, a, b, x):
  apply = jax.jit(calibrate.quantized(model, (), stage="folded").apply)
  la, lb = np.asarray(apply(a, x)), np.asarray(apply(b, x))
  return float(np.abs(la - lb).max() / np.abs(la).max())


def _flat(folded):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(folded["params"],
                                                                  sep="/").items()}


def _out_ranges(w):
  return np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)


def _in_ranges(w, depthwise):
  return _out_ranges(w) if depthwise else np.abs(np.moveaxis(w, -2, -1)).reshape(
      -1, w.shape[-2]).max(axis=0)


# --------------------------------------------------------------------------
# Which layers are rescaled.
# --------------------------------------------------------------------------


def test_pairs_follow_the_dataflow():
  """Pairs are read from the traced model: a tensor that a residual add also
  reads (block_1's project output, block_2's add) is never rescaled."""
  model = tiny_net()
  x = _images(4, 16, 0)
  folded = _fold(model, _float_vars(model, x))
  found = [(p.first, p.second, p.act, p.depthwise)
           for p in equalize.pairs(model, folded, x)]
  assert found == [
      ("stem", "block_0/dw", "relu6", True),
      ("block_0/dw", "block_0/project", "relu6", False),
      ("block_0/project", "block_1/expand", None, False),
      ("block_1/expand", "block_1/dw", "relu6", True),
      ("block_1/dw", "block_1/project", "relu6", False),
      ("block_2/expand", "block_2/dw", "relu6", True),
      ("block_2/dw", "block_2/project", "relu6", False),
  ]


def test_relu6_bounds():
  floor, locked = equalize.relu6_bounds(np.array([-1.0, 0.0, 3.0, 5.9, 6.0, 9.0]))
  np.testing.assert_allclose(floor[2:4], [0.5, 5.9 / 6])
  np.testing.assert_array_equal(floor[:2], [1.0, 1.0])   # never fires: only shrinks
  np.testing.assert_array_equal(locked, [False, False, False, False, True, True])
  floor, locked = equalize.relu6_bounds(np.array([3.0, 4.0]), headroom=1.5)
  np.testing.assert_allclose(floor, [0.75, 1.0])
  np.testing.assert_array_equal(locked, [False, True])


def test_relu6_needs_calibration_maxima():
  model = tiny_net()
  x = _images(4, 16, 0)
  folded = _fold(model, _float_vars(model, x))
  with pytest.raises(ValueError, match="channel_max=fat.equalize.channel_maxima"):
    equalize.equalize(model, folded, x)
  with pytest.raises(ValueError, match="headroom must be >= 1"):
    equalize.equalize_images(model, folded, x, headroom=0.5)


# --------------------------------------------------------------------------
# Function preservation.
# --------------------------------------------------------------------------


def test_tiny_net_keeps_its_function_float32():
  model = tiny_net()
  x = _images(32, 16, 1)
  folded = _fold(model, _float_vars(model, x))
  new = equalize.equalize_images(model, folded, x)
  assert _relative_change(model, folded, new, x) < ATOL_REL
  before, after = _flat(folded), _flat(new)
  assert jax.tree.map(np.shape, before) == jax.tree.map(np.shape, after)
  assert all(after[k].dtype == np.float32 for k in after)
  moved = np.abs(_out_ranges(after["block_1/dw/conv/kernel"])
                 / _out_ranges(before["block_1/dw/conv/kernel"]) - 1)
  assert np.mean(moved > 1e-3) > 0.5   # rescaling did something


def test_activation_scales():
  """Every channel that fires is scaled to the largest range; ReLU6 caps that
  range at 6 (and at 6 / headroom) and keeps locked and silent channels."""
  np.testing.assert_allclose(equalize.activation_scales(np.array([-1.0, 0.0, 1.0, 2.0, 4.0]),
                                                        "relu"), [1, 1, 0.25, 0.5, 1])
  np.testing.assert_allclose(equalize.activation_scales(np.array([1.0, 3.0, 9.0, -2.0]),
                                                        "relu6"), [1 / 6, 0.5, 1, 1])
  # headroom 1.5: the range is capped at 4, and 5 * 1.5 >= 6 locks the second channel.
  np.testing.assert_allclose(equalize.activation_scales(np.array([1.0, 5.0]), "relu6",
                                                        headroom=1.5), [0.25, 1.0])
  m = np.array([0.5, 1.0, 3.0, 3.9])
  floor, locked = equalize.relu6_bounds(m, headroom=1.5)
  s = equalize.activation_scales(m, "relu6", headroom=1.5)
  assert np.all(s >= floor) and not locked.any()
  np.testing.assert_allclose(m / s, 3.9)


def test_activation_target_gives_each_depthwise_input_one_range():
  """target="activations" on tiny_net (float32): the logits on the
  calibration images are kept; every firing channel of each tensor read by a
  depthwise conv ends with the same largest value (6 where a channel clips);
  every other layer, and the depthwise biases, are untouched."""
  model = tiny_net()
  x = _images(32, 16, 1)
  folded = _fold(model, _float_vars(model, x))
  new = equalize.equalize_images(model, folded, x, target="activations")
  assert _relative_change(model, folded, new, x) < ATOL_REL
  before_max = equalize.channel_maxima(model, folded, x)
  after_max = equalize.channel_maxima(model, new, x)
  before, after = _flat(folded), _flat(new)
  pairs = equalize.pairs(model, folded, x)
  into_dw = [p for p in pairs if p.depthwise]
  assert [p.first for p in into_dw] == ["stem", "block_1/expand", "block_2/expand"]
  for p in into_dw:
    fires = before_max[p.first] > 0
    a_before = np.minimum(before_max[p.first][fires], 6.0)
    a_after = np.minimum(after_max[p.first][fires], 6.0)
    assert a_before.min() < 0.5 * a_before.max(), p.first   # the ranges did differ
    np.testing.assert_allclose(a_after, a_after.max(), rtol=1e-4, err_msg=p.first)
  moved = {p.first for p in into_dw} | {p.second for p in into_dw}
  for key in before:
    layer, leaf = key.rsplit("/conv/", 1) if "/conv/" in key else (key, "")
    if layer not in moved or (leaf == "bias" and layer.endswith("/dw")):
      np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    else:
      assert not np.array_equal(after[key], before[key]), key
  with pytest.raises(ValueError, match="target must be one of"):
    equalize.equalize_images(model, folded, x, target="both")


@pytest.mark.slow
def test_activation_target_helps_per_tensor_activations():
  """What it is for: 8-bit per-channel weights, and the tensors read by
  depthwise convs at 4 bits per tensor (min/max; the others at 16 bits).
  After it, tiny_net loses a fraction of the float logits it lost before."""
  model = tiny_net()
  x = _images(32, 16, 4)
  folded = _fold(model, _float_vars(model, x))
  a4 = rules.QuantRule(pattern=r"^(stem|block_\d+/expand)/act_q$", act=quant.QuantSpec(bits=4))
  r = rules.uniform_rules(weight=quant.QuantSpec(bits=8, per_channel=True),
                          act=quant.QuantSpec(bits=16), overrides=(a4,))
  ref = np.asarray(jax.jit(calibrate.quantized(model, (), stage="folded").apply)(folded, x))
  errors = []
  for params in (folded, equalize.equalize_images(model, folded, x, target="activations")):
    qmodel, qvars = pipeline.quantize(model, params, r, x)
    qvars = calibrate.calibrate(qmodel, qvars, [x], progress=False)
    errors.append(float(np.mean((np.asarray(jax.jit(qmodel.apply)(qvars, x)) - ref) ** 2)))
  assert errors[1] < 0.3 * errors[0], errors


@pytest.mark.slow
@pytest.mark.parametrize("name,target", [("mobilenet_v2", "weights"), ("mnasnet", "weights"),
                                         ("mnasnet", "activations")])
def test_network_keeps_its_function(name, target):
  """Each whole network, in float64: logits unchanged on the calibration images
  (ReLU6 is bounded by their maxima); MNASNet's ReLU pairs are exact on any image."""
  with jax.enable_x64(True):
    kw = dict(width=0.35) if name == "mobilenet_v2" else dict(width=0.5)
    model = models.create(name, num_classes=10, small_input=True, dtype=jnp.float64, **kw)
    x = _images(16, 16, 2, np.float64)
    folded = _fold(model, _float_vars(model, x))
    maxima = equalize.channel_maxima(model, folded, x)
    new = equalize.equalize(model, folded, x, channel_max=maxima, target=target)
    change = _relative_change(model, folded, new, x)
    assert change < ATOL_REL, change
    assert change < 1e-9, change   # float64: exact up to rounding
    if name == "mnasnet":
      assert _relative_change(model, folded, new, _images(16, 16, 3, np.float64)) < 1e-9
    if target == "activations":
      after_max = equalize.channel_maxima(model, new, x)
      firsts = {p.first for p in equalize.pairs(model, folded, x) if p.depthwise}
      assert len(firsts) >= 10
      for first in firsts:   # ReLU, no cap: each tensor into a depthwise has one range
        a = after_max[first][maxima[first] > 0]
        np.testing.assert_allclose(a, a.max(), rtol=1e-6, err_msg=first)
      return
    # Every ReLU pair ends with equal ranges (sqrt(r1 r2) on both sides); a ReLU6
    # pair where a channel's calibration maximum holds it back does not.
    before, after = _flat(folded), _flat(new)
    pairs = equalize.pairs(model, folded, x)
    assert len(pairs) >= 30
    for p in pairs:
      r1 = _out_ranges(after[f"{p.first}/conv/kernel"])
      r2 = _in_ranges(after[f"{p.second}/conv/kernel"], p.depthwise)
      if p.act != "relu6":
        np.testing.assert_allclose(r1, r2, rtol=1e-3, err_msg=f"{p.first} -> {p.second}")
      else:
        floor, locked = equalize.relu6_bounds(maxima[p.first])
        # The first layer's bias is divided by its total scale S, and by nothing else.
        b0, b1 = before[f"{p.first}/conv/bias"], after[f"{p.first}/conv/bias"]
        assert np.all(np.abs(b0) > 1e-6)
        total = b0 / b1
        assert np.all(total[~locked] >= floor[~locked] * (1 - 1e-9))
        np.testing.assert_allclose(total[locked], 1.0, rtol=1e-9)
        free = ~locked & (total > floor * (1 + 1e-6))
        np.testing.assert_allclose(r1[free], r2[free], rtol=1e-3)


@pytest.mark.slow
def test_equalizing_helps_per_tensor_weights():
  """What it is for: 4-bit per-tensor weights (float activations) of tiny_net
  lose less of the float logits after rescaling."""
  model = tiny_net()
  x = _images(32, 16, 4)
  folded = _fold(model, _float_vars(model, x))
  w4 = rules.uniform_rules(weight=quant.QuantSpec(bits=4, per_channel=False), act=None)
  ref = np.asarray(jax.jit(calibrate.quantized(model, (), stage="folded").apply)(folded, x))
  errors = []
  for params in (folded, equalize.equalize_images(model, folded, x)):
    qmodel, qvars = pipeline.quantize(model, params, w4, x)
    errors.append(float(np.mean((np.asarray(jax.jit(qmodel.apply)(qvars, x)) - ref) ** 2)))
  assert errors[1] < 0.7 * errors[0], errors


# --------------------------------------------------------------------------
# Export after rescaling.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel,target", [
    (False, "weights"), pytest.param(True, "weights", marks=pytest.mark.slow),
    pytest.param(True, "activations", marks=pytest.mark.slow)])
def test_export_matches_the_integer_reference_after_rescaling(per_channel, target):
  """W8A8 on rescaled tiny_net: every integer op reproduces the simulation's grid
  indices within one step (>= 99.9% equal), as tests/test_export.py requires.

  A few images: an output exactly on a rounding tie (x * s == k + 0.5 in
  float32) may be rounded one way in the recorded activation and the other way
  where XLA fuses the same fake-quant into the next conv, with or without
  rescaling; 32 images at 28 px hit one such tie in this network."""
  model = tiny_net()
  x = _images(16, 16, 5)
  folded = _fold(model, _float_vars(model, x))
  new = equalize.equalize_images(model, folded, x, target=target)
  r = rules.uniform_rules(weight=quant.QuantSpec(bits=8, per_channel=per_channel),
                          act=quant.QuantSpec(bits=8))
  qmodel, qvars = pipeline.quantize(model, new, r, x)
  qvars = calibrate.calibrate(qmodel, qvars, [x], progress=False)
  nodes, acts = graph.trace(qmodel, qvars, x, return_activations=True)
  assert_integer_layers_match(nodes, acts, x)


# --------------------------------------------------------------------------
# Bias correction.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w4_tiny():
  """tiny_net at W4A8 per tensor, calibrated, and bias-corrected on its images:
  (qmodel, variables, corrected variables, images)."""
  model = tiny_net()
  x = _images(64, 16, 6)
  r = pipeline.setting_rules(pipeline.Setting(name="w4a8", weight_bits=4, act_bits=8,
                                              per_channel=False))
  p = pipeline.prepare(model, _float_vars(model, x), r, x, batch_size=32)
  fixed = bias_correction.correct_biases(p.qmodel, p.variables, x, batch_size=32)
  return p.qmodel, p.variables, fixed, x


def test_bias_correction_lowers_each_layers_mean_error(w4_tiny):
  """Each layer's mean output error per channel against its float layer, on the
  inputs the quantized network gives it, before and after the correction."""
  qmodel, qvars, fixed, x = w4_tiny
  before = bias_correction.output_errors(qmodel, qvars, x, batch_size=32)
  after = bias_correction.output_errors(qmodel, fixed, x, batch_size=32,
                                        reference=qvars["params"])
  assert set(before) == set(after) and {"classifier", "head/conv"} <= set(before)
  for path in before:
    if path == "stem/conv":  # its error is the bias's int32 rounding, which stays
      continue
    assert np.abs(after[path]).mean() < 0.2 * np.abs(before[path]).mean(), path
  # Only biases change.
  b, a = _flat(qvars), _flat(fixed)
  changed = [k for k in b if not np.array_equal(a[k], b[k])]
  assert changed and all(k.endswith("/bias") for k in changed), changed
  for collection in ("quant_stats", "thresholds"):
    assert jax.tree.all(jax.tree.map(np.array_equal, qvars[collection], fixed[collection]))


def test_bias_correction_independent_check(w4_tiny):
  """The classifier's mean output error, from the model's recorded intermediates
  (its quantized output against its float weights on the same pooled input):
  lower after correction, and so is the logits' error against the float model."""
  qmodel, qvars, fixed, x = w4_tiny
  kernel = np.asarray(qvars["params"]["classifier"]["kernel"], np.float64)
  bias = np.asarray(qvars["params"]["classifier"]["bias"], np.float64)
  run = jax.jit(lambda v: qmodel.apply(v, x, capture_intermediates=True,
                                       mutable=["intermediates"]))

  def errors(v):
    logits, state = run(v)
    inter = state["intermediates"]
    pooled = np.asarray(inter["pool_q"]["__call__"][0][0], np.float64)
    y_q = np.asarray(inter["classifier"]["__call__"][0], np.float64)
    return np.abs((y_q - (pooled @ kernel + bias)).mean(axis=0)).mean(), np.asarray(logits)

  (layer_before, q_before), (layer_after, q_after) = errors(qvars), errors(fixed)
  assert layer_after < 0.5 * layer_before
  fmodel = calibrate.quantized(qmodel, (), stage="folded")
  ref = np.asarray(jax.jit(fmodel.apply)({"params": qvars["params"]}, x))
  assert np.mean((q_after - ref) ** 2) < np.mean((q_before - ref) ** 2)


def test_ptq_methods_correct_biases_when_switched_on(w4_tiny):
  """``config.bias_correction`` applies the correction to each PTQ method's result."""
  from configs import default
  qmodel, qvars, fixed, x = w4_tiny
  config = default.get_config("smoke")
  assert config.calibration_batch_size == 32  # as w4_tiny's correction
  ctx = methods.Context(config=config, setting=None, qmodel=qmodel, variables=qvars, calib=x,
                        unlabeled=x, train=None, teacher=None, act_ranges=lambda _: {},
                        distill=None, results={})
  for name in ("ptq_minmax", "ptq_percentile"):
    config.bias_correction = False
    off = methods.get(name).run(ctx).variables
    assert jax.tree.all(jax.tree.map(np.array_equal, off["params"], qvars["params"]))
    config.bias_correction = True
    on = methods.get(name).run(ctx).variables
    assert jax.tree.all(jax.tree.map(np.array_equal, on["params"], fixed["params"]))


def test_bias_correction_needs_a_quantized_model(w4_tiny):
  qmodel, qvars, _, x = w4_tiny
  with pytest.raises(ValueError, match="'quant' stage"):
    bias_correction.output_errors(calibrate.quantized(qmodel, (), stage="folded"), qvars, x)


# --------------------------------------------------------------------------
# Config switches.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["equalize", "bias_correction"])
def test_config_switches_are_booleans(field):
  from configs import default
  c = default.get_config()
  assert c[field] is False
  config_checks.validate(c)
  # A config file that sets the field to 1 (assignment would keep the bool type).
  del c[field]
  c[field] = 1
  with pytest.raises(ValueError, match=f"config.{field} must be True or False"):
    config_checks.validate(c)


def test_config_equalize_target_is_checked():
  from configs import default
  c = default.get_config()
  assert c.equalize_target == "weights"
  c.equalize_target = "activations"
  config_checks.validate(c)
  c.equalize_target = "channels"
  with pytest.raises(ValueError, match="config.equalize_target must be one of"):
    config_checks.validate(c)
