"""FAT threshold-training and full-QAT steps (fat.steps), the distillation losses and MSE PTQ."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_prepared
from fat import calibrate, quant, schedules, steps, variables
from fat.layers import BOUNDS_COLLECTION, TRAINABLE_COLLECTION


@pytest.fixture(scope="module")
def setup():
  """A three-block network of MobileNet-v2's blocks at W4A4 per-channel, BN
  statistics from the batch, and the float teacher's logits."""
  p, x = tiny_prepared(quant.QuantSpec(bits=4, per_channel=True), quant.QuantSpec(bits=4))
  teacher = jax.jit(p.fmodel.apply)(p.folded, x)
  return p.qmodel, p.variables, x, teacher


def test_distillation_losses_match_formulas():
  q = jnp.array([[1.0, 2.0], [0.0, -1.0]])
  f = jnp.array([[0.0, 2.0], [1.0, 1.0]])
  np.testing.assert_allclose(steps.distillation_loss(q, f, "rmse"),
                             np.sqrt((1 + 0 + 1 + 4) / 4), rtol=1e-6)
  expected = np.mean([np.sqrt(1 + 1e-5) + np.sqrt(1e-5), np.sqrt(1 + 1e-5) + np.sqrt(4 + 1e-5)])
  np.testing.assert_allclose(steps.distillation_loss(q, f, "smooth_l1"), expected, rtol=1e-6)
  # kl: sum_k p_k log(p_k / q_k) with p = softmax(f), q = softmax(q), batch mean.
  softmax = lambda z: np.exp(np.float64(z)) / np.exp(np.float64(z)).sum(-1, keepdims=True)
  pf, pq = softmax(f), softmax(q)
  np.testing.assert_allclose(steps.distillation_loss(q, f, "kl"),
                             np.mean(np.sum(pf * np.log(pf / pq), -1)), rtol=1e-5)
  assert float(steps.distillation_loss(f, f, "kl")) == 0.0
  with pytest.raises(ValueError, match="distillation loss"):
    steps.distillation_loss(q, f, "l2")


def test_rmse_gradient_is_finite_where_logits_match():
  f = jnp.array([[0.5, -1.0], [2.0, 0.0]])
  grad = lambda q: jax.grad(lambda q: steps.distillation_loss(q, f, "rmse"))(q)
  assert float(steps.distillation_loss(f, f, "rmse")) == 0.0
  np.testing.assert_array_equal(grad(f), np.zeros((2, 2)))
  # Elsewhere it is the gradient of sqrt(mean(d^2)): d / (n * rmse).
  q = f + jnp.array([[1.0, 0.0], [0.0, -1.0]])
  np.testing.assert_allclose(grad(q), np.array([[1.0, 0.0], [0.0, -1.0]]) / (4 * np.sqrt(0.5)),
                             rtol=1e-6)


@pytest.fixture(scope="module")
def fat_step(setup):
  """(optimizer, FAT step) at lr 1e-2 with projection, compiled once for the tests."""
  tx = schedules.fat_optimizer(1e-2, reset_steps=400)
  return tx, steps.make_fat_step(setup[0], tx, "rmse")


def _alphas(thresholds) -> np.ndarray:
  return np.concatenate([np.ravel(a) for p, a in jax.tree_util.tree_leaves_with_path(thresholds)
                         if p[-1].key == "alpha"])


@pytest.mark.slow
def test_fat_lowers_loss_and_trains_only_thresholds(setup, fat_step):
  qmodel, qvars, x, teacher = setup
  tx, step = fat_step
  part = variables.partition(qvars)
  thresholds, frozen = part.trainable, part.frozen
  frozen_before = jax.tree.map(np.array, frozen)
  opt_state = tx.init(thresholds)
  first = None
  for _ in range(30):
    thresholds, opt_state, m = step(thresholds, opt_state, frozen, x, teacher)
    first = float(m["loss"]) if first is None else first
  final = float(steps.distillation_loss(
      jax.jit(qmodel.apply)({**frozen, **thresholds}, x), teacher))
  assert final < 0.9 * first, (first, final)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         thresholds[TRAINABLE_COLLECTION], qvars[TRAINABLE_COLLECTION])
  assert any(jax.tree.leaves(changed))
  names = {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(thresholds)}
  assert names == {"alpha", "beta"}
  jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, frozen))
  # Projection: every alpha stays in QuantSpec.alpha_range, and they still train.
  alphas = _alphas(thresholds)
  assert np.all((alphas >= 0.5) & (alphas <= 1.0)) and np.any(alphas < 1.0)


