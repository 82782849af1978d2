"""Tests of the FAT quantizer core (METHOD.md section 1).

Every expected value here comes from an independent reference written from the
formulas in METHOD.md: a float64 numpy integer-grid forward, and a jnp forward
whose autodiff (round -> straight-through, clip -> masked) defines the
expected gradients.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fat import quant

from conftest import (KINDS, TINY, ambiguous, bshape, np_fake_quant, np_grid,
                      np_params, qrange, ste_clip, ste_fake_quant, ste_round)


def make_x(shape, spec, seed=0):
  """float32 normal data; channels get different scales; asym data shifted."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape)
  if spec.per_channel:
    c = shape[spec.axis % len(shape)]
    x = x * bshape(np.linspace(0.2, 3.0, c), len(shape), spec)
  else:
    x = x * 1.7
  if spec.kind == "asymmetric":
    x = x + 0.4
  return x.astype(np.float32)


def with_factors(qp, alpha, beta):
  a = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), jnp.shape(qp.t_max))
  b = jnp.broadcast_to(jnp.asarray(beta, jnp.float32), jnp.shape(qp.t_max))
  return qp._replace(alpha=a, beta=b)


# (shape, per_channel, axis) layouts used throughout.
LAYOUTS = [
    pytest.param((5, 7), False, -1, id="tensor2d"),
    pytest.param((3, 3, 4, 5), False, -1, id="tensor4d"),
    pytest.param((6, 5), True, -1, id="chan_last"),
    pytest.param((5, 6), True, 0, id="chan_axis0"),
    pytest.param((3, 3, 4, 5), True, -1, id="chan_conv4d"),
]


def custom_factors(spec, c):
  """Non-default, in-range alpha/beta (vectors per channel)."""
  if spec.per_channel:
    return np.linspace(0.55, 0.95, c), np.linspace(-0.15, 0.35, c)
  return np.float64(0.7), np.float64(0.1)


# --------------------------------------------------------------------------
# init_params.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,per_channel,axis", LAYOUTS)
def test_init_params(kind, shape, per_channel, axis):
  spec = quant.QuantSpec(kind=kind, per_channel=per_channel, axis=axis)
  x = make_x(shape, spec, seed=1)
  qp = quant.init_params(jnp.asarray(x), spec)
  t_min, t_max = np_params(x, spec)
  want_shape = (shape[axis % len(shape)],) if per_channel else ()
  for field in qp:
    assert jnp.shape(field) == want_shape
  np.testing.assert_allclose(qp.t_min, t_min, rtol=1e-6, atol=0)
  np.testing.assert_allclose(qp.t_max, t_max, rtol=1e-6, atol=0)
  np.testing.assert_array_equal(qp.alpha, np.ones(want_shape))
  np.testing.assert_array_equal(qp.beta, np.zeros(want_shape))


def test_init_params_unsigned_all_negative():
  spec = quant.QuantSpec(kind="unsigned")
  qp = quant.init_params(-jnp.arange(1.0, 5.0), spec)
  assert float(qp.t_max) == 0.0 and float(qp.t_min) == 0.0


def test_init_params_asymmetric_range_includes_zero():
  """A channel of one sign still gets 0 on its initial grid (zero point in range)."""
  spec = quant.QuantSpec(bits=8, kind="asymmetric", per_channel=True)
  x = jnp.asarray([[1.0, -3.0, -1.0], [2.0, -2.0, 4.0]])  # channels: >0, <0, mixed
  qp = quant.init_params(x, spec)
  np.testing.assert_array_equal(qp.t_min, [0.0, -3.0, -1.0])
  np.testing.assert_array_equal(qp.t_max, [2.0, 0.0, 4.0])
  y = quant.fake_quant(jnp.zeros_like(x), qp, spec)
  np.testing.assert_array_equal(y, 0.0)


