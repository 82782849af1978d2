"""Post-training quantization baselines: min/max, percentile and MSE thresholds.

* ``ptq_minmax``: activation ranges are the min and max over the calibration
  images; weight ranges the min and max of each (per-channel) kernel.
* ``ptq_percentile``: activation ranges are the (100-p, p) percentiles
  (``config.percentile``), averaged over calibration batches.
* ``ptq_mse``: from min/max ranges, each quantizer's alpha is the value on a
  grid over ``alpha_range`` with the least squared quantization error
  (``fat.calibrate.mse_search``; weights per channel when per-channel). With
  ``config.mse_shift``, shifted (asymmetric) quantizers search alpha and beta
  together, which can shorten the range at either end or about 0
  (``fat.mse.shift_sweep``).

With ``config.bias_correction``, each method's variables then get DFQ's
empirical bias correction on the calibration images
(``fat.bias_correction.correct_biases``), so FAT, which starts from the best PTQ
variant, starts from corrected biases too.
"""

from __future__ import annotations

from fat import bias_correction, calibrate
from fat.methods.registry import PTQ, Context, Method, Result, register


def _corrected(variables: dict, ctx: Context) -> Result:
  """``variables`` as a Result, bias-corrected when ``config.bias_correction``."""
  if ctx.config.get("bias_correction", False):
    variables = bias_correction.correct_biases(ctx.qmodel, variables, ctx.calib,
                                               batch_size=ctx.config.calibration_batch_size)
  return Result(variables)


def _from_ranges(statistic: str):
  def run(ctx: Context) -> Result:
    return _corrected(calibrate.with_ranges(ctx.variables, ctx.act_ranges(statistic)), ctx)
  return run


def _mse(ctx: Context) -> Result:
  start = calibrate.with_ranges(ctx.variables, ctx.act_ranges("minmax"))
  batches, num = ctx.calibration_batches()
  return _corrected(calibrate.mse_search(ctx.qmodel, start, batches, num_batches=num,
                                         shift=ctx.config.get("mse_shift", False)), ctx)


def _check_percentile(config) -> None:
  if not 50.0 < config.percentile <= 100.0:
    raise ValueError(f"config.percentile must be in (50, 100], got {config.percentile}.")


register(Method(name="ptq_minmax", kind=PTQ, order=0, run=_from_ranges("minmax"),
                description="min/max ranges"))
register(Method(name="ptq_percentile", kind=PTQ, order=1, run=_from_ranges("percentile"),
                validate=_check_percentile, description="percentile ranges"))
register(Method(name="ptq_mse", kind=PTQ, order=2, run=_mse,
                description="alpha with the least quantization MSE, from min/max"))
