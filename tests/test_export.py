"""Integer graph, integer-only reference and ONNX export (fat/graph.py, fat/integer.py,
fat/export_onnx.py), on small folded models with calibrated, perturbed thresholds.

References are independent of the code under test where it matters: the
fixed-point multiply is checked against exact rational arithmetic, ONNX
Runtime runs the exported files, and the integer reference is compared with
the fake-quantized JAX model layer by layer.
"""

import dataclasses
import fractions
import os
import re

import flax.linen as nn
import jax
import jax.extend
import numpy as np
import onnx
import pytest
from conftest import assert_integer_layers_match, random_variables, tiny_net
from onnx import numpy_helper

from fat import (calibrate, checkpoints, data, export_onnx, fold, graph, integer, models,
                 pipeline, quant, rules, runtime)
from fat import variables as fat_variables
from fat.errors import ExportError
from fat.layers import ActQuant
from fat.models import blocks


def _model(name):
  kw = dict(width=0.35) if name == "mobilenet_v2" else dict(width=0.5)
  return models.create(name, num_classes=10, small_input=True, **kw)


def _images(n, seed):
  """Smooth, image-like inputs in [-1, 1]."""
  rng = np.random.default_rng(seed)
  base = rng.uniform(-1, 1, (n, 7, 7, 1))
  return np.clip(np.kron(base, np.ones((1, 4, 4, 1))) + 0.1 * rng.normal(size=(n, 28, 28, 1)),
                 -1, 1).astype(np.float32)


def _quantized(name, per_channel=True, weight_bits=8, act_bits=8, seed=0, kind="symmetric",
               perturb=True, model=None, variables=None):
  model = _model(name) if model is None else model
  x = _images(64, seed)
  v = random_variables(model, x, seed) if variables is None else variables
  # Random BN statistics so that folding matters.
  rng = np.random.default_rng(seed)
  stats = jax.tree.map(lambda a: np.asarray(a) + rng.uniform(0, 0.2, np.shape(a)),
                       v["batch_stats"])
  r = rules.uniform_rules(
      weight=quant.QuantSpec(bits=weight_bits, per_channel=per_channel, kind=kind),
      act=quant.QuantSpec(bits=act_bits, kind=kind))
  p = pipeline.prepare(model, {**v, "batch_stats": stats}, r, x, batch_size=len(x))
  qmodel, qvars = p.qmodel, p.variables
  if not perturb:
    return qmodel, qvars
  # Trained-looking thresholds: alpha in [0.6, 1] (beta is unused by symmetric specs).
  alpha = lambda p, a: (rng.uniform(0.6, 1.0, np.shape(a)).astype(np.float32)
                        if getattr(p[-1], "key", None) == "alpha" else a)
  return qmodel, {**qvars,
                  "thresholds": jax.tree_util.tree_map_with_path(alpha, qvars["thresholds"])}


# The whole networks' traced-graph checks run in the slow tier (their trace is
# 30 s a network here); the fast tier exports tiny_net.
@pytest.fixture(scope="module",
                params=[pytest.param("mobilenet_v2", marks=pytest.mark.slow),
                        pytest.param("mnasnet", marks=pytest.mark.slow)])
def traced(request):
  qmodel, qvars = _quantized(request.param)
  x = _images(32, 1)
  nodes, acts = graph.trace(qmodel, qvars, x, return_activations=True)
  return request.param, qmodel, qvars, x, nodes, acts


# --------------------------------------------------------------------------
# Fixed-point arithmetic.
# --------------------------------------------------------------------------


def test_quantize_multiplier_roundtrip():
  for m in [1e-6, 0.0123, 0.25, 0.5, 0.999999, 1.0, 3.7]:
    m0, shift = integer.quantize_multiplier(m)
    assert 2 ** 30 <= int(m0) < 2 ** 31
    assert abs(int(m0) * 2.0 ** (int(shift) - 31) - m) <= m * 2 ** -30


def test_multiply_by_multiplier_rounds_once_to_nearest():
  rng = np.random.default_rng(0)
  x = rng.integers(-2 ** 20, 2 ** 20, 2000)
  for m in [0.0131, 0.1302, 0.4999, 0.75]:
    m0, shift = integer.quantize_multiplier(m)
    got = integer.multiply_by_multiplier(x, m0, shift)
    exact = [fractions.Fraction(int(v) * int(m0), 2 ** (31 - int(shift))) for v in x]
    want = np.array([int((e + fractions.Fraction(1, 2)).__floor__()) for e in exact])
    np.testing.assert_array_equal(got, want)  # round half up, one rounding