# --------------------------------------------------------------------------
# 1 + 2. Forward values and the grid.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("factors", ["default", "custom"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,per_channel,axis", LAYOUTS)
def test_forward_matches_numpy(kind, bits, factors, shape, per_channel, axis):
  spec = quant.QuantSpec(bits=bits, kind=kind, per_channel=per_channel, axis=axis)
  x = make_x(shape, spec, seed=bits)
  qp = quant.init_params(jnp.asarray(x), spec)
  if factors == "custom":
    qp = with_factors(qp, *custom_factors(spec, shape[axis % len(shape)]))
  y = np.asarray(quant.fake_quant(jnp.asarray(x), qp, spec))
  assert y.shape == x.shape and y.dtype == np.float32

  t_min, t_max = np_params(x, spec)
  alpha, beta = np.asarray(qp.alpha), np.asarray(qp.beta)
  y_ref, q_ref, s, z = np_fake_quant(x, spec, t_min, t_max, alpha, beta)
  scale = np.broadcast_to(1.0 / s, x.shape)  # one grid step
  # float32 vs float64 may round exact-looking .5 ties differently: those
  # elements may be one step off, all others must agree to ~1e-5 of the range.
  amb = ambiguous(x, spec, t_min, t_max, alpha, beta)
  assert amb.mean() < 0.05
  np.testing.assert_allclose(y[~amb], y_ref[~amb], rtol=0,
                             atol=1e-5 * scale.max() * 2 ** bits)
  assert np.all(np.abs(y - y_ref)[~amb] <= 1e-3 * scale[~amb] + 1e-7)
  assert np.all(np.abs(y - y_ref)[amb] <= 1.001 * scale[amb] + 1e-7)

  # 2. On the grid: y * s is an integer in [qmin + z, qmax + z].
  qmin, qmax = qrange(kind, bits)
  ys = y.astype(np.float64) * s
  np.testing.assert_allclose(ys, np.round(ys), rtol=0, atol=1e-3)
  assert np.all(np.round(ys) - z >= qmin) and np.all(np.round(ys) - z <= qmax)
  np.testing.assert_array_equal((np.round(ys) - z)[~amb], q_ref[~amb])

  # At most 2^bits distinct levels per channel (per tensor if not per-channel).
  ch = np.moveaxis(y, axis, 0).reshape(shape[axis], -1) if per_channel else y.reshape(1, -1)
  for row in ch:
    assert len(np.unique(row)) <= 2 ** bits


@pytest.mark.parametrize("kind", KINDS)
def test_forward_dense_grid_levels(kind):
  """A dense ramp hits every grid level exactly once range is covered."""
  bits = 3
  spec = quant.QuantSpec(bits=bits, kind=kind)
  x = jnp.linspace(-2.0, 2.0, 4001)
  qp = quant.init_params(x, spec)
  y = np.asarray(quant.fake_quant(x, qp, spec))
  levels = np.unique(y)
  qmin, qmax = qrange(kind, bits)
  assert len(levels) == qmax - qmin + 1
  s, z = np_grid(spec, 1, *np_params(np.asarray(x), spec), 1.0, 0.0)
  np.testing.assert_allclose(levels, (np.arange(qmin, qmax + 1) + z) / s, atol=1e-6)
  # Monotone non-decreasing.
  assert np.all(np.diff(y) >= 0)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_output_is_exactly_integer_times_step(kind, per_channel):
  """fake_quant(x) == (q + z) * grid_step bit for bit: the simulation and the
  integer reference share one dequantization (no divide that XLA may rewrite)."""
  spec = quant.QuantSpec(bits=8, kind=kind, per_channel=per_channel, axis=-1)
  x = jnp.asarray(make_x((4, 5, 6), spec, seed=2))
  qp = quant.init_params(x, spec)._replace(
      alpha=jnp.full((6,) if per_channel else (), 0.8, jnp.float32))
  b = lambda p: bshape(p, x.ndim, spec, jnp)

  def dequantized(x, qp):
    q, _, z = quant.quantize_int(x, qp, spec)
    return (q + b(z)) * b(quant.grid_step(qp, spec))

  np.testing.assert_array_equal(quant.fake_quant(x, qp, spec), dequantized(x, qp))
  # Under jit XLA may simplify the reciprocal's arithmetic; it does so alike in both.
  np.testing.assert_array_equal(jax.jit(quant.fake_quant, static_argnums=2)(x, qp, spec),
                                jax.jit(dequantized)(x, qp))


