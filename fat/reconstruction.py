"""AdaRound's reconstruction: each layer (or block) learns its weights' rounding so
that its quantized output matches the float model's, on unlabeled images.

    spec = ReconSpec(granularity="layer", iterations=500)
    variables, stats, losses = reconstruct(qmodel, variables, images, spec)

``qmodel`` is the setting's quantized model and ``variables`` its calibrated
variables (the PTQ start: weight and activation thresholds stay as they are).
The network is followed as a chain of its top-level modules (``fat.chain``; the
only glue between them may be a global average pool), carrying two tensors
over every image: the float model's (the targets) and the quantized model's
with the units before already hardened (the inputs; ``input="float"`` uses
the float ones, Nagel et al.'s plain form; ``input="qdrop"`` takes each input
element from the float model with probability ``drop_prob`` at every step and
from the quantized model otherwise, QDrop's random dropping of activation
quantization, Wei et al. 2022). A unit is one layer (``ConvBNAct``,
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

from fat import chain, data, rounding, rules
from fat.chain import COLLECTIONS as _COLLECTIONS
from fat.chain import Call, trace
from fat.layers import BOUNDS_COLLECTION, TRAINABLE_COLLECTION, QuantMode

GRANULARITIES = ("layer", "block")
INPUTS = ("quantized", "float", "qdrop")


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
    input: "quantized" (the quantized model's input to the unit), "float",
      or "qdrop": each element of each step's input drawn from the float
      model's input with probability ``drop_prob``, else the quantized one.
      QDrop drops to the quantized model's own value before its activation
      quantizer; the chain carries the float model's, which is what is used.
    drop_prob: the share of float input elements under ``input="qdrop"``
      (QDrop's 0.5).
    quantize_output: whether the loss reads the unit's output after its output
      quantizer (True) or before it (False: Nagel et al.'s ``f_a(W~ x)``; the
      next unit's input quantization is not the rounding's to fix).
    act_thresholds: also train the alpha and beta of the unit's activation
      quantizers jointly with the rounding, on the same loss (BRECQ's and
      QDrop's learned activation step sizes), clipped to their specs' ranges
      after every step. Needs ``quantize_output`` (a layer's own output
      quantizer is then in the loss).
    threshold_learning_rate: Adam's, on those thresholds.
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
  drop_prob: float = 0.5
  quantize_output: bool = False
  act_thresholds: bool = False
  threshold_learning_rate: float = 1e-3
  seed: int = 0

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}.")
    if self.input not in INPUTS:
      raise ValueError(f"input must be one of {INPUTS}, got {self.input!r}.")
    for name in ("iterations", "batch_size"):
      if isinstance(getattr(self, name), bool) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
    if not 0.0 <= self.drop_prob <= 1.0:
      raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob}.")
    if not 0.0 <= self.warmup < 1.0:
      raise ValueError(f"warmup must be in [0, 1), got {self.warmup}.")
    if not (self.learning_rate > 0 and self.reg_weight >= 0 and self.threshold_learning_rate > 0):
      raise ValueError("learning_rate and threshold_learning_rate must be > 0 and reg_weight "
                       f">= 0, got {self.learning_rate}, {self.threshold_learning_rate} and "
                       f"{self.reg_weight}.")
    if self.act_thresholds and not self.quantize_output:
      raise ValueError("act_thresholds trains the thresholds of the quantizers in the loss; "
                       "set quantize_output=True so that each unit's output quantizer is in it.")


def unit_variables(variables: dict, path: str) -> dict:
  """The collections of ``variables`` below ``path``."""
  out = {}
  for col in _COLLECTIONS:
    sub = chain.subtree(variables.get(col, {}), path)
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


def _glued(x, glue: str):
  """``x`` after the glue before a module: itself, or its global average pool."""
  if glue == "mean":
    return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))
  return x


def _forward(module: nn.Module, argspec: tuple, glue: str):
  """``(variables, x, step) -> (y, step)`` of a standalone module."""

  def apply(v, x, step):
    out = module.apply(v, _glued(x, glue), *_call_args(argspec, step))
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


def act_thresholds(sub: dict) -> dict:
  """``{flat key: value}`` of the thresholds of ``sub``'s activation quantizers
  (the ``thresholds`` of modules without a kernel)."""
  flat = traverse_util.flatten_dict(sub.get(TRAINABLE_COLLECTION, {}), sep="/")
  kernels = {rounding.parent(k) for k in traverse_util.flatten_dict(sub["params"], sep="/")
             if k.endswith("kernel")}
  return {k: v for k, v in flat.items() if rounding.parent(k) not in kernels}


def _with_thresholds(variables: dict, flat: dict) -> dict:
  """``variables`` with the thresholds at the flat keys of ``flat`` replaced."""
  if not flat:
    return variables
  tree = traverse_util.flatten_dict(variables[TRAINABLE_COLLECTION], sep="/")
  return {**variables, TRAINABLE_COLLECTION: traverse_util.unflatten_dict({**tree, **flat},
                                                                          sep="/")}


@functools.lru_cache(maxsize=256)
def _bounds_fn(module: nn.Module, argspec: tuple, glue: str):
  """The jitted pass that gives a unit's threshold bounds (run eagerly, each op
  of the unit would compile on its own)."""

  def bounds(v, x, step):
    _, state = module.apply(v, _glued(x, glue), *_call_args(argspec, step),
                            mutable=[BOUNDS_COLLECTION])
    return state.get(BOUNDS_COLLECTION, {})

  return jax.jit(bounds)


def _bounds(module: nn.Module, argspec: tuple, glue: str, v: dict, x, step, keys) -> dict:
  """``{flat key: [lo, hi]}`` of the thresholds at ``keys``, as their specs give them."""
  got = _bounds_fn(module, argspec, glue)(v, jnp.asarray(x[:1]), step)
  got = traverse_util.flatten_dict(got, sep="/")
  return {k: got[k] for k in keys}


def mixed_input(x_q, x_f, key, drop_prob: float):
  """QDrop's input: each element of ``x_f`` with probability ``drop_prob``,
  else ``x_q``'s (``key``: a ``jax.random`` key)."""
  take_float = jax.random.bernoulli(key, drop_prob, jnp.shape(x_q))
  return jnp.where(take_float, jnp.asarray(x_f, jnp.result_type(x_q)), x_q)


