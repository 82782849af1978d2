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
* ``thresholds``:  the trainable ``alpha`` and ``beta``: FAT trains only these;
* ``threshold_bounds`` (only when the caller makes it mutable): each trainable
  alpha's and beta's ``[lo, hi]`` clip range, for projecting them after an update;
* ``rounding`` (only while AdaRound trains, ``fat.rounding``): a kernel-shaped
  rounding variable ``v`` of each weight whose spec says ``rounding="learned"``;
  the weight is then the soft AdaRound weight. Hardened weights are plain
  kernels on the grid, and this collection is gone.

Quantizers return their grid step ``1/s`` next to their output, and convs
take their input's step: in "quant" mode a conv's bias is rounded to the int32
grid of step ``x_step * w_step``, as an int8 runtime stores it. When
``quant_grid`` is made mutable, every quantizer in "quant" mode sows its
integer grid (``step``, ``z``, ``qmin``, ``qmax``; weights also their integer
values ``q``), with ``fake_quant(x) == (q + z) * step``: ``fat.graph`` reads
it for export and the integer reference.

Weight thresholds are the per-tensor or per-channel range of the folded kernel,
read under ``stop_gradient`` (a constant, as METHOD.md section 1 says).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fat import depthwise, lsq, mse, order_stats, qlinear, quant, rounding, rules

STAGES = ("float", "folded", "calibrate", "quant")
CALIBRATIONS = ("minmax", "percentile", "mse")
ACT_COLLECTION = "quant_stats"
TRAINABLE_COLLECTION = "thresholds"
CALIB_COLLECTION = "calibration"
GRID_COLLECTION = "quant_grid"
# (lo, hi) of each trainable alpha/beta, recorded when the caller makes it mutable.
BOUNDS_COLLECTION = "threshold_bounds"
# Starting values of the quantizer variables (alpha=1 keeps the calibrated
# range). ``calibrate.init_quant_variables`` builds them from this table too.
INITIAL = {"alpha": 1.0, "beta": 0.0, "x_min": 0.0, "x_max": 0.0}


def quant_variable(module: nn.Module, collection: str, name: str, shape=()):
  """A float32 quantizer variable of ``module``, starting at ``INITIAL[name]``."""
  return module.variable(collection, name, jnp.full, shape, INITIAL[name], jnp.float32)