def test_forward_hand_example_symmetric():
  """Hand-computed 2-bit symmetric case: grid {-1, 0, 1} * T."""
  spec = quant.QuantSpec(bits=2, kind="symmetric")
  qp = quant.QuantParams(t_min=jnp.float32(-2.0), t_max=jnp.float32(2.0),
                         alpha=jnp.float32(0.5), beta=jnp.float32(0.0))
  x = jnp.asarray([-5.0, -0.6, -0.4, 0.4, 0.6, 0.9, 3.0])
  # T = 1, s = 1: round then clip to [-1, 1].
  np.testing.assert_allclose(quant.fake_quant(x, qp, spec),
                             [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 1.0])


def test_forward_hand_example_asymmetric():
  """Hand-computed 2-bit asymmetric case."""
  spec = quant.QuantSpec(bits=2, kind="asymmetric")
  # R = 6, R_adj = 0.5*6 = 3, s = 1, T_l = -3 + 0.25*6 = -1.5 -> z = round(-1.5) = -2.
  qp = quant.QuantParams(t_min=jnp.float32(-3.0), t_max=jnp.float32(3.0),
                         alpha=jnp.float32(0.5), beta=jnp.float32(0.25))
  x = jnp.asarray([-4.2, -1.8, -0.7, 0.2, 0.9, 1.3, 2.8])
  # round(x) - z = [-2, 0, 1, 2, 3, 3, 5] -> clip [0, 3] -> [0,0,1,2,3,3,3] -> + z.
  np.testing.assert_allclose(quant.fake_quant(x, qp, spec),
                             [-2.0, -2.0, -1.0, 0.0, 1.0, 1.0, 1.0])


# --------------------------------------------------------------------------
# 3. Gradients.
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _impl_grad_fn(spec):
  loss = lambda x, qp, g: jnp.sum(g * quant.fake_quant(x, qp, spec))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


@functools.lru_cache(maxsize=None)
def _ref_grad_fn(spec):
  loss = lambda x, a, b, t0, t1, g: jnp.sum(g * ste_fake_quant(x, a, b, t0, t1, spec))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def grads_impl(x, qp, spec, g):
  """d sum(g * fake_quant) / d (x, qp); jitted, cached per spec for speed."""
  return _impl_grad_fn(spec)(x, qp, g)


def grads_ref(x, qp, spec, g):
  """d sum(g * STE reference) / d (x, alpha, beta)."""
  return _ref_grad_fn(spec)(x, qp.alpha, qp.beta, qp.t_min, qp.t_max, g)


def check_grads(x, qp, spec, seed=0):
  x = jnp.asarray(x, jnp.float32)
  g = jnp.asarray(np.random.default_rng(seed + 100).normal(size=x.shape), jnp.float32)
  gx, gq = grads_impl(x, qp, spec, g)
  rx, ra, rb = grads_ref(x, qp, spec, g)
  mag = float(np.max(np.abs(qp.t_max))) + float(np.max(np.abs(qp.t_min)))
  np.testing.assert_allclose(gx, rx, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gq.alpha, ra, rtol=1e-4, atol=1e-5 * mag * x.size)
  np.testing.assert_allclose(gq.beta, rb, rtol=1e-4, atol=1e-5 * mag * x.size)
  np.testing.assert_array_equal(gq.t_min, np.zeros(np.shape(qp.t_min)))
  np.testing.assert_array_equal(gq.t_max, np.zeros(np.shape(qp.t_max)))
  assert jnp.shape(gq.alpha) == jnp.shape(qp.alpha)
  assert jnp.shape(gq.beta) == jnp.shape(qp.beta)
  return gx, gq, (rx, ra, rb)


