"""From a float model to a calibrated, fake-quantized one: the policy and the sequence.

    rules = pipeline.setting_rules(pipeline.Setting(name="w4a8", weight_bits=4, act_bits=8,
                                                    per_channel=True))
    p = pipeline.prepare(model, float_vars, rules, calib_images)
    logits = p.qmodel.apply(p.variables, x)

``prepare`` is fold BN (``fat.fold``) -> quantized model (``fat.calibrate.quantized``)
-> initial quantizer variables -> activation ranges from calibration images.
``quantize`` is its middle part, for callers that fold once and calibrate
several settings (the main job shares ranges between settings).

``setting_rules`` is the quantizer-rule policy of a setting: one weight spec
and one activation spec everywhere, the network input symmetric in
asymmetric settings, optionally the first and last layers' weights at
another width, and optionally per-layer widths (``Setting.overrides``, e.g. a
mixed-precision allocation from ``fat.allocation``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import numpy as np

from fat import calibrate, data, fold, quant, recipes, rules


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
  """One quantization setting (a row group of the report).

  ``first_last_bits`` > 0 keeps the stem's and classifier's weights at that
  width; 0 quantizes them like the rest.

  ``overrides``: ``(pattern, weight_bits, act_bits)`` triples, per-layer widths
  ahead of every other rule (a regex on the layer path, as ``fat.rules``; bits
  0 leaves that role to the later rules). Kind, granularity and clip ranges stay
  the setting's. A config holds them as data (lists from JSON are accepted).
  """

  name: str
  weight_bits: int
  act_bits: int
  per_channel: bool
  weight_kind: str = "symmetric"
  act_kind: str = "symmetric"
  first_last_bits: int = 0
  overrides: tuple = ()

  def __post_init__(self):
    if self.weight_kind == "unsigned":
      raise ValueError(f"setting {self.name!r}: weight_kind cannot be 'unsigned'; "
                       "use 'symmetric' or 'asymmetric'.")
    object.__setattr__(self, "overrides", _overrides(self.name, self.overrides))


def _overrides(name: str, items) -> tuple[tuple[str, int, int], ...]:
  """``items`` as a tuple of ``(pattern, weight_bits, act_bits)``, checked."""
  out = []
  for i, item in enumerate(items or ()):
    where = f"setting {name!r}: overrides[{i}]"
    if isinstance(item, str) or len(tuple(item)) != 3:
      raise ValueError(f"{where} must be (pattern, weight_bits, act_bits), got {item!r}.")
    pattern, wb, ab = tuple(item)
    if not isinstance(pattern, str):
      raise ValueError(f"{where}: the pattern must be a string, got {pattern!r}.")
    for role, bits in (("weight_bits", wb), ("act_bits", ab)):
      if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not (
          bits == 0 or 2 <= bits <= 16):
        raise ValueError(f"{where}: {role} must be 0 (not set) or an integer in 2..16, "
                         f"got {bits!r}.")
    if not (wb or ab):
      raise ValueError(f"{where} sets neither weight_bits nor act_bits.")
    out.append((pattern, int(wb), int(ab)))
  return tuple(out)


def setting_rules(s: Setting, *, alpha_range=(0.5, 1.0), beta_range=(-0.2, 0.4),
                  unsigned_relu: bool = False) -> tuple[rules.QuantRule, ...]:
  """The quantizer rules of setting ``s`` (alpha/beta clip ranges as given).

  ``unsigned_relu``: ReLU outputs get the unsigned quantizer without beta in
  asymmetric settings too (the paper's recipe, ``fat.recipes``); symmetric
  settings quantize them so anyway.
  """
  ranges = dict(alpha_range=tuple(alpha_range), beta_range=tuple(beta_range))
  weight = quant.QuantSpec(bits=s.weight_bits, kind=s.weight_kind, per_channel=s.per_channel,
                           **ranges)
  act = quant.QuantSpec(bits=s.act_bits, kind=s.act_kind, unsigned_relu=bool(unsigned_relu),
                        **ranges)
  per_layer = tuple(
      rules.QuantRule(pattern=p, weight=dataclasses.replace(weight, bits=wb) if wb else None,
                      act=dataclasses.replace(act, bits=ab) if ab else None)
      for p, wb, ab in s.overrides)
  overrides = ()
  if s.act_kind == "asymmetric":
    # The network input has a fixed range, [-1, 1] for "keras" preprocessing. On
    # an asymmetric grid its zero point, round(-127.5), puts every pixel value on
    # a rounding tie (resolved differently by XLA, ONNX Runtime and the integer
    # reference); the symmetric grid has none.
    in_act = rules.resolve(per_layer, "input_q", "act") or act
    overrides = (rules.QuantRule(pattern=r"^input_q$",
                                 act=dataclasses.replace(in_act, kind="symmetric")),)
  overrides += per_layer
  if s.first_last_bits:
    first_last = quant.QuantSpec(bits=s.first_last_bits, kind=s.weight_kind,
                                 per_channel=s.per_channel, **ranges)
    overrides += (rules.QuantRule(pattern=r"^(stem|classifier)(/|$)", weight=first_last),)
  return rules.uniform_rules(weight=weight, act=act, overrides=overrides)


def quantize(model: nn.Module, folded: dict, quant_rules, sample) -> tuple[nn.Module, dict]:
  """``(qmodel, qvars)``: ``model`` in the "quant" stage with ``quant_rules``,
  and its variables: the folded params, zero activation ranges, alpha = 1,
  beta = 0. ``sample`` is one input batch (only its shape is used)."""
  qmodel = calibrate.quantized(model, quant_rules)
  return qmodel, calibrate.init_quant_variables(qmodel, folded["params"], sample)


def first_batch(images, n: int = 1) -> np.ndarray:
  """The first ``n`` images of a split or an image array."""
  return next(data.image_batches(images, n)[0])


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What ``prepare`` returns: the quantized model and its variables, and the
  folded float model and its variables (the distillation teacher)."""

  qmodel: nn.Module
  variables: dict
  folded: dict

  @property
  def fmodel(self) -> nn.Module:
    """The folded, unquantized model (``folded`` are its variables)."""
    return calibrate.quantized(self.qmodel, (), stage="folded")


def prepare(model: nn.Module, float_vars: dict, quant_rules, images, *,
            calibration: str = "minmax", percentile: float = 99.99,
            batch_size: int = 128, progress: bool = False) -> Prepared:
  """fold -> quantized model -> initial variables -> activation ranges.

  ``model`` is the float (BatchNorm) model and ``float_vars`` its variables
  (``params`` and ``batch_stats``); ``images`` are the calibration images, a
  ``fat.data.Split`` or an array (NHWC). ``calibration`` is "minmax" or
  "percentile" (``fat.calibrate.activation_ranges``).
  """
  folded = fold.fold_variables(float_vars, model.bn_eps)
  qmodel, qvars = quantize(model, folded, quant_rules, first_batch(images))
  batches, num = data.image_batches(images, batch_size)
  qvars = calibrate.calibrate(qmodel, qvars, batches, method=calibration, percentile=percentile,
                              num_batches=num, progress=progress)
  return Prepared(qmodel=qmodel, variables=qvars, folded=folded)


def config_rules(setting, fat) -> tuple[rules.QuantRule, ...]:
  """``setting_rules`` of a setting and FAT section given as mappings: an
  ml_collections config's (``config.settings[i]``, ``config.fat``) or the
  ones a checkpoint's meta.json records."""
  as_dict = lambda m: m.to_dict() if hasattr(m, "to_dict") else dict(m)
  fat = as_dict(fat)
  return setting_rules(Setting(**as_dict(setting)), alpha_range=tuple(fat["alpha_range"]),
                       beta_range=tuple(fat["beta_range"]),
                       unsigned_relu=recipes.resolve(fat).unsigned_relu)
