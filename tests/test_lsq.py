"""LSQ / LSQ+ (fat/lsq.py, QuantMode(lsq=True), fat/methods/lsq.py): an SGD step on
alpha (beta) with the scaled gradient is LSQ's SGD step on the step size
(offset), against an independent reference: the straight-through autodiff of
LSQ's own formula, ``y = clip(round(x / d), Q_n, Q_p) * d``, times
g = 1/sqrt(N * Q_p)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fat import lsq, quant
from fat.layers import Dense, QuantMode
from fat import rules


def ste_round(u):
  return u + jax.lax.stop_gradient(jnp.round(u) - u)


def ste_clip(v, lo, hi):
  return jnp.where((v >= lo) & (v <= hi), v, jax.lax.stop_gradient(jnp.clip(v, lo, hi)))


def lsq_reference(x, d, offset, spec):
  """LSQ (LSQ+ with an offset on the grid) in step units, x's last axis the channel."""
  z = ste_round(offset / d)
  return (ste_clip(ste_round(x / d) - z, spec.qmin, spec.qmax) + z) * d


CASES = [
    quant.QuantSpec(bits=4, per_channel=True),
    quant.QuantSpec(bits=3, kind="asymmetric", per_channel=False),
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.kind}{s.bits}{'pc' * s.per_channel}")
def test_sgd_step_on_alpha_is_lsqs_step_on_the_step_size(spec):
  rng = np.random.default_rng(0)
  x = rng.normal(0.3 if spec.kind == "unsigned" else 0, 1, (64, 5)).astype(np.float32)
  if spec.kind == "unsigned":
    x = np.maximum(x, 0)
  c = (5,) if spec.per_channel else ()
  lo, hi = quant.observed_range(x, spec)
  qp = quant.params_from_range(lo, hi, spec, rng.uniform(0.6, 0.9, c).astype(np.float32),
                               rng.uniform(0.05, 0.2, c).astype(np.float32))
  g_out = rng.normal(size=x.shape).astype(np.float32)
  n = x.shape[0] if spec.per_channel else x.size
  # Ours: the gradient reaching alpha and beta through the layer's quantizer.
  loss = lambda qp: jnp.sum(quant.fake_quant(x, lsq.scale_grads(qp, spec, n), spec) * g_out)
  grads = jax.jit(jax.grad(loss))(qp)
  # The reference, in LSQ's own variables: step size d and offset T_l.
  span = quant.KINDS[spec.kind].span(qp.t_min, qp.t_max)
  d = np.clip(qp.alpha, *spec.alpha_range) * span / spec.qmax
  offset = (qp.t_min + np.clip(qp.beta, *spec.beta_range) * span
            if quant.KINDS[spec.kind].shifted else np.zeros_like(d))
  y_ref = lambda d, o: lsq_reference(x, d, o, spec)
  fq = jax.jit(lambda qp: quant.fake_quant(x, qp, spec))
  np.testing.assert_allclose(jax.jit(y_ref)(d, offset), fq(qp), atol=1e-5)
  g = 1 / np.sqrt(n * spec.qmax)
  gd, go = jax.jit(jax.grad(lambda d, o: jnp.sum(y_ref(d, o) * g_out), argnums=(0, 1)))(
      jnp.asarray(d), jnp.asarray(offset))
  lr = 1e-3
  # One SGD step: alpha' * span / qmax == d - lr * g * dL/dd.
  new_d = (qp.alpha - lr * grads.alpha) * span / spec.qmax
  np.testing.assert_allclose(new_d, d - lr * g * np.asarray(gd), rtol=1e-5)
  if quant.KINDS[spec.kind].shifted:  # LSQ+: t_min + beta' * span == T_l - lr * g * dL/dT_l
    new_offset = qp.t_min + (qp.beta - lr * grads.beta) * span
    np.testing.assert_allclose(new_offset, offset - lr * g * np.asarray(go), rtol=1e-5,
                               atol=1e-7)
  # The forward pass is unchanged.
  np.testing.assert_array_equal(
      jax.jit(lambda qp: quant.fake_quant(x, lsq.scale_grads(qp, spec, n), spec))(qp), fq(qp))


def test_zero_channels_stay_finite():
  spec = quant.QuantSpec(bits=4, per_channel=True)
  x = np.zeros((8, 3), np.float32)
  qp = quant.init_params(x, spec)
  grads = jax.jit(jax.grad(
      lambda qp: jnp.sum(quant.fake_quant(x, lsq.scale_grads(qp, spec, 8), spec))))(qp)
  assert np.all(np.isfinite(grads.alpha)) and np.all(grads.alpha == 0)
  assert lsq.grad_scale(8, spec) == pytest.approx(1 / np.sqrt(8 * 7))


def test_lsq_mode_scales_a_layers_threshold_gradients():
  """QuantMode(lsq=True): same logits; the Dense weight alpha's gradient times
  g * (qmax / t_max)^2, with N = inputs per output channel."""
  spec = quant.QuantSpec(bits=4, per_channel=True)
  r = rules.uniform_rules(weight=spec, act=None)
  x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  plain = Dense(3, mode=QuantMode(stage="quant", rules=r, weights_trained=True))
  scaled = plain.clone(mode=dataclasses.replace(plain.mode, lsq=True))
  v = jax.jit(plain.init)(jax.random.PRNGKey(0), x)
  v = {**v, "thresholds": jax.tree.map(lambda a: a * 0.8, v["thresholds"])}
  f = lambda m: jax.jit(jax.grad(lambda v: jnp.sum(m.apply(v, x) ** 2)))(v)["thresholds"]["alpha"]
  np.testing.assert_array_equal(jax.jit(plain.apply)(v, x), jax.jit(scaled.apply)(v, x))
  t_max = np.abs(np.asarray(v["params"]["kernel"])).max(axis=0)
  want = np.asarray(f(plain)) * lsq.grad_scale(6, spec) * (spec.qmax / t_max) ** 2
  np.testing.assert_allclose(f(scaled), want, rtol=1e-5)
