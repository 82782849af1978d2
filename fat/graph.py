"""The fake-quantized network as an explicit integer graph, for export.

    g = graph.trace(qmodel, qvars, sample_images)   # list of Nodes, numpy only

``trace`` records the top-level building blocks (``ConvBNAct``, ``Dense``,
``ActQuant``, ``InvertedResidual``) with ``flax.linen.intercept_methods`` under
``jax.eval_shape``, following tensors by identity, so the graph is the model's
real dataflow; then one jitted run has every quantizer record its integer grid
(``fat.layers.GRID_COLLECTION``). The two pieces of glue that are plain
``jnp`` code in ``fat.models.blocks`` are recognized by where they sit: the
quantizer of a residual block's sum (an ``ActQuant`` directly inside an
``InvertedResidual``) and the global average pool (a 2-D quantizer input after
a conv). Anything else raises, naming the layer; the integer reference tests
check the recognized ops numerically.

Every node output is an integer tensor on its grid: ``x = (q - zero_point) *
scale``. ``fat.export_onnx`` writes the graph as ONNX QDQ; ``fat.integer`` runs
it in integer arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fat import depthwise
from fat.layers import GRID_COLLECTION, ActQuant, Dense
from fat.models.blocks import ConvBNAct, InvertedResidual


class ExportError(ValueError):
  """The quantized model has something the integer graph cannot represent."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grid:
  """An integer grid: ``x = (q - zero_point) * scale`` with ``q`` in [qmin, qmax].

  ``scale`` and ``zero_point`` are scalars, or per-channel vectors for weights.
  """

  scale: np.ndarray
  zero_point: np.ndarray
  qmin: int
  qmax: int

  def quantize(self, x: np.ndarray) -> np.ndarray:
    """Grid indices of float ``x`` (channel last), as the fake quantizer rounds."""
    return np.clip(np.round(x.astype(np.float32) * (1.0 / self.scale)) + self.zero_point,
                   self.qmin, self.qmax)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Node:
  """One integer op.

  op: "quantize" (float input -> grid), "conv" (regular or depthwise, folded
    bias, optional ReLU/ReLU6), "dense", "add" or "mean" (global average pool).
  name: the model layer path; also the name of the node's output tensor.
  inputs: names of input tensors ("input" is the float image batch).
  out: the output grid.
  attrs: op attributes. conv/dense: ``q_weight`` (HWIO, or (in, out) for
    dense, integer values), ``weight`` (the same weights in float),
    ``w_grid``, ``bias`` (float), ``act``; conv also ``stride``, ``pads``
    ((top, bottom), (left, right)), ``depthwise``.
  """

  op: str
  name: str
  inputs: tuple[str, ...]
  out: Grid | None  # None only while a dense layer waits for its output quantizer
  attrs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _grid(g: dict, path: str) -> Grid:
  if "step" not in g:
    raise ExportError(f"layer {path!r} has no quantizer; integer export needs every weight "
                      "and activation quantized (check the setting's rules).")
  return Grid(scale=np.asarray(g["step"][0], np.float32),
              zero_point=(-np.asarray(g["z"][0])).astype(np.int64),
              qmin=int(g["qmin"][0]), qmax=int(g["qmax"][0]))


class _Tracer:
  """Records top-level building blocks and follows tensors by identity.

  Runs under ``jax.eval_shape``: tensors are abstract tracers, whose identity
  is the dataflow.
  """

  def __init__(self):
    self.calls, self.names, self.keep = [], {}, []
    self.blocks: list[tuple[nn.Module, str | None]] = []  # open residual blocks
    self.depth = 0                # > 0 inside a recorded composite

  def name(self, x, name):
    self.names[id(x)] = name
    self.keep.append(x)  # keeps ids unique while the trace runs

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or self.depth:
      return next_fun(*args, **kwargs)
    if isinstance(module, InvertedResidual):
      self.blocks.append((module, self.names.get(id(args[0]))))
      try:
        return next_fun(*args, **kwargs)
      finally:
        self.blocks.pop()
    if not isinstance(module, (ConvBNAct, Dense, ActQuant)):
      return next_fun(*args, **kwargs)
    self.depth += 1
    try:
      out = next_fun(*args, **kwargs)
    finally:
      self.depth -= 1
    value = out[0] if isinstance(out, tuple) else out  # blocks return (x, step)
    path = "/".join(module.scope.path)
    src = self.names.get(id(args[0]))
    block = self.blocks[-1] if self.blocks else None
    in_block = block is not None and module.parent is not None \
        and module.parent.scope.path == block[0].scope.path
    self.calls.append((module, path, src, args[0].shape, block[1] if in_block else None))
    self.name(value, path)
    return out


