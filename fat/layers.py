"""Flax layers that run in float, folded, calibration or fake-quantized mode.

One architecture definition serves every stage of the pipeline; the
``QuantMode`` attribute says which:

* ``"float"``:     conv (no bias) -> BatchNorm -> activation; the trainable float net.
* ``"folded"``:    conv with the BN folded into kernel and bias; no quantization.
* ``"calibrate"``: folded, and every activation quantizer sows a statistic of
  its input into the ``calibration`` collection: its (min, max), its
  (100-p, p) percentiles, or, for "mse", the quantization error of every
  alpha on a grid (``QuantMode.calibration``; weights sow it too);
  ``fat.calibrate`` reduces them over batches into the variables.
* ``"quant"``:     folded, weights and activations fake-quantized by the specs
  that ``QuantMode.rules`` assign to each layer path.

Variable collections in the folded/quantized net:

* ``params``:      folded ``kernel`` and ``bias``;
* ``quant_stats``: calibrated activation ranges ``x_min``/``x_max`` (constants),
  and the frozen ``alpha``/``beta`` of untrained quantizers (the input);
* ``thresholds``:  the trainable ``alpha`` and ``beta``: FAT trains only these.

Weight thresholds are the per-tensor or per-channel range of the folded kernel,
read under ``stop_gradient`` (a constant, as METHOD.md section 1 says).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fat import depthwise, quant, rules

STAGES = ("float", "folded", "calibrate", "quant")
CALIBRATIONS = ("minmax", "percentile", "mse")
ACT_COLLECTION = "quant_stats"
TRAINABLE_COLLECTION = "thresholds"
CALIB_COLLECTION = "calibration"


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantMode:
  """Which pipeline stage a model runs in, and its quantizer rules."""

  stage: str = "float"
  rules: tuple[rules.QuantRule, ...] = ()
  calibration: str = "minmax"
  percentile: float = 99.99

  def __post_init__(self):
    if self.stage not in STAGES:
      raise ValueError(f"QuantMode.stage must be one of {STAGES}, got {self.stage!r}.")
    if self.calibration not in CALIBRATIONS:
      raise ValueError(f"QuantMode.calibration must be one of {CALIBRATIONS}, "
                       f"got {self.calibration!r}.")
    if not 50.0 < self.percentile <= 100.0:
      raise ValueError(f"QuantMode.percentile must be in (50, 100], got {self.percentile}.")
    object.__setattr__(self, "rules", tuple(self.rules))

  @property
  def folded(self) -> bool:
    return self.stage != "float"


def layer_path(module: nn.Module) -> str:
  return "/".join(module.scope.path)


def act_spec(spec: quant.QuantSpec, signed: bool) -> quant.QuantSpec:
  """The activation spec for signed or non-negative (post-ReLU) data.

  A symmetric spec becomes unsigned on ReLU outputs (its clip at 0 is the
  ReLU); an asymmetric one keeps a non-negative shift range ([0, 0.4]).
  """
  if signed:
    return spec
  if spec.kind == "symmetric":
    return dataclasses.replace(spec, kind="unsigned")
  if spec.kind == "asymmetric":
    lo, hi = spec.beta_range
    return dataclasses.replace(spec, beta_range=(max(lo, 0.0), hi))
  return spec


def calibration_stat(x, mode: QuantMode):
  """What a calibration pass records of one activation tensor."""
  xs = jax.lax.stop_gradient(x).astype(jnp.float32)
  if mode.calibration == "percentile":
    return jnp.percentile(xs.ravel(), jnp.array([100.0 - mode.percentile, mode.percentile]))
  return jnp.stack([jnp.min(xs), jnp.max(xs)])


class ActQuant(nn.Module):
  """Fake-quantizes an activation (per tensor) in "quant" mode.

  Attributes:
    mode: the pipeline stage and rules.
    signed: False for non-negative data (ReLU/ReLU6 outputs, their pool).
    trainable: False keeps alpha/beta out of the trainable collection (the
      network input has a fixed range).
  """

  mode: QuantMode
  signed: bool = True
  trainable: bool = True

  @nn.compact
  def __call__(self, x):
    if self.mode.stage in ("float", "folded"):
      return x
    spec = rules.resolve(self.mode.rules, layer_path(self), "act")
    if spec is None:
      return x
    spec = act_spec(dataclasses.replace(spec, per_channel=False), self.signed)
    sweep = self.mode.stage == "calibrate" and self.mode.calibration == "mse"
    if self.mode.stage == "calibrate" and not sweep:
      if not self.is_initializing():
        self.sow(CALIB_COLLECTION, "observed", calibration_stat(x, self.mode))
      return x
    x_min = self.variable(ACT_COLLECTION, "x_min", jnp.zeros, (), jnp.float32)
    x_max = self.variable(ACT_COLLECTION, "x_max", jnp.zeros, (), jnp.float32)
    col = TRAINABLE_COLLECTION if self.trainable else ACT_COLLECTION
    alpha = self.variable(col, "alpha", jnp.ones, (), jnp.float32)
    beta = self.variable(col, "beta", jnp.zeros, (), jnp.float32)
    qp = quant.params_from_range(x_min.value, x_max.value, spec, alpha.value, beta.value)
    if sweep:  # the (fixed-range) input keeps its alpha
      if self.trainable and not self.is_initializing():
        self.sow(CALIB_COLLECTION, "observed", quant.alpha_sweep(x, qp, spec))
      return x
    return quant.fake_quant(x, qp, spec)


def quantize_weight(module: nn.Module, kernel, mode: QuantMode):
  """Fake-quantizes ``kernel`` (output channel last) in "quant" mode."""
  sweep = mode.stage == "calibrate" and mode.calibration == "mse"
  if mode.stage != "quant" and not sweep:
    return kernel
  spec = rules.resolve(mode.rules, layer_path(module), "weight")
  if spec is None:
    return kernel
  spec = dataclasses.replace(spec, axis=-1)
  shape = (kernel.shape[-1],) if spec.per_channel else ()
  alpha = module.variable(TRAINABLE_COLLECTION, "alpha", jnp.ones, shape, jnp.float32)
  beta = module.variable(TRAINABLE_COLLECTION, "beta", jnp.zeros, shape, jnp.float32)
  w_min, w_max = quant.observed_range(jax.lax.stop_gradient(kernel), spec)
  qp = quant.params_from_range(w_min, w_max, spec, alpha.value, beta.value)
  if sweep:
    if not module.is_initializing():
      module.sow(CALIB_COLLECTION, "observed", quant.alpha_sweep(kernel, qp, spec))
    return kernel
  kernel_q = quant.fake_quant(kernel, qp, spec)
  # Recorded only when the caller makes "intermediates" mutable (tests, export).
  module.sow("intermediates", "kernel_q", kernel_q)
  return kernel_q


class Conv(nn.Module):
  """NHWC conv (regular or depthwise) whose kernel is quantized in "quant" mode.

  Parameters are ``kernel`` (``(kh, kw, cin, cout)``, depthwise
  ``(kh, kw, 1, C)``) and, when folded, ``bias``.
  """

  features: int
  kernel_size: int = 1
  strides: int = 1
  depthwise: bool = False
  use_bias: bool = False
  padding: str = "same"
  dw_impl: str = "auto"
  mode: QuantMode = QuantMode()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    cin = x.shape[-1]
    if self.depthwise and self.features != cin:
      raise ValueError(f"depthwise conv needs features == input channels, got "
                       f"{self.features} and {cin}.")
    shape = (k, k, 1 if self.depthwise else cin, self.features)
    kernel = self.param("kernel", nn.initializers.he_normal(), shape, jnp.float32)
    kernel = quantize_weight(self, kernel, self.mode).astype(self.dtype)
    x = x.astype(self.dtype)
    if self.depthwise:
      y = depthwise.depthwise_conv(x, kernel, self.strides, self.padding, self.dw_impl)
    elif k == 1 and self.strides == 1:
      y = jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])
    else:
      pads = tuple(depthwise.conv_padding(x.shape[i], k, self.strides, self.padding)
                   for i in (1, 2))
      y = jax.lax.conv_general_dilated(
          x, kernel, (self.strides, self.strides), pads,
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return y


class Dense(nn.Module):
  """Dense layer whose kernel is quantized in "quant" mode."""

  features: int
  mode: QuantMode = QuantMode()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features), jnp.float32)
    kernel = quantize_weight(self, kernel, self.mode)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return x @ kernel + bias
