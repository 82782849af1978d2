"""AdaRound's reconstruction: each layer (or block) learns its weights' rounding so
that its quantized output matches the float model's, on unlabeled images.

    spec = ReconSpec(granularity="layer", iterations=500)
    variables, stats, losses = reconstruct(qmodel, variables, images, spec)

``qmodel`` is the setting's quantized model and ``variables`` its calibrated
variables (the PTQ start: weight and activation thresholds stay as they are).
The network is followed as a chain of its top-level modules (``trace``; the
only glue between them may be a global average pool), carrying two tensors
over every image: the float model's (the targets) and the quantized model's
with the units before already hardened (the inputs; ``input="float"`` uses
the float ones, Nagel et al.'s plain form). A unit is one layer (``ConvBNAct``,
``Dense``: a module ``fat.graph`` exports as one node), or with
``granularity="block"`` one top-level module with weights (an inverted
residual block with its add). Each unit minimises, over ``iterations`` Adam
steps on random batches of the images,

  mean_(images, positions) sum_channels (f_q(x; w~(v)) - f(x_float))^2
      + lambda * on_t * f_reg(v; beta_t)

(``fat.rounding``; ``f_q`` includes the unit's activation function and its
output quantizer), then is hardened onto its grid before the next unit reads
its output. Each unit runs as a module of its own whose rules are its resolved
specs (``fat.rules.relocate``), so units alike in shapes and specs share one
compiled step; the loop around the step is plain Python over device arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fat import data, graph, rounding, rules
from fat.layers import ACT_COLLECTION, TRAINABLE_COLLECTION, ActQuant, QuantMode

GRANULARITIES = ("layer", "block")
INPUTS = ("quantized", "float")
_COLLECTIONS = ("params", TRAINABLE_COLLECTION, ACT_COLLECTION, rounding.COLLECTION)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReconSpec:
  """How the rounding of each unit is learned (defaults: BRECQ's lambda, warm-up
  and beta range; far fewer iterations than its 20k, for a CPU).

  Attributes:
    granularity: "layer" or "block" (module docstring).
    iterations: Adam steps per unit.
    batch_size: images per step.
    learning_rate: Adam's, on the rounding variables.
    reg_weight: lambda of the rounding regularizer.
    warmup: share of the steps without the regularizer.
    beta_start, beta_end: beta's linear annealing after the warm-up.
    input: "quantized" (the quantized model's input to the unit) or "float".
    quantize_output: whether the loss reads the unit's output after its output
      quantizer (True) or before it (False: Nagel et al.'s ``f_a(W~ x)``; the
      next unit's input quantization is not the rounding's to fix).
    seed: the batch sampling's.
  """

  granularity: str = "layer"
  iterations: int = 500
  batch_size: int = 32
  learning_rate: float = 1e-2
  reg_weight: float = 0.01
  warmup: float = 0.2
  beta_start: float = 20.0
  beta_end: float = 2.0
  input: str = "quantized"
  quantize_output: bool = False
  seed: int = 0

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}.")
    if self.input not in INPUTS:
      raise ValueError(f"input must be one of {INPUTS}, got {self.input!r}.")
    for name in ("iterations", "batch_size"):
      if isinstance(getattr(self, name), bool) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
    if not 0.0 <= self.warmup < 1.0:
      raise ValueError(f"warmup must be in [0, 1), got {self.warmup}.")
    if not (self.learning_rate > 0 and self.reg_weight >= 0):
      raise ValueError("learning_rate must be > 0 and reg_weight >= 0, got "
                       f"{self.learning_rate} and {self.reg_weight}.")


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

  jax.eval_shape(run, {k: v for k, v in variables.items() if k in _COLLECTIONS},
                 jnp.asarray(sample[:1], jnp.float32))

  def made_by(rec):  # the quantizer inside rec whose output is rec's output
    inside = [p for p, y in tracer.quantizers if y is rec["out"][0]
              and p.startswith(rec["path"] + "/")]
    return inside[0][len(rec["path"]) + 1:] if inside else None

  def inner(rec, x, step):
    if graph.is_node(rec["module"]):
      return (), made_by
    kids = [r for r in tracer.records if r["path"].startswith(rec["path"] + "/")
            and _has_weights(variables, r["path"])]
    return _follow(kids, x, step, rec["path"], lambda r, x, s: ((), made_by)), made_by

  top = [r for r in tracer.records if "/" not in r["path"]]
  return _follow(top, holder["x"], None, "the network", inner)


def _subtree(tree: dict, path: str):
  for name in path.split("/") if path else ():
    if not isinstance(tree, dict) or name not in tree:
      return None
    tree = tree[name]
  return tree


def _has_weights(variables: dict, path: str) -> bool:
  sub = _subtree(variables["params"], path)
  return sub is not None and any(k.endswith("kernel") for k in
                                 traverse_util.flatten_dict(sub, sep="/"))


def unit_variables(variables: dict, path: str) -> dict:
  """The collections of ``variables`` below ``path``."""
  out = {}
  for col in _COLLECTIONS:
    sub = _subtree(variables.get(col, {}), path)
    if sub:
      out[col] = sub
  return out


def _set_unit(variables: dict, path: str, sub: dict) -> dict:
  """``variables`` with the collections below ``path`` replaced by ``sub``'s."""
  out = dict(variables)
  for col, tree in sub.items():
    flat = traverse_util.flatten_dict(out.get(col, {}), sep="/")
    flat = {k: v for k, v in flat.items() if not k.startswith(path + "/")}
    flat.update({f"{path}/{k}": v for k, v in traverse_util.flatten_dict(tree, sep="/").items()})
    out[col] = traverse_util.unflatten_dict(flat, sep="/")
  return out


def standalone(call: Call, variables: dict, quant_rules, stage: str,
               quantize_output: bool = True) -> nn.Module:
  """``call.module`` as a module of its own in ``stage``, with its resolved specs
  (its layers' paths relative to it); without its output quantizer unless
  ``quantize_output``."""
  sub = unit_variables(variables, call.path)
  paths = {k.rsplit("/", 1)[0] if "/" in k else ""
           for col in sub.values() for k in traverse_util.flatten_dict(col, sep="/")}
  moved = rules.relocate(quant_rules, call.path, paths)
  if not quantize_output and call.output_quantizer is not None:
    moved = tuple(dataclasses.replace(r, act=None) if r.pattern == rules.exact(
        call.output_quantizer) else r for r in moved)
  mode = QuantMode(stage=stage, rules=moved)
  return call.module.clone(parent=None, name=None, mode=mode)


def _call_args(argspec, step):
  return tuple(step if a == "step" else a[1] for a in argspec)


def _forward(module: nn.Module, argspec: tuple, glue: str):
  """``(variables, x, step) -> (y, step)`` of a standalone module."""

  def apply(v, x, step):
    if glue == "mean":
      x = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))
    out = module.apply(v, x, *_call_args(argspec, step))
    return out if isinstance(out, tuple) else (out, None)

  return apply


