"""Integer-only reference inference of a traced graph (``fat.graph``), numpy.

What an int8 runtime does, written out (Jacob et al. 2018, as in TFLite's
reference kernels):

* conv / dense: int8 x int8 products (int4 x int8 for 2-4-bit weights: the
  same arithmetic on a narrower weight grid) accumulated in int32, plus the
  int32 bias ``round(b / (scale_in * scale_w))``;
* requantization by a fixed-point multiplier: ``M = scale_in * scale_w /
  scale_out = M0 * 2^-n`` with a 31-bit ``M0``, a 64-bit product and one
  rounding right shift; ReLU/ReLU6 become a clamp on the grid;
* residual add: both inputs rescaled to a common scale (left shift 20) by
  fixed-point multipliers, added, then requantized;
* global average pool: an int32 sum, requantized by ``scale_in / (H*W*scale_out)``.

Accumulations run as float64 matmuls, which are exact on integers below 2^53
(int8 products summed over fewer than 2^37 terms), and are checked to fit
int32. ``run`` returns every node's integer output, so the tests can compare
each activation with the fake-quantized model's grid indices.
"""

from __future__ import annotations

import numpy as np

from fat.graph import ExportError, Grid, Node

ADD_LEFT_SHIFT = 20
_INT32 = (-2 ** 31, 2 ** 31 - 1)


def quantize_multiplier(m) -> tuple[np.ndarray, np.ndarray]:
  """``m = M0 * 2^(shift - 31)`` with ``M0`` in [2^30, 2^31) (int64 arrays)."""
  m = np.asarray(m, np.float64)
  if np.any(m <= 0) or not np.all(np.isfinite(m)):
    raise ValueError("requantization multipliers must be positive and finite.")
  frac, shift = np.frexp(m)                   # m = frac * 2^shift, frac in [0.5, 1)
  m0 = np.round(frac * 2.0 ** 31).astype(np.int64)
  carry = m0 == 2 ** 31
  m0 = np.where(carry, 2 ** 30, m0)
  return m0, shift.astype(np.int64) + carry


def multiply_by_multiplier(x: np.ndarray, m0, shift) -> np.ndarray:
  """``round(x * M0 * 2^(shift - 31))`` with one rounding, half up (TFLite's
  ``TFLITE_SINGLE_ROUNDING`` MultiplyByQuantizedMultiplier): a 64-bit product
  and one rounding right shift by ``31 - shift``. (The older two-step form,
  a rounding doubling high multiply then a rounding shift, rounds twice and is
  off by one on ~1% of small accumulators.)"""
  x = np.asarray(x, np.int64)
  if x.min(initial=0) < _INT32[0] or x.max(initial=0) > _INT32[1]:
    raise OverflowError("a requantization input does not fit int32.")
  n = 31 - np.asarray(shift, np.int64)
  if np.any(n < 1) or np.any(n > 62):
    raise OverflowError("requantization multiplier out of range.")
  return (x * np.asarray(m0, np.int64) + (np.int64(1) << (n - 1))) >> n


def _requantize(acc: np.ndarray, multiplier, out: Grid, lo=None, hi=None) -> np.ndarray:
  m0, shift = quantize_multiplier(multiplier)
  q = multiply_by_multiplier(acc, m0, shift) + out.zero_point
  lo = out.qmin if lo is None else max(out.qmin, lo)
  hi = out.qmax if hi is None else min(out.qmax, hi)
  return np.clip(q, lo, hi)


def _check_int32(acc: np.ndarray, name: str):
  if acc.min(initial=0) < _INT32[0] or acc.max(initial=0) > _INT32[1]:
    raise OverflowError(f"{name}: the int32 accumulator overflows.")


def bias_int32(node: Node, in_grid: Grid) -> np.ndarray:
  """The int32 bias at scale ``scale_in * scale_w`` (per output channel), rounded
  in float32 as the simulation rounds it (``fat.quant.fake_quant_bias``)."""
  scale = np.float32(in_grid.scale) * node.attrs["w_grid"].scale.astype(np.float32)
  return np.round(node.attrs["bias"].astype(np.float32) / scale).astype(np.int64)