def test_int32_overflow_is_refused():
  m0, shift = integer.quantize_multiplier(0.5)
  with pytest.raises(OverflowError):
    integer.multiply_by_multiplier(np.array([2 ** 31]), m0, shift)


# --------------------------------------------------------------------------
# The traced graph.
# --------------------------------------------------------------------------


def test_graph_covers_the_model(traced):
  name, _, qvars, _, nodes, acts = traced
  ops = [n.op for n in nodes]
  assert ops[0] == "quantize" and ops[-1] == "dense" and ops[-2] == "mean"
  assert ops.count("conv") == 52 and ops.count("add") == 10
  names = [n.name for n in nodes]
  assert len(set(names)) == len(names)
  for n in nodes:  # every input is produced earlier (a DAG in topological order)
    for i in n.inputs:
      assert i == "input" or names.index(i) < names.index(n.name), (n.name, i)
  adds = [n for n in nodes if n.op == "add"]
  assert all(n.name.endswith("/add_q") and n.inputs[1].endswith("/project") for n in adds)
  # Weights on the grid: integer values within [qmin, qmax], per-channel steps.
  for n in nodes:
    if n.op in ("conv", "dense"):
      q, g = n.attrs["q_weight"], n.attrs["w_grid"]
      assert q.min() >= g.qmin and q.max() <= g.qmax
      assert np.shape(g.scale) == (q.shape[-1],)
      deq = (q - g.zero_point) * g.scale
      w = n.attrs["weight"]
      inside = np.abs(w) <= g.qmax * g.scale
      assert np.all(np.abs(deq - w)[inside] <= (0.5 + 1e-3) * np.broadcast_to(g.scale, w.shape)[inside])
      assert np.all(np.abs(q[~inside]) == g.qmax)  # clipped by alpha < 1
  # Activations are grid indices in range.
  for n in nodes:
    a = acts[n.name]
    assert a.min() >= n.out.qmin and a.max() <= n.out.qmax


def test_trace_refuses_unquantized_layers():
  model = tiny_net()
  x = _images(2, 0)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
  folded = fold.fold_variables(v, model.bn_eps)
  # Weights quantized, activations not: nothing an int8 runtime can run.
  qmodel, qvars = pipeline.quantize(
      model, folded, rules.uniform_rules(weight=quant.QuantSpec(bits=8), act=None), x)
  with pytest.raises(ExportError, match="no quantizer"):
    graph.trace(qmodel, qvars, x)
  with pytest.raises(ExportError, match="'quant' stage"):
    graph.trace(calibrate.quantized(model, (), stage="folded"), folded, x)


# --------------------------------------------------------------------------
# A block defined here declares its own export; fat/graph.py knows nothing of it.
# --------------------------------------------------------------------------


class _InheritedConv(blocks.ConvBNAct):
  """Exported by ``ConvBNAct``'s registration (a subclass inherits it)."""


class _TaggedConv(blocks.ConvBNAct):
  """Registers its own exporter, which wins over ``ConvBNAct``'s."""


@graph.register(_TaggedConv)
def _tagged_conv(call, g):
  node = blocks.conv_node(call, g)
  return dataclasses.replace(node, attrs={**node.attrs, "tag": "toy"})


def _shortcut(block, x, train, x_step):
  """Two convs, then ``sum_q`` quantizes the block input + the second conv's output."""
  y, step = _InheritedConv(block.features, 3, name="a", **block.common())(x, train, x_step)
  y, _ = _TaggedConv(block.features, act=None, name="b", **block.common())(y, train, step)
  return ActQuant(block.mode, signed=True, name="sum_q")(x + y)


class _Shortcut(blocks.Common):
  features: int

  @nn.compact
  def __call__(self, x, train=False, x_step=None):
    return _shortcut(self, x, train, x_step)


@graph.register_glue(_Shortcut)
def _shortcut_sum(block, quantizer, g):
  return graph.Node(op="add", name=quantizer.path, inputs=(block.src, f"{block.path}/b"),
                    out=g.grid(quantizer.path))


class _Undeclared(blocks.Common):
  """The same block without a glue registration."""
  features: int

  @nn.compact
  def __call__(self, x, train=False, x_step=None):
    return _shortcut(self, x, train, x_step)


