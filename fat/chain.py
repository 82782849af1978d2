"""A network as a chain of its top-level modules, for unit-by-unit
reconstruction (``fat.reconstruction``).

    calls = trace(qmodel, variables, sample)

``trace`` runs the quantized model once (shapes only) and records its calls at
depth 1 and 2: each top-level module in call order, how its arguments come
from the previous module's ``(output, grid step)``, the glue between them (only
a global average pool may come between two modules), the quantizer that makes
its output, and, for a container that is not a ``fat.graph`` node (an inverted
residual block), its inner calls with weights, also a chain.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from fat import graph, rounding
from fat.layers import ACT_COLLECTION, TRAINABLE_COLLECTION, ActQuant

# The collections a unit's module reads.
COLLECTIONS = ("params", TRAINABLE_COLLECTION, ACT_COLLECTION, rounding.COLLECTION)

# --------------------------------------------------------------------------
# The chain of top-level modules.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Call:
  """One module call: its path, the module, how its arguments are made from the
  running ``(x, step)`` (``args``: "step" or a constant per argument after x),
  the glue before it ("" or "mean"), the calls inside it (depth 2), and the
  path (relative) of the quantizer that makes its output (None: none)."""

  path: str
  module: nn.Module
  args: tuple
  glue: str = ""
  children: tuple = ()
  output_quantizer: str | None = None


class _Tracer:
  """Records module calls at depth 1 and 2 with their inputs and outputs, and
  the outputs of every activation quantizer."""

  def __init__(self):
    self.records: list[dict] = []
    self.quantizers: list[tuple[str, object]] = []

  def __call__(self, next_fun, args, kwargs, context):
    path = context.module.scope.path
    if context.method_name == "__call__" and isinstance(context.module, ActQuant):
      out = self._record(next_fun, args, kwargs, context, path)
      self.quantizers.append(("/".join(path), out[0]))
      return out
    return self._record(next_fun, args, kwargs, context, path)

  def _record(self, next_fun, args, kwargs, context, path):
    if context.method_name != "__call__" or not 1 <= len(path) <= 2 or not args:
      return next_fun(*args, **kwargs)
    if kwargs:
      raise ValueError(f"reconstruction follows positional calls only; {'/'.join(path)!r} "
                       f"takes {sorted(kwargs)} by keyword.")
    rec = {"path": "/".join(path), "module": context.module, "args": args}
    self.records.append(rec)
    out = next_fun(*args, **kwargs)
    rec["out"] = out if isinstance(out, tuple) else (out, None)
    return out


def _argspec(args, step, path: str) -> tuple:
  spec = []
  for a in args[1:]:
    if a is step and a is not None:
      spec.append("step")
    elif a is None or isinstance(a, (bool, int, float, str)):
      spec.append(("const", a))
    else:
      raise ValueError(f"reconstruction: an argument of {path!r} is neither the previous "
                       "module's grid step nor a constant.")
  return tuple(spec)


def _follow(records, x, step, where: str, inner) -> list[Call]:
  """``records`` as a chain from ``(x, step)``; ``inner(record, x, step)`` gives
  a record's children and the function naming its output quantizer."""
  calls = []
  for rec in records:
    arg, glue = rec["args"][0], ""
    if arg is not x:
      if getattr(x, "ndim", 0) == 4 and arg.ndim == 2 and arg.shape[-1] == x.shape[-1]:
        glue = "mean"
      else:
        raise ValueError(f"reconstruction: {rec['path']!r} in {where} reads a tensor other "
                         "than the previous module's output (only a global average pool may "
                         "come between two modules).")
    children, made_by = inner(rec, arg, step)
    calls.append(Call(path=rec["path"], module=rec["module"],
                      args=_argspec(rec["args"], step, rec["path"]), glue=glue,
                      children=tuple(children), output_quantizer=made_by(rec)))
    x, step = rec["out"]
  return calls


def trace(qmodel: nn.Module, variables: dict, sample) -> list[Call]:
  """The top-level calls of ``qmodel`` as a chain. A top-level container (not a
  ``fat.graph`` node) carries its inner calls with weights, also a chain."""
  tracer, holder = _Tracer(), {}

  def run(v, x):
    holder["x"] = x
    with nn.intercept_methods(tracer):
      return qmodel.apply(v, x)

  jax.eval_shape(run, {k: v for k, v in variables.items() if k in COLLECTIONS},
                 jnp.asarray(sample[:1], jnp.float32))

  def made_by(rec):  # the quantizer inside rec whose output is rec's output
    inside = [p for p, y in tracer.quantizers if y is rec["out"][0]
              and p.startswith(rec["path"] + "/")]
    return inside[0][len(rec["path"]) + 1:] if inside else None

  def inner(rec, x, step):
    if graph.is_node(rec["module"]):
      return (), made_by
    kids = [r for r in tracer.records if r["path"].startswith(rec["path"] + "/")
            and has_weights(variables, r["path"])]
    return _follow(kids, x, step, rec["path"], lambda r, x, s: ((), made_by)), made_by

  top = [r for r in tracer.records if "/" not in r["path"]]
  return _follow(top, holder["x"], None, "the network", inner)


def subtree(tree: dict, path: str):
  for name in path.split("/") if path else ():
    if not isinstance(tree, dict) or name not in tree:
      return None
    tree = tree[name]
  return tree


def has_weights(variables: dict, path: str) -> bool:
  sub = subtree(variables["params"], path)
  return sub is not None and any(k.endswith("kernel") for k in
                                 traverse_util.flatten_dict(sub, sep="/"))

