"""The MSE search's candidate grids (fat/mse.py) against a float64 reference,
and ``calibrate.mse_search`` with the (alpha, beta) search on asymmetric weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_fake_quant, np_grid, tiny_net, tiny_prepared

from fat import calibrate, mse, pipeline, quant, rounding, rules
from fat.layers import TRAINABLE_COLLECTION


def _skewed(key, shape):
  """Per channel (last axis): values in [0, 1] and one outlier at -10, which
  shortening the range from its top end cannot clip."""
  x = jax.random.uniform(key, shape).at[0].set(-10.0)
  return x * jnp.arange(1, shape[-1] + 1)


def test_alpha_sweep_matches_the_reference_error():
  spec = quant.QuantSpec(bits=3, per_channel=True)
  w = jax.random.normal(jax.random.PRNGKey(3), (50, 4)) * jnp.array([1.0, 2.0, 3.0, 4.0])
  qp = quant.init_params(w, spec)
  grid, errors = mse.alpha_sweep(w, qp, spec, num=11)
  assert errors.shape == (11, 4)
  w64, t_max = np.asarray(w, np.float64), np.max(np.abs(np.asarray(w, np.float64)), axis=0)
  for c in range(4):
    direct = [float(np.sum((np_fake_quant(w64, spec, -t_max, t_max, np.full(4, a), 0.0)[0]
                            - w64)[:, c] ** 2)) for a in np.asarray(grid, np.float64)]
    np.testing.assert_allclose(np.asarray(errors[:, c]), direct, rtol=1e-4)


@pytest.mark.parametrize("per_channel", [True, False])
def test_shift_candidates(per_channel):
  """beta = p (1 - alpha) for p on [0, 1] and p = -t_min / R, clipped to beta_range."""
  spec = quant.QuantSpec(bits=4, kind="asymmetric", per_channel=per_channel)
  w = _skewed(jax.random.PRNGKey(0), (64, 3))
  qp = quant.init_params(w, spec)
  alphas, betas = mse.shift_candidates(qp, spec, num=5, positions=3)
  assert alphas.shape == (5 * 4,) and betas.shape == (5 * 4,) + np.shape(qp.alpha)
  t_min, t_max = np.asarray(qp.t_min, np.float64), np.asarray(qp.t_max, np.float64)
  about_zero = -t_min / (t_max - t_min)
  for k, (a, b) in enumerate(zip(np.asarray(alphas), np.asarray(betas))):
    p = (0.0, 0.5, 1.0)[k % 4] if k % 4 < 3 else about_zero
    np.testing.assert_allclose(a, np.linspace(0.5, 1.0, 5)[k // 4], rtol=1e-6)
    np.testing.assert_allclose(b, np.clip(p * (1 - a), -0.2, 0.4) * np.ones_like(t_min),
                               rtol=1e-5, atol=1e-7)


def test_shift_candidates_need_a_shifted_kind():
  spec = quant.QuantSpec(bits=4)
  with pytest.raises(ValueError, match="shifted quantizer kind.*alpha_sweep"):
    mse.shift_candidates(quant.init_params(jnp.ones((4, 2)), spec), spec)


@pytest.mark.parametrize("per_channel", [True, False])
def test_shift_sweep_matches_the_reference_error_and_keeps_zero(per_channel):
  """Each candidate's error is the float64 reference's; a candidate whose grid
  has no integer zero point in [qmin, qmax] gets +inf, and only those do."""
  spec = quant.QuantSpec(bits=3, kind="asymmetric", per_channel=per_channel)
  w = _skewed(jax.random.PRNGKey(1), (400, 3))
  qp = quant.init_params(w, spec)
  alphas, betas, errors = mse.shift_sweep(w, qp, spec, num=6, positions=5)
  w64 = np.asarray(w, np.float64)
  t_min, t_max = np.asarray(qp.t_min, np.float64), np.asarray(qp.t_max, np.float64)
  axes = 0 if per_channel else None
  lost_any = False
  for a, b, e in zip(np.asarray(alphas, np.float64), np.asarray(betas, np.float64),
                     np.asarray(errors, np.float64)):
    alpha = np.full_like(t_min, a)
    y, _, _, z = np_fake_quant(w64, spec, t_min, t_max, alpha, b)
    ref = np.sum((y - w64) ** 2, axis=axes)
    z = np.reshape(np_grid(spec, np.ndim(t_min), t_min, t_max, alpha, b)[1], np.shape(ref))
    lost = (-z < 0) | (-z > spec.qmax)
    lost_any |= bool(np.any(lost))
    np.testing.assert_array_equal(np.isinf(e), lost)
    np.testing.assert_allclose(e[~lost], np.reshape(ref, np.shape(e))[~lost], rtol=1e-4)
  assert lost_any  # the data loses 0 on some candidate: the mask is exercised
  # Placing the window beats shortening the top end alone on this skewed data.
  alpha_only = np.asarray(mse.alpha_sweep(w, qp, spec, num=6)[1])
  assert np.all(np.min(errors, axis=0) < np.min(alpha_only, axis=0))


@pytest.fixture(scope="module")
def asym_setup():
  p, x = tiny_prepared(quant.QuantSpec(bits=3, kind="asymmetric", per_channel=True),
                       quant.QuantSpec(bits=8))
  return p.qmodel, p.variables, x


def _node(tree, layer):
  for key in layer.split("/") + ["conv"]:
    tree = tree[key]
  return tree


def test_mse_search_with_shift_picks_each_channels_least_error(asym_setup):
  """With ``shift``, each asymmetric weight channel gets the candidate (alpha,
  beta) with the least float64 reference error among those that keep 0 on the
  grid; the search's grids pass ``rounding.check_grids``. Without it, beta stays 0."""
  qmodel, qvars, x = asym_setup
  spec = quant.QuantSpec(bits=3, kind="asymmetric", per_channel=True)
  shifted = calibrate.mse_search(qmodel, qvars, [x[:8], x[8:]], shift=True, progress=False)
  plain = calibrate.mse_search(qmodel, qvars, [x], progress=False)
  moved = 0
  for layer in ("stem", "block_1/dw", "block_2/project"):
    w = np.asarray(_node(qvars["params"], layer)["kernel"], np.float64)
    th, th_plain = _node(shifted[TRAINABLE_COLLECTION], layer), _node(
        plain[TRAINABLE_COLLECTION], layer)
    np.testing.assert_array_equal(th_plain["beta"], 0.0)
    t_min, t_max = np.minimum(w.min((0, 1, 2)), 0), np.maximum(w.max((0, 1, 2)), 0)
    alphas, betas = (np.asarray(v, np.float64) for v in mse.shift_candidates(
        quant.QuantParams(t_min, t_max, np.ones_like(t_min), np.zeros_like(t_min)), spec))
    errors = []
    for a, b in zip(alphas, betas):
      alpha = np.full_like(t_min, a)
      y = np_fake_quant(w, spec, t_min, t_max, alpha, b)[0]
      z = np_grid(spec, 1, t_min, t_max, alpha, b)[1]
      errors.append(np.where((-z >= 0) & (-z <= spec.qmax),
                             np.sum((y - w) ** 2, axis=(0, 1, 2)), np.inf))
    errors = np.stack(errors)
    picked = [np.flatnonzero(np.isclose(alphas, a, atol=1e-6) & np.isclose(betas[:, c], b,
                                                                           atol=1e-6))
              for c, (a, b) in enumerate(zip(np.asarray(th["alpha"]), np.asarray(th["beta"])))]
    assert all(len(k) for k in picked), layer  # each channel's pair is a candidate
    err = np.array([errors[k, c].min() for c, k in enumerate(picked)])
    np.testing.assert_allclose(err, errors.min(axis=0), rtol=1e-4, atol=1e-12)
    moved += int(np.sum(np.asarray(th["beta"]) != 0))
  assert moved > 0  # beta left 0 somewhere: the shift was used
  learned = rules.uniform_rules(
      weight=quant.QuantSpec(bits=3, kind="asymmetric", per_channel=True, rounding="learned"),
      act=quant.QuantSpec(bits=8))
  rounding.check_grids(shifted, learned)  # raises GridLostError if a grid lost 0


