"""Trainable-threshold fake quantization (FAT), pure JAX.

The numerics of METHOD.md section 1, with no Flax inside:

* ``KINDS``       -- the quantizer kinds: name -> ``Kind``, a few small pure
  functions (integer grid, thresholds from a range, the range alpha scales,
  whether beta shifts the grid). A new kind is one entry of this table.
* ``QuantSpec``   -- frozen, keyword-only description of one quantizer.
* ``QuantParams`` -- pytree of (t_min, t_max, alpha, beta).
* ``init_params`` -- thresholds from a calibration tensor.
* ``fake_quant``  -- the quantize-dequantize op, with a ``jax.custom_vjp`` whose
  gradients equal the straight-through-estimator (STE) autodiff of the
  forward formula: round has derivative 1, clip passes gradient only inside
  its range. ``t_min`` and ``t_max`` are calibration constants and get zero
  gradient.

The grid is always computed in float32; the output has the input's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Floor on the threshold / range so that an all-zero tensor gives zeros.
_TINY = 1e-12


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kind:
  """One quantizer kind, as the grid formulas below use it.

  With alpha_c = clip(alpha, alpha_range) and R = ``span(t_min, t_max)``, the
  scale is s = qmax / (alpha_c * R). Unshifted kinds have T_l = z = 0; a
  shifted kind has T_l = t_min + clip(beta, beta_range) * R, an integer zero
  point z = round(T_l * s), and beta gets a gradient. Then
  y = (clip(round(x * s) - z, qmin, qmax) + z) / s.

  Attributes:
    qrange: bits n -> (qmin, qmax), the integer grid.
    thresholds: float32 (x_min, x_max) -> (t_min, t_max), the calibration
      thresholds from an observed range (elementwise, any shape).
    span: (t_min, t_max) -> R, the range that alpha scales.
    shifted: whether the grid has the trainable shift beta (a zero point).
  """

  qrange: Callable[[int], tuple[int, int]]
  thresholds: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  span: Callable[[jax.Array, jax.Array], jax.Array]
  shifted: bool = False


def _signed_grid(bits):
  return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def _unsigned_grid(bits):
  return 0, 2 ** bits - 1


def _symmetric_thresholds(x_min, x_max):
  t_max = jnp.maximum(jnp.abs(x_min), jnp.abs(x_max))
  return -t_max, t_max


def _unsigned_thresholds(x_min, x_max):
  t_max = jnp.maximum(x_max, 0.0)
  return jnp.zeros_like(t_max), t_max


def _asymmetric_thresholds(x_min, x_max):
  return jnp.minimum(x_min, 0.0), jnp.maximum(x_max, 0.0)


# Iterating KINDS gives the kind names, in this order.
KINDS: dict[str, Kind] = {
    "symmetric": Kind(qrange=_signed_grid, thresholds=_symmetric_thresholds,
                      span=lambda t_min, t_max: t_max),
    "unsigned": Kind(qrange=_unsigned_grid, thresholds=_unsigned_thresholds,
                     span=lambda t_min, t_max: t_max),
    "asymmetric": Kind(qrange=_unsigned_grid, thresholds=_asymmetric_thresholds,
                       span=lambda t_min, t_max: t_max - t_min, shifted=True),
}


ROUNDINGS = ("nearest", "learned")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How one tensor is quantized.

  Attributes:
    bits: bit width n, 2..16.
    kind: a name in ``KINDS``: "symmetric" (signed, grid
      -(2^(n-1)-1)..2^(n-1)-1), "unsigned" (grid 0..2^n-1, for ReLU outputs) or
      "asymmetric" (grid 0..2^n-1 with a trainable zero point).
    per_channel: one threshold per index of ``axis`` instead of one per tensor.
    axis: the channel axis used when ``per_channel`` is set.
    alpha_range: clip range of the threshold scale factor alpha.
    beta_range: clip range of the asymmetric shift beta (ignored otherwise).
    rounding: weights only: "nearest" (round to nearest) or "learned" (AdaRound,
      ``fat.rounding``: a weight module with a rounding variable ``v`` in the
      ``rounding`` collection rounds up where h(v) -> 1 and down where h(v) -> 0;
      without one, or once hardened onto the grid, it rounds to nearest).
    unsigned_relu: activations only: on non-negative (post-ReLU) data use the
      unsigned quantizer, without beta, whatever ``kind`` is (the paper's recipe;
      ``fat.layers.act_spec``). Symmetric specs do so anyway.
  """

  bits: int = 8
  kind: str = "symmetric"
  per_channel: bool = False
  axis: int = -1
  alpha_range: tuple[float, float] = (0.5, 1.0)
  beta_range: tuple[float, float] = (-0.2, 0.4)
  rounding: str = "nearest"
  unsigned_relu: bool = False

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
      raise ValueError(f"QuantSpec.bits must be an integer in 2..16, got {self.bits!r}.")
    if not 2 <= self.bits <= 16:
      raise ValueError(f"QuantSpec.bits must be in 2..16, got {self.bits}.")
    if self.kind not in KINDS:
      raise ValueError(f"QuantSpec.kind must be one of {tuple(KINDS)}, got {self.kind!r}.")
    for name in ("alpha_range", "beta_range"):
      rng = getattr(self, name)
      if len(tuple(rng)) != 2:
        raise ValueError(f"QuantSpec.{name} must be a (low, high) pair, got {rng!r}.")
      lo, hi = (float(v) for v in rng)
      if not (np.isfinite(lo) and np.isfinite(hi)) or lo >= hi:
        raise ValueError(
            f"QuantSpec.{name} must satisfy low < high (finite), got {rng!r}; "
            "use e.g. (0.5, 1.0) for alpha and (-0.2, 0.4) for beta.")
      object.__setattr__(self, name, (lo, hi))
    if self.alpha_range[0] <= 0:
      raise ValueError(
          f"QuantSpec.alpha_range must be positive, got {self.alpha_range!r}.")
    if self.rounding not in ROUNDINGS:
      raise ValueError(f"QuantSpec.rounding must be one of {ROUNDINGS}, got {self.rounding!r}.")
    if not isinstance(self.unsigned_relu, (bool, np.bool_)):
      raise ValueError(f"QuantSpec.unsigned_relu must be True or False, got {self.unsigned_relu!r}.")

  @property
  def qmin(self) -> int:
    return KINDS[self.kind].qrange(self.bits)[0]

  @property
  def qmax(self) -> int:
    return KINDS[self.kind].qrange(self.bits)[1]