@functools.lru_cache(maxsize=256)
def _apply_fn(module: nn.Module, argspec: tuple, glue: str):
  return jax.jit(_forward(module, argspec, glue))


def _propagate(call: Call, module, v: dict, xs, step, batch: int):
  """``(y over all images as numpy, step)`` of one standalone module, in batches."""
  fn = _apply_fn(module, call.args, call.glue)
  outs, new_step = [], None
  for i in range(0, len(xs), batch):
    y, new_step = fn(v, xs[i:i + batch], step)
    outs.append(np.asarray(y))
  return np.concatenate(outs), new_step


def _float_vars(variables: dict, path: str) -> dict:
  params = unit_variables(variables, path).get("params")
  return {"params": params} if params else {}


def _recon_error(y, target):
  """mean over images and positions of the squared error summed over channels."""
  d = (y.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
  return jnp.mean(jnp.sum(d, axis=-1))


def _error(y: np.ndarray, target: np.ndarray) -> float:
  """``_recon_error`` on the host (no compile per shape)."""
  d = y.astype(np.float64) - target.astype(np.float64)
  return float(np.mean(np.sum(d * d, axis=-1)))


@functools.lru_cache(maxsize=256)
def _train_step(module: nn.Module, argspec: tuple, glue: str, learning_rate: float):
  """``(tx, step)``: Adam and the jitted reconstruction step of one unit."""
  tx = optax.adam(learning_rate)
  forward = _forward(module, argspec, glue)

  def loss_fn(v_round, frozen, x, step, target, beta, weight):
    y, _ = forward({**frozen, rounding.COLLECTION: v_round}, x, step)
    err = _recon_error(y, target)
    reg = sum(rounding.regularizer(v, beta) for v in jax.tree.leaves(v_round))
    return err + weight * reg, err

  @jax.jit
  def step(v_round, opt_state, frozen, xs, x_step, targets, idx, beta, weight):
    x, target = jnp.take(xs, idx, axis=0), jnp.take(targets, idx, axis=0)
    (loss, err), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        v_round, frozen, x, x_step, target, beta, weight)
    updates, opt_state = tx.update(grads, opt_state, v_round)
    return optax.apply_updates(v_round, updates), opt_state, loss, err

  return tx, step


@dataclasses.dataclass
class _Run:
  """What ``reconstruct`` accumulates over units."""

  losses: list = dataclasses.field(default_factory=list)
  units: list = dataclasses.field(default_factory=list)
  steps: int = 0
  nearest: float = 0.0
  learned: float = 0.0
  flipped: int = 0
  weights: int = 0