class _ToyNet(blocks.Network):
  block: type = _Shortcut

  @nn.compact
  def __call__(self, x, train=False):
    x, step = ActQuant(self.mode, signed=True, trainable=False, name="input_q")(x)
    x, step = blocks.ConvBNAct(8, 3, 2, name="stem", **self.common())(x, train, step)
    x, step = self.block(8, name="toy", **self.common())(x, train, step)
    x, _ = blocks.ConvBNAct(16, name="head", **self.common())(x, train, step)
    return blocks.classifier_head(x, self.num_classes, self.mode)


def test_a_new_block_declares_its_export():
  qmodel, qvars = _quantized(None, model=_ToyNet(num_classes=10))
  x = _images(16, 1)
  nodes, acts = graph.trace(qmodel, qvars, x, return_activations=True)
  assert [(n.op, n.name, n.inputs) for n in nodes] == [
      ("quantize", "input_q", ("input",)),
      ("conv", "stem", ("input_q",)),
      ("conv", "toy/a", ("stem",)),
      ("conv", "toy/b", ("toy/a",)),
      ("add", "toy/sum_q", ("stem", "toy/b")),
      ("conv", "head", ("toy/sum_q",)),
      ("mean", "pool_q", ("head",)),
      ("dense", "logits_q", ("pool_q",)),
  ]
  a, b = nodes[2], nodes[3]
  assert "tag" not in a.attrs and b.attrs["tag"] == "toy"
  assert a.attrs["act"] == "relu6" and b.attrs["act"] is None
  assert a.attrs["pads"] == ((1, 1), (1, 1)) and a.attrs["weight"].shape == (3, 3, 8, 8)
  # The integer reference runs the new block's add, within one step of the simulation.
  for name, d in integer.layer_differences(nodes, acts, x).items():
    assert d.max() <= 1, name
  onnx.checker.check_model(export_onnx.to_qdq(nodes, (None,) + x.shape[1:]), full_check=True)
  # Without its glue registration, the trace names the quantizer it cannot export.
  qmodel, qvars = _quantized(None, model=_ToyNet(num_classes=10, block=_Undeclared))
  with pytest.raises(ExportError, match="cannot export the op feeding 'toy/sum_q'"):
    graph.trace(qmodel, qvars, x)


# --------------------------------------------------------------------------
# Integer-only reference vs the fake-quantized model.
# --------------------------------------------------------------------------


def test_integer_reference_layer_by_layer(traced):
  """Each integer op, given the simulation's integer inputs, reproduces the
  simulation's grid indices: >= 99.9% equal, the rest within 1 step."""
  _, _, _, x, nodes, acts = traced
  assert_integer_layers_match(nodes, acts, x)


def test_integer_reference_end_to_end(traced):
  """Run alone from the images: the logits' argmax equals the simulation's on
  (almost) every image; single-step differences can grow along the network."""
  _, qmodel, qvars, x, nodes, acts = traced
  ints = integer.run(nodes, x)
  sim = np.asarray(jax.jit(qmodel.apply)(qvars, x))
  ref = integer.logits(nodes, x, batch_size=7)
  np.testing.assert_array_equal(ref.argmax(-1) == sim.argmax(-1),
                                ints[nodes[-1].name].argmax(-1) == sim.argmax(-1))
  assert np.mean(ref.argmax(-1) == sim.argmax(-1)) >= 0.9
  assert np.array_equal(ints["input_q"], acts["input_q"])
  first_conv = nodes[1].name
  assert np.mean(ints[first_conv] == acts[first_conv]) >= 0.999


# --------------------------------------------------------------------------
# ONNX export and ONNX Runtime.
# --------------------------------------------------------------------------


