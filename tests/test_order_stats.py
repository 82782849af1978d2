"""fat.order_stats.percentiles against numpy's float64 percentile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fat import order_stats

QS = (0.0, 0.01, 1.0, 25.0, 49.9, 50.0, 50.1, 75.0, 99.0, 99.99, 100.0)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 101, 1000])
@pytest.mark.parametrize("kind", ["normal", "ties", "relu", "negative"])
def test_equals_numpy(n, kind):
  rng = np.random.default_rng(n)
  v = rng.normal(size=n).astype(np.float32)
  if kind == "ties":
    v = np.round(v)
  elif kind == "relu":
    v = np.maximum(v, 0.0)
  elif kind == "negative":
    v = -np.abs(v) - 1.0
  got = np.asarray(jax.jit(lambda v: order_stats.percentiles(v, QS))(v))
  want = np.percentile(v.astype(np.float64), QS)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_activation_sized_tail():
  """The calibration case: both 99.99% tails of a 4-d activation, incl. +-0, inf."""
  x = np.array(jax.random.normal(jax.random.PRNGKey(0), (16, 16, 16, 24)))
  x[0, 0, 0, :3] = (-0.0, 0.0, np.inf)
  got = np.asarray(order_stats.percentiles(jnp.asarray(x), (0.01, 99.99)))
  np.testing.assert_allclose(got, np.percentile(x.astype(np.float64), (0.01, 99.99)),
                             rtol=1e-6)
  assert np.isinf(order_stats.percentiles(jnp.asarray(x), (100.0,))[0])


def test_bad_input():
  with pytest.raises(ValueError, match="in \\[0, 100\\]"):
    order_stats.percentiles(jnp.ones(3), (101.0,))
  with pytest.raises(ValueError, match="empty"):
    order_stats.percentiles(jnp.ones((0,)), (50.0,))
