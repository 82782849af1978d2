"""Tests of MobileNet-v2 and MNASNet through the pipeline stages.

float -> folded (METHOD.md section 2) -> calibrated -> fake-quantized (section 1).

The expensive pieces (random float variables with realistic BN statistics, the
folded variables, the calibrated 16-bit quantized variables, one 8-bit run
with every intermediate captured) are built once per model by module-scoped
fixtures. Every quantizer grid here is recomputed from the formulas of
METHOD.md section 1 in float64 numpy, not with ``fat.quant``.
"""

import dataclasses
import inspect
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fat import models
from fat.calibrate import activation_ranges, calibrate, init_quant_variables, quantized
from fat.fold import fold_variables
from fat.layers import QuantMode
from fat.models import MNASNet, MobileNetV2, blocks, pretrained
from fat.quant import QuantSpec
from fat.rules import QuantRule

MODELS = {"mobilenet_v2": MobileNetV2, "mnasnet": MNASNet}

WIDTH = 0.5
SIZE = 32
BATCH = 8
NUM_CLASSES = 10

# Residual (add_q) blocks, from the stage tables of METHOD.md section 6: every
# repeat after the first of a stage (each stage's first repeat changes the
# channel count or strides, so it has no residual add).
RESIDUAL = {
    # (1,16,1,1) b0 | (6,24,2,2) b1 b2 | (6,32,3,2) b3-5 | (6,64,4,2) b6-9 |
    # (6,96,3,1) b10-12 | (6,160,3,2) b13-15 | (6,320,1,1) b16
    "mobilenet_v2": {2, 4, 5, 7, 8, 9, 11, 12, 14, 15},
    # (3,3,24,3,2) b0-2 | (3,5,40,3,2) b3-5 | (6,5,80,3,2) b6-8 | (6,3,96,2,1) b9-10 |
    # (6,5,192,4,2) b11-14 | (6,3,320,1,1) b15
    "mnasnet": {1, 2, 4, 5, 7, 8, 10, 12, 13, 14},
}
NUM_BLOCKS = {"mobilenet_v2": 17, "mnasnet": 16}
# conv layers: MobileNet-v2 stem + block_0 (dw, project) + 16*3 + head = 52;
# MNASNet stem + sep_dw + sep_project + 16*3 + head = 52. Plus the classifier.
NUM_WEIGHT_QUANTIZERS = 53
# input_q + one act_q per conv (52) + 10 add_q + pool_q + logits_q.
NUM_ACT_QUANTIZERS = 65
ACT_QUANTIZER_NAMES = ("act_q", "add_q", "input_q", "pool_q", "logits_q")
LINEAR_CONVS = ("project", "sep_project")  # ConvBNAct with act=None
MODEL_ACT = {"mobilenet_v2": lambda v: np.clip(v, 0.0, 6.0),
             "mnasnet": lambda v: np.maximum(v, 0.0)}


# --------------------------------------------------------------------------
# Tree helpers.
# --------------------------------------------------------------------------


