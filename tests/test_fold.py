"""Tests of batch-norm folding (METHOD.md section 2).

The reference is the unfolded layer followed by an inference-mode batch norm
computed in float64 numpy: gamma * (y - mean) / sqrt(var + eps) + beta.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fat.fold import fold_batch_norm

EPS = 1e-3
HI = jax.lax.Precision.HIGHEST


def bn_params(c, seed):
  rng = np.random.default_rng(seed)
  return dict(
      scale=rng.uniform(0.5, 1.5, c).astype(np.float32),
      offset=rng.normal(size=c).astype(np.float32),
      mean=rng.normal(size=c).astype(np.float32),
      var=rng.uniform(0.2, 2.0, c).astype(np.float32),
  )


def np_bn(y, bn, eps=EPS):
  y = np.asarray(y, np.float64)
  f = lambda k: np.asarray(bn[k], np.float64)
  return f("scale") * (y - f("mean")) / np.sqrt(f("var") + eps) + f("offset")


def conv(x, k, groups=1):
  return jax.lax.conv_general_dilated(
      x, k, window_strides=(1, 1), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups, precision=HI)


def check_fold(layer, x, kernel, bias, bn):
  """layer(x, kernel) + bias, then BN == layer(x, folded kernel) + folded bias."""
  k2, b2 = fold_batch_norm(kernel, bias, bn["scale"], bn["offset"], bn["mean"],
                           bn["var"], EPS)
  assert k2.shape == kernel.shape and b2.shape == (kernel.shape[-1],)
  y = np.asarray(layer(x, kernel), np.float64)
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  want = np_bn(y, bn)
  got = np.asarray(layer(x, k2), np.float64) + np.asarray(b2, np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The closed form of METHOD.md as a second check.
  m = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(bn["var"], np.float64) + EPS)
  b = 0.0 if bias is None else np.asarray(bias, np.float64)
  np.testing.assert_allclose(k2, np.asarray(kernel, np.float64) * m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      b2, np.asarray(bn["offset"], np.float64) + (b - np.asarray(bn["mean"], np.float64)) * m,
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_regular_conv(with_bias):
  rng = np.random.default_rng(0)
  cin, cout = 3, 5
  x = jnp.asarray(rng.normal(size=(2, 6, 6, cin)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=cout), jnp.float32) if with_bias else None
  check_fold(conv, x, kernel, bias, bn_params(cout, 1))


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_depthwise_conv(with_bias):
  rng = np.random.default_rng(2)
  c = 4
  x = jnp.asarray(rng.normal(size=(2, 5, 5, c)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, c)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=c), jnp.float32) if with_bias else None
  check_fold(lambda x, k: conv(x, k, groups=c), x, kernel, bias, bn_params(c, 3))


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_dense(with_bias):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(7, 6)).astype(np.float32)
  kernel = rng.normal(size=(6, 3)).astype(np.float32)
  bias = rng.normal(size=3).astype(np.float32) if with_bias else None
  dense = lambda x, k: np.asarray(x, np.float64) @ np.asarray(k, np.float64)
  check_fold(dense, x, kernel, bias, bn_params(3, 5))


def test_fold_none_scale_offset_mean_identity():
  """scale=None, offset=None mean gamma=1, beta=0."""
  rng = np.random.default_rng(6)
  kernel = rng.normal(size=(4, 3)).astype(np.float32)
  bn = bn_params(3, 7)
  k2, b2 = fold_batch_norm(kernel, None, None, None, bn["mean"], bn["var"], EPS)
  m = 1.0 / np.sqrt(bn["var"].astype(np.float64) + EPS)
  np.testing.assert_allclose(k2, kernel * m, rtol=1e-5)
  np.testing.assert_allclose(b2, -bn["mean"] * m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["mean", "var", "scale", "offset", "bias"])
@pytest.mark.parametrize("bad_shape", [(6,), (5, 1)], ids=["len6", "col"])
def test_fold_shape_mismatch_raises(which, bad_shape):
  rng = np.random.default_rng(8)
  cout = 5
  kernel = rng.normal(size=(3, 3, 2, cout)).astype(np.float32)
  args = dict(bias=np.zeros(cout, np.float32), **bn_params(cout, 9))
  args[which] = np.ones(bad_shape, np.float32)
  with pytest.raises(ValueError):
    fold_batch_norm(kernel, args["bias"], args["scale"], args["offset"], args["mean"],
                    args["var"], EPS)
