"""The fake-quantized network as an explicit integer graph, for export.

    g = graph.trace(qmodel, qvars, sample_images)   # list of Nodes, numpy only

``trace`` runs the model under ``jax.eval_shape`` with
``flax.linen.intercept_methods``, following tensors by identity, so the graph
is the model's real dataflow; then one jitted run has every quantizer record
its integer grid (``fat.layers.GRID_COLLECTION``).

Modules declare their export in two tables here, keyed by class (a subclass
inherits its base's entry), filled by the module that defines the class:

* ``@register(cls)`` on ``fn(call, builder) -> Node``: a call of a ``cls``
  module is one node; the trace records it and does not look inside.
  ``fat.layers.Dense`` and ``ActQuant`` are registered below,
  ``fat.models.blocks.ConvBNAct`` in its own module.
* ``@register_glue(cls)`` on ``fn(scope, quantizer, builder) -> Node | None``:
  a ``cls`` module has plain ``jnp`` code that feeds one of its quantizers
  (an ``ActQuant`` whose input the trace cannot follow). ``fn`` gets the call
  of the ``cls`` module (its input name in ``scope.src``) and of the quantizer
  and returns that quantizer's node, or None when it is not one of its own
  (e.g. ``fat.models.blocks.InvertedResidual``'s residual "add",
  ``Network``'s global average pool "mean").

Any other module is traced through. A quantizer fed by glue nobody declared
raises, naming the layer; the integer reference tests check the exported ops
numerically.

Every node output is an integer tensor on its grid: ``x = (q - zero_point) *
scale``. ``fat.export_onnx`` writes the graph as ONNX QDQ; ``fat.integer`` runs
it in integer arithmetic.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fat.errors import ExportError  # noqa: F401  (callers also catch it as graph.ExportError)
from fat.layers import GRID_COLLECTION, ActQuant, Dense


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Call:
  """One traced ``__call__`` of a module.

  module: the bound module; path: its layer path ("block_3/project").
  src: the name of the tensor in its first argument (a node's name, or
    "input"); None when plain ``jnp`` code made it (glue).
  in_shape: the shape of that argument.
  parent: the call of the module's parent, when the trace went through it.
  """

  module: nn.Module
  path: str
  src: str | None
  in_shape: tuple[int, ...]
  parent: Call | None = None


Exporter = Callable[[Call, "Builder"], Node]
GlueExporter = Callable[[Call, Call, "Builder"], "Node | None"]
_NODES: dict[type, Exporter] = {}
_GLUE: dict[type, GlueExporter] = {}


def register(cls: type):
  """Decorator: ``fn(call, builder) -> Node`` exports each call of a ``cls``
  module (or subclass) as one node; the trace does not look inside it."""
  def add(fn: Exporter) -> Exporter:
    _NODES[cls] = fn
    return fn
  return add


def register_glue(cls: type):
  """Decorator: ``fn(scope, quantizer, builder) -> Node | None`` exports the
  quantizers directly inside a ``cls`` module (or subclass) that its plain
  ``jnp`` code feeds; None: not one of its own."""
  def add(fn: GlueExporter) -> GlueExporter:
    _GLUE[cls] = fn
    return fn
  return add


def _lookup(table: dict, cls: type):
  """The entry of ``cls`` or of its nearest registered base class."""
  return next((table[c] for c in cls.__mro__ if c in table), None)


def is_node(module: nn.Module) -> bool:
  """Whether a call of ``module`` exports as one node (``register``): a layer,
  not a container of layers."""
  return _lookup(_NODES, type(module)) is not None


def _grid(g: dict, path: str) -> Grid:
  if "step" not in g:
    raise ExportError(f"layer {path!r} has no quantizer; integer export needs every weight "
                      "and activation quantized (check the setting's rules).")
  return Grid(scale=np.asarray(g["step"][0], np.float32),
              zero_point=(-np.asarray(g["z"][0])).astype(np.int64),
              qmin=int(g["qmin"][0]), qmax=int(g["qmax"][0]))


class Builder:
  """The graph being built: the nodes so far, and the folded weights and
  recorded grids that exporters read by layer path."""

  def __init__(self, params: dict, grids: dict):
    self.nodes: list[Node] = []
    self._params = params
    self._grids = collections.defaultdict(dict)  # layer path -> {"step", "z", ...}
    for key, value in grids.items():
      path, name = key.rsplit("/", 1)
      self._grids[path][name] = value

  def grid(self, path: str) -> Grid:
    """The output grid of the quantizer at ``path``; ExportError if it has none."""
    return _grid(self._grids.get(path, {}), path)

  def weights(self, path: str) -> dict:
    """Float and integer weights of the conv or dense layer at ``path``: the node
    attrs ``weight``, ``bias``, ``w_grid`` and ``q_weight``."""
    if f"{path}/bias" not in self._params:
      raise ExportError(f"layer {path!r} has no bias: fold the batch norm before export.")
    wgrid = self._grids.get(path, {})
    return {"weight": np.asarray(self._params[f"{path}/kernel"], np.float32),
            "bias": np.asarray(self._params[f"{path}/bias"], np.float32),
            "w_grid": _grid(wgrid, path),
            "q_weight": np.asarray(wgrid["q"][0]).astype(np.int64)}

  def add(self, call: Call) -> None:
    """Appends the node of one recorded call, by its class's exporter."""
    if call.src is None and not isinstance(call.module, ActQuant):
      raise ExportError(f"layer {call.path!r} reads a tensor the trace cannot follow.")
    node = _lookup(_NODES, type(call.module))(call, self)
    known = {"input"} | {n.name for n in self.nodes}
    missing = [i for i in node.inputs if i not in known]
    if missing:
      raise ExportError(f"layer {call.path!r} reads {missing}, which no earlier node makes.")
    self.nodes.append(node)