def saturation_fraction(x, qp, spec):
  _, _, s, z = np_fake_quant(x, spec, qp.t_min, qp.t_max, qp.alpha, qp.beta)
  qmin, qmax = qrange(spec.kind, spec.bits)
  v = np.round(np.asarray(x, np.float64) * s) - z
  return np.mean((v < qmin) | (v > qmax))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha,beta", [
    (1.0, 0.0),     # defaults, alpha on its upper bound (inclusive)
    (0.7, 0.1),     # in range, saturation occurs
    (0.5, -0.2),    # both on their lower bounds (inclusive)
    (0.6, 0.4),     # beta on its upper bound
    (0.3, 0.1),     # alpha below range
    (1.2, 0.1),     # alpha above range
    (0.7, -0.3),    # beta below range
    (0.7, 0.5),     # beta above range
])
def test_grad_per_tensor(kind, bits, alpha, beta):
  spec = quant.QuantSpec(bits=bits, kind=kind)
  x = make_x((6, 7), spec, seed=bits)
  qp = with_factors(quant.init_params(jnp.asarray(x), spec), alpha, beta)
  gx, gq, _ = check_grads(x, qp, spec, seed=bits)
  a_lo, a_hi = spec.alpha_range
  b_lo, b_hi = spec.beta_range
  if not a_lo <= alpha <= a_hi:
    assert float(gq.alpha) == 0.0
  else:
    assert float(gq.alpha) != 0.0
  if kind != "asymmetric" or not b_lo <= beta <= b_hi:
    assert float(gq.beta) == 0.0
  if alpha == 0.7 and bits >= 4 and (kind != "asymmetric" or beta == 0.1):
    # Saturation really happens, and blocks the x gradient there.
    assert saturation_fraction(x, qp, spec) > 0
    assert np.sum(np.asarray(gx) == 0) > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,axis", [((6, 5), -1), ((5, 6), 0), ((3, 3, 2, 5), -1),
                                        ((3, 5, 4), 1)])
def test_grad_per_channel(kind, shape, axis):
  spec = quant.QuantSpec(bits=4, kind=kind, per_channel=True, axis=axis)
  x = make_x(shape, spec, seed=3)
  qp = quant.init_params(jnp.asarray(x), spec)
  # Channel 0 and 4 have alpha out of range; channel 0 and 4 have beta out too.
  alpha = np.array([0.3, 0.6, 0.8, 1.0, 1.2])
  beta = np.array([-0.3, 0.0, 0.2, 0.4, 0.5])
  qp = with_factors(qp, alpha, beta)
  _, gq, _ = check_grads(x, qp, spec, seed=3)
  ga, gb = np.asarray(gq.alpha), np.asarray(gq.beta)
  assert ga[0] == 0.0 and ga[4] == 0.0
  if kind != "unsigned":  # tiny unsigned channels may have exactly-zero alpha grads
    assert np.all(ga[1:4] != 0.0)
  if kind == "asymmetric":
    assert gb[0] == 0.0 and gb[4] == 0.0
  else:
    np.testing.assert_array_equal(gb, 0.0)