@functools.lru_cache(maxsize=256)
def _train_step(module: nn.Module, argspec: tuple, glue: str, learning_rate: float,
                threshold_learning_rate: float, qdrop: bool = False):
  """``(tx, step)``: Adam and the jitted reconstruction step of one unit, on
  ``{"v": rounding variables, "t": flat activation thresholds}``; with
  ``qdrop`` (``input="qdrop"``) each step's input is ``mixed_input`` at the
  step's ``drop_prob`` argument (traced: every probability shares one program)."""
  tx = optax.multi_transform(
      {"v": optax.adam(learning_rate), "t": optax.adam(threshold_learning_rate)},
      lambda tr: {name: jax.tree.map(lambda _: name, tree) for name, tree in tr.items()})
  forward = _forward(module, argspec, glue)

  def loss_fn(train, frozen, x, step, target, beta, weight):
    v = {**_with_thresholds(frozen, train["t"]), rounding.COLLECTION: train["v"]}
    y, _ = forward(v, x, step)
    err = _recon_error(y, target)
    reg = sum(rounding.regularizer(v, beta) for v in jax.tree.leaves(train["v"]))
    return err + weight * reg, err

  @jax.jit
  def step(train, opt_state, frozen, bounds, xs, xs_float, x_step, targets, idx, key, t,
           drop_prob, beta, weight):
    x, target = jnp.take(xs, idx, axis=0), jnp.take(targets, idx, axis=0)
    if qdrop:
      x = mixed_input(x, jnp.take(xs_float, idx, axis=0), jax.random.fold_in(key, t), drop_prob)
    (loss, err), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        train, frozen, x, x_step, target, beta, weight)
    updates, opt_state = tx.update(grads, opt_state, train)
    new = optax.apply_updates(train, updates)
    new["t"] = {k: jnp.clip(t, bounds[k][0], bounds[k][1]) for k, t in new["t"].items()}
    return new, opt_state, loss, err

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
           spec: ReconSpec, batch: int, rng: np.random.Generator, run: _Run, xs_float=None):
  """``(variables, (y, step))``: ``variables`` with the rounding of ``unit`` (run
  as ``module``) learned and hardened, and the unit's hardened output on ``xs``
  (run as ``output_module``, with its output quantizer). ``xs_float``: the float
  model's inputs, mixed into ``xs`` at each step under ``input="qdrop"``."""
  sub = unit_variables(variables, unit.path)
  run.nearest += _error(_propagate(unit, module, sub, xs, step, batch)[0], targets)
  started = rounding.init_rounding(sub, module.mode.rules)
  frozen = {k: val for k, val in started.items() if k != rounding.COLLECTION}
  trained = {"v": started[rounding.COLLECTION],
             "t": act_thresholds(sub) if spec.act_thresholds else {}}
  bounds = (_bounds(module, unit.args, unit.glue, frozen, xs, step, trained["t"])
            if trained["t"] else {})
  qdrop = spec.input == "qdrop"
  tx, train = _train_step(module, unit.args, unit.glue, spec.learning_rate,
                          spec.threshold_learning_rate, qdrop)
  opt_state, n = tx.init(trained), len(xs)
  dev_x, dev_t = jnp.asarray(xs), jnp.asarray(targets)  # one transfer for every step
  dev_f = jnp.asarray(xs_float) if qdrop else dev_x
  key = jax.random.PRNGKey(spec.seed)
  for t in range(spec.iterations):
    beta, on = rounding.annealed_beta(t, spec.iterations, spec.warmup, spec.beta_start,
                                      spec.beta_end)
    idx = rng.integers(0, n, min(spec.batch_size, n)).astype(np.int32)
    trained, opt_state, loss, _ = train(trained, opt_state, frozen, bounds, dev_x, dev_f, step,
                                        dev_t, idx, key, np.int32(run.steps),
                                        np.float32(spec.drop_prob), np.float32(beta),
                                        np.float32(spec.reg_weight * on))
    run.steps += 1
    if run.steps % 50 == 0 or t + 1 == spec.iterations:
      run.losses.append((run.steps, float(loss)))
  hard, counts = rounding.harden(
      {**_with_thresholds(frozen, trained["t"]), rounding.COLLECTION: trained["v"]},
      module.mode.rules)
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
  rounding.check_grids(variables, learned)
  x = np.concatenate(list(data.image_batches(images, batch_size)[0]))
  rng, run = np.random.default_rng(spec.seed), _Run()
  # The float model's weights: ``variables`` gets each unit's hardened kernel
  # once learned, and the targets must stay the float model's outputs.
  float_weights = {"params": variables["params"]}
  xq, xf, step_q = x, x, None
  for top in trace(qmodel, variables, x):
    if chain.has_weights(variables, top.path):
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
        source = in_f if spec.input == "float" else in_q
        variables, out = _learn(unit, variables, tmod, qmod, source, in_step, target, spec,
                                batch_size, rng, run, in_f if spec.input == "qdrop" else None)
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