@register(Dense)
def _dense(call: Call, g: Builder) -> Node:
  """Its output grid comes with the output quantizer that follows (``_act_quant``)."""
  return Node(op="dense", name=call.path, inputs=(call.src,), out=None,
              attrs=g.weights(call.path))


@register(ActQuant)
def _act_quant(call: Call, g: Builder) -> Node:
  """The input quantizer ("quantize"), a dense layer's output quantizer (fused
  into the "dense" node), or glue that the parent module declares."""
  grid = g.grid(call.path)
  if call.src is None:  # glue: ask the module whose jnp code made the input
    glue = _lookup(_GLUE, type(call.parent.module)) if call.parent is not None else None
    node = glue(call.parent, call, g) if glue is not None else None
    if node is None:
      raise ExportError(f"cannot export the op feeding {call.path!r}: only convs, dense "
                        "layers and the glue a module registers (fat.graph.register_glue: "
                        "residual adds, the global average pool) are supported.")
    return node
  if g.nodes and call.src == g.nodes[-1].name and g.nodes[-1].op == "dense":
    # The dense layer's output quantizer: an int8 kernel requantizes to it.
    dense = g.nodes.pop()
    return dataclasses.replace(dense, name=call.path, out=grid,
                               attrs={**dense.attrs, "layer": dense.name})
  return Node(op="quantize", name=call.path, inputs=(call.src,), out=grid)


class _Tracer:
  """Records the calls of registered modules and follows tensors by identity.

  Runs under ``jax.eval_shape``: tensors are abstract tracers, whose identity
  is the dataflow. Unregistered modules are traced through and stay open
  (``self.open``) as the parents of the calls inside them.
  """

  def __init__(self):
    self.calls: list[Call] = []
    self.open: list[Call] = []
    self.names, self.keep = {}, []
    self.depth = 0                # > 0 inside a recorded module

  def name(self, x, name):
    self.names[id(x)] = name
    self.keep.append(x)  # keeps ids unique while the trace runs

  def _open_parent(self, module: nn.Module) -> Call | None:
    """The open call of ``module``'s parent, if that is the innermost one."""
    parent = module.parent  # the root module's is a flax Scope
    if self.open and isinstance(parent, nn.Module) and parent.scope is not None \
        and parent.scope.path == self.open[-1].module.scope.path:
      return self.open[-1]
    return None

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or self.depth or not args:
      return next_fun(*args, **kwargs)
    call = Call(module=module, path="/".join(module.scope.path),
                src=self.names.get(id(args[0])), in_shape=tuple(getattr(args[0], "shape", ())),
                parent=self._open_parent(module))
    if _lookup(_NODES, type(module)) is None:
      self.open.append(call)
      try:
        return next_fun(*args, **kwargs)
      finally:
        self.open.pop()
    self.depth += 1
    try:
      out = next_fun(*args, **kwargs)
    finally:
      self.depth -= 1
    self.calls.append(call)
    self.name(out[0] if isinstance(out, tuple) else out, call.path)  # blocks return (x, step)
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
  builder = Builder(traverse_util.flatten_dict(jax.device_get(qvars["params"]), sep="/"),
                    traverse_util.flatten_dict(state[GRID_COLLECTION], sep="/"))
  for call in tracer.calls:
    builder.add(call)
  nodes = builder.nodes
  if not nodes or nodes[-1].out is None:
    raise ExportError("the model output is not quantized.")
  if not return_activations:
    return nodes
  outputs = traverse_util.flatten_dict(state["intermediates"], sep="/")

  def value(name):  # a module's output; blocks and quantizers return (x, step)
    out = outputs[f"{name}/__call__"][0]
    return np.asarray(out[0] if isinstance(out, tuple) else out)

  return nodes, {n.name: n.out.quantize(value(n.name)).astype(np.int64) for n in nodes}