def test_grad_per_channel_independent_channels():
  """Perturbing one channel's g only changes that channel's alpha gradient."""
  spec = quant.QuantSpec(bits=4, kind="symmetric", per_channel=True, axis=0)
  x = make_x((4, 9), spec, seed=5)
  qp = with_factors(quant.init_params(jnp.asarray(x), spec), 0.7, 0.0)
  g = np.ones(x.shape, np.float32)
  _, gq1 = grads_impl(jnp.asarray(x), qp, spec, jnp.asarray(g))
  g[2] *= 3.0
  _, gq2 = grads_impl(jnp.asarray(x), qp, spec, jnp.asarray(g))
  d = np.asarray(gq2.alpha) - np.asarray(gq1.alpha)
  np.testing.assert_array_equal(d[[0, 1, 3]], 0.0)
  np.testing.assert_allclose(d[2], 2.0 * np.asarray(gq1.alpha)[2], rtol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("alpha", [0.55, 0.7, 1.0, 0.3, 1.2])
def test_grad_symmetric_closed_form(alpha, per_channel):
  """METHOD.md: in range g*(y-x)/alpha_c, saturated g*sign(x)*t_max, 0 outside."""
  spec = quant.QuantSpec(bits=4, kind="symmetric", per_channel=per_channel, axis=-1)
  x = make_x((8, 3), spec, seed=7)
  qp = with_factors(quant.init_params(jnp.asarray(x), spec), alpha, 0.0)
  g = np.random.default_rng(8).normal(size=x.shape).astype(np.float32)
  gx, gq = grads_impl(jnp.asarray(x), qp, spec, jnp.asarray(g))

  t_min, t_max = np_params(x, spec)
  y, _, s, _ = np_fake_quant(x, spec, t_min, t_max, alpha, 0.0)
  qmin, qmax = qrange("symmetric", 4)
  v = np.round(x.astype(np.float64) * s)
  inr = (v >= qmin) & (v <= qmax)
  alpha_c = np.clip(alpha, *spec.alpha_range)
  tm = bshape(t_max, x.ndim, spec)
  contrib = np.where(inr, g * (y - x) / alpha_c, g * np.sign(x) * tm)
  axes = 0 if per_channel else None
  want = contrib.sum(axis=axes)
  if not 0.5 <= alpha <= 1.0:
    want = np.zeros_like(want)
  assert (~inr).any() or alpha >= 1.0
  np.testing.assert_allclose(gq.alpha, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gx, np.where(inr, g, 0.0), rtol=0, atol=0)


def test_grad_x_saturation_boundary_inclusive():
  """x exactly on the largest level keeps its gradient; beyond it does not."""
  spec = quant.QuantSpec(bits=2, kind="symmetric")
  qp = quant.QuantParams(jnp.float32(-1.0), jnp.float32(1.0), jnp.float32(1.0),
                         jnp.float32(0.0))
  x = jnp.asarray([-1.4, -1.0, 0.0, 1.0, 1.4, 1.6])
  gx, _ = grads_impl(x, qp, spec, jnp.ones_like(x))
  # round(1.4) = 1 is still in range (STE then clip); round(1.6) = 2 saturates.
  np.testing.assert_array_equal(gx, [1.0, 1.0, 1.0, 1.0, 1.0, 0.0])


# --------------------------------------------------------------------------
# 4. Transformations and bfloat16.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_jit_matches_eager(kind):
  spec = quant.QuantSpec(bits=4, kind=kind, per_channel=True, axis=-1)
  x = jnp.asarray(make_x((4, 5), spec, seed=11))
  qp = with_factors(quant.init_params(x, spec), 0.8, 0.1)
  f = jax.jit(quant.fake_quant, static_argnums=2)
  np.testing.assert_allclose(f(x, qp, spec), quant.fake_quant(x, qp, spec), atol=1e-7)
  g = jnp.ones_like(x)
  loss = lambda x, qp: jnp.sum(g * quant.fake_quant(x, qp, spec))
  eager = jax.grad(loss, argnums=(0, 1))(x, qp)
  jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, qp)
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_vmap_matches_loop(kind, per_channel):
  spec = quant.QuantSpec(bits=4, kind=kind, per_channel=per_channel, axis=-1)
  xs = jnp.asarray(make_x((3, 4, 5), spec, seed=12))
  qps = jax.vmap(lambda x: quant.init_params(x, spec))(xs)
  qps = qps._replace(alpha=qps.alpha * 0.8, beta=qps.beta + 0.1)
  fq = lambda x, qp: quant.fake_quant(x, qp, spec)
  ys = jax.vmap(fq)(xs, qps)
  gfun = jax.jit(jax.grad(lambda x, qp: jnp.sum(jnp.sin(fq(x, qp))), argnums=(0, 1)))
  gs = jax.vmap(gfun)(xs, qps)
  for i in range(xs.shape[0]):
    qp_i = jax.tree_util.tree_map(lambda p: p[i], qps)
    np.testing.assert_allclose(ys[i], fq(xs[i], qp_i), atol=1e-7)
    g_i = gfun(xs[i], qp_i)
    for a, b in zip(jax.tree_util.tree_leaves(g_i), jax.tree_util.tree_leaves(gs)):
      np.testing.assert_allclose(b[i], a, rtol=1e-5, atol=1e-6)
  # Shared (unbatched) parameters also work.
  qp0 = jax.tree_util.tree_map(lambda p: p[0], qps)
  ys0 = jax.vmap(fq, in_axes=(0, None))(xs, qp0)
  for i in range(xs.shape[0]):
    np.testing.assert_allclose(ys0[i], fq(xs[i], qp0), atol=1e-7)