class QuantParams(NamedTuple):
  """Thresholds of one quantizer: calibration constants and trainable factors.

  Per-tensor fields are scalars; per-channel fields have shape ``(C,)``.
  """

  t_min: jax.Array
  t_max: jax.Array
  alpha: jax.Array
  beta: jax.Array


def _reduce_axes(ndim: int, spec: QuantSpec) -> tuple[int, ...]:
  if not spec.per_channel:
    return tuple(range(ndim))
  axis = spec.axis % ndim
  return tuple(a for a in range(ndim) if a != axis)


def _broadcast(p: jax.Array, ndim: int, spec: QuantSpec) -> jax.Array:
  """Reshapes a per-channel parameter so that it broadcasts against x."""
  p = jnp.asarray(p, jnp.float32)
  if not spec.per_channel or ndim == 0:
    return p
  shape = [1] * ndim
  shape[spec.axis % ndim] = -1
  return p.reshape(shape)


def params_from_range(x_min, x_max, spec: QuantSpec, alpha=None, beta=None) -> QuantParams:
  """Thresholds from an observed range [x_min, x_max].

  Symmetric: t_max = max(|x_min|, |x_max|), t_min = -t_max. Unsigned:
  t_min = 0, t_max = max(x_max, 0). Asymmetric: t_min = min(x_min, 0),
  t_max = max(x_max, 0), so that 0 is on the initial grid (an integer zero
  point exists: int8 deployment needs one, and zero padding stays exact).
  alpha defaults to 1 and beta to 0.
  """
  x_min = jnp.asarray(x_min, jnp.float32)
  x_max = jnp.asarray(x_max, jnp.float32)
  t_min, t_max = KINDS[spec.kind].thresholds(x_min, x_max)
  alpha = jnp.ones_like(t_max) if alpha is None else jnp.asarray(alpha, jnp.float32)
  beta = jnp.zeros_like(t_max) if beta is None else jnp.asarray(beta, jnp.float32)
  return QuantParams(t_min=t_min, t_max=t_max, alpha=alpha, beta=beta)


