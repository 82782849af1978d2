"""Threshold training (FAT) and full QAT as pure, jitted step functions.

FAT (METHOD.md section 3): only ``thresholds`` (alpha, beta) are trained, by
distillation between the float model's logits and the quantized model's
logits on unlabeled images. Full QAT trains ``params`` and ``thresholds``
with labels and cross-entropy. Both steps carry a NaN guard: a step whose
loss or new variables are not finite is dropped, the last good state is kept
and the optimizer state is reset.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fat.layers import TRAINABLE_COLLECTION

LOSSES = ("rmse", "smooth_l1")


def distillation_loss(q_logits, f_logits, kind: str = "rmse"):
  """RMSE over batch and logits, or the original ``mean_batch(sum sqrt(d^2 + 1e-5))``."""
  d = q_logits.astype(jnp.float32) - f_logits.astype(jnp.float32)
  if kind == "rmse":
    return jnp.sqrt(jnp.mean(d ** 2))
  if kind == "smooth_l1":
    return jnp.mean(jnp.sum(jnp.sqrt(d ** 2 + 1e-5), axis=-1))
  raise ValueError(f"distillation loss must be one of {LOSSES}, got {kind!r}.")


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _guarded(tx, old_state, old_opt, new_state, new_opt, loss):
  ok = jnp.isfinite(loss) & _all_finite(new_state)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  fresh_opt = tx.init(old_state)
  return keep(new_state, old_state), keep(new_opt, fresh_opt), ok


def _make_guarded_step(loss_fn, tx: optax.GradientTransformation):
  """``step(trainable, opt_state, frozen, x, target)``: one guarded optimizer update."""

  @jax.jit
  def step(trainable, opt_state, frozen, x, target):
    value, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, target)
    updates, new_opt = tx.update(grads, opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    trainable, opt_state, ok = _guarded(tx, trainable, opt_state, new, new_opt, value)
    return trainable, opt_state, {"loss": value, "finite": ok}

  return step


def make_fat_step(qmodel: nn.Module, tx: optax.GradientTransformation, loss: str = "rmse"):
  """``step(thresholds, opt_state, frozen, x, teacher_logits) -> (thresholds, opt_state, metrics)``.

  ``frozen`` holds every other collection of the quantized variables
  (``params`` and ``quant_stats``); it receives no gradient.
  """
  if loss not in LOSSES:
    raise ValueError(f"distillation loss must be one of {LOSSES}, got {loss!r}.")

  def loss_fn(thresholds, frozen, x, teacher):
    q = qmodel.apply({**frozen, TRAINABLE_COLLECTION: thresholds}, x)
    return distillation_loss(q, teacher, loss)

  return _make_guarded_step(loss_fn, tx)


def make_qat_step(qmodel: nn.Module, tx: optax.GradientTransformation):
  """Full QAT: ``step(trainable, opt_state, frozen, x, labels)`` with
  ``trainable = {"params": ..., "thresholds": ...}`` and cross-entropy on labels."""
  # The kernels get gradients here, so thresholds reuse them (layers.QuantMode).
  qmodel = qmodel.clone(mode=dataclasses.replace(qmodel.mode, weights_trained=True))

  def loss_fn(trainable, frozen, x, y):
    logits = qmodel.apply({**frozen, **trainable}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return _make_guarded_step(loss_fn, tx)