def test_onnx_export_runs_int8_in_ort(traced, tmp_path):
  _, qmodel, qvars, x, nodes, _ = traced
  q_model = export_onnx.to_qdq(nodes, (None,) + x.shape[1:])
  f_model = export_onnx.to_float(nodes, (None,) + x.shape[1:])
  onnx.checker.check_model(q_model, full_check=True)
  paths = {k: str(tmp_path / f"{k}.onnx") for k in ("int8", "fp32")}
  onnx.save(q_model, paths["int8"])
  onnx.save(f_model, paths["fp32"])
  init = {t.name: t for t in q_model.graph.initializer}
  # 8-bit weights only: opset 17, which every ONNX Runtime since 1.13 reads.
  assert export_onnx.opset(q_model) == 17 and q_model.ir_version == 8
  assert export_onnx.weight_types(q_model) == {"int8": 53}
  assert any(t.data_type == onnx.TensorProto.INT32 and n.endswith("bias/int")
             for n, t in init.items())
  # ORT runs integer kernels, no float convolutions.
  ops = runtime.executed_ops(paths["int8"])
  assert ops.get("QLinearConv", 0) == 53 and ops.get("QLinearAdd", 0) == 10
  assert not set(ops) & set(runtime.FLOAT_COMPUTE_OPS), ops
  # int8 ORT agrees with the integer reference and the simulation.
  ort_q = runtime.logits(runtime.session(paths["int8"]), x)
  ref = integer.logits(nodes, x)
  sim = np.asarray(jax.jit(qmodel.apply)(qvars, x))
  # On x86 CPUs without VNNI, ORT with fat.runtime's exact-int8 option agrees with
  # the integer reference on 30 of these 32 images for MNASNet (17 without the
  # option: saturated products); elsewhere on at least 31. The residual is not isolated.
  assert np.mean(ort_q.argmax(-1) == ref.argmax(-1)) >= 0.9
  assert np.mean(ort_q.argmax(-1) == sim.argmax(-1)) >= 0.9
  step = nodes[-1].out.scale
  assert np.median(np.abs(ort_q - sim)) <= 2 * step
  # fp32 ONNX equals the folded JAX model.
  folded = calibrate.quantized(qmodel, (), stage="folded")
  want = np.asarray(jax.jit(folded.apply)({"params": qvars["params"]}, x))
  np.testing.assert_allclose(runtime.logits(runtime.session(paths["fp32"]), x), want,
                             atol=1e-3, rtol=1e-4)


def test_storage_types():
  g = lambda lo, hi, zp: graph.Grid(scale=np.float32(0.1), zero_point=np.asarray(zp),
                                    qmin=lo, qmax=hi)
  T = onnx.TensorProto
  assert export_onnx.storage(g(-127, 127, 0), "x") == (T.INT8, np.int8)
  assert export_onnx.storage(g(0, 255, 3), "x") == (T.UINT8, np.uint8)
  with pytest.raises(ExportError, match="0 is not on the trained grid.*no uint8 zero point"):
    export_onnx.storage(g(0, 255, -5), "x")  # zero point outside uint8
  # Weights: 2-4-bit grids in int4/uint4, 5-8-bit ones in int8/uint8.
  w = lambda grid: export_onnx.storage(grid, "x", weights=True)[0]
  assert [w(g(-k, k, 0)) for k in (1, 3, 7, 15, 127)] == [T.INT4] * 3 + [T.INT8] * 2
  assert [w(g(0, 2 ** k - 1, 1)) for k in (2, 4, 6, 8)] == [T.UINT4] * 2 + [T.UINT8] * 2
  with pytest.raises(ExportError, match="0 is not on the trained grid.*no uint4 zero point"):
    w(g(0, 15, np.array([3, 16])))  # channel 1's zero point is off its 4-bit grid
  with pytest.raises(ExportError, match="16-bit grid .* weights of 2-8 bits"):
    w(g(-32767, 32767, 0))
  # Activations: 8 bits only, whatever the storage type could hold.
  for bad in (g(0, 15, 0), g(-7, 7, 0), g(-1, 1, 0)):
    with pytest.raises(ExportError, match=rf"^x: activations on a \d-bit grid "
                                          rf"\[{bad.qmin}, {bad.qmax}\]; ONNX export needs "
                                          "8-bit activations"):
      export_onnx.storage(bad, "x")


# --------------------------------------------------------------------------
# Below 8 bits: int4 weights (opset 21), on the three-block tiny network.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_w4a8():
  """W4A8 per channel, symmetric, trained-looking thresholds."""
  qmodel, qvars = _quantized(None, model=tiny_net(), weight_bits=4)
  x = _images(64, 1)
  nodes, acts = graph.trace(qmodel, qvars, x, return_activations=True)
  return qmodel, qvars, x, nodes, acts


def _weight_nodes(nodes):
  return [n for n in nodes if n.op in ("conv", "dense")]