@pytest.mark.slow
def test_nan_guard_keeps_last_good_thresholds(setup, fat_step):
  qmodel, qvars, x, teacher = setup
  tx, step = fat_step
  part = variables.partition(qvars)
  thresholds, frozen = part.trainable, part.frozen
  opt_state = tx.init(thresholds)
  thresholds, opt_state, _ = step(thresholds, opt_state, frozen, x, teacher)
  thresholds, opt_state, _ = step(thresholds, opt_state, frozen, x, teacher)
  bad, bad_opt, m = step(thresholds, opt_state, frozen, x, teacher * jnp.nan)
  assert not bool(m["finite"])
  jax.tree.map(np.testing.assert_array_equal, bad, thresholds)
  # Adam is reset (moments and bias-correction count zero) ...
  (reset, schedule, _), (before, schedule_before, _) = bad_opt, opt_state
  adam, adam_before = reset.inner, opt_state[0].inner
  assert int(adam.count) == 0 and int(adam_before.count) == 2
  for moment in (adam.mu, adam.nu):
    assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(moment))
  assert any(np.any(np.asarray(a)) for a in jax.tree.leaves(adam_before.nu))
  # ... while the schedule and the periodic-reset counter keep their step.
  assert int(reset.count) == int(before.count) == 2
  assert int(schedule.count) == int(schedule_before.count) == 2


def test_nan_guard_catches_an_overflowing_adam_moment():
  """A finite gradient above ~1.8e19 overflows Adam's second moment to inf while
  the loss, the update (0) and the variables stay finite; the step is refused."""
  tx = schedules.fat_optimizer(1e-3, 400, 1e-4)
  step = steps._make_guarded_step(
      lambda t, frozen, x, target: (jnp.sum(t["alpha"] * x), {}), tx, project=False)
  t, opt = {"alpha": jnp.ones(3)}, tx.init({"alpha": jnp.ones(3)})
  t, opt, m = step(t, opt, {}, jnp.ones(3), None)
  assert bool(m["finite"])
  after, after_opt, m = step(t, opt, {}, jnp.array([1e20, 1.0, 1.0]), None)
  assert np.isfinite(float(m["loss"])) and not bool(m["finite"])
  np.testing.assert_array_equal(after["alpha"], t["alpha"])
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(after_opt))
  # An optimizer without state (SGD) passes the guard.
  sgd = optax.sgd(0.1)
  step = steps._make_guarded_step(
      lambda t, frozen, x, target: (jnp.sum(t["alpha"] * x), {}), sgd, project=False)
  t, _, m = step({"alpha": jnp.ones(3)}, sgd.init({"alpha": jnp.ones(3)}), {}, jnp.ones(3), None)
  assert bool(m["finite"]) and np.allclose(t["alpha"], 0.9)


def test_threshold_bounds_mirror_the_thresholds(setup):
  qmodel, qvars, x, _ = setup
  bounds = jax.jit(lambda v, x: qmodel.apply(v, x, mutable=[BOUNDS_COLLECTION])[1])(
      qvars, x)[BOUNDS_COLLECTION]
  thresholds = qvars[TRAINABLE_COLLECTION]
  assert jax.tree.structure(bounds) == jax.tree.structure(thresholds)
  ranges = {"alpha": (0.5, 1.0), "beta": (-0.2, 0.4)}  # QuantSpec's defaults
  for path, b in jax.tree_util.tree_leaves_with_path(bounds):
    t = thresholds
    for k in path:
      t = t[k.key]
    assert b.shape == (2, *np.shape(t)), path
    lo, hi = ranges[path[-1].key]
    np.testing.assert_array_equal(b[0], np.full(np.shape(t), lo, np.float32))
    np.testing.assert_array_equal(b[1], np.full(np.shape(t), hi, np.float32))


def test_project_thresholds_clips_each_leaf_into_its_bounds():
  t = {"a": {"alpha": jnp.array([0.2, 0.7, 1.3]), "beta": jnp.array(0.9)}}
  b = {"a": {"alpha": jnp.array([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]]),
             "beta": jnp.array([-0.2, 0.4])}}
  out = steps.project_thresholds(t, b)
  np.testing.assert_allclose(out["a"]["alpha"], [0.5, 0.7, 1.0], rtol=1e-7)
  assert float(out["a"]["beta"]) == pytest.approx(0.4)