def observed_range(x: jax.Array, spec: QuantSpec):
  """(min, max) of ``x``, per channel of ``spec.axis`` if ``spec.per_channel``."""
  x = jnp.asarray(x, jnp.float32)
  if spec.per_channel and x.ndim == 0:
    raise ValueError("per_channel quantization needs an input with a channel axis.")
  axes = _reduce_axes(x.ndim, spec)
  return jnp.min(x, axis=axes), jnp.max(x, axis=axes)


def init_params(x: jax.Array, spec: QuantSpec) -> QuantParams:
  """Thresholds from the range of ``x`` (alpha = 1, beta = 0).

  Symmetric: t_max = max|x|, t_min = -t_max. Unsigned: t_min = 0,
  t_max = max(x, 0). Asymmetric: t_min = min(x, 0), t_max = max(x, 0).
  """
  return params_from_range(*observed_range(x, spec), spec)


def as_float32(qp) -> QuantParams:
  """``qp`` with every field a float32 array (the grid is always float32)."""
  return QuantParams(*(jnp.asarray(p, jnp.float32) for p in qp))


def _grid(qp: QuantParams, ndim: int, spec: QuantSpec):
  """Scale s, zero point z and the quantities their gradients need."""
  lo, hi = spec.alpha_range
  alpha = _broadcast(qp.alpha, ndim, spec)
  alpha_c = jnp.clip(alpha, lo, hi)
  alpha_live = (alpha >= lo) & (alpha <= hi)
  kind = KINDS[spec.kind]
  t_min = _broadcast(qp.t_min, ndim, spec)
  r = kind.span(t_min, _broadcast(qp.t_max, ndim, spec))
  width = alpha_c * r
  if kind.shifted:
    blo, bhi = spec.beta_range
    beta = _broadcast(qp.beta, ndim, spec)
    t_low = t_min + jnp.clip(beta, blo, bhi) * r
    beta_live = (beta >= blo) & (beta <= bhi)
  else:
    t_low = jnp.zeros_like(width)
    beta_live = jnp.zeros_like(width, bool)
  # The floor keeps all-zero channels finite; a floored width has no gradient.
  alpha_live = alpha_live & (width > _TINY)
  width = jnp.maximum(width, _TINY)
  s = spec.qmax / width
  z = jnp.round(t_low * s) if kind.shifted else jnp.zeros_like(s)
  return s, z, alpha_c, alpha_live, r, t_low, beta_live


def _forward(x, qp, spec):
  xf = x.astype(jnp.float32)
  s, z, alpha_c, alpha_live, r, t_low, beta_live = _grid(qp, xf.ndim, spec)
  v = jnp.round(xf * s) - z
  in_range = (v >= spec.qmin) & (v <= spec.qmax)
  # Times the step 1/s rather than divided by s: XLA may turn the division into
  # a multiply by the reciprocal in one program and not in another (e.g. split
  # over two devices), and a one-ulp difference here moves later values across
  # rounding boundaries. This way y == (q + z) * grid_step exactly.
  y = (jnp.clip(v, spec.qmin, spec.qmax) + z) * (1.0 / s)
  return y, (xf, y, s, in_range, alpha_c, alpha_live, r, t_low, beta_live)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fake_quant(x, qp, spec):
  return _forward(x, qp, spec)[0].astype(x.dtype)


def _fake_quant_fwd(x, qp, spec):
  # Only x is saved: the backward pass recomputes the grid inside its own
  # fused loops, cheaper than writing and re-reading y and the range mask.
  return _forward(x, qp, spec)[0].astype(x.dtype), (x, qp)


def partials(x: jax.Array, qp: QuantParams, spec: QuantSpec):
  """``(y, in_range, dy_dalpha, dy_dbeta)`` of ``y = fake_quant(x)``, elementwise.

  The STE derivatives of each output element with respect to its own channel's
  alpha and beta (float32, the shape of ``x``), and the mask where dy/dx = 1.
  ``fake_quant``'s backward pass and ``fat.qlinear`` both contract them with a
  cotangent.
  """
  _, (xf, y, s, in_range, alpha_c, alpha_live, r, t_low, beta_live) = _forward(x, qp, spec)
  # d y / d s: (x - y)/s in range; (T_l - y)/s saturated (T_l = 0 unless shifted).
  dy_ds = jnp.where(in_range, xf - y, t_low - y) / s
  # d s / d alpha = -s / alpha_c while alpha is inside its clip range.
  dy_dalpha = jnp.where(alpha_live, -dy_ds * s / alpha_c, 0.0)
  if KINDS[spec.kind].shifted:
    # Saturated outputs move with T_l = t_min + beta*R; in-range ones do not.
    dy_dbeta = jnp.where(in_range | ~beta_live, 0.0, r)
  else:
    dy_dbeta = None
  return y, in_range, dy_dalpha, dy_dbeta


