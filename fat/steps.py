"""Threshold training (FAT) and full QAT as pure, jitted step functions.

Every step has the signature ``step(trainable, opt_state, frozen, x, target)
-> (trainable, opt_state, metrics)``, where ``trainable`` and ``frozen`` are
the two halves of a ``fat.variables.Partition`` (dicts of collections), so
that one loop (``fat.loop.train``) drives them all.

FAT (METHOD.md section 3): only ``thresholds`` (alpha, beta) are trained, by
distillation between the float model's logits and the quantized model's
logits on unlabeled images. Full QAT trains ``params`` and ``thresholds``
with labels and cross-entropy. Both steps carry a NaN guard: a step whose
loss, new variables or new optimizer state are not finite is dropped, the
last good state is kept and Adam's moments are reset
(``schedules.reset_adam``; the learning-rate schedule keeps its step).

After each update the thresholds are projected onto their clip ranges
(alpha into ``alpha_range``, beta into ``beta_range``). The forward pass
clips them anyway, so this changes no output; but a variable that stepped
past its range would get a zero gradient there (METHOD.md section 1) and
stay stuck, as most per-channel alphas starting at 1.0 did without it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fat import schedules
from fat.layers import BOUNDS_COLLECTION, TRAINABLE_COLLECTION

LOSSES = ("rmse", "smooth_l1", "kl")


def distillation_loss(q_logits, f_logits, kind: str = "rmse"):
  """RMSE over batch and logits, the original ``mean_batch(sum sqrt(d^2 + 1e-5))``,
  or ``kl``: the batch mean of KL(softmax(f) || softmax(q))."""
  if kind == "kl":
    return jnp.mean(optax.losses.kl_divergence_with_log_targets(
        jax.nn.log_softmax(q_logits.astype(jnp.float32)),
        jax.nn.log_softmax(f_logits.astype(jnp.float32))))
  d = q_logits.astype(jnp.float32) - f_logits.astype(jnp.float32)
  if kind == "rmse":
    # sqrt has an infinite slope at 0: at d == 0 give the gradient 0, not NaN.
    ms = jnp.mean(d ** 2)
    return jnp.where(ms > 0, jnp.sqrt(jnp.where(ms > 0, ms, 1.0)), 0.0)
  if kind == "smooth_l1":
    return jnp.mean(jnp.sum(jnp.sqrt(d ** 2 + 1e-5), axis=-1))
  raise ValueError(f"distillation loss must be one of {LOSSES}, got {kind!r}.")


# The step updates, projects and guards each trainable collection raveled into
# one vector, and the optimizers run on it too (``schedules.fat_optimizer``,
# ``optax.flatten``): a network has a few hundred small threshold leaves, and
# one XLA op per leaf and operation made the update compile for longer than the
# whole network's gradient (``benchmarks.step_speed`` prints the compile time).


def _all_finite(tree) -> jax.Array:
  """True when every floating leaf is finite (also for a tree without any, such as SGD's state)."""
  floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not floats:
    return jnp.array(True)
  return jnp.all(jnp.isfinite(ravel_pytree(floats)[0]))


def project_thresholds(thresholds, bounds):
  """Each alpha and beta clipped into its ``[lo, hi]`` (``bounds``: the
  ``threshold_bounds`` collection, the same tree with a leading axis of 2)."""
  flat, unravel = ravel_pytree(thresholds)
  return unravel(_clip_flat(flat, thresholds, bounds))


def _clip_flat(flat, thresholds, bounds):
  """``flat`` (``thresholds`` raveled) clipped into the raveled ``bounds``."""
  if jax.tree.structure(thresholds) != jax.tree.structure(bounds):
    raise ValueError("threshold_bounds does not match the thresholds' tree: "
                     f"{jax.tree.structure(bounds)} vs {jax.tree.structure(thresholds)}.")
  lo = ravel_pytree(jax.tree.map(lambda b: b[0], bounds))[0]
  hi = ravel_pytree(jax.tree.map(lambda b: b[1], bounds))[0]
  return jnp.clip(flat, lo, hi)


def _make_guarded_step(loss_fn, tx: optax.GradientTransformation, project: bool):
  """``step(trainable, opt_state, frozen, x, target)``: one guarded optimizer update.

  ``loss_fn`` returns ``(loss, bounds)``; with ``project`` the updated
  thresholds are clipped into their bounds (constants of the traced model, so
  they cost nothing at run time). A step whose loss, new variables or new
  optimizer state are not finite is dropped: the last good variables are kept
  and Adam's moments are reset. Each collection of ``trainable`` is updated as
  one raveled vector.
  """

  @jax.jit
  def step(trainable, opt_state, frozen, x, target):
    (value, bounds), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, frozen, x, target)
    updates, new_opt = tx.update(grads, opt_state, trainable)
    old, new, unravel = {}, {}, {}
    for name, tree in trainable.items():
      old[name], unravel[name] = ravel_pytree(tree)
      new[name] = old[name] + ravel_pytree(updates[name])[0].astype(old[name].dtype)
      if project and name == TRAINABLE_COLLECTION:
        new[name] = _clip_flat(new[name], tree, bounds)
    # The optimizer state too: a finite gradient above ~1.8e19 overflows Adam's
    # second moment to inf while its update is 0, which would freeze that
    # variable until the next reset without any non-finite loss or variable.
    ok = jnp.isfinite(value) & _all_finite(new) & _all_finite(new_opt)
    opt_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_opt,
                             schedules.reset_adam(opt_state))
    trainable = {name: unravel[name](jnp.where(ok, new[name], old[name])) for name in trainable}
    return trainable, opt_state, {"loss": value, "finite": ok}

  return step


def _apply_with_bounds(qmodel, variables, x):
  """(logits, threshold bounds) of one quantized forward pass."""
  out, state = qmodel.apply(variables, x, mutable=[BOUNDS_COLLECTION])
  return out, state.get(BOUNDS_COLLECTION, {})


def make_fat_step(qmodel: nn.Module, tx: optax.GradientTransformation, loss: str = "rmse",
                  project: bool = True):
  """``step(trainable, opt_state, frozen, x, teacher_logits) -> (trainable, opt_state, metrics)``.

  ``trainable`` is ``{"thresholds": ...}`` (``fat.variables.FAT_TRAINABLE``);
  ``frozen`` holds every other collection of the quantized variables
  (``params`` and ``quant_stats``); it receives no gradient. ``project=False``
  leaves the updated thresholds unclipped (the original recipe).
  """
  if loss not in LOSSES:
    raise ValueError(f"distillation loss must be one of {LOSSES}, got {loss!r}.")

  def loss_fn(trainable, frozen, x, teacher):
    q, bounds = _apply_with_bounds(qmodel, {**frozen, **trainable}, x)
    return distillation_loss(q, teacher, loss), bounds

  return _make_guarded_step(loss_fn, tx, project)


def make_qat_step(qmodel: nn.Module, tx: optax.GradientTransformation):
  """Full QAT: ``step(trainable, opt_state, frozen, x, labels)`` with
  ``trainable = {"params": ..., "thresholds": ...}`` (``fat.variables.QAT_TRAINABLE``)
  and cross-entropy on labels."""
  # The kernels get gradients here, so thresholds reuse them (layers.QuantMode).
  qmodel = qmodel.clone(mode=dataclasses.replace(qmodel.mode, weights_trained=True))

  def loss_fn(trainable, frozen, x, y):
    logits, bounds = _apply_with_bounds(qmodel, {**frozen, **trainable}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), bounds

  return _make_guarded_step(loss_fn, tx, True)