def record_bounds(module: nn.Module, spec: quant.QuantSpec, shape=()) -> None:
  """Records ``[lo, hi]`` (stacked on a leading axis of 2) of the module's
  trainable alpha and beta in ``threshold_bounds``, the tree that
  ``fat.methods`` projects the trained thresholds onto."""
  if module.is_mutable_collection(BOUNDS_COLLECTION) and not module.is_initializing():
    for name, (lo, hi) in (("alpha", spec.alpha_range), ("beta", spec.beta_range)):
      module.put_variable(BOUNDS_COLLECTION, name,
                          jnp.stack([jnp.full(shape, lo, jnp.float32),
                                     jnp.full(shape, hi, jnp.float32)]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantMode:
  """Which pipeline stage a model runs in, and its quantizer rules."""

  stage: str = "float"
  rules: tuple[rules.QuantRule, ...] = ()
  calibration: str = "minmax"
  percentile: float = 99.99
  # True when the kernels are trained too (full QAT). Weight thresholds then
  # take their gradient from the kernel gradient, which is computed anyway;
  # otherwise (FAT) from a forward op, and no kernel gradient is computed
  # (fat.qlinear).
  weights_trained: bool = False
  # True: alpha and beta pass LSQ-scaled gradients (fat.lsq.scale_grads); the
  # forward pass is unchanged.
  lsq: bool = False
  # calibration "mse" only: on shifted (asymmetric) grids, search alpha and beta
  # together (fat.mse.shift_sweep) instead of alpha alone.
  mse_shift: bool = False

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
  ReLU); an asymmetric one keeps a non-negative shift range ([0, 0.4]), or,
  with ``spec.unsigned_relu``, becomes unsigned too (no beta).
  """
  if signed:
    return spec
  if spec.kind == "symmetric" or spec.unsigned_relu:
    return dataclasses.replace(spec, kind="unsigned")
  if spec.kind == "asymmetric":
    lo, hi = spec.beta_range
    return dataclasses.replace(spec, beta_range=(max(lo, 0.0), hi))
  return spec


def calibration_stat(x, mode: QuantMode):
  """What a calibration pass records of one activation tensor."""
  xs = jax.lax.stop_gradient(x).astype(jnp.float32)
  if mode.calibration == "percentile":
    return order_stats.percentiles(xs, (100.0 - mode.percentile, mode.percentile))
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
    """Returns ``(y, step)``: the (fake-quantized) tensor and its grid step
    ``1/s`` in "quant" mode (None otherwise), which the next layer's bias
    quantization needs."""
    if self.mode.stage in ("float", "folded"):
      return x, None
    spec = rules.resolve(self.mode.rules, layer_path(self), "act")
    if spec is None:
      return x, None
    spec = act_spec(dataclasses.replace(spec, per_channel=False), self.signed)
    sweep = self.mode.stage == "calibrate" and self.mode.calibration == "mse"
    if self.mode.stage == "calibrate" and not sweep:
      if not self.is_initializing():
        self.sow(CALIB_COLLECTION, "observed", calibration_stat(x, self.mode))
      return x, None
    x_min = quant_variable(self, ACT_COLLECTION, "x_min")
    x_max = quant_variable(self, ACT_COLLECTION, "x_max")
    col = TRAINABLE_COLLECTION if self.trainable else ACT_COLLECTION
    alpha = quant_variable(self, col, "alpha")
    beta = quant_variable(self, col, "beta")
    if self.trainable:
      record_bounds(self, spec)
    qp = quant.params_from_range(x_min.value, x_max.value, spec, alpha.value, beta.value)
    if self.mode.lsq and self.trainable:
      qp = lsq.scale_grads(qp, spec, lsq.features(x))
    if sweep:  # the (fixed-range) input keeps its alpha
      if self.trainable and not self.is_initializing():
        self.sow(CALIB_COLLECTION, "observed", mse_sweep(x, qp, spec, self.mode))
      return x, None
    y = quant.fake_quant(x, qp, spec)
    if self.is_mutable_collection(GRID_COLLECTION) and not self.is_initializing():
      sow_grid(self, x, qp, spec)
    return y, quant.grid_step(qp, spec)


def mse_sweep(x, qp: quant.QuantParams, spec: quant.QuantSpec, mode: QuantMode):
  """The MSE search's candidates and errors for one quantizer (``fat.mse``)."""
  if mode.mse_shift and quant.KINDS[spec.kind].shifted:
    return mse.shift_sweep(x, qp, spec)
  return mse.alpha_sweep(x, qp, spec)


def sow_grid(module: nn.Module, x, qp: quant.QuantParams, spec: quant.QuantSpec,
             with_values: bool = False):
  """Records the integer grid of one quantizer in ``quant_grid``."""
  q, s, z = quant.quantize_int(x, qp, spec)
  grid = {"step": jnp.reshape(1.0 / s, jnp.shape(qp.alpha)),
          "z": jnp.reshape(z, jnp.shape(qp.alpha)),
          "qmin": jnp.asarray(spec.qmin), "qmax": jnp.asarray(spec.qmax)}
  if with_values:
    grid["q"] = q
  for name, value in grid.items():
    module.sow(GRID_COLLECTION, name, value)


def quantized_apply(module: nn.Module, op, x, kernel, mode: QuantMode):
  """``(op(x, kernel_q), step)``: ``op`` applied to ``kernel`` (output channel last)
  fake-quantized in "quant" mode, and the kernel's grid step per output channel
  (or per tensor); otherwise ``(op(x, kernel), None)``.

  ``op`` is linear in the kernel. Unless ``mode.weights_trained``,
  ``fat.qlinear`` gives the thresholds their gradients through a forward ``op``
  instead of the kernel's gradient.
  """
  sweep = mode.stage == "calibrate" and mode.calibration == "mse"
  spec = (rules.resolve(mode.rules, layer_path(module), "weight")
          if mode.stage == "quant" or sweep else None)
  if spec is None:
    return op(x, kernel.astype(x.dtype)), None
  spec = dataclasses.replace(spec, axis=-1)
  shape = (kernel.shape[-1],) if spec.per_channel else ()
  alpha = quant_variable(module, TRAINABLE_COLLECTION, "alpha", shape)
  beta = quant_variable(module, TRAINABLE_COLLECTION, "beta", shape)
  record_bounds(module, spec, shape)
  w_min, w_max = quant.observed_range(jax.lax.stop_gradient(kernel), spec)
  qp = quant.params_from_range(w_min, w_max, spec, alpha.value, beta.value)
  if sweep:
    if not module.is_initializing():
      module.sow(CALIB_COLLECTION, "observed", mse_sweep(kernel, qp, spec, mode))
    return op(x, kernel.astype(x.dtype)), None
  # Recorded only when the caller makes "intermediates" mutable (tests, export).
  if module.is_mutable_collection("intermediates"):
    module.sow("intermediates", "kernel_q", quant.fake_quant(kernel, qp, spec))
  if mode.lsq:
    qp = lsq.scale_grads(qp, spec, lsq.weights_per_channel(kernel, spec))
  if spec.rounding == "learned" and module.has_variable(rounding.COLLECTION, "v"):
    return _learned_rounding(module, op, x, kernel, qp, spec), quant.grid_step(qp, spec)
  if module.is_mutable_collection(GRID_COLLECTION) and not module.is_initializing():
    sow_grid(module, kernel, qp, spec, with_values=True)
  if mode.weights_trained:
    y = op(x, quant.fake_quant(kernel, qp, spec).astype(x.dtype))
  else:
    y = qlinear.quantized_linear(x, kernel, qp, spec, op)
  return y, quant.grid_step(qp, spec)


def _learned_rounding(module: nn.Module, op, x, kernel, qp, spec):
  """``op(x, w~)`` with the soft AdaRound weight of the module's rounding variable."""
  if module.is_mutable_collection(GRID_COLLECTION):
    raise ValueError(f"layer {layer_path(module)!r} still has a soft rounding variable; "
                     "harden it (fat.rounding.harden) before export.")
  w = rounding.soft_quant(kernel, module.get_variable(rounding.COLLECTION, "v"), qp, spec)
  if module.is_mutable_collection("intermediates"):
    module.sow("intermediates", "kernel_q", w)
  return op(x, w.astype(x.dtype))


def biased(module: nn.Module, y, features: int, x_step, w_step):
  """``y + bias``; in "quant" mode the bias sits on the int32 grid of step
  ``x_step * w_step``, as an int8 runtime stores it (METHOD.md section 2)."""
  bias = module.param("bias", nn.initializers.zeros, (features,), jnp.float32)
  if x_step is not None and w_step is not None:
    bias = quant.fake_quant_bias(bias, x_step * w_step)
  return y + bias


def _pointwise(x, kernel):
  return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0], precision=depthwise.PRECISION)


