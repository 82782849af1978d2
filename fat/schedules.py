"""FAT's learning-rate schedule and periodic Adam reset (METHOD.md section 3), on optax.

``lr_t = lr * exp(-decay * t) * |cos(pi * d / (4 * N))| + 1e-7`` with
``d = t mod N``; every ``N`` steps the Adam moments and bias-correction count
restart from zero.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree


def fat_schedule(learning_rate: float, reset_every: int = 400,
                 decay: float = 1e-4, floor: float = 1e-7) -> optax.Schedule:
  if reset_every <= 0:
    raise ValueError(f"reset_every must be positive, got {reset_every}.")

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    d = jnp.mod(t, reset_every)
    return learning_rate * jnp.exp(-decay * t) * jnp.abs(
        jnp.cos(jnp.pi * d / (4.0 * reset_every))) + floor

  return schedule


class ResetState(NamedTuple):
  count: jax.Array
  inner: optax.OptState


def reset_every(inner: optax.GradientTransformation, every: int) -> optax.GradientTransformation:
  """Re-initialises ``inner``'s state every ``every`` updates (Adam reset)."""

  def init(params):
    return ResetState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    fresh = inner.init(updates)
    restart = (state.count > 0) & (jnp.mod(state.count, every) == 0)
    inner_state = jax.tree.map(lambda f, s: jnp.where(restart, f, s), fresh, state.inner)
    updates, inner_state = inner.update(updates, inner_state, params)
    return updates, ResetState(state.count + 1, inner_state)

  return optax.GradientTransformation(init, update)


def reset_adam(opt_state):
  """``opt_state`` with every Adam state (moments and bias-correction count)
  zeroed and everything else, such as schedule and reset counters, kept: the
  NaN guard's "reset Adam" (METHOD.md section 3)."""
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  zero = lambda s: optax.ScaleByAdamState(jnp.zeros_like(s.count),
                                          jax.tree.map(jnp.zeros_like, s.mu),
                                          jax.tree.map(jnp.zeros_like, s.nu))
  return jax.tree.map(lambda s: zero(s) if is_adam(s) else s, opt_state, is_leaf=is_adam)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update leaf by the matching leaf of ``scales`` (a pytree of
  floats shaped like the parameters' tree, a constant): per-leaf learning rates
  after a per-element normalizer such as Adam's. One multiply of the raveled
  updates, not one per leaf."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    flat, unravel = ravel_pytree(updates)
    factors = jax.tree.map(lambda u, k: np.full(np.shape(u), k, np.float32), updates, scales)
    return unravel(flat * jnp.asarray(ravel_pytree(factors)[0], flat.dtype)), state

  return optax.GradientTransformation(init, update)


def fat_optimizer(learning_rate: float, reset_steps: int = 400, decay: float = 1e-4,
                  scales=None) -> optax.GradientTransformation:
  """Adam with FAT's cosine-and-reset schedule; ``scales`` (optional, a tree
  like the parameters') multiplies each leaf's learning rate.

  Adam runs on the parameters raveled into one vector (``optax.flatten``): a
  network's few hundred threshold leaves would otherwise each add their own ops
  to the step's program. The formula is the same as per leaf; XLA's rounding of
  some elements differs in the last bit.
  """
  tx = optax.flatten(optax.chain(
      reset_every(optax.scale_by_adam(), reset_steps),
      optax.scale_by_schedule(fat_schedule(learning_rate, reset_steps, decay)),
      optax.scale(-1.0),
  ))
  return tx if scales is None else optax.chain(tx, scale_by_tree(scales))