def _key(k):
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flat(tree):
  """{"a/b/c": leaf} of a nested dict."""
  return {"/".join(_key(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaf_names(tree):
  return {p.rsplit("/", 1)[-1] for p in flat(tree)}


def captured(intermediates):
  """Module outputs ("__call__") and sown quantized kernels, keyed by module path."""
  outs, kernels = {}, {}
  for path, value in flat(intermediates).items():
    parts = path.split("/")
    if "__call__" in parts:
      # Each entry is a 1-tuple; blocks and quantizers return (x, step).
      i = parts.index("__call__")
      mod, rest = "/".join(parts[:i]), parts[i + 1:]
      assert rest in (["0"], ["0", "0"], ["0", "1"]), path
      if rest != ["0", "1"]:
        outs[mod] = np.asarray(value, np.float64)
      continue
    assert parts[-1] == "0", path
    mod = "/".join(parts[:-2])
    if parts[-2] == "kernel_q":
      kernels[mod] = np.asarray(value, np.float64)
    else:
      raise AssertionError(f"unexpected intermediate {path}")
  return outs, kernels


def weight_layers(params):
  """Paths of every layer with a kernel: "stem/conv", ..., "classifier"."""
  return {p[:-len("/kernel")] for p in flat(params) if p.endswith("/kernel")}


def count(tree):
  return sum(int(np.prod(l.shape)) for l in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# Parameter counts, shapes, widths (shape-only, via jax.eval_shape).
# --------------------------------------------------------------------------


def _shapes(model, size, batch=1):
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("name,width,want", [
    ("mobilenet_v2", 1.0, 3_504_872),  # Keras MobileNetV2 trainable params
    ("mnasnet", 1.0, 4_383_312),       # torchvision mnasnet1_0
    ("mnasnet", 0.5, 2_218_512),       # torchvision mnasnet0_5
    ("mnasnet", 0.75, 3_170_208),      # torchvision mnasnet0_75
    ("mnasnet", 1.3, 6_282_256),       # torchvision mnasnet1_3
])
def test_param_count(name, width, want):
  v = _shapes(MODELS[name](num_classes=1000, width=width), 224)
  assert count(v["params"]) == want


@pytest.mark.parametrize("width,want", [(1.0, 3_538_984), (1.4, 6_156_712)])
def test_mobilenet_v2_total_with_bn_stats(width, want):
  """Keras' model.count_params() includes the BN moving mean and variance."""
  v = _shapes(MobileNetV2(num_classes=1000, width=width), 224)
  assert count(v["params"]) + count(v["batch_stats"]) == want


def test_param_count_classifier_and_head():
  v = _shapes(MobileNetV2(num_classes=1000, width=1.0), 224)
  assert v["params"]["classifier"]["kernel"].shape == (1280, 1000)
  assert v["params"]["classifier"]["bias"].shape == (1000,)
  assert v["params"]["stem"]["conv"]["kernel"].shape == (3, 3, 3, 32)
  # The 1280 head is not shrunk below width 1.0 ...
  v = _shapes(MobileNetV2(num_classes=10, width=0.5), 32)
  assert v["params"]["head"]["conv"]["kernel"].shape[-1] == 1280
  assert v["params"]["stem"]["conv"]["kernel"].shape == (3, 3, 3, 16)
  # ... but grows above it.
  v = _shapes(MobileNetV2(num_classes=10, width=1.4), 32)
  assert v["params"]["head"]["conv"]["kernel"].shape[-1] == 1792


@pytest.mark.parametrize("size,small,spatial", [
    (224, False, 7), (32, False, 1), (28, True, 2), (32, True, 2)])
@pytest.mark.parametrize("name", list(MODELS))
def test_output_shapes(name, size, small, spatial):
  model = MODELS[name](num_classes=1000, small_input=small)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  only_head = lambda mdl, method: mdl.name == "head"
  y, v = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x,
                                       capture_intermediates=only_head), x)
  assert y.shape == (2, 1000)
  assert y.dtype == jnp.float32
  head, _ = v["intermediates"]["head"]["__call__"][0]  # blocks return (x, step)
  assert head.shape == (2, spatial, spatial, 1280)


@pytest.mark.parametrize("name,width", [
    ("mobilenet_v2", 0.2), ("mobilenet_v2", 1.5), ("mnasnet", 0.6), ("mnasnet", 2.0)])
def test_invalid_width_raises(name, width):
  with pytest.raises(ValueError, match="width"):
    _shapes(MODELS[name](num_classes=10, width=width), 32)


@pytest.mark.parametrize("name,width", [
    ("mobilenet_v2", 0.35), ("mobilenet_v2", 1.4), ("mnasnet", 0.5), ("mnasnet", 1.3)])
def test_valid_width_edges(name, width):
  v = _shapes(MODELS[name](num_classes=10, width=width), 32)
  assert count(v["params"]) > 0


# The keyword arguments shipped checkpoints store in meta.json ("model_kwargs").
MODEL_KWARGS = ("num_classes", "width", "small_input", "padding", "bn_eps", "bn_momentum",
                "dw_impl", "mode", "dtype")


def test_registry_is_the_table_of_models():
  from fat.models.tiny import TinyMobileNetV2
  table = {**MODELS, "mobilenet_v2_tiny": TinyMobileNetV2}
  assert models.MODELS == tuple(models.REGISTRY) == tuple(table)
  for name, entry in models.REGISTRY.items():
    assert entry.constructor is table[name]
    assert set(MODEL_KWARGS) <= set(inspect.signature(entry.constructor).parameters)
    m = models.create(name, num_classes=10, small_input=True)
    assert type(m) is table[name] and models.name_of(m) == name
    assert set(entry.pretrained) <= set(pretrained.FORMATS)
  assert set(pretrained.FORMATS) == {f for e in models.REGISTRY.values() for f in e.pretrained}
  # The table's widths are the ones the models accept (test_invalid_width_raises).
  for name, width, ok in [("mobilenet_v2", 0.35, True), ("mobilenet_v2", 1.4, True),
                          ("mobilenet_v2", 1.5, False), ("mnasnet", 0.75, True),
                          ("mnasnet", 0.6, False), ("mnasnet", True, False),
                          ("mobilenet_v2_tiny", 1.0, True), ("mobilenet_v2_tiny", 0.5, False)]:
    assert models.REGISTRY[name].allows(width) == ok, (name, width)
  models.check_width("mnasnet", 1.3)
  with pytest.raises(ValueError, match=re.escape(
      "config.width must be one of (0.5, 0.75, 1.0, 1.3) for mnasnet, got 0.6.")):
    models.check_width("mnasnet", 0.6, "config.width")
  with pytest.raises(ValueError, match=re.escape("width must be in [0.35, 1.4] for mobilenet_v2")):
    models.check_width("mobilenet_v2", 2.0)
  with pytest.raises(ValueError, match="unknown model 'resnet'"):
    models.create("resnet")


@pytest.mark.parametrize("name", list(MODELS))
def test_blocks_inherit_the_shared_attributes(name):
  """Every block gets the network's ``Common`` attributes; defaults as before."""
  defaults = {"mobilenet_v2": ("same", 1e-3), "mnasnet": ("symmetric", 1e-5)}[name]
  assert (MODELS[name]().padding, MODELS[name]().bn_eps) == defaults
  model = MODELS[name](num_classes=10, width=0.5, padding="same", bn_eps=0.01,
                       bn_momentum=0.9, dw_impl="shift")
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, blocks.Common) and context.method_name == "__call__":
      seen.append((type(context.module), context.module.common()))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _shapes(model, 32)
  assert {t for t, _ in seen} == {MODELS[name], blocks.ConvBNAct, blocks.InvertedResidual}
  assert all(c == model.common() for _, c in seen)
  assert model.common()["dw_impl"] == "shift"


# --------------------------------------------------------------------------
# Float model with realistic BN statistics (module-scoped, per model).
# --------------------------------------------------------------------------


def random_float_params(shapes, rng):
  """He-normal conv kernels, LeCun-normal classifier, BN scale/bias randomized."""

  def leaf(path, s):
    names = [_key(k) for k in path]
    if names[-1] == "kernel":
      gain = 2.0 if names[-2] == "conv" else 1.0
      fan_in = int(np.prod(s.shape[:-1]))
      return (rng.normal(size=s.shape) * np.sqrt(gain / fan_in)).astype(np.float32)
    if names[-1] == "scale":
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if names[-1] == "bias":
      return rng.normal(0.0, 0.2, s.shape).astype(np.float32)
    raise AssertionError(f"unexpected parameter {names}")

  return jax.tree_util.tree_map_with_path(leaf, shapes)


# The BN statistics are the batch's own (momentum 0, train mode), then the
# variance is floored. A random net on 8 images of 32 px has channels that are
# almost constant across the batch (var ~ 1e-10 after a ReLU at 2x2
# resolution); their 1/sqrt(var + eps) ~ 300x gain turns 16-bit rounding into
# percent-level logit noise, which no trained network has.
VAR_FLOOR = 0.3


@dataclasses.dataclass
class Net:
  name: str
  model: nn.Module
  x: np.ndarray
  variables: dict
  logits: np.ndarray          # float model, eval mode
  folded: dict                # {"params": ...}
  folded_logits: np.ndarray


# MNASNet's network-level checks run in the slow tier; MobileNet-v2's in both.
# Checks of the quantizer layers themselves (the same classes in both networks)
# run on MobileNet-v2 only (``MOBILENET_V2_ONLY``): each MNASNet compile there
# would test no code the MobileNet-v2 one does not, and costs 15-30 s. MNASNet's
# own structure is checked here (folding, calibration, 16 bits, gradients) and
# by the export graph and paper-row tests.
MOBILENET_V2_ONLY = pytest.mark.parametrize("net", ["mobilenet_v2"], indirect=True)


@pytest.fixture(scope="module",
                params=["mobilenet_v2", pytest.param("mnasnet", marks=pytest.mark.slow)])
def net(request):
  name = request.param
  model = MODELS[name](num_classes=NUM_CLASSES, width=WIDTH, small_input=True,
                       dw_impl="conv")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
  shapes = _shapes(model, SIZE)
  params = random_float_params(shapes["params"], rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["batch_stats"])

  @jax.jit
  def batch_stats(params, stats, x):
    _, upd = model.clone(bn_momentum=0.0).apply(
        {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return upd["batch_stats"]

  stats = batch_stats(params, zeros, x)
  stats = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.maximum(v, VAR_FLOOR) if _key(p[-1]) == "var" else v, stats)
  variables = {"params": params, "batch_stats": stats}
  logits = np.asarray(jax.jit(model.apply)(variables, x))
  folded = jax.jit(fold_variables, static_argnums=1)(variables, model.bn_eps)
  fmodel = model.clone(mode=QuantMode(stage="folded"))
  folded_logits = np.asarray(jax.jit(fmodel.apply)(folded, x))
  return Net(name, model, x, variables, logits, folded, folded_logits)


def test_float_logits_are_order_one(net):
  assert net.logits.shape == (BATCH, NUM_CLASSES)
  assert np.all(np.isfinite(net.logits))
  assert 0.3 < np.abs(net.logits).max() < 20
  assert net.logits.std() > 0.1
  # Not a constant network: different images give different logits.
  assert np.abs(net.logits[0] - net.logits[1]).max() > 1e-2


def test_bn_stats_are_the_batch_statistics(net):
  """momentum 0 in train mode: the stem's running mean is its conv output's mean."""
  x = net.x.astype(np.float64)
  k = np.asarray(net.variables["params"]["stem"]["conv"]["kernel"], np.float64)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # 3x3, stride 1 (small_input)
  y = sum(np.einsum("nhwc,cd->nhwd", xp[:, i:i + SIZE, j:j + SIZE], k[i, j])
          for i in range(3) for j in range(3))
  mean = np.asarray(net.variables["batch_stats"]["stem"]["bn"]["mean"])
  var = np.asarray(net.variables["batch_stats"]["stem"]["bn"]["var"])
  np.testing.assert_allclose(mean, y.mean(axis=(0, 1, 2)), atol=1e-4)
  np.testing.assert_allclose(var, np.maximum(y.var(axis=(0, 1, 2)), VAR_FLOOR), rtol=1e-3)


# --------------------------------------------------------------------------
# Folding.
# --------------------------------------------------------------------------


def test_folded_structure(net):
  params = flat(net.folded["params"])
  assert not any("/bn/" in p for p in params)
  assert set(net.folded) == {"params"}
  layers = weight_layers(net.variables["params"])
  assert layers == weight_layers(net.folded["params"])
  for layer in layers:
    assert params[layer + "/kernel"].shape == \
        flat(net.variables["params"])[layer + "/kernel"].shape
    assert params[layer + "/bias"].shape == (params[layer + "/kernel"].shape[-1],)
  # The classifier has no BN: copied as is.
  np.testing.assert_array_equal(net.folded["params"]["classifier"]["kernel"],
                                net.variables["params"]["classifier"]["kernel"])


def test_folded_equals_float_eval(net):
  assert 0.3 < np.abs(net.logits).max() < 20
  np.testing.assert_allclose(net.folded_logits, net.logits, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------
# 16-bit quantized model: init_quant_variables + calibrate.
# --------------------------------------------------------------------------

W16 = QuantSpec(bits=16, kind="symmetric", per_channel=True)
A16 = QuantSpec(bits=16, kind="symmetric")
RULES16 = (QuantRule(pattern=".*", weight=W16, act=A16),)


@pytest.fixture(scope="module")
def calibrated(net):
  qmodel = quantized(net.model, RULES16)
  qvars = init_quant_variables(qmodel, net.folded["params"], net.x)
  # Two batches of the same data: the running min/max must span both.
  qvars = calibrate(qmodel, qvars, [net.x[:BATCH // 2], net.x[BATCH // 2:]], progress=False)
  return qmodel, qvars


def test_quant_variable_collections(net, calibrated):
  _, qv = calibrated
  assert set(qv) == {"params", "quant_stats", "thresholds"}
  assert leaf_names(qv["params"]) == {"kernel", "bias"}
  assert leaf_names(qv["thresholds"]) == {"alpha", "beta"}
  # The folded params are used as given.
  qparams = flat(qv["params"])
  for p, v in flat(net.folded["params"]).items():
    np.testing.assert_array_equal(qparams[p], v)
  # quant_stats: ranges everywhere; alpha/beta only for the fixed-range input.
  stats = flat(qv["quant_stats"])
  assert {p for p in stats if p.rsplit("/", 1)[-1] in ("alpha", "beta")} == \
      {"input_q/alpha", "input_q/beta"}
  assert leaf_names(qv["quant_stats"]) == {"x_min", "x_max", "alpha", "beta"}
  assert "input_q" not in qv["thresholds"]
  # One alpha per weight quantizer and per trainable activation quantizer.
  th = flat(qv["thresholds"])
  alphas = [p for p in th if p.endswith("/alpha")]
  assert len(alphas) == NUM_WEIGHT_QUANTIZERS + NUM_ACT_QUANTIZERS - 1
  for p in alphas:
    layer = p[:-len("/alpha")]
    if layer + "/kernel" in qparams:  # per-channel weight thresholds
      c = qparams[layer + "/kernel"].shape[-1]
      assert th[p].shape == (c,), p
    else:
      assert th[p].shape == (), p
  # Initial values: alpha = 1, beta = 0.
  assert all(np.all(np.asarray(v) == (1.0 if p.endswith("alpha") else 0.0))
             for p, v in th.items())


@pytest.mark.slow
@MOBILENET_V2_ONLY
def test_init_quant_variables_equal_model_init(net):
  """Built from shapes and ``layers.INITIAL``, they equal Flax's own init."""
  qmodel = quantized(net.model, RULES16)
  ours = init_quant_variables(qmodel, net.folded["params"], net.x)
  ref = jax.jit(qmodel.init)(jax.random.PRNGKey(0), net.x[:1])
  assert set(ours) == {"params"} | (set(ref) - {"params"})
  for col in set(ours) - {"params"}:
    assert jax.tree.structure(ours[col]) == jax.tree.structure(ref[col]), col
    for a, b in zip(jax.tree.leaves(ours[col]), jax.tree.leaves(ref[col])):
      assert a.dtype == b.dtype and a.shape == b.shape
      np.testing.assert_array_equal(a, b)


def test_calibrated_ranges(net, calibrated):
  _, qv = calibrated
  st = qv["quant_stats"]
  assert float(st["input_q"]["x_min"]) == pytest.approx(float(net.x.min()), abs=0)
  assert float(st["input_q"]["x_max"]) == pytest.approx(float(net.x.max()), abs=0)
  assert float(st["logits_q"]["x_min"]) == pytest.approx(float(net.folded_logits.min()), abs=1e-5)
  assert float(st["logits_q"]["x_max"]) == pytest.approx(float(net.folded_logits.max()), abs=1e-5)
  ranges = flat(st)
  for p, v in ranges.items():
    if p.endswith("x_max"):
      x_min = float(ranges[p[:-len("x_max")] + "x_min"])
      assert float(v) > x_min, p
  # Post-ReLU outputs: min is 0, and ReLU6 caps MobileNet-v2's at 6.
  relu6 = net.name == "mobilenet_v2"
  for layer in weight_layers(net.folded["params"]):
    if not layer.endswith("/conv") or layer.split("/")[-2] in LINEAR_CONVS:
      continue
    r = st
    for k in layer[:-len("/conv")].split("/") + ["act_q"]:
      r = r[k]
    assert float(r["x_min"]) == 0.0, layer
    assert 0.0 < float(r["x_max"]) <= (6.0 if relu6 else np.inf), layer


@pytest.mark.slow
@MOBILENET_V2_ONLY
def test_percentile_ranges_weight_batches_by_size(net):
  """Per-batch percentiles are averaged with the batch sizes as weights, so a short
  last batch counts for its images only (checked on the network input)."""
  qmodel = quantized(net.model, RULES16)
  parts = [net.x[:BATCH - 2], net.x[BATCH - 2:]]
  got = activation_ranges(qmodel, net.folded["params"], parts, method="percentile",
                          percentile=90.0, progress=False)["input_q"]
  per_batch = np.array([np.percentile(np.asarray(p, np.float64), (10.0, 90.0)) for p in parts])
  want = np.average(per_batch, axis=0, weights=[BATCH - 2, 2])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(want[1] - per_batch[:, 1].mean()) > 1e-3  # the weights matter here


def test_16bit_close_to_float(net, calibrated):
  qmodel, qv = calibrated
  yq = np.asarray(jax.jit(qmodel.apply)(qv, net.x))
  assert 0.3 < np.abs(net.logits).max() < 20
  err = np.abs(yq - net.logits).max()
  assert err < 1e-2
  assert err > 1e-7  # the quantizers are live


# --------------------------------------------------------------------------
# 8 bits: every quantized tensor lies on its grid.
# --------------------------------------------------------------------------

W8 = {
    "sym_pc": QuantSpec(bits=8, kind="symmetric", per_channel=True),
    "sym_pt": QuantSpec(bits=8, kind="symmetric", per_channel=False),
    "asym_pc": QuantSpec(bits=8, kind="asymmetric", per_channel=True),
    "asym_pt": QuantSpec(bits=8, kind="asymmetric", per_channel=False),
}
A8 = {"symmetric": QuantSpec(bits=8, kind="symmetric"),
      "asymmetric": QuantSpec(bits=8, kind="asymmetric")}
BLOCK_WEIGHTS = ("sym_pc", "asym_pt", "sym_pt", "asym_pc")  # by block index mod 4


def _blocks(residue):
  return r"^block_(%s)/" % "|".join(str(i) for i in range(residue, 17, 4))


# Every weight kind/granularity and every activation kind in one network.
RULES8 = (
    QuantRule(pattern=_blocks(0), weight=W8["sym_pc"], act=A8["symmetric"]),
    QuantRule(pattern=_blocks(1), weight=W8["asym_pt"], act=A8["asymmetric"]),
    QuantRule(pattern=_blocks(2), weight=W8["sym_pt"], act=A8["symmetric"]),
    QuantRule(pattern=_blocks(3), weight=W8["asym_pc"], act=A8["asymmetric"]),
    QuantRule(pattern=r"^classifier$", weight=W8["asym_pc"]),
    QuantRule(pattern=r"^(head|pool_q|logits_q)", act=A8["asymmetric"]),
    QuantRule(pattern=r".*", weight=W8["sym_pc"], act=A8["symmetric"]),
)


def expected_weight(layer):
  """(kind, per_channel) that RULES8 should give this weight layer."""
  m = re.match(r"block_(\d+)/", layer)
  key = BLOCK_WEIGHTS[int(m.group(1)) % 4] if m else (
      "asym_pc" if layer == "classifier" else "sym_pc")
  return ("symmetric" if key.startswith("sym") else "asymmetric"), key.endswith("pc")


def expected_act(point):
  m = re.match(r"block_(\d+)/", point)
  if m:
    return "symmetric" if int(m.group(1)) % 2 == 0 else "asymmetric"
  return "asymmetric" if point.split("/")[0] in ("head", "pool_q", "logits_q") else "symmetric"


def is_post_relu(point):
  """ReLU/ReLU6 outputs (and their average pool) are non-negative."""
  if point == "pool_q":
    return True
  if point.endswith("/act_q"):
    return point.split("/")[-2] not in LINEAR_CONVS
  return False  # input_q, add_q, logits_q, linear projections


def grid(kind, unsigned, bits, t_min, t_max, alpha, beta):
  """float64 (s, z, qmin, qmax) from METHOD.md section 1."""
  a = np.clip(np.asarray(alpha, np.float64), 0.5, 1.0)
  t_min = np.asarray(t_min, np.float64)
  t_max = np.asarray(t_max, np.float64)
  if kind == "asymmetric":
    r = t_max - t_min
    assert np.all(r > 0)
    s = (2 ** bits - 1) / (a * r)
    b_lo = 0.0 if unsigned else -0.2
    t_low = t_min + np.clip(np.asarray(beta, np.float64), b_lo, 0.4) * r
    return s, np.round(t_low * s), 0, 2 ** bits - 1, t_low * s
  if unsigned:
    t = np.maximum(t_max, 0.0)
    assert np.all(t > 0)
    return (2 ** bits - 1) / (a * t), np.zeros_like(t), 0, 2 ** bits - 1, None
  t = np.maximum(np.abs(t_min), np.abs(t_max))
  assert np.all(t > 0)
  q = 2 ** (bits - 1) - 1
  return q / (a * t), np.zeros_like(t), -q, q, None


def check_on_grid(y, x_in, s, z, qmin, qmax, zl, what):
  """y * s - z is an integer in [qmin, qmax]; y is the grid point nearest clip(x).

  Returns the number of distinct levels used.
  """
  u = y * s
  frac = np.abs(u - np.round(u))
  assert frac.max() < 1e-3, f"{what}: off-grid by {frac.max()} steps"
  q = np.round(u) - z
  # A channel whose zero point T_l*s is a near-tie may round either way.
  slack = 0 if zl is None else np.where(np.abs(np.abs(zl - np.floor(zl)) - 0.5) < 1e-3, 1, 0)
  assert np.all(q >= qmin - slack) and np.all(q <= qmax + slack), \
      f"{what}: levels {q.min()}..{q.max()} outside {qmin}..{qmax}"
  lo, hi = (qmin + z) / s, (qmax + z) / s
  want = np.clip(x_in, lo, hi)
  err = np.abs(y - want) - 0.5 / s
  assert err.max() < 1e-5 + 1e-6 * np.abs(x_in).max(), \
      f"{what}: not the nearest grid point (excess {err.max()})"
  return len(np.unique(q))


@dataclasses.dataclass
class Q8:
  variables: dict
  outs: dict      # module path -> output
  kernels: dict   # weight layer path -> sown kernel_q
  logits: np.ndarray


@pytest.fixture(scope="module")
def q8(net, calibrated):
  """8-bit mixed-rule model on the calibrated ranges, thresholds randomized."""
  _, qv16 = calibrated
  qmodel = quantized(net.model, RULES8)
  shapes = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), net.x[:1])
  assert jax.tree.structure(shapes["quant_stats"]) == jax.tree.structure(qv16["quant_stats"])
  rng = np.random.default_rng(1)

  def factors(path, v):
    # alpha partly outside [0.5, 1] and beta partly outside its range: the clip matters.
    name = _key(path[-1])
    if name == "alpha":
      return rng.uniform(0.4, 1.1, np.shape(v)).astype(np.float32)
    if name == "beta":
      return rng.uniform(-0.3, 0.5, np.shape(v)).astype(np.float32)
    return v

  variables = {
      "params": net.folded["params"],
      "quant_stats": jax.tree_util.tree_map_with_path(factors, qv16["quant_stats"]),
      "thresholds": jax.tree_util.tree_map_with_path(factors, shapes["thresholds"]),
  }
  run = jax.jit(lambda v, x: qmodel.apply(v, x, capture_intermediates=True,
                                          mutable=["intermediates"]))
  logits, state = run(variables, net.x)
  outs, kernels = captured(state["intermediates"])
  return Q8(variables, outs, kernels, np.asarray(logits))


@pytest.mark.slow
@MOBILENET_V2_ONLY
def test_8bit_quantizers_cover_the_network(net, q8):
  layers = weight_layers(net.folded["params"])
  assert len(layers) == NUM_WEIGHT_QUANTIZERS
  assert set(q8.kernels) == layers
  assert "classifier" in q8.kernels and "stem/conv" in q8.kernels
  convbnact = {l[:-len("/conv")] for l in layers if l.endswith("/conv")}
  assert len(convbnact) == NUM_WEIGHT_QUANTIZERS - 1
  want = ({"input_q", "pool_q", "logits_q"} | {c + "/act_q" for c in convbnact}
          | {f"block_{i}/add_q" for i in RESIDUAL[net.name]})
  found = {p for p in q8.outs if p.rsplit("/", 1)[-1] in ACT_QUANTIZER_NAMES}
  assert len(want) == NUM_ACT_QUANTIZERS
  assert found == want
  assert all(f"block_{i}" in q8.outs for i in range(NUM_BLOCKS[net.name]))
  assert f"block_{NUM_BLOCKS[net.name]}" not in q8.outs


@pytest.mark.slow
@MOBILENET_V2_ONLY
def test_8bit_weights_on_grid(net, q8):
  params = flat(net.folded["params"])
  th = flat(q8.variables["thresholds"])
  seen = set()
  for layer, kq in q8.kernels.items():
    kind, per_channel = expected_weight(layer)
    seen.add((kind, per_channel))
    w = np.asarray(params[layer + "/kernel"], np.float64)
    assert kq.shape == w.shape
    alpha, beta = th[layer + "/alpha"], th[layer + "/beta"]
    assert np.shape(alpha) == ((w.shape[-1],) if per_channel else ()), layer
    axes = tuple(range(w.ndim - 1)) if per_channel else None
    lo, hi = w.min(axis=axes), w.max(axis=axes)
    if kind == "asymmetric":  # the range is widened to hold 0 (fat.quant.params_from_range)
      lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    s, z, qmin, qmax, zl = grid(kind, False, 8, lo, hi, alpha, beta)
    levels = check_on_grid(kq, w, s, z, qmin, qmax, zl, f"{layer} kernel ({kind}, pc={per_channel})")
    assert levels >= 8, layer
    # The quantization is not the identity.
    assert np.abs(kq - w).max() > 0, layer
  assert seen == {("symmetric", True), ("symmetric", False),
                  ("asymmetric", True), ("asymmetric", False)}


def act_input(net, q8, point):
  """The float input of an activation quantizer, rebuilt from captured outputs."""
  outs = q8.outs
  if point == "input_q":
    return net.x.astype(np.float64)
  if point == "pool_q":
    return outs["head/act_q"].mean(axis=(1, 2))
  if point == "logits_q":
    return outs["classifier"]
  if point.endswith("/add_q"):
    i = int(re.match(r"block_(\d+)/", point).group(1))
    return outs[f"block_{i - 1}"] + outs[f"block_{i}/project/act_q"]
  parent = point[:-len("/act_q")]
  y = outs[parent + "/conv"]
  return MODEL_ACT[net.name](y) if is_post_relu(point) else y


@pytest.mark.slow
@MOBILENET_V2_ONLY
def test_8bit_activations_on_grid(net, q8):
  stats = q8.variables["quant_stats"]
  th = q8.variables["thresholds"]
  seen, levels = set(), {}
  points = [p for p in q8.outs if p.rsplit("/", 1)[-1] in ACT_QUANTIZER_NAMES]
  assert len(points) == NUM_ACT_QUANTIZERS
  for point in points:
    kind, unsigned = expected_act(point), is_post_relu(point)
    seen.add((kind, unsigned))
    st, fac = stats, (stats if point == "input_q" else th)
    for k in point.split("/"):
      st, fac = st[k], fac[k]
    s, z, qmin, qmax, zl = grid(kind, unsigned, 8, st["x_min"], st["x_max"],
                                fac["alpha"], fac["beta"])
    levels[point] = check_on_grid(q8.outs[point], act_input(net, q8, point), s, z, qmin,
                                  qmax, zl, f"{point} ({kind}, unsigned={unsigned})")
  assert seen == {("symmetric", True), ("symmetric", False),
                  ("asymmetric", True), ("asymmetric", False)}
  np.testing.assert_array_equal(q8.outs["logits_q"], q8.logits)
  # With random alpha/beta a quantizer may clip everything to one level (beta
  # 0.4 on a ReLU output), but most use many.
  assert sum(n >= 8 for n in levels.values()) >= 0.75 * len(levels), levels


# --------------------------------------------------------------------------
# Thresholds are a separate, trainable collection.
# --------------------------------------------------------------------------


def test_threshold_gradient_and_frozen_params(net, calibrated):
  """A FAT step: non-zero alpha/beta gradients; an optimizer keyed on the
  collection moves the thresholds and leaves the (non-zero-gradient) params."""
  _, qv16 = calibrated
  # Quantize the tail only, so the backward pass stays small.
  rules = (QuantRule(pattern=r"^(head/|pool_q|classifier|logits_q)",
                     weight=W8["sym_pc"], act=A8["asymmetric"]),)
  qmodel = quantized(net.model, rules)
  shapes = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), net.x[:1])
  assert leaf_names(shapes["thresholds"]) == {"alpha", "beta"}
  assert set(shapes["thresholds"]) == {"head", "pool_q", "classifier", "logits_q"}
  stats = {k: qv16["quant_stats"][k] for k in shapes["quant_stats"]}
  # alpha < 1 so that some values saturate (the beta gradient lives there).
  thresholds = jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.full(s.shape, 0.7 if _key(p[-1]) == "alpha" else 0.1, jnp.float32),
      shapes["thresholds"])
  frozen = net.folded["params"]
  target = jnp.asarray(net.logits)

  def loss(trainable):
    params = {**frozen, "classifier": trainable["params"]["classifier"]}
    y = qmodel.apply({"params": params, "quant_stats": stats,
                      "thresholds": trainable["thresholds"]}, net.x)
    return jnp.sqrt(jnp.mean((y - target) ** 2))

  trainable = {"params": {"classifier": frozen["classifier"]}, "thresholds": thresholds}
  labels = {"params": jax.tree.map(lambda _: "frozen", trainable["params"]),
            "thresholds": jax.tree.map(lambda _: "fat", trainable["thresholds"])}
  tx = optax.multi_transform({"fat": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels)

  @jax.jit
  def step(trainable, opt_state):
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), grads, value

  new, grads, value = step(trainable, tx.init(trainable))
  assert np.isfinite(float(value)) and float(value) > 0
  g = flat(grads["thresholds"])
  assert all(np.all(np.isfinite(v)) for v in g.values())
  assert max(np.abs(v).max() for p, v in g.items() if p.endswith("alpha")) > 0
  assert max(np.abs(v).max() for p, v in g.items() if p.endswith("beta")) > 0
  assert np.abs(g["head/conv/alpha"]).max() > 0  # per-channel weight alpha
  # The params do get a gradient, yet the update leaves them bit-identical.
  assert np.abs(np.asarray(grads["params"]["classifier"]["kernel"])).max() > 0
  for p, v in flat(new["params"]).items():
    np.testing.assert_array_equal(v, flat(trainable["params"])[p])
  moved = [p for p, v in flat(new["thresholds"]).items()
           if np.any(np.asarray(v) != np.asarray(flat(thresholds)[p]))]
  assert any(p.endswith("alpha") for p in moved)
  for p in moved:  # only where the gradient is non-zero
    assert np.any(g[p] != 0), p