def test_grad_of_grad_free_composition_under_jit_vmap():
  """jit(vmap(grad)) over a batch of inputs with shared params."""
  spec = quant.QuantSpec(bits=8, kind="asymmetric")
  xs = jnp.asarray(make_x((3, 10), spec, seed=13))
  qp = with_factors(quant.init_params(xs, spec), 0.6, 0.05)
  gfun = jax.grad(lambda qp, x: jnp.sum(quant.fake_quant(x, qp, spec) ** 2))
  per_ex = jax.jit(jax.vmap(gfun, in_axes=(None, 0)))(qp, xs)
  for i in range(3):
    want = gfun(qp, xs[i])
    np.testing.assert_allclose(per_ex.alpha[i], want.alpha, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_ex.beta[i], want.beta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16(kind, per_channel):
  spec = quant.QuantSpec(bits=8, kind=kind, per_channel=per_channel, axis=-1)
  xb = jnp.asarray(make_x((6, 4), spec, seed=14)).astype(jnp.bfloat16)
  x32 = xb.astype(jnp.float32)  # exactly the same values
  qp = with_factors(quant.init_params(x32, spec), 0.8, 0.1)
  yb = quant.fake_quant(xb, qp, spec)
  y32 = quant.fake_quant(x32, qp, spec)
  assert yb.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  np.testing.assert_allclose(yb.astype(np.float32), y32, rtol=2 ** -8, atol=1e-6)
  # The grid is computed in float32: bf16 output is the rounding of y32.
  np.testing.assert_array_equal(yb, y32.astype(jnp.bfloat16))

  g = jnp.asarray(np.random.default_rng(15).normal(size=xb.shape), jnp.float32)
  g = g.astype(jnp.bfloat16).astype(jnp.float32)
  loss = lambda x, qp: jnp.sum(g * quant.fake_quant(x, qp, spec).astype(jnp.float32))
  gxb, gqb = jax.grad(loss, argnums=(0, 1))(xb, qp)
  gx32, gq32 = jax.grad(loss, argnums=(0, 1))(x32, qp)
  assert gxb.dtype == jnp.bfloat16
  np.testing.assert_allclose(gxb.astype(np.float32), gx32, rtol=0, atol=0)
  for a, b in ((gqb.alpha, gq32.alpha), (gqb.beta, gq32.beta)):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)

  # bf16 parameters give bf16 parameter gradients.
  qpb = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), qp)
  gxb2, gqb2 = jax.grad(loss, argnums=(0, 1))(xb, qpb)
  assert gxb2.dtype == jnp.bfloat16
  assert gqb2.alpha.dtype == jnp.bfloat16 and gqb2.beta.dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# 5. All-zero tensors and channels.
# --------------------------------------------------------------------------


def all_finite_grads(x, qp, spec):
  g = jnp.ones_like(x)
  gx, gq = grads_impl(x, qp, spec, g)
  for leaf in (gx, *gq):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  return gx, gq


@pytest.mark.parametrize("alpha", [1.0, 0.7])
@pytest.mark.parametrize("kind", KINDS)
def test_all_zero_tensor(kind, alpha):
  spec = quant.QuantSpec(bits=8, kind=kind)
  x = jnp.zeros((4, 5), jnp.float32)
  qp = with_factors(quant.init_params(x, spec), alpha, 0.1)
  y = quant.fake_quant(x, qp, spec)
  np.testing.assert_array_equal(y, 0.0)
  _, gq = all_finite_grads(x, qp, spec)
  np.testing.assert_array_equal(gq.alpha, 0.0)
  np.testing.assert_array_equal(gq.beta, 0.0)