def _conv_acc(q: np.ndarray, node: Node, in_grid: Grid) -> np.ndarray:
  w = node.attrs["q_weight"] - node.attrs["w_grid"].zero_point
  x = (q - in_grid.zero_point).astype(np.float64)
  if node.op == "dense":
    acc = x @ w.astype(np.float64)
  else:
    (pt, pb), (pl, pr) = node.attrs["pads"]
    s = node.attrs["stride"]
    kh, kw = w.shape[:2]
    x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))  # (q - zp) of a real 0 is 0
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::s, ::s]
    if node.attrs["depthwise"]:
      acc = np.einsum("nhwcij,ijc->nhwc", win, w[:, :, 0, :].astype(np.float64))
    else:
      acc = np.einsum("nhwcij,ijcd->nhwd", win, w.astype(np.float64), optimize=True)
  acc = np.round(acc).astype(np.int64) + bias_int32(node, in_grid)
  _check_int32(acc, node.name)
  return acc


def _act_bounds(node: Node) -> tuple[int | None, int | None]:
  """ReLU / ReLU6 as a clamp on the output grid."""
  act, out = node.attrs.get("act"), node.out
  if act is None:
    return None, None
  zp = int(out.zero_point)
  if act == "relu":
    return zp, None
  if act == "relu6":
    return zp, zp + int(np.round(6.0 / np.float64(out.scale)))
  raise ValueError(f"{node.name}: no integer form for activation {act!r}.")


def run_node(node: Node, values: dict, grids: dict, images=None) -> np.ndarray:
  """Integer output of one node from the integer outputs (and grids) of its inputs."""
  if node.op == "quantize":
    if node.inputs[0] != "input":
      raise ValueError(f"{node.name}: only the network input is quantized from float.")
    return node.out.quantize(np.asarray(images, np.float32)).astype(np.int64)
  if node.op in ("conv", "dense"):
    src = node.inputs[0]
    acc = _conv_acc(values[src], node, grids[src])
    mult = (np.float64(grids[src].scale) * node.attrs["w_grid"].scale.astype(np.float64)
            / np.float64(node.out.scale))
    return _requantize(acc, mult, node.out, *_act_bounds(node))
  if node.op == "add":
    a, b = node.inputs
    ga, gb = grids[a], grids[b]
    twice_max = 2 * max(np.float64(ga.scale), np.float64(gb.scale))
    terms = []
    for v, g in ((values[a], ga), (values[b], gb)):
      m0, sh = quantize_multiplier(np.float64(g.scale) / twice_max)
      terms.append(multiply_by_multiplier((v - g.zero_point) << ADD_LEFT_SHIFT, m0, sh))
    mult = twice_max / ((1 << ADD_LEFT_SHIFT) * np.float64(node.out.scale))
    return _requantize(terms[0] + terms[1], mult, node.out)
  if node.op == "mean":
    src = node.inputs[0]
    v, g = values[src], grids[src]
    acc = np.sum(v - g.zero_point, axis=(1, 2))
    _check_int32(acc, node.name)
    mult = np.float64(g.scale) / (v.shape[1] * v.shape[2] * np.float64(node.out.scale))
    return _requantize(acc, mult, node.out)
  raise ValueError(f"{node.name}: unknown op {node.op!r}.")


def run(nodes: list[Node], images: np.ndarray) -> dict[str, np.ndarray]:
  """Integer outputs of every node for float NHWC ``images``."""
  values: dict[str, np.ndarray] = {}
  grids: dict[str, Grid] = {}
  for node in nodes:
    try:
      values[node.name] = run_node(node, values, grids, images)
    except OverflowError as e:  # a scale too small or too large for int32 arithmetic
      msg = str(e) if str(e).startswith(node.name) else f"{node.name}: {e}"
      raise ExportError(f"{msg} A near-zero weight channel or activation range "
                        "gives scales outside int32 fixed point; quantize that layer's "
                        "weights per tensor (a rule override for its path).") from e
    grids[node.name] = node.out
  return values


def layer_differences(nodes: list[Node], acts: dict, images: np.ndarray) -> dict:
  """``{node name: |integer output - acts[name]|}`` in grid steps, each node run on
  the integer inputs in ``acts`` (the simulation's, from
  ``graph.trace(..., return_activations=True)``), so that differences do not add up."""
  grids = {n.name: n.out for n in nodes}
  return {n.name: np.abs(run_node(n, {i: acts[i] for i in n.inputs if i != "input"}, grids,
                                  images) - acts[n.name]) for n in nodes}


def logits(nodes: list[Node], images: np.ndarray, batch_size: int = 100) -> np.ndarray:
  """Dequantized float logits of the integer run, in batches."""
  out = nodes[-1]
  q = np.concatenate([run(nodes, images[i:i + batch_size])[out.name]
                      for i in range(0, len(images), batch_size)])
  return (q - out.out.zero_point).astype(np.float32) * out.out.scale