def trace(qmodel: nn.Module, qvars: dict, sample, return_activations: bool = False):
  """The integer graph of ``qmodel`` (stage "quant") with variables ``qvars``.

  ``sample`` is a small float batch (NHWC). With ``return_activations`` it
  also returns ``{node name: grid indices}`` of the fake-quantized model on
  ``sample``: what an integer runtime must reproduce.
  """
  if qmodel.mode.stage != "quant":
    raise ExportError(f"trace needs a model in the 'quant' stage, got {qmodel.mode.stage!r}.")
  variables = {k: v for k, v in qvars.items() if k != GRID_COLLECTION}
  x = jnp.asarray(sample, jnp.float32)
  tracer = _Tracer()

  def structure(v, x):
    tracer.name(x, "input")
    with nn.intercept_methods(tracer):
      return qmodel.apply(v, x)

  jax.eval_shape(structure, variables, x)
  run = jax.jit(lambda v, x: qmodel.apply(v, x, mutable=[GRID_COLLECTION],
                                          capture_intermediates=True))
  _, state = run(variables, x)
  grids = traverse_util.flatten_dict(state[GRID_COLLECTION], sep="/")
  grid_of = lambda path: {k.rsplit("/", 1)[1]: v for k, v in grids.items()
                          if k.rsplit("/", 1)[0] == path}
  outputs = traverse_util.flatten_dict(state["intermediates"], sep="/")
  params = traverse_util.flatten_dict(jax.device_get(qvars["params"]), sep="/")
  nodes: list[Node] = []
  for module, path, src, in_shape, block_input in tracer.calls:
    if isinstance(module, ActQuant):
      grid = _grid(grid_of(path), path)
      if src is not None and nodes and src == nodes[-1].name and nodes[-1].op == "dense":
        # The dense layer's output quantizer: an int8 kernel requantizes to it.
        dense = nodes.pop()
        nodes.append(dataclasses.replace(dense, name=path, out=grid,
                                         attrs={**dense.attrs, "layer": dense.name}))
      elif src is not None:
        nodes.append(Node(op="quantize", name=path, inputs=(src,), out=grid))
      elif block_input is not None and nodes:
        nodes.append(Node(op="add", name=path, inputs=(block_input, nodes[-1].name), out=grid))
      elif len(in_shape) == 2 and nodes and nodes[-1].op == "conv":
        nodes.append(Node(op="mean", name=path, inputs=(nodes[-1].name,), out=grid))
      else:
        raise ExportError(f"cannot export the op feeding {path!r}: only convs, dense layers, "
                          "residual adds and the global average pool are supported.")
    elif src is None:
      raise ExportError(f"layer {path!r} reads a tensor the trace cannot follow.")
    elif isinstance(module, ConvBNAct):
      nodes.append(_conv_node(module, path, in_shape, src, params, grid_of))
    else:
      w = _weights(path, params, grid_of(path))
      nodes.append(Node(op="dense", name=path, inputs=(src,), out=None, attrs=w))
  if not nodes or nodes[-1].out is None:
    raise ExportError("the model output is not quantized.")
  if not return_activations:
    return nodes
  def value(name):  # a module's output; blocks and quantizers return (x, step)
    out = outputs[f"{name}/__call__"][0]
    return np.asarray(out[0] if isinstance(out, tuple) else out)

  return nodes, {n.name: n.out.quantize(value(n.name)).astype(np.int64) for n in nodes}


def _weights(path: str, params: dict, wgrid: dict) -> dict:
  """Float and integer weights of the conv or dense layer at ``path``."""
  if f"{path}/bias" not in params:
    raise ExportError(f"layer {path!r} has no bias: fold the batch norm before export.")
  return {"weight": np.asarray(params[f"{path}/kernel"], np.float32),
          "bias": np.asarray(params[f"{path}/bias"], np.float32),
          "w_grid": _grid(wgrid, path),
          "q_weight": np.asarray(wgrid["q"][0]).astype(np.int64)}


def _conv_node(module: ConvBNAct, path, in_shape, src, params, grid_of) -> Node:
  w = _weights(f"{path}/conv", params, grid_of(f"{path}/conv"))
  k, s = module.kernel_size, module.strides
  pads = tuple(depthwise.conv_padding(in_shape[i], k, s, module.padding) for i in (1, 2))
  attrs = {**w, "stride": s, "pads": pads, "depthwise": module.depthwise, "act": module.act}
  return Node(op="conv", name=path, inputs=(src,), out=_grid(grid_of(f"{path}/act_q"),
                                                              f"{path}/act_q"), attrs=attrs)