@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("kind", KINDS)
def test_all_zero_channel(kind, axis):
  spec = quant.QuantSpec(bits=8, kind=kind, per_channel=True, axis=axis)
  x = make_x((5, 5), spec, seed=16)
  x = np.moveaxis(x, axis, 0)
  x[2] = 0.0
  x = np.moveaxis(x, 0, axis)
  qp = with_factors(quant.init_params(jnp.asarray(x), spec), 0.8, 0.1)
  y = np.asarray(quant.fake_quant(jnp.asarray(x), qp, spec))
  np.testing.assert_array_equal(np.take(y, 2, axis=axis), 0.0)
  t_min, t_max = np_params(x, spec)
  y_ref = np_fake_quant(x, spec, t_min, t_max, qp.alpha, qp.beta)[0]
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  _, gq = all_finite_grads(jnp.asarray(x), qp, spec)
  assert float(gq.alpha[2]) == 0.0 and float(gq.beta[2]) == 0.0


# --------------------------------------------------------------------------
# 6. Specification validation.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(bits=1), dict(bits=17), dict(bits=0), dict(kind="foo"),
    dict(alpha_range=(1.0, 0.5)), dict(alpha_range=(0.5, 0.5)), dict(alpha_range=()),
    dict(beta_range=(0.4, -0.2)), dict(beta_range=(0.1, 0.1)),
], ids=lambda kw: repr(kw))
def test_invalid_spec_raises(kwargs):
  with pytest.raises(ValueError):
    quant.QuantSpec(**kwargs)


@pytest.mark.parametrize("bits", [2, 16])
def test_valid_bit_extremes(bits):
  spec = quant.QuantSpec(bits=bits)
  assert spec.bits == bits


def test_spec_is_frozen_and_keyword_only():
  spec = quant.QuantSpec()
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.bits = 4
  with pytest.raises(TypeError):
    quant.QuantSpec(8)
  with pytest.raises(TypeError):
    quant.QuantSpec(8, "symmetric")
  # Frozen specs are hashable (usable as static jit arguments) and compare by value.
  assert hash(spec) == hash(quant.QuantSpec())
  assert spec == quant.QuantSpec(bits=8)


def test_spec_defaults():
  spec = quant.QuantSpec()
  assert (spec.bits, spec.kind, spec.per_channel, spec.axis) == (8, "symmetric", False, -1)
  assert tuple(spec.alpha_range) == (0.5, 1.0)
  assert tuple(spec.beta_range) == (-0.2, 0.4)


def test_per_channel_param_shape_mismatch_raises():
  spec = quant.QuantSpec(per_channel=True, axis=-1)
  x = jnp.ones((3, 4))
  qp = quant.init_params(jnp.ones((3, 5)), spec)
  with pytest.raises(ValueError):
    quant.fake_quant(x, qp, spec)


# --------------------------------------------------------------------------
# 7. The kind table: a kind is one entry of quant.KINDS.
# --------------------------------------------------------------------------


def test_kind_table():
  assert tuple(quant.KINDS) == KINDS  # iterating the table gives the names
  for kind in KINDS:
    assert isinstance(quant.KINDS[kind], quant.Kind)
    for bits in range(2, 17):
      spec = quant.QuantSpec(bits=bits, kind=kind)
      assert (spec.qmin, spec.qmax) == qrange(kind, bits)
  assert [k for k in KINDS if quant.KINDS[k].shifted] == ["asymmetric"]


# Toy kinds, registered only inside the test below. "toy_twos": the full
# two's-complement grid -2^(n-1)..2^(n-1)-1 on symmetric thresholds, no shift.
# "toy_minmax": grid 0..2^n-1, shifted, thresholds exactly [min x, max x]
# (0 is not forced onto the grid).
TOY_KINDS = {
    "toy_twos": quant.Kind(
        qrange=lambda n: (-2 ** (n - 1), 2 ** (n - 1) - 1),
        thresholds=lambda lo, hi: (-jnp.maximum(jnp.abs(lo), jnp.abs(hi)),
                                   jnp.maximum(jnp.abs(lo), jnp.abs(hi))),
        span=lambda t_min, t_max: t_max),
    "toy_minmax": quant.Kind(
        qrange=lambda n: (0, 2 ** n - 1),
        thresholds=lambda lo, hi: (lo, hi),
        span=lambda t_min, t_max: t_max - t_min, shifted=True),
}


