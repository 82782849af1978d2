"""FAT's cosine-with-reset schedule and the periodic Adam reset."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fat import schedules


def reference_lr(t, lr, n, decay=1e-4):
  d = t % n
  return lr * math.exp(-decay * t) * abs(math.cos(math.pi * d / (4 * n))) + 1e-7


@pytest.mark.parametrize("t", [0, 1, 199, 399, 400, 401, 1234])
def test_schedule_matches_formula(t):
  sched = schedules.fat_schedule(1e-3, reset_every=400)
  np.testing.assert_allclose(float(sched(t)), reference_lr(t, 1e-3, 400), rtol=1e-5)


def test_schedule_restarts_every_n():
  sched = schedules.fat_schedule(1.0, reset_every=10, decay=0.0)
  assert float(sched(9)) < float(sched(10))
  np.testing.assert_allclose(float(sched(10)), 1.0 + 1e-7, rtol=1e-6)


def test_schedule_rejects_bad_period():
  with pytest.raises(ValueError, match="reset_every"):
    schedules.fat_schedule(1e-3, reset_every=0)


def test_adam_state_resets_every_n_updates():
  tx = schedules.reset_every(optax.scale_by_adam(), 3)
  params = {"a": jnp.ones(2)}
  state = tx.init(params)
  g = {"a": jnp.array([1.0, -2.0])}
  first, _ = optax.scale_by_adam().update(g, optax.scale_by_adam().init(params))
  outs = []
  for _ in range(4):
    u, state = tx.update(g, state, params)
    outs.append(u["a"])
  # Update 4 follows a reset, so it equals the very first Adam update.
  np.testing.assert_allclose(outs[3], first["a"], rtol=1e-6)
  assert int(state.inner.count) == 1  # Adam's bias-correction count restarted


def test_fat_optimizer_step_size_follows_schedule():
  tx = schedules.fat_optimizer(1e-2, reset_steps=5)
  params = jnp.zeros(3)
  state = tx.init(params)
  g = jnp.array([1.0, 1.0, 1.0])
  u, state = tx.update(g, state, params)
  # First Adam step has unit magnitude (m/sqrt(v) = 1), scaled by lr_0 and negated.
  np.testing.assert_allclose(u, -reference_lr(0, 1e-2, 5) * np.ones(3), rtol=1e-4)