@pytest.mark.slow
def test_without_projection_alphas_leave_their_range(setup):
  """``project=False`` (the original recipe): an alpha that steps past 1.0 gets
  a zero gradient there and stays out of range (the projected run is checked
  in ``test_fat_lowers_loss_and_trains_only_thresholds``)."""
  qmodel, qvars, x, teacher = setup
  tx = schedules.fat_optimizer(1e-2)
  step = steps.make_fat_step(qmodel, tx, project=False)
  part = variables.partition(qvars)
  thresholds, frozen = part.trainable, part.frozen
  opt_state = tx.init(thresholds)
  for _ in range(10):
    thresholds, opt_state, _ = step(thresholds, opt_state, frozen, x, teacher)
  assert np.any(_alphas(thresholds) > 1.0)


@pytest.mark.slow
def test_qat_step_trains_params_and_thresholds(setup):
  qmodel, qvars, x, _ = setup
  y = jnp.arange(len(x)) % 10
  tx = optax.adam(1e-3)
  step = steps.make_qat_step(qmodel, tx)
  part = variables.partition(qvars, variables.QAT_TRAINABLE)
  trainable, frozen = part.trainable, part.frozen
  assert set(trainable) == {"params", TRAINABLE_COLLECTION} and set(frozen) == {"quant_stats"}
  opt_state = tx.init(trainable)
  losses = []
  for _ in range(40):
    trainable, opt_state, m = step(trainable, opt_state, frozen, x, y)
    losses.append(float(m["loss"]))
  assert np.mean(losses[-5:]) < 0.95 * losses[0], losses
  stem = trainable["params"]["stem"]["conv"]["kernel"]
  assert not np.allclose(stem, qvars["params"]["stem"]["conv"]["kernel"])


def test_mse_search_picks_each_channels_least_error(setup):
  """For a per-channel weight, ``mse_search`` keeps, per output channel, the
  grid alpha whose float64 reference quantization error is least."""
  from conftest import np_fake_quant
  qmodel, qvars, x, _ = setup
  searched = calibrate.mse_search(qmodel, qvars, [x[:8], x[8:]], progress=False)
  spec = quant.QuantSpec(bits=4, per_channel=True)  # the setup's weight spec
  grid = np.linspace(*spec.alpha_range, 21)
  for layer in ("stem", "block_1/dw", "block_2/project"):
    node_w, node_t = qvars["params"], searched[TRAINABLE_COLLECTION]
    for key in layer.split("/") + ["conv"]:
      node_w, node_t = node_w[key], node_t[key]
    w = np.asarray(node_w["kernel"], np.float64)
    t_max = np.max(np.abs(w), axis=(0, 1, 2))
    errors = np.stack([np.sum((np_fake_quant(w, spec, -t_max, t_max, np.full_like(t_max, a),
                                             0.0)[0] - w) ** 2, axis=(0, 1, 2))
                       for a in grid])  # (21, C)
    chosen = np.asarray(node_t["alpha"])
    assert chosen.shape == t_max.shape
    index = np.abs(chosen[None, :] - grid[:, None]).argmin(axis=0)
    np.testing.assert_allclose(chosen, grid[index], atol=1e-6)  # a grid point
    picked = errors[index, np.arange(len(chosen))]
    # The least error per channel (up to float32-vs-float64 rounding ties).
    np.testing.assert_allclose(picked, errors.min(axis=0), rtol=1e-4, atol=1e-12)
    assert np.any(chosen < 1.0), layer  # 4 bits: clipping pays somewhere


@pytest.mark.slow
def test_mse_search_lowers_output_error(setup):
  qmodel, qvars, x, teacher = setup
  searched = calibrate.mse_search(qmodel, qvars, [x], progress=False)
  apply = jax.jit(qmodel.apply)  # eager apply dispatches op by op: 30 s per call here
  err = lambda v: float(jnp.mean((apply(v, x) - teacher) ** 2))
  assert err(searched) < err(qvars)
  alphas = [a for p, a in jax.tree_util.tree_leaves_with_path(searched[TRAINABLE_COLLECTION])
            if p[-1].key == "alpha"]
  assert all(np.all((a >= 0.5) & (a <= 1.0)) for a in alphas)  # QuantSpec.alpha_range
