"""Learned rounding: AdaRound as a post-training method, and FAT after it.

* ``ptq_adaround``: from the thresholds of a PTQ result (``config.adaround.start``;
  "best": the one with the lowest distillation loss on the calibration images,
  as FAT picks its start),
  every weight learns whether it rounds up or down, layer by layer (or block
  by block), by reconstructing the float model's outputs on unlabeled images
  (``fat.reconstruction``, ``fat.rounding``); the weights are then hardened onto
  the same grid, so the result is an ordinary set of quantized variables.
  No labels. It optimizes, so it is registered as a trained method: it gets
  training columns in the report, runs after the PTQ methods, and is not a
  candidate for ``fat``'s start (``fat`` stays the published recipe).
* ``fat_adaround``: FAT's threshold training (the ``config.fat`` recipe) started
  from ``ptq_adaround``'s result, with the weight thresholds frozen: moving a
  weight's alpha moves its grid, and the learned integers would be rounded to
  nearest on the new grid; only the activation thresholds train.
* ``fat_adaround_all``: the same, training every threshold (weights' too).
* ``fat_adaround_joint``: AdaRound from the same start with the activation
  thresholds trained jointly with the rounding, unit by unit, on each unit's
  reconstruction loss with its output quantizer in it (BRECQ's and QDrop's
  learned activation step sizes; ``ReconSpec.act_thresholds``), at
  ``config.adaround.threshold_learning_rate``.
* ``fat_qdrop``: the same, block by block (``granularity="block"``) on QDrop's
  randomly dropped activation quantization (``input="qdrop"``, at
  ``config.adaround.drop_prob``): QDrop's recipe (Wei et al. 2022) with FAT's
  thresholds as its learned activation step sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from flax import traverse_util

from fat import checks, reconstruction, rounding
from fat.layers import TRAINABLE_COLLECTION
from fat.methods import fat_training
from fat.methods.registry import PTQ, TRAINED, Context, Method, Result, of_kind, register


def recon_spec(config) -> reconstruction.ReconSpec:
  """The ``ReconSpec`` of ``config.adaround``."""
  a = config.adaround
  return reconstruction.ReconSpec(
      granularity=a.granularity, iterations=a.iterations, batch_size=a.batch_size,
      learning_rate=a.learning_rate, reg_weight=a.reg_weight, warmup=a.warmup,
      beta_start=float(a.beta_range[0]), beta_end=float(a.beta_range[1]), input=a.input,
      drop_prob=a.drop_prob,
      quantize_output=a.quantize_output, threshold_learning_rate=a.threshold_learning_rate,
      seed=config.seed)


JOINT, QDROP = "fat_adaround_joint", "fat_qdrop"
RECONSTRUCTIONS = ("ptq_adaround", JOINT, QDROP)


def method_spec(config, name: str) -> reconstruction.ReconSpec:
  """The ``ReconSpec`` method ``name`` (one of ``RECONSTRUCTIONS``) runs."""
  spec = recon_spec(config)
  if name in (JOINT, QDROP):  # the output quantizer in the loss, its thresholds trained
    spec = dataclasses.replace(spec, act_thresholds=True, quantize_output=True)
  if name == QDROP:
    spec = dataclasses.replace(spec, granularity="block", input="qdrop")
  return spec


def images(ctx: Context):
  """The reconstruction images: the calibration images, or the first
  ``config.adaround.images`` unlabeled ones (which start with them)."""
  n = ctx.config.adaround.images
  return ctx.calib if not n else ctx.unlabeled.head(n)


BEST = "best"  # config.adaround.start: the PTQ result with the lowest distillation loss


def start(ctx: Context) -> str:
  """The PTQ result the rounding is learned on (``config.adaround.start``)."""
  name = ctx.config.adaround.start
  return fat_training.start(ctx) if name == BEST else name


def run_adaround(ctx: Context, name: str = "ptq_adaround") -> Result:
  cfg, init = ctx.config.adaround, start(ctx)
  try:
    out, stats, losses = reconstruction.reconstruct(
        ctx.qmodel, ctx.results[init], images(ctx), method_spec(ctx.config, name),
        batch_size=ctx.config.calibration_batch_size, pattern=cfg.layers)
  except rounding.GridLostError as e:  # checked before any training
    raise ValueError(f"{name} from {init} on setting {ctx.setting.name!r}: {e} In the config: "
                     "config.adaround.start='ptq_minmax' (alpha = 1 keeps 0 on every grid), "
                     "config.mse_shift=True (its MSE search keeps 0 on every grid), "
                     "or leave the layer out of config.adaround.layers.") from e
  return Result(out, {**stats, "init": init}, losses)


def weight_threshold_mask(qvars: dict) -> dict:
  """The ``thresholds`` tree with 0.0 on weight quantizers (a module with a
  kernel) and 1.0 on activation quantizers."""
  acts = reconstruction.act_thresholds(qvars)
  flat = traverse_util.flatten_dict(qvars[TRAINABLE_COLLECTION], sep="/")
  return traverse_util.unflatten_dict({k: 1.0 if k in acts else 0.0 for k in flat}, sep="/")


def fat_after_adaround(name: str, train_weight_thresholds: bool):
  """The ``run`` of FAT from ``ptq_adaround``'s result, registered as ``name``."""
  return functools.partial(_run_fat_adaround, name=name,
                           train_weights=train_weight_thresholds)