def test_integer_reference_at_4_bits(tiny_w4a8):
  """int4 x int8 products: each op within one step of the simulation (>= 99.9% equal),
  and the logits' argmax end to end."""
  qmodel, qvars, x, nodes, acts = tiny_w4a8
  assert {(n.attrs["w_grid"].qmin, n.attrs["w_grid"].qmax) for n in _weight_nodes(nodes)} \
      == {(-7, 7)}
  assert_integer_layers_match(nodes, acts, x)
  sim = np.asarray(jax.jit(qmodel.apply)(qvars, x))
  assert np.mean(integer.logits(nodes, x).argmax(-1) == sim.argmax(-1)) >= 0.95


def test_int4_weights_export_runs_in_ort(tiny_w4a8, tmp_path):
  """W4A8 per channel: int4 initializers (two a byte) at opset 21, run by ORT,
  which agrees with the integer reference and the simulation."""
  qmodel, qvars, x, nodes, _ = tiny_w4a8
  model = export_onnx.to_qdq(nodes, (None,) + x.shape[1:])
  onnx.checker.check_model(model, full_check=True)
  assert export_onnx.opset(model) == 21 and model.ir_version == 10
  layers = _weight_nodes(nodes)
  assert export_onnx.weight_types(model) == {"int4": len(layers)}
  init = {t.name: t for t in model.graph.initializer}
  for n in layers:
    t = init[f"{n.name}/weight/int"]
    q = n.attrs["q_weight"]
    assert t.data_type == onnx.TensorProto.INT4 and len(t.raw_data) == (q.size + 1) // 2
    stored = numpy_helper.to_array(t).astype(np.int64)  # OIHW
    want = q.T[:, :, None, None] if n.op == "dense" else np.transpose(q, (3, 2, 0, 1))
    np.testing.assert_array_equal(stored, want)
    assert init[f"{n.name}/weight/zero_point"].data_type == onnx.TensorProto.INT4
  path = str(tmp_path / "w4a8.onnx")
  onnx.save(model, path)
  sess, ops = runtime.session_and_ops(path)
  assert ops.get("QLinearAdd") == 1 and ops.get("DequantizeLinear", 0) >= len(layers)
  ort_q = runtime.logits(sess, x)
  sim = np.asarray(jax.jit(qmodel.apply)(qvars, x))
  assert np.mean(ort_q.argmax(-1) == integer.logits(nodes, x).argmax(-1)) >= 0.95
  assert np.mean(ort_q.argmax(-1) == sim.argmax(-1)) >= 0.95
  assert np.median(np.abs(ort_q - sim)) <= nodes[-1].out.scale


@pytest.mark.slow
def test_mixed_int8_int4_export_runs_in_ort(tmp_path):
  """Asymmetric 4-bit weights (uint4) with an 8-bit stem and classifier
  (first_last_bits=8): both storage types in one opset-21 model; ORT still fuses
  the 8-bit layers into QLinearConv."""
  model = tiny_net()
  x = _images(64, 0)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
  r = pipeline.setting_rules(pipeline.Setting(
      name="w4a8_mixed", weight_bits=4, act_bits=8, per_channel=True,
      weight_kind="asymmetric", first_last_bits=8))
  p = pipeline.prepare(model, v, r, x, batch_size=len(x))
  nodes = graph.trace(p.qmodel, p.variables, x)
  q_model = export_onnx.to_qdq(nodes, (None,) + x.shape[1:])
  onnx.checker.check_model(q_model, full_check=True)
  assert export_onnx.opset(q_model) == 21
  assert export_onnx.weight_types(q_model) == {"uint4": 9, "uint8": 2}
  path = str(tmp_path / "mixed.onnx")
  onnx.save(q_model, path)
  sess, ops = runtime.session_and_ops(path)
  assert ops.get("QLinearConv") == 2, ops  # the stem and the classifier
  ort_q = runtime.logits(sess, x)
  sim = np.asarray(jax.jit(p.qmodel.apply)(p.variables, x))
  assert np.mean(ort_q.argmax(-1) == integer.logits(nodes, x).argmax(-1)) >= 0.95
  assert np.mean(ort_q.argmax(-1) == sim.argmax(-1)) >= 0.95


