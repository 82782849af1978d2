"""ONNX export of a traced graph (``fat.graph``): integer QDQ and float32.

    model = export_onnx.to_qdq(nodes, input_shape)    # onnx.ModelProto, QDQ
    model = export_onnx.to_float(nodes, input_shape)  # the same folded net in float32

Both take NHWC float images (our data layout) named ``images`` and transpose
to NCHW once. The QDQ model stores, for ``x = (q - zero_point) * scale``:

* weight initializers ``q`` with per-channel (axis 0) or per-tensor scales and
  zero points, behind ``DequantizeLinear``: int8 (uint8 for asymmetric grids)
  for 5-8-bit weights, int4 (uint4) for 2-4-bit ones; a k-bit symmetric grid
  [-(2^(k-1) - 1), 2^(k-1) - 1] fits int4 for k <= 4, an asymmetric one
  [0, 2^k - 1] fits uint4;
* int32 biases at scale ``scale_in * scale_w`` behind ``DequantizeLinear``;
* ``QuantizeLinear`` -> ``DequantizeLinear`` on every activation the
  simulation quantizes, with our trained scales and zero points (8-bit only).

Opset: 17 (IR 8, read by every ONNX Runtime since 1.13) for graphs of 8-bit
weights; 21 (IR 10), where ``DequantizeLinear`` takes int4/uint4, as soon as
one weight is stored in 4 bits. ONNX Runtime fuses the 8-bit patterns into
integer kernels (QLinearConv, QLinearAdd, QLinearGlobalAveragePool, ...);
int4 weights it dequantizes to float and convolves in float. Grids ONNX
cannot hold exactly (activations not 8 bits; weights wider than 8 bits; a zero
point outside the storage type) raise ``ExportError``. Activations are stored
as uint8 (signed grids shifted by a zero point of 128). One known difference:
there the saturation is at -128 steps, our symmetric grid's at -127, so a
signed activation below its clipped range lands one step lower.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fat.graph import ExportError, Grid, Node
from fat.integer import bias_int32

OPSET, IR_VERSION = 17, 8            # 8-bit weights: every ONNX Runtime since 1.13
OPSET_INT4, IR_VERSION_INT4 = 21, 10  # int4/uint4 initializers (DequantizeLinear-21)
# Storage types by width: (name, lo, hi, ONNX element type, numpy dtype).
_TYPES = {
    4: (("int4", -8, 7, TensorProto.INT4, ml_dtypes.int4),
        ("uint4", 0, 15, TensorProto.UINT4, ml_dtypes.uint4)),
    8: (("int8", -128, 127, TensorProto.INT8, np.int8),
        ("uint8", 0, 255, TensorProto.UINT8, np.uint8)),
}


def grid_bits(grid: Grid) -> int:
  """The width of ``grid``: ceil(log2(qmax - qmin + 1)), e.g. 4 for [-7, 7] and [0, 15]."""
  return int(np.ceil(np.log2(grid.qmax - grid.qmin + 1)))


def storage(grid: Grid, what: str, weights: bool = False) -> tuple[int, type]:
  """The ONNX element type and numpy dtype holding ``grid``, or ExportError.

  Activations: 8-bit grids only. A narrower grid would fit the storage type,
  but QuantizeLinear would clip activations to the storage type's range, not
  to the grid's, and ONNX Runtime's integer kernels take 8-bit activations.
  Weights are constants already on their grid, stored exactly: 2-4-bit grids
  in int4/uint4, 5-8-bit ones in int8/uint8.
  """
  zp = np.asarray(grid.zero_point)
  bits = grid_bits(grid)
  if not weights and bits != 8:
    raise ExportError(
        f"{what}: activations on a {bits}-bit grid [{grid.qmin}, {grid.qmax}]; ONNX export "
        "needs 8-bit activations (act_bits=8; weights may have 2-8 bits): QuantizeLinear "
        "clips to its 8-bit storage range, not to a narrower grid.")
  if bits > 8:
    raise ExportError(
        f"{what}: the {bits}-bit grid [{grid.qmin}, {grid.qmax}] is wider than int8; "
        "ONNX export needs weights of 2-8 bits.")
  types = _TYPES[4 if weights and bits <= 4 else 8]
  # A signed grid in the signed type, an unsigned one ([0, 2^k - 1]) in the unsigned.
  for _, lo, hi, onnx_type, dtype in (types if grid.qmin < 0 else types[::-1]):
    if lo <= grid.qmin and grid.qmax <= hi and np.all((zp >= lo) & (zp <= hi)):
      return onnx_type, dtype
  name, lo, hi = types[1][:3]
  if grid.qmin >= 0:
    # An asymmetric grid [0, 2^k - 1] holds (q - zero_point) * scale: 0 is on it
    # only for a zero point in [0, 2^k - 1], which the unsigned type holds.
    bad = np.flatnonzero(np.ravel((zp < lo) | (zp > hi)))
    raise ExportError(
        f"{what}: 0 is not on the trained grid ({bad.size} of {zp.size} channel(s), e.g. "
        f"channel {bad[0]} with zero point {np.ravel(zp)[bad[0]]}), so no {name} zero point "
        "represents it. Training moved the range off 0 (beta above its start, or alpha "
        "below it for a range that ends at 0); retrain with config.fat.beta_range's upper "
        "end at 0.0, or quantize this layer symmetrically.")
  raise ExportError(
      f"{what}: the grid [{grid.qmin}, {grid.qmax}] with zero point(s) in "
      f"[{zp.min()}, {zp.max()}] is not an {types[0][0]} or {name} grid.")


class _Builder:
  def __init__(self):
    self.nodes, self.inits = [], []
    self.low_bit = False  # an int4/uint4 initializer: opset 21

  def init(self, name: str, array: np.ndarray) -> str:
    self.inits.append(numpy_helper.from_array(np.asarray(array), name))
    return name

  def op(self, op_type: str, inputs, output: str, **attrs) -> str:
    self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=output, **attrs))
    return output

  def qdq(self, x: str, grid: Grid, name: str) -> str:
    """QuantizeLinear -> DequantizeLinear of activation ``x`` on ``grid``.

    Activations are stored as uint8: a signed grid [-127, 127] with zero point
    z is the same set of values as uint8 with zero point z + 128, and ONNX
    Runtime fuses uint8-activation / int8-weight patterns into integer kernels
    (mixed int8/uint8 activations fall back to float).
    """
    storage(grid, name)
    zero_point = np.asarray(grid.zero_point) + (128 if grid.qmin < 0 else 0)
    scale = self.init(f"{name}/scale", np.float32(grid.scale))
    zp = self.init(f"{name}/zero_point", zero_point.astype(np.uint8))
    q = self.op("QuantizeLinear", [x, scale, zp], f"{name}/q")
    return self.op("DequantizeLinear", [q, scale, zp], f"{name}/dq")

  def dequantized(self, name: str, q: np.ndarray, scale, zero_point, onnx_dtype) -> str:
    """An integer initializer behind DequantizeLinear (per channel on axis 0);
    onnx packs int4/uint4 two to a byte."""
    scale = np.asarray(scale, np.float32)
    attrs = {"axis": 0} if scale.ndim else {}
    self.low_bit |= onnx_dtype in (ml_dtypes.int4, ml_dtypes.uint4)
    self.init(f"{name}/int", q.astype(onnx_dtype))
    self.init(f"{name}/scale", scale)
    self.init(f"{name}/zero_point", np.asarray(zero_point).astype(onnx_dtype))
    return self.op("DequantizeLinear", [f"{name}/int", f"{name}/scale", f"{name}/zero_point"],
                   f"{name}/dq", **attrs)


def _oihw(kernel: np.ndarray, op: str) -> np.ndarray:
  """HWIO conv (or (in, out) dense) kernel to ONNX OIHW."""
  if op == "dense":
    return kernel.T[:, :, None, None]
  return np.transpose(kernel, (3, 2, 0, 1))


def _conv(b: _Builder, node: Node, x: str, in_grid: Grid | None) -> str:
  a = node.attrs
  op_attrs = {}
  if node.op == "conv":
    k = a["weight"].shape[0]
    (pt, pb), (pl, pr) = a["pads"]
    op_attrs = dict(kernel_shape=[k, k], strides=[a["stride"]] * 2, pads=[pt, pl, pb, pr],
                    group=a["weight"].shape[-1] if a["depthwise"] else 1)
  if in_grid is None:  # float model
    w = b.init(f"{node.name}/weight", _oihw(a["weight"], node.op).astype(np.float32))
    bias = b.init(f"{node.name}/bias", a["bias"].astype(np.float32))
  else:
    wg = a["w_grid"]
    _, wdtype = storage(wg, f"{node.name} weights", weights=True)
    w = b.dequantized(f"{node.name}/weight", _oihw(a["q_weight"], node.op),
                      wg.scale, wg.zero_point, wdtype)
    bias_scale = np.float32(in_grid.scale) * wg.scale.astype(np.float32)
    q_bias = bias_int32(node, in_grid)
    over = np.flatnonzero(np.abs(np.ravel(q_bias)) >= 2 ** 31)
    if over.size:
      c = over[0]
      raise ExportError(
          f"{node.name}: the bias of {over.size} output channel(s) does not fit int32 at "
          f"scale input_step * weight_step (e.g. channel {c}: weight step "
          f"{np.ravel(wg.scale)[c]:.3g}, bias {np.ravel(node.attrs['bias'])[c]:.3g}). Such "
          "a channel has near-zero weights after BN folding; quantize this layer's weights "
          "per tensor (a rule override for its path).")
    bias = b.dequantized(f"{node.name}/bias", q_bias, bias_scale,
                         np.zeros(np.shape(bias_scale), np.int32), np.int32)
  y = b.op("Conv", [x, w, bias], f"{node.name}/conv", **op_attrs)
  act = a.get("act")
  if act == "relu":
    y = b.op("Relu", [y], f"{node.name}/relu")
  elif act == "relu6":
    lo = b.init(f"{node.name}/clip_min", np.float32(0.0))
    hi = b.init(f"{node.name}/clip_max", np.float32(6.0))
    y = b.op("Clip", [y, lo, hi], f"{node.name}/relu6")
  elif act is not None:
    raise ExportError(f"{node.name}: no ONNX form for activation {act!r}.")
  return y


def _build(nodes: list[Node], input_shape, quantized: bool) -> onnx.ModelProto:
  if len(input_shape) != 4:
    raise ExportError(f"input_shape must be NHWC, got {input_shape}.")
  b = _Builder()
  tensors = {"input": b.op("Transpose", ["images"], "images_nchw", perm=[0, 3, 1, 2])}
  grids: dict[str, Grid] = {}
  for node in nodes:
    ins = [tensors[i] for i in node.inputs]
    if node.op == "quantize":
      y = ins[0]
    elif node.op in ("conv", "dense"):
      y = _conv(b, node, ins[0], grids.get(node.inputs[0]) if quantized else None)
    elif node.op == "add":
      y = b.op("Add", ins, f"{node.name}/add")
    elif node.op == "mean":
      y = b.op("GlobalAveragePool", ins, f"{node.name}/pool")
    else:
      raise ExportError(f"{node.name}: no ONNX form for op {node.op!r}.")
    if quantized:
      y = b.qdq(y, node.out, node.name)
    tensors[node.name], grids[node.name] = y, node.out
  if nodes[-1].op != "dense":
    raise ExportError("the graph must end in the dense classifier.")
  b.op("Flatten", [tensors[nodes[-1].name]], "logits", axis=1)
  n, h, w, c = input_shape
  num_classes = nodes[-1].attrs["weight"].shape[-1]
  graph = helper.make_graph(
      b.nodes, "fat_qdq" if quantized else "fat_fp32",
      [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", h, w, c])],
      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
      initializer=b.inits)
  opset, ir_version = (OPSET_INT4, IR_VERSION_INT4) if b.low_bit else (OPSET, IR_VERSION)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                            producer_name="fat")
  model.ir_version = ir_version
  onnx.checker.check_model(model, full_check=True)
  return model


def to_qdq(nodes: list[Node], input_shape) -> onnx.ModelProto:
  """The QDQ model of the traced graph: 8-bit activations, int8 or int4 weights."""
  return _build(nodes, input_shape, quantized=True)


def to_float(nodes: list[Node], input_shape) -> onnx.ModelProto:
  """The float32 model of the same folded weights (no quantization)."""
  return _build(nodes, input_shape, quantized=False)


def opset(model: onnx.ModelProto) -> int:
  """The default-domain opset ``model`` imports."""
  return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def weight_types(model: onnx.ModelProto) -> dict[str, int]:
  """``{storage type name: count}`` of the weight initializers of a QDQ model."""
  names = {t[3]: t[0] for ts in _TYPES.values() for t in ts}
  counts = {}
  for t in model.graph.initializer:
    if t.name.endswith("weight/int"):
      counts[names[t.data_type]] = counts.get(names[t.data_type], 0) + 1
  return dict(sorted(counts.items()))
