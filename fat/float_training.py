"""Float (BN, full-precision) training of the base classifiers: pure step functions."""

from __future__ import annotations

import flax.linen as nn
import jax
import optax


OPTIMIZERS = ("adamw", "sgd")


def optimizer(learning_rate: float, weight_decay: float, total_steps: int,
              warmup_steps: int, name: str = "adamw") -> optax.GradientTransformation:
  """Linear warm-up and cosine decay to zero, with one of ``OPTIMIZERS``.

  ``"adamw"``: decoupled weight decay. ``"sgd"``: Nesterov momentum 0.9 with an
  L2 term ``weight_decay * p`` added to the gradient.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1))
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=weight_decay)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=0.9, nesterov=True))
  raise ValueError(f"config.optimizer must be one of {OPTIMIZERS}, got {name!r}.")


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    label_smoothing: float = 0.0):
  """``step(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss)``."""

  def loss_fn(params, batch_stats, x, y):
    logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x,
                              train=True, mutable=["batch_stats"])
    labels = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, labels).mean(), upd["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return step