def test_4_bit_activations_are_refused_naming_the_setting(tiny_w4a8, tmp_path, monkeypatch):
  """W4A4 cannot be exported: one line naming the setting, the first layer and the
  reason; without a setting, export skips it and says why. (The W4A8 variables
  under 4-bit activation rules: the variables do not depend on the widths. The
  smoke test exports and skips real settings end to end.)"""
  from experiments import deploy
  w4a4 = calibrate.quantized(tiny_net(), rules.uniform_rules(
      weight=quant.QuantSpec(bits=4, per_channel=True), act=quant.QuantSpec(bits=4)))
  meta = {checkpoints.CHECKSUMS: {"params/w": "0"}, "model": "tiny", "model_kwargs": {}}
  (tmp_path / "checkpoints" / "w4a4").mkdir(parents=True)
  monkeypatch.setattr(deploy, "load_setting", lambda w, s: (w4a4, tiny_w4a8[1], meta))
  images = np.full((2, 28, 28, 1), 128, np.uint8)
  monkeypatch.setattr(deploy, "eval_split", lambda m: data.Split(images, np.zeros(2, int)))
  reason = (r"input_q: activations on a 4-bit grid \[-7, 7\]; ONNX export needs 8-bit "
            r"activations \(act_bits=8")
  with pytest.raises(ExportError, match=rf"^cannot export setting 'w4a4': {reason}"):
    deploy.export(str(tmp_path), "w4a4")
  written, skipped = deploy.export(str(tmp_path))
  assert written == [] and list(skipped) == ["w4a4"]
  assert re.match(reason, skipped["w4a4"]) and "\n" not in skipped["w4a4"]
  assert not os.path.exists(tmp_path / "export" / "w4a4")


@pytest.mark.slow
def test_asymmetric_export_runs_in_ort(tmp_path):
  """Asymmetric (uint8) weights per channel and asymmetric activations, calibrated:
  every grid holds 0, so every layer exports, also depthwise filters whose taps
  all have one sign (two made so in tiny_net: folding keeps their signs); ORT
  agrees with the integer reference and the simulation."""
  model = tiny_net()
  v = random_variables(model, _images(1, 0))
  kernel = np.array(v["params"]["block_1"]["dw"]["conv"]["kernel"])
  kernel[..., 0], kernel[..., 1] = np.abs(kernel[..., 0]), -np.abs(kernel[..., 1])
  v["params"]["block_1"]["dw"]["conv"]["kernel"] = kernel
  qmodel, qvars = _quantized(None, kind="asymmetric", perturb=False, model=model, variables=v)
  x = _images(32, 1)
  nodes, acts = graph.trace(qmodel, qvars, x, return_activations=True)
  one_sign = [(n.name, c) for n in nodes if n.op == "conv" and n.attrs["depthwise"]
              for c in range(n.attrs["weight"].shape[-1])
              if np.all(n.attrs["weight"][..., c] > 0) or np.all(n.attrs["weight"][..., c] < 0)]
  assert {c for _, c in one_sign} >= {0, 1}, one_sign
  diffs = integer.layer_differences(nodes, acts, x)
  for n in nodes[1:]:  # each integer op within one step of the simulation
    assert diffs[n.name].max() <= 1, n.name
  path = str(tmp_path / "asym.onnx")
  q_model = export_onnx.to_qdq(nodes, (None,) + x.shape[1:])
  onnx.checker.check_model(q_model, full_check=True)
  onnx.save(q_model, path)
  assert any(t.data_type == onnx.TensorProto.UINT8 and t.name.endswith("weight/int")
             for t in q_model.graph.initializer)
  ort_q = runtime.logits(runtime.session(path), x)
  sim = np.asarray(jax.jit(qmodel.apply)(qvars, x))
  assert np.mean(ort_q.argmax(-1) == integer.logits(nodes, x).argmax(-1)) >= 0.95
  assert np.mean(ort_q.argmax(-1) == sim.argmax(-1)) >= 0.9


@pytest.mark.slow
def test_tiny_weight_channel_bias_overflow_is_named():
  """A per-channel weight step so small that the bias needs more than 32 bits is
  refused with the layer, the channel and the fix."""
  qmodel, qvars = _quantized(None, model=tiny_net(), perturb=False)
  nodes = graph.trace(qmodel, qvars, _images(2, 0))
  conv = next(n for n in nodes if n.op == "conv")
  scale = np.array(conv.attrs["w_grid"].scale)
  scale[3] = 1e-12
  conv.attrs["w_grid"] = dataclasses.replace(conv.attrs["w_grid"], scale=scale)
  conv.attrs["bias"] = np.array(conv.attrs["bias"])
  conv.attrs["bias"][3] = 0.5
  with pytest.raises(ExportError, match=rf"{conv.name}: the bias of 1 output channel.*"
                                        r"channel 3.*per tensor"):
    export_onnx.to_qdq(nodes, (None, 28, 28, 1))
  # The integer reference names the layer too (zero bias: the multiplier is too small).
  conv.attrs["bias"][3] = 0.0
  with pytest.raises(ExportError, match=rf"{conv.name}: requantization multiplier"):
    integer.run(nodes, _images(2, 0))


