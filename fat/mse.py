"""The MSE PTQ search's candidates and their squared quantization errors, pure JAX.

Each function takes one tensor and its quantizer and returns, for every
candidate threshold, the summed squared error of ``fake_quant`` against the
tensor (per channel when the spec is per-channel). ``fat.calibrate.mse_search``
sums them over the calibration batches and keeps the least.

* ``alpha_sweep``: alpha on a grid over ``alpha_range``, beta left as it is.
  On a shifted (asymmetric) grid with beta = 0 this shortens the range from its
  top end only, and can cut it short of 0.
* ``shift_sweep``: on shifted grids, (alpha, beta) pairs that place the
  shortened window anywhere inside [t_min, t_max]: beta = p * (1 - alpha) for
  positions p on a grid over [0, 1], plus p = -t_min / R, which shortens the
  range about 0 (both ends by the factor alpha). Pairs whose grid loses 0 (no
  integer zero point, which int8 runtimes and zero padding need) are never
  chosen: their error is +inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fat import quant

ALPHAS = 21     # alpha grid points over alpha_range
POSITIONS = 11  # window positions over [0, 1] (shift_sweep), plus the one about 0


def _axes(ndim: int, spec: quant.QuantSpec) -> tuple[int, ...]:
  if not spec.per_channel:
    return tuple(range(ndim))
  return tuple(a for a in range(ndim) if a != spec.axis % ndim)


def _error(x, qp: quant.QuantParams, spec: quant.QuantSpec):
  y = quant.fake_quant(x, qp, spec)
  return jnp.sum((y - x) ** 2, axis=_axes(x.ndim, spec))


def alpha_sweep(x: jax.Array, qp: quant.QuantParams, spec: quant.QuantSpec,
                num: int = ALPHAS):
  """Squared quantization error for each alpha on a grid over ``alpha_range``.

  Returns ``(grid, errors)``: ``grid`` has shape ``(num,)``; ``errors`` has
  shape ``(num,)`` per tensor or ``(num, C)`` per channel. The MSE PTQ
  baseline picks ``grid[argmin(errors)]`` (per channel).
  """
  xf = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  qp = quant.as_float32(qp)
  grid = jnp.linspace(spec.alpha_range[0], spec.alpha_range[1], num)
  return grid, jax.lax.map(lambda a: _error(xf, qp._replace(alpha=jnp.full_like(qp.alpha, a)),
                                            spec), grid)


def shift_candidates(qp: quant.QuantParams, spec: quant.QuantSpec, num: int = ALPHAS,
                     positions: int = POSITIONS):
  """``(alphas, betas)`` of ``shift_sweep``: shapes ``(K,)`` and ``(K,) + alpha's
  shape``, K = num * (positions + 1), betas clipped to ``beta_range``."""
  kind = quant.KINDS[spec.kind]
  if not kind.shifted:
    raise ValueError(f"shift_sweep needs a shifted quantizer kind, got {spec.kind!r}; "
                     "use alpha_sweep.")
  qp = quant.as_float32(qp)
  r = kind.span(qp.t_min, qp.t_max)
  about_zero = jnp.where(r > 0, -qp.t_min / jnp.maximum(r, 1e-30), 0.0)
  ps = jnp.concatenate([jnp.broadcast_to(jnp.linspace(0.0, 1.0, positions)[:, None],
                                         (positions, about_zero.size)),
                        about_zero.reshape(1, -1)])           # (P + 1, C or 1)
  grid = jnp.linspace(spec.alpha_range[0], spec.alpha_range[1], num)
  betas = ps[None] * (1.0 - grid)[:, None, None]                 # (num, P + 1, C or 1)
  betas = jnp.clip(betas, *spec.beta_range).reshape((-1,) + jnp.shape(qp.beta))
  alphas = jnp.repeat(grid, positions + 1)
  return alphas, betas


def shift_sweep(x: jax.Array, qp: quant.QuantParams, spec: quant.QuantSpec,
                num: int = ALPHAS, positions: int = POSITIONS):
  """Squared quantization error for each (alpha, beta) of ``shift_candidates``.

  Returns ``(alphas, betas, errors)``: ``errors`` has shape ``(K,)`` per tensor
  or ``(K, C)`` per channel, +inf where the candidate's grid has no integer
  zero point. The pairs about 0 keep it unless ``beta_range`` clips their
  beta; with alpha_range reaching 1 and beta_range containing 0 the min/max
  grid (alpha = 1, beta = 0) is among them. ``fat.calibrate.mse_search``
  refuses a quantizer whose errors are all +inf.
  """
  xf = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  qp = quant.as_float32(qp)
  alphas, betas = shift_candidates(qp, spec, num, positions)
  ndim = np.ndim(qp.alpha)

  def error(candidate):
    a, b = candidate
    qpc = qp._replace(alpha=jnp.full_like(qp.alpha, a), beta=b)
    _, z = quant.scale_and_zero(qpc, spec, ndim)
    zero_on_grid = (-z >= spec.qmin) & (-z <= spec.qmax)
    return jnp.where(zero_on_grid, _error(xf, qpc, spec), jnp.inf)

  return alphas, betas, jax.lax.map(error, (alphas, betas))