def _run_fat_adaround(ctx: Context, name: str, train_weights: bool) -> Result:
  """``fat_training``'s recipe (``config.fat``: its data, score, schedule,
  per-width learning rates, keep-best), started from ``ptq_adaround``; frozen
  thresholds get a learning-rate factor of 0."""
  recipe = fat_training.resolve(ctx.config.fat)
  start = ctx.results["ptq_adaround"]
  factors = {f"{TRAINABLE_COLLECTION}/{k}": 1.0 if train_weights else m
             for k, m in traverse_util.flatten_dict(weight_threshold_mask(start),
                                                    sep="/").items()}
  out = fat_training.train_thresholds(ctx, name, start, recipe,
                                      fat_training.fat_data(ctx, recipe), factors)
  return Result(out.variables, {**out.stats, "init": "ptq_adaround", "recipe": recipe.name},
                out.losses)


def validate_adaround(config) -> None:
  a = config.adaround
  ptq = of_kind(config.methods, PTQ)
  if not ptq or (a.start != BEST and a.start not in ptq):
    raise ValueError(f"config.adaround.start must be {BEST!r} or a PTQ method in config.methods "
                     f"(there: {ptq}), got {a.start!r}; add a PTQ method such as 'ptq_minmax' "
                     "to config.methods.")
  for name in ("iterations", "batch_size"):
    checks.positive_int(f"adaround.{name}", a[name])
  checks.nonnegative_int("adaround.images", a.images, "the calibration images")
  checks.learning_rate("adaround.learning_rate", a.learning_rate)
  checks.learning_rate("adaround.threshold_learning_rate", a.threshold_learning_rate)
  checks.boolean("adaround.quantize_output", a.quantize_output)
  checks.number("adaround.reg_weight", a.reg_weight, 0.0)
  checks.number("adaround.warmup", a.warmup, 0.0, 0.99)
  checks.number("adaround.drop_prob", a.drop_prob, 0.0, 1.0)
  if len(tuple(a.beta_range)) != 2 or not 0 < a.beta_range[1] <= a.beta_range[0]:
    raise ValueError(f"config.adaround.beta_range must be (start, end) with start >= end > 0, "
                     f"got {a.beta_range!r}.")
  try:
    re.compile(a.layers)
  except re.error as e:
    raise ValueError(f"config.adaround.layers {a.layers!r} is not a valid regex: {e}") from e
  if a.granularity not in reconstruction.GRANULARITIES:
    raise ValueError(f"config.adaround.granularity must be one of "
                     f"{reconstruction.GRANULARITIES}, got {a.granularity!r}.")
  if a.input not in reconstruction.INPUTS:
    raise ValueError(f"config.adaround.input must be one of {reconstruction.INPUTS}, got "
                     f"{a.input!r}.")
  if not float(config.fat.alpha_range[0]) <= 1.0 <= float(config.fat.alpha_range[1]):
    raise ValueError("ptq_adaround hardens weights with alpha = 1, so config.fat.alpha_range "
                     f"must contain 1.0, got {tuple(config.fat.alpha_range)}.")
  asym = [s.name for s in config.settings if s.weight_kind == "asymmetric"]
  if asym and not float(config.fat.beta_range[0]) <= 0.0 <= float(config.fat.beta_range[1]):
    raise ValueError(f"ptq_adaround hardens asymmetric weights (settings {asym}) with beta = 0, "
                     "so config.fat.beta_range must contain 0.0, got "
                     f"{tuple(config.fat.beta_range)}.")


def validate_fat_adaround(config) -> None:
  if "ptq_adaround" not in config.methods:
    raise ValueError("fat_adaround starts from ptq_adaround's result; add 'ptq_adaround' to "
                     "config.methods.")


register(Method(name="ptq_adaround", kind=TRAINED, order=-1, run=run_adaround,
                validate=validate_adaround,
                description="AdaRound: learned rounding by layer-wise reconstruction"))
register(Method(name="fat_adaround", kind=TRAINED, order=0.5,
                run=fat_after_adaround("fat_adaround", False), validate=validate_fat_adaround,
                description="FAT's training of activation thresholds after AdaRound"))
register(Method(name="fat_adaround_all", kind=TRAINED, order=0.6,
                run=fat_after_adaround("fat_adaround_all", True),
                validate=validate_fat_adaround,
                description="FAT's training of every threshold after AdaRound"))
register(Method(name=JOINT, kind=TRAINED, order=0.7,
                run=functools.partial(run_adaround, name=JOINT), validate=validate_adaround,
                description="AdaRound with the activation thresholds trained jointly"))
register(Method(name=QDROP, kind=TRAINED, order=0.8,
                run=functools.partial(run_adaround, name=QDROP), validate=validate_adaround,
                description="QDrop's recipe: rounding and activation thresholds by block, "
                            "on randomly dropped activation quantization"))