@pytest.mark.parametrize("impl", ["conv", "shift"])
def test_every_product_asks_for_float32(impl):
  """Every convolution and matmul of the quantized model (and of its gradient) asks
  for HIGHEST precision: the default rounds operands to bf16 on TPU and TF32 on
  recent GPUs, off the 8-bit grid the integer runtime computes on."""
  model = tiny_net(dw_impl=impl)  # MobileNet-v2's blocks: conv, depthwise, add, dense
  x = _images(2, 0)
  v = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])
  v = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), v)
  folded = fold.fold_variables(v, model.bn_eps)
  qmodel = calibrate.quantized(model, rules.uniform_rules(weight=quant.QuantSpec(bits=8),
                                                          act=quant.QuantSpec(bits=8)))
  qvars = jax.eval_shape(lambda: calibrate.init_quant_variables(qmodel, folded["params"], x))
  part = fat_variables.partition(qvars)
  loss = lambda p: qmodel.apply(p.merged(), x).sum()
  jaxprs = [jax.make_jaxpr(qmodel.apply)(qvars, x), jax.make_jaxpr(jax.grad(loss))(part)]
  seen = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        grouped = eqn.params.get("feature_group_count", 1) > 1  # a depthwise conv
        seen.append((eqn.primitive.name + ("_grouped" if grouped else ""),
                     eqn.params["precision"]))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  for j in jaxprs:
    walk(j.jaxpr)
  names = {n for n, _ in seen}
  assert {"dot_general", "conv_general_dilated"} <= names
  assert ("conv_general_dilated_grouped" in names) == (impl == "conv")
  highest = jax.lax.Precision.HIGHEST
  assert all(p in (highest, (highest, highest)) for _, p in seen), seen


def _saturating_qdq(path):
  """A QDQ 1x1 conv whose uint8 x int8 products saturate int16 pair sums: inputs at
  the top of the uint8 grid (stored 255, zero point 128) times weights of 127."""
  from onnx import TensorProto, helper
  f = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)
  inits = [f("s1", 1.0), numpy_helper.from_array(np.array(128, np.uint8), "z128"),
           numpy_helper.from_array(np.full((1, 16, 1, 1), 127, np.int8), "wq"),
           f("sw", 1.0), numpy_helper.from_array(np.array(0, np.int8), "z0"),
           f("so", 4096.0)]
  nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "z128"], ["xq"]),
           helper.make_node("DequantizeLinear", ["xq", "s1", "z128"], ["xd"]),
           helper.make_node("DequantizeLinear", ["wq", "sw", "z0"], ["wd"]),
           helper.make_node("Conv", ["xd", "wd"], ["y"]),
           helper.make_node("QuantizeLinear", ["y", "so", "z128"], ["yq"]),
           helper.make_node("DequantizeLinear", ["yq", "so", "z128"], ["out"])]
  g = helper.make_graph(nodes, "saturate",
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 1, 1])],
                        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 1, 1])],
                        inits)
  onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
            path)


def test_ort_sessions_compute_uint8_by_int8_products_exactly(tmp_path):
  """fat.runtime's sessions set ORT's exact-int8 option: on x86 CPUs without VNNI,
  where ORT's default uint8 x int8 kernel saturates (here its sum would be 2040,
  0 output steps), the conv returns the integer result: 16 * 127 * 127 = 258064,
  63 output steps of 4096. On other CPUs both kernels are exact, and only the
  option check can fail."""
  path = str(tmp_path / "saturate.onnx")
  _saturating_qdq(path)
  sess, ops = runtime.session_and_ops(path)
  assert ops.get("QLinearConv") == 1, ops
  assert sess.get_session_options().get_session_config_entry(
      "session.x64quantprecision") == "1"
  out = runtime.logits(sess, np.full((1, 16, 1, 1), 127.0, np.float32))
  assert out.ravel().tolist() == [63 * 4096.0]
