"""``qlinear.quantized_linear`` equals autodiff of ``op(x, fake_quant(w))``.

The reference differentiates the composition directly: the threshold
gradients flow through the weight gradient dL/dW_q and ``fake_quant``'s own
backward pass (itself tested against an STE autodiff in test_quant.py). The
op under test gets them from a forward op on dW_q/dalpha instead.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fat import depthwise, layers, qlinear, quant, rules
from fat import variables as fat_variables
from conftest import ste_fake_quant


# float32 products, as the models ask for (fat.depthwise.PRECISION): on a GPU the
# default may be TF32, and the two gradient paths would round differently.
P = depthwise.PRECISION


def _pointwise(x, w):
  return jnp.einsum("nhwc,cd->nhwd", x, w[0, 0], precision=P)


def _conv(x, w, stride):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=P)


OPS = {
    # name: (op, x shape, w shape)
    "depthwise_shift_s1": (functools.partial(depthwise.depthwise_conv, stride=1,
                                             padding="same", impl="shift"),
                           (2, 7, 7, 6), (3, 3, 1, 6)),
    "depthwise_shift_s2": (functools.partial(depthwise.depthwise_conv, stride=2,
                                             padding="same", impl="shift"),
                           (2, 8, 8, 6), (3, 3, 1, 6)),
    "depthwise_conv": (functools.partial(depthwise.depthwise_conv, stride=1,
                                         padding="same", impl="conv"),
                       (2, 6, 6, 5), (3, 3, 1, 5)),
    "pointwise": (_pointwise, (2, 5, 5, 8), (1, 1, 8, 4)),
    "conv_s2": (functools.partial(_conv, stride=2), (2, 9, 9, 3), (3, 3, 3, 5)),
    "matmul": (functools.partial(jnp.matmul, precision=P), (4, 12), (12, 7)),
}


def _case(name, kind, per_channel, seed=0):
  op, xs, ws = OPS[name]
  # Drawn in numpy: jax.random compiles a sampler per new shape (seconds each here).
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=xs), jnp.float32)
  w = jnp.asarray(rng.normal(size=ws) * 0.5, jnp.float32)
  spec = quant.QuantSpec(bits=4, kind=kind, per_channel=per_channel, axis=-1)
  c = ws[-1] if per_channel else None
  shape = (c,) if per_channel else ()
  # alpha inside and, for one channel, outside its clip range; beta likewise.
  alpha = rng.uniform(0.55, 0.95, shape)
  beta = rng.uniform(-0.15, 0.35, shape)
  if per_channel:
    alpha[0] = 1.2
    beta[-1] = 0.6
  qp = quant.params_from_range(*quant.observed_range(w, spec), spec,
                               np.float32(alpha), np.float32(beta))
  g = jnp.asarray(rng.normal(size=jax.eval_shape(op, x, w).shape), jnp.float32)
  return op, x, w, qp, spec, g


def _loss(fn, g):
  return lambda x, w, a, b: jnp.sum(fn(x, w, a, b) * g)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_value_and_gradients_match_autodiff(name, kind, per_channel):
  op, x, w, qp, spec, g = _case(name, kind, per_channel)

  def ours(x, w, a, b):
    return qlinear.quantized_linear(x, w, qp._replace(alpha=a, beta=b), spec, op)

  def reference(x, w, a, b):
    return op(x, quant.fake_quant(w, qp._replace(alpha=a, beta=b), spec))

  args = (x, w, qp.alpha, qp.beta)
  np.testing.assert_array_equal(ours(*args), reference(*args))
  got = jax.jit(jax.grad(_loss(ours, g), argnums=(0, 1, 2, 3)))(*args)
  want = jax.jit(jax.grad(_loss(reference, g), argnums=(0, 1, 2, 3)))(*args)
  for name_, a, b in zip(("x", "w", "alpha", "beta"), got, want):
    scale = float(jnp.max(jnp.abs(b))) + 1e-6
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=name_)
  # The test is not vacuous: alpha gets a non-zero gradient, and beta does for
  # the asymmetric kind; a clipped alpha (channel 0) gets none.
  assert float(jnp.max(jnp.abs(got[2]))) > 0
  if kind == "asymmetric":
    assert float(jnp.max(jnp.abs(got[3]))) > 0
  else:
    assert float(jnp.max(jnp.abs(got[3]))) == 0
  if per_channel:
    assert float(got[2][0]) == 0.0


@pytest.mark.parametrize("impl", ["dot", "reduce"])
def test_position_sum_impls_equal_the_sum(impl):
  y = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 5, 6)), jnp.float32)
  np.testing.assert_allclose(qlinear.position_sum(y, impl), np.sum(np.asarray(y), axis=(0, 1, 2)),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="position_sum impl must be one of"):
    qlinear.position_sum(y, "fast")


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("impl", ["dot", "reduce"])
def test_both_position_sums_give_the_autodiff_gradient(monkeypatch, impl, per_channel):
  """The per-backend choice does not change the threshold gradient."""
  monkeypatch.setattr(qlinear, "POSITION_SUM_IMPL", impl)
  op, x, w, qp, spec, g = _case("depthwise_shift_s1", "asymmetric", per_channel, seed=5)
  ours = lambda a, b: jnp.sum(g * qlinear.quantized_linear(
      x, w, qp._replace(alpha=a, beta=b), spec, op))
  ref = lambda a, b: jnp.sum(g * op(x, quant.fake_quant(w, qp._replace(alpha=a, beta=b), spec)))
  got = jax.jit(jax.grad(ours, argnums=(0, 1)))(qp.alpha, qp.beta)
  want = jax.jit(jax.grad(ref, argnums=(0, 1)))(qp.alpha, qp.beta)
  for a, b in zip(got, want):
    assert float(jnp.max(jnp.abs(b))) > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("kind", quant.KINDS)
def test_threshold_gradients_match_ste_reference(kind):
  """Against test_quant's independent STE autodiff of the METHOD.md formula
  (round -> identity, clip -> masked), composed with the op."""
  op, x, w, qp, spec, g = _case("depthwise_shift_s2", kind, True, seed=3)
  t_min, t_max = qp.t_min, qp.t_max
  ours = lambda a, b: jnp.sum(g * qlinear.quantized_linear(
      x, w, qp._replace(alpha=a, beta=b), spec, op))
  ref = lambda a, b: jnp.sum(g * op(x, ste_fake_quant(w, a, b, t_min, t_max, spec)))
  got = jax.jit(jax.grad(ours, argnums=(0, 1)))(qp.alpha, qp.beta)
  want = jax.jit(jax.grad(ref, argnums=(0, 1)))(qp.alpha, qp.beta)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * (float(jnp.max(jnp.abs(b))) + 1e-6))


def _conv_windows(fn, *args):
  text = jax.jit(fn).lower(*args).compile().as_text()
  return [line.split("window={")[1].split("}")[0] for line in text.splitlines()
          if " convolution(" in line]


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="reads XLA:CPU's convolution ops; a GPU compiles them to cuDNN calls")
def test_frozen_weight_gradient_is_not_computed_under_jit():
  """With the weight frozen, the jitted threshold gradient runs only the
  forward-shaped convolution (3x3 window, stride 2) on dW_q/dalpha; autodiff
  of the composition runs the weight-gradient convolution instead."""
  op, x, w, qp, spec, g = _case("conv_s2", "symmetric", True)
  ours = lambda a, x, g: jnp.sum(g * qlinear.quantized_linear(
      x, w, qp._replace(alpha=a), spec, op))
  ref = lambda a, x, g: jnp.sum(g * op(x, quant.fake_quant(w, qp._replace(alpha=a), spec)))
  forward = "size=3x3 stride=2x2 pad=1_1x1_1"
  assert _conv_windows(jax.grad(ours), qp.alpha, x, g) == [forward]
  ref_windows = _conv_windows(jax.grad(ref), qp.alpha, x, g)
  assert len(ref_windows) == 1 and ref_windows != [forward]


def test_rejects_channel_axis_not_last():
  op, x, w, qp, spec, _ = _case("matmul", "symmetric", True)
  bad = quant.QuantSpec(bits=4, per_channel=True, axis=0)
  with pytest.raises(ValueError, match="output-channel axis last"):
    qlinear.quantized_linear(x, w, qp, bad, op)


class _Tiny(nn.Module):
  """Stem conv, depthwise, pointwise and dense layers of ``fat.layers``, weights quantized."""
  mode: layers.QuantMode

  @nn.compact
  def __call__(self, x):
    x = jax.nn.relu(layers.Conv(8, 3, strides=2, mode=self.mode, dtype=x.dtype)(x))
    x = jax.nn.relu(layers.Conv(8, 3, depthwise=True, mode=self.mode, dtype=x.dtype)(x))
    x = layers.Conv(6, 1, mode=self.mode, dtype=x.dtype)(x)
    return layers.Dense(3, mode=self.mode)(jnp.mean(x, axis=(1, 2)))


@pytest.mark.slow
def test_layer_threshold_gradients_same_with_and_without_weight_training():
  """Quantized layers give the same threshold gradients whether they use qlinear
  (FAT, kernels frozen) or autodiff through the kernel gradient
  (``QuantMode.weights_trained``, full QAT). In float64: in float32 the two
  sum cancelling terms in different orders, which moves small entries."""
  r = rules.uniform_rules(weight=quant.QuantSpec(bits=4, per_channel=True), act=None)
  fat_mode = layers.QuantMode(stage="quant", rules=r)
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 9, 9, 3), jnp.float64)
    fat_model = _Tiny(mode=fat_mode)
    qat_model = _Tiny(mode=dataclasses.replace(fat_mode, weights_trained=True))
    variables = jax.jit(fat_model.init)(jax.random.PRNGKey(0), x)
    part = fat_variables.partition(variables)
    thresholds = jax.tree.map(lambda a: a * 0.8, part.trainable)

    def grads(m):
      loss = lambda t: jnp.sum(jnp.sin(m.apply(part.with_trainable(t).merged(), x)))
      return jax.jit(jax.grad(loss))(thresholds)

    a, b = grads(fat_model), grads(qat_model)
    np.testing.assert_array_equal(fat_model.apply(variables, x), qat_model.apply(variables, x))
  assert len(jax.tree.leaves(a)) == 8  # alpha and beta of four layers
  for ga, gb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert float(jnp.linalg.norm(ga - gb)) <= 1e-6 * float(jnp.linalg.norm(gb)) + 1e-12
  alphas = [g for p, g in jax.tree_util.tree_leaves_with_path(a) if p[-1].key == "alpha"]
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in alphas)