def toy_qrange(kind, bits):
  return (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if kind == "toy_twos" else (0, 2 ** bits - 1)


def ste_toy(x, alpha, beta, t_min, t_max, spec):
  """The toy kinds' formulas written out in jnp; autodiff is their STE gradient."""
  b = lambda p: bshape(jnp.asarray(p, jnp.float32), x.ndim, spec, jnp)
  qmin, qmax = toy_qrange(spec.kind, spec.bits)
  a = ste_clip(b(alpha), *spec.alpha_range)
  if spec.kind == "toy_twos":
    s = qmax / jnp.maximum(a * b(t_max), TINY)
    z = 0.0
  else:
    r = b(t_max) - b(t_min)
    s = qmax / jnp.maximum(a * r, TINY)
    z = ste_round((b(t_min) + ste_clip(b(beta), *spec.beta_range) * r) * s)
  v = ste_round(x * s) - z
  return (ste_clip(v, qmin, qmax) + z) / s


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kind", sorted(TOY_KINDS))
def test_registered_kind_matches_its_ste_reference(kind, per_channel, monkeypatch):
  with pytest.raises(ValueError):
    quant.QuantSpec(kind=kind)  # not a kind until it is in the table
  monkeypatch.setitem(quant.KINDS, kind, TOY_KINDS[kind])
  spec = quant.QuantSpec(bits=4, kind=kind, per_channel=per_channel, axis=-1)
  qmin, qmax = toy_qrange(kind, 4)
  assert (spec.qmin, spec.qmax) == (qmin, qmax)

  x = make_x((8, 5), spec, seed=21)
  x[:, 1] = np.abs(x[:, 1]) + 0.5  # a positive channel: min/max differs from asymmetric
  x[-1, [0, 2, 3, 4]] = -np.abs(x).max()  # reaches the most negative level
  axes = 0 if per_channel else None
  qp = quant.init_params(jnp.asarray(x), spec)
  t_max = np.abs(x).max(axis=axes)
  want = (-t_max, t_max) if kind == "toy_twos" else (x.min(axis=axes), x.max(axis=axes))
  np.testing.assert_array_equal(qp.t_min, want[0])
  np.testing.assert_array_equal(qp.t_max, want[1])

  qp = with_factors(qp, *custom_factors(spec, 5))
  x = jnp.asarray(x)
  y = quant.fake_quant(x, qp, spec)
  ref = lambda x, a, b: ste_toy(x, a, b, qp.t_min, qp.t_max, spec)
  np.testing.assert_allclose(y, ref(x, qp.alpha, qp.beta), rtol=1e-6, atol=1e-6)
  # On the kind's grid, which is used end to end (qmin = -8 is not symmetric's -7).
  q, _, z = quant.quantize_int(x, qp, spec)
  b = lambda p: bshape(p, x.ndim, spec, jnp)
  np.testing.assert_array_equal(y, (q + b(z)) * b(quant.grid_step(qp, spec)))
  assert float(q.min()) == qmin and float(q.max()) == qmax

  g = jnp.asarray(np.random.default_rng(22).normal(size=x.shape), jnp.float32)
  gx, gq = _impl_grad_fn(spec)(x, qp, g)
  rx, ra, rb = jax.jit(jax.grad(lambda x, a, b: jnp.sum(g * ref(x, a, b)),
                                argnums=(0, 1, 2)))(x, qp.alpha, qp.beta)
  mag = float(np.max(np.abs(qp.t_max))) + float(np.max(np.abs(qp.t_min)))
  np.testing.assert_allclose(gx, rx, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gq.alpha, ra, rtol=1e-4, atol=1e-5 * mag * x.size)
  np.testing.assert_allclose(gq.beta, rb, rtol=1e-4, atol=1e-5 * mag * x.size)
  np.testing.assert_array_equal(gq.t_min, 0.0)
  np.testing.assert_array_equal(gq.t_max, 0.0)
  assert np.all(np.asarray(gq.alpha) != 0.0)  # not vacuous
  assert np.any(np.asarray(gx) == 0.0)  # saturation happens
  if TOY_KINDS[kind].shifted:
    assert np.all(np.asarray(gq.beta) != 0.0)
  else:
    np.testing.assert_array_equal(gq.beta, 0.0)