def test_mse_search_refuses_a_search_that_cannot_keep_zero():
  """A beta range that excludes 0 on ReLU activations (whose range starts at 0)
  leaves no candidate with a zero point: one error naming the quantizer and the fix."""
  model = tiny_net()
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 1))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  r = rules.uniform_rules(weight=quant.QuantSpec(bits=8),
                          act=quant.QuantSpec(bits=4, kind="asymmetric",
                                              beta_range=(0.2, 0.4)))
  p = pipeline.prepare(model, variables, r, x, batch_size=len(x))
  with pytest.raises(ValueError, match="keeps 0 on the integer grid.*beta_range contain 0"):
    calibrate.mse_search(p.qmodel, p.variables, [x], shift=True, progress=False)


def test_ptq_mse_reads_config_mse_shift(asym_setup):
  """``config.mse_shift`` switches ``ptq_mse`` to the (alpha, beta) search."""
  from configs import default
  from fat import methods
  qmodel, qvars, x = asym_setup
  config = default.get_config("smoke")
  ctx = methods.Context(config=config, setting=None, qmodel=qmodel, variables=qvars, calib=x,
                        unlabeled=x, train=None, teacher=None, act_ranges=lambda _: {},
                        distill=None, results={})
  batches = [x[i:i + config.calibration_batch_size]
             for i in range(0, len(x), config.calibration_batch_size)]
  for shift in (False, True):
    config.mse_shift = shift
    got = methods.get("ptq_mse").run(ctx).variables[TRAINABLE_COLLECTION]
    want = calibrate.mse_search(qmodel, qvars, batches, shift=shift,
                                progress=False)[TRAINABLE_COLLECTION]
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))
  assert not jax.tree.all(jax.tree.map(np.array_equal, got, calibrate.mse_search(
      qmodel, qvars, batches, progress=False)[TRAINABLE_COLLECTION]))


def test_config_mse_shift_is_a_boolean():
  from configs import default
  from experiments import config_checks
  c = default.get_config()
  assert c.mse_shift is False
  config_checks.validate(c)
  del c["mse_shift"]
  c["mse_shift"] = 1
  with pytest.raises(ValueError, match="config.mse_shift must be True or False"):
    config_checks.validate(c)