def _learn(unit: Call, variables: dict, module, output_module, xs, step, targets,
           spec: ReconSpec, batch: int, rng: np.random.Generator, run: _Run):
  """``(variables, (y, step))``: ``variables`` with the rounding of ``unit`` (run
  as ``module``) learned and hardened, and the unit's hardened output on ``xs``
  (run as ``output_module``, with its output quantizer)."""
  sub = unit_variables(variables, unit.path)
  run.nearest += _error(_propagate(unit, module, sub, xs, step, batch)[0], targets)
  started = rounding.init_rounding(sub, module.mode.rules)
  v_round = started[rounding.COLLECTION]
  frozen = {k: val for k, val in started.items() if k != rounding.COLLECTION}
  tx, train = _train_step(module, unit.args, unit.glue, spec.learning_rate)
  opt_state, n = tx.init(v_round), len(xs)
  dev_x, dev_t = jnp.asarray(xs), jnp.asarray(targets)  # one transfer for every step
  for t in range(spec.iterations):
    beta, on = rounding.annealed_beta(t, spec.iterations, spec.warmup, spec.beta_start,
                                      spec.beta_end)
    idx = rng.integers(0, n, min(spec.batch_size, n)).astype(np.int32)
    v_round, opt_state, loss, _ = train(v_round, opt_state, frozen, dev_x, step, dev_t, idx,
                                        np.float32(beta), np.float32(spec.reg_weight * on))
    run.steps += 1
    if run.steps % 50 == 0 or t + 1 == spec.iterations:
      run.losses.append((run.steps, float(loss)))
  hard, counts = rounding.harden({**frozen, rounding.COLLECTION: v_round}, module.mode.rules)
  learned = _propagate(unit, module, hard, xs, step, batch)
  run.learned += _error(learned[0], targets)
  out = learned if output_module is module else _propagate(unit, output_module, hard, xs,
                                                             step, batch)
  run.flipped += counts["flipped"]
  run.weights += counts["weights"]
  run.units.append(unit.path)
  return _set_unit(variables, unit.path, hard), out


def reconstruct(qmodel: nn.Module, variables: dict, images, spec: ReconSpec, *,
                batch_size: int = 128, pattern: str = ".*"):
  """``(variables, stats, losses)``: ``variables`` with the rounding of every
  weight on a path matching ``pattern`` learned unit by unit on ``images`` (a
  split or an NHWC array) and hardened onto the grid.

  ``stats``: ``train_seconds``, ``train_images``, ``steps``, ``units``,
  ``granularity``, ``flipped_pct`` (weights rounded away from nearest) and
  ``recon_error_nearest`` / ``recon_error_learned``: the units' reconstruction
  errors on all the images, summed, before and after. ``losses``: the training
  loss every 50 steps.
  """
  t0 = time.time()
  # One rule set for every quantized run: a hardened layer (no rounding
  # variable) under rounding="learned" rounds to nearest, as in the setting.
  learned = rules.with_rounding(qmodel.mode.rules, "learned", pattern)
  x = np.concatenate(list(data.image_batches(images, batch_size)[0]))
  rng, run = np.random.default_rng(spec.seed), _Run()
  # The float model's weights: ``variables`` gets each unit's hardened kernel
  # once learned, and the targets must stay the float model's outputs.
  float_weights = {"params": variables["params"]}
  xq, xf, step_q = x, x, None
  for top in trace(qmodel, variables, x):
    if _has_weights(variables, top.path):
      block = spec.granularity == "layer" and top.children
      in_q, in_f, in_step = xq, xf, step_q
      for unit in top.children if block else (top,):
        fmod = standalone(unit, variables, (), "folded")
        target, _ = _propagate(unit, fmod, _float_vars(float_weights, unit.path), in_f, None,
                               batch_size)
        qmod = standalone(unit, variables, learned, "quant")
        # The loss's module: qmod without its output quantizer unless quantize_output.
        tmod = (qmod if spec.quantize_output or unit.output_quantizer is None
                else standalone(unit, variables, learned, "quant", quantize_output=False))
        source = in_q if spec.input == "quantized" else in_f
        variables, out = _learn(unit, variables, tmod, qmod, source, in_step, target, spec,
                                batch_size, rng, run)
        if block:  # the next layer of the block reads this one's output
          if spec.input == "float":
            out = _propagate(unit, qmod, unit_variables(variables, unit.path), in_q, in_step,
                             batch_size)
          (in_q, in_step), in_f = out, target
    qmod = standalone(top, variables, learned, "quant")
    xq, step_q = _propagate(top, qmod, unit_variables(variables, top.path), xq, step_q,
                            batch_size)
    fmod = standalone(top, variables, (), "folded")
    xf, _ = _propagate(top, fmod, _float_vars(float_weights, top.path), xf, None, batch_size)
  stats = {"train_seconds": time.time() - t0, "train_images": int(len(x)), "steps": run.steps,
           "units": len(run.units), "granularity": spec.granularity,
           "flipped_pct": 100.0 * run.flipped / max(run.weights, 1),
           "recon_error_nearest": run.nearest, "recon_error_learned": run.learned}
  return variables, stats, run.losses