def _conv(x, kernel, strides, pads):
  return jax.lax.conv_general_dilated(x, kernel, (strides, strides), pads,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=depthwise.PRECISION)


def _matmul(x, kernel):
  return jnp.matmul(x, kernel, precision=depthwise.PRECISION)


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
  def __call__(self, x, x_step=None):
    """``x_step``: the grid step of ``x`` in "quant" mode, for the int32 bias."""
    k = self.kernel_size
    cin = x.shape[-1]
    if self.depthwise and self.features != cin:
      raise ValueError(f"depthwise conv needs features == input channels, got "
                       f"{self.features} and {cin}.")
    shape = (k, k, 1 if self.depthwise else cin, self.features)
    kernel = self.param("kernel", nn.initializers.he_normal(), shape, jnp.float32)
    x = x.astype(self.dtype)
    if self.depthwise:
      op = functools.partial(depthwise.depthwise_conv, stride=self.strides,
                             padding=self.padding, impl=self.dw_impl)
    elif k == 1 and self.strides == 1:
      op = _pointwise
    else:
      pads = tuple(depthwise.conv_padding(x.shape[i], k, self.strides, self.padding)
                   for i in (1, 2))
      op = functools.partial(_conv, strides=self.strides, pads=pads)
    y, w_step = quantized_apply(self, op, x, kernel, self.mode)
    if self.use_bias:
      y = biased(self, y, self.features, x_step, w_step)
    return y


class Dense(nn.Module):
  """Dense layer whose kernel is quantized in "quant" mode."""

  features: int
  mode: QuantMode = QuantMode()

  @nn.compact
  def __call__(self, x, x_step=None):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features), jnp.float32)
    x = x.astype(jnp.promote_types(x.dtype, kernel.dtype))
    y, w_step = quantized_apply(self, _matmul, x, kernel, self.mode)
    return biased(self, y, self.features, x_step, w_step)