def reduce_to_params(grad, qp: QuantParams, spec: QuantSpec, ndim: int):
  """Sums an elementwise threshold gradient to the shape of ``qp.alpha``."""
  return jnp.sum(grad, axis=_reduce_axes(ndim, spec)).reshape(jnp.shape(qp.alpha))


def threshold_grads(qp: QuantParams, grad_alpha, grad_beta=None) -> QuantParams:
  """The cotangent of ``qp``: calibration constants get zero."""
  return QuantParams(
      t_min=jnp.zeros_like(qp.t_min),
      t_max=jnp.zeros_like(qp.t_max),
      alpha=grad_alpha.astype(jnp.result_type(qp.alpha)),
      beta=(jnp.zeros_like(qp.beta) if grad_beta is None
            else grad_beta.astype(jnp.result_type(qp.beta))))


def _fake_quant_bwd(spec, saved, g):
  x, qp = saved
  _, in_range, dy_dalpha, dy_dbeta = partials(x, qp, spec)
  dtype = g.dtype  # the output cotangent has the input's dtype
  g = g.astype(jnp.float32)
  grad_x = jnp.where(in_range, g, 0.0)
  grad_alpha = reduce_to_params(g * dy_dalpha, qp, spec, x.ndim)
  grad_beta = None if dy_dbeta is None else reduce_to_params(g * dy_dbeta, qp, spec, x.ndim)
  return grad_x.astype(dtype), threshold_grads(qp, grad_alpha, grad_beta)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x: jax.Array, qp: QuantParams, spec: QuantSpec) -> jax.Array:
  """Quantize-dequantize ``x`` on the grid given by ``qp`` and ``spec``."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  qp = as_float32(qp)
  if spec.per_channel:
    n = x.shape[spec.axis % x.ndim] if x.ndim else None
    for name, p in zip(QuantParams._fields, qp):
      if p.shape != (n,):
        raise ValueError(
            f"per-channel QuantParams.{name} has shape {p.shape}, expected ({n},) "
            f"for input shape {x.shape} and axis {spec.axis}.")
  return _fake_quant(x, qp, spec)


def scale_and_zero(qp: QuantParams, spec: QuantSpec, ndim: int):
  """``(s, z)`` of the grid, broadcastable against an ``ndim`` input, float32:
  ``fake_quant(x) == (clip(round(x * s) - z, qmin, qmax) + z) * (1 / s)``."""
  s, z, *_ = _grid(as_float32(qp), ndim, spec)
  return s, z


def grid_step(qp: QuantParams, spec: QuantSpec) -> jax.Array:
  """The grid step ``1/s`` (shape of ``qp.alpha``): ``fake_quant(x) == (q + z) * step``."""
  qp = as_float32(qp)
  s = _grid(qp, np.ndim(qp.alpha), dataclasses.replace(spec, per_channel=False))[0]
  return 1.0 / s


@jax.custom_vjp
def _round_ste(x):
  return jnp.round(x)


_round_ste.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


def fake_quant_bias(bias: jax.Array, step: jax.Array) -> jax.Array:
  """``bias`` rounded to the int32 grid of ``step`` (input step times weight step).

  The rounding has a straight-through gradient for ``bias``; ``step`` gets
  none through it (the bias error is below half an accumulator unit).
  """
  step = jax.lax.stop_gradient(jnp.asarray(step, jnp.float32))
  b = jnp.asarray(bias, jnp.float32)
  return _round_ste(b / step) * step


def quantize_int(x: jax.Array, qp: QuantParams, spec: QuantSpec):
  """Integer grid indices and the (scale, zero point) mapping them back.

  ``fake_quant(x) == (q + z) * (1 / s)`` with ``q`` returned here, so
  ``x ≈ (q - zero_point) * step`` where ``step = 1/s`` and
  ``zero_point = -z``. Used by export and the integer reference.
  """
  xf = jnp.asarray(x, jnp.float32)
  s, z, *_ = _grid(as_float32(qp), xf.ndim, spec)
  q = jnp.clip(jnp.round(xf * s) - z, spec.qmin, spec.qmax)
  return q, s, z
