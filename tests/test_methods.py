"""FAT threshold training, full QAT steps, the distillation losses and MSE PTQ."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fat import calibrate, fold, methods, models, quant, rules, schedules
from fat.layers import ACT_COLLECTION, TRAINABLE_COLLECTION


@pytest.fixture(scope="module")
def setup():
  model = models.MobileNetV2(num_classes=10, width=0.35, small_input=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 16, 16, 1))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  train_apply = jax.jit(functools.partial(model.clone(bn_momentum=0.0).apply, train=True,
                                          mutable=["batch_stats"]))
  _, upd = train_apply(variables, x)
  folded = fold.fold_variables({"params": variables["params"], **upd}, model.bn_eps)
  fmodel = calibrate.quantized(model, (), stage="folded")
  teacher = jax.jit(fmodel.apply)(folded, x)
  r = rules.uniform_rules(weight=quant.QuantSpec(bits=4, per_channel=True),
                          act=quant.QuantSpec(bits=4))
  qmodel = calibrate.quantized(model, r)
  qvars = calibrate.init_quant_variables(qmodel, folded["params"], x)
  qvars = calibrate.calibrate(qmodel, qvars, [x], progress=False)
  return qmodel, qvars, x, teacher


def test_distillation_losses_match_formulas():
  q = jnp.array([[1.0, 2.0], [0.0, -1.0]])
  f = jnp.array([[0.0, 2.0], [1.0, 1.0]])
  np.testing.assert_allclose(methods.distillation_loss(q, f, "rmse"),
                             np.sqrt((1 + 0 + 1 + 4) / 4), rtol=1e-6)
  expected = np.mean([np.sqrt(1 + 1e-5) + np.sqrt(1e-5), np.sqrt(1 + 1e-5) + np.sqrt(4 + 1e-5)])
  np.testing.assert_allclose(methods.distillation_loss(q, f, "smooth_l1"), expected, rtol=1e-6)
  with pytest.raises(ValueError, match="distillation loss"):
    methods.distillation_loss(q, f, "l2")


def test_fat_lowers_loss_and_trains_only_thresholds(setup):
  qmodel, qvars, x, teacher = setup
  tx = schedules.fat_optimizer(1e-2, reset_steps=400)
  step = methods.make_fat_step(qmodel, tx, "rmse")
  thresholds = qvars[TRAINABLE_COLLECTION]
  frozen = {k: v for k, v in qvars.items() if k != TRAINABLE_COLLECTION}
  frozen_before = jax.tree.map(np.array, frozen)
  opt_state = tx.init(thresholds)
  first = None
  for _ in range(30):
    thresholds, opt_state, m = step(thresholds, opt_state, frozen, x, teacher)
    first = float(m["loss"]) if first is None else first
  final = float(methods.distillation_loss(
      jax.jit(qmodel.apply)({**frozen, TRAINABLE_COLLECTION: thresholds}, x), teacher))
  assert final < 0.9 * first, (first, final)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         thresholds, qvars[TRAINABLE_COLLECTION])
  assert any(jax.tree.leaves(changed))
  names = {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(thresholds)}
  assert names == {"alpha", "beta"}
  jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, frozen))


def test_nan_guard_keeps_last_good_thresholds(setup):
  qmodel, qvars, x, teacher = setup
  tx = schedules.fat_optimizer(1e-2)
  step = methods.make_fat_step(qmodel, tx)
  thresholds = qvars[TRAINABLE_COLLECTION]
  frozen = {k: v for k, v in qvars.items() if k != TRAINABLE_COLLECTION}
  opt_state = tx.init(thresholds)
  thresholds, opt_state, _ = step(thresholds, opt_state, frozen, x, teacher)
  bad, bad_opt, m = step(thresholds, opt_state, frozen, x, teacher * jnp.nan)
  assert not bool(m["finite"])
  jax.tree.map(np.testing.assert_array_equal, bad, thresholds)
  # The optimizer state was reset to a fresh one.
  jax.tree.map(np.testing.assert_array_equal, bad_opt, tx.init(thresholds))


def test_qat_step_trains_params_and_thresholds(setup):
  qmodel, qvars, x, _ = setup
  y = jnp.arange(len(x)) % 10
  tx = optax.adam(1e-3)
  step = methods.make_qat_step(qmodel, tx)
  trainable = {"params": qvars["params"], TRAINABLE_COLLECTION: qvars[TRAINABLE_COLLECTION]}
  frozen = {ACT_COLLECTION: qvars[ACT_COLLECTION]}
  opt_state = tx.init(trainable)
  losses = []
  for _ in range(40):
    trainable, opt_state, m = step(trainable, opt_state, frozen, x, y)
    losses.append(float(m["loss"]))
  assert np.mean(losses[-5:]) < 0.95 * losses[0], losses
  stem = trainable["params"]["stem"]["conv"]["kernel"]
  assert not np.allclose(stem, qvars["params"]["stem"]["conv"]["kernel"])


def test_mse_search_picks_the_grid_minimum():
  spec = quant.QuantSpec(bits=3, per_channel=True)
  w = jax.random.normal(jax.random.PRNGKey(3), (50, 4)) * jnp.array([1.0, 2.0, 3.0, 4.0])
  qp = quant.init_params(w, spec)
  grid, errors = quant.alpha_sweep(w, qp, spec, num=11)
  assert errors.shape == (11, 4)
  for c in range(4):
    direct = [float(jnp.sum((quant.fake_quant(w, qp._replace(alpha=jnp.full(4, a)), spec)
                             - w)[:, c] ** 2)) for a in np.asarray(grid)]
    np.testing.assert_allclose(np.asarray(errors[:, c]), direct, rtol=1e-5)


def test_mse_search_lowers_output_error(setup):
  qmodel, qvars, x, teacher = setup
  searched = calibrate.mse_search(qmodel, qvars, [x], progress=False)
  apply = jax.jit(qmodel.apply)  # eager apply dispatches op by op: 30 s per call here
  err = lambda v: float(jnp.mean((apply(v, x) - teacher) ** 2))
  assert err(searched) < err(qvars)
  alphas = jax.tree.leaves(searched[TRAINABLE_COLLECTION])
  assert all(np.all((a >= 0.0) & (a <= 1.0)) for a in alphas)
