"""Up-front checks of a main-job config and workdir, before anything is written."""

from __future__ import annotations

import math
import os
import tempfile

import ml_collections

from fat import data, float_training, imagenet, methods, models, quant

PTQ_METHODS = ("minmax", "percentile", "mse")


def _positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"config.{name} must be a positive integer, got {value!r}.")


def _nonnegative_int(name: str, value, zero_means: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"config.{name} must be an integer >= 0 (0: {zero_means}), got {value!r}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field and its allowed values."""
  if config.dataset not in data.DATASETS:
    raise ValueError(f"config.dataset {config.dataset!r} is unknown; choose one of "
                     f"{data.DATASETS}.")
  if config.dataset in data.IMAGENET_SOURCES and config.preprocess not in imagenet.PREPROCESS:
    raise ValueError(f"config.preprocess must be one of {sorted(imagenet.PREPROCESS)} for "
                     f"ImageNet, got {config.preprocess!r}.")
  if config.pretrained.format and config.pretrained.format not in models.PRETRAINED_FORMATS:
    raise ValueError(f"config.pretrained.format must be '' (use model_checkpoint) or one of "
                     f"{models.PRETRAINED_FORMATS}, got {config.pretrained.format!r}.")
  for name in ("eval_batch_size", "calibration_images", "calibration_batch_size",
               "log_every", "image_size"):
    _positive_int(name, config[name])
  if isinstance(config.eval_examples, bool) or config.eval_examples < 0:
    raise ValueError(f"config.eval_examples must be >= 0 (0: all), got {config.eval_examples}.")
  if not 50.0 < config.percentile <= 100.0:
    raise ValueError(f"config.percentile must be in (50, 100], got {config.percentile}.")
  unknown = set(config.ptq_methods) - set(PTQ_METHODS)
  if unknown:
    raise ValueError(f"config.ptq_methods has unknown {sorted(unknown)}; choose from "
                     f"{PTQ_METHODS}.")
  fat = config.fat
  for name in ("batch_size", "epochs", "reset_steps"):
    _positive_int(f"fat.{name}", fat[name])
  if not 0.0 < fat.train_fraction <= 1.0:
    raise ValueError(f"config.fat.train_fraction must be in (0, 1], got {fat.train_fraction}.")
  for name, lr in (("fat.learning_rate", fat.learning_rate),
                   ("qat.learning_rate", config.qat.learning_rate)):
    if not (lr > 0 and math.isfinite(lr)):
      raise ValueError(f"config.{name} must be positive and finite, got {lr}.")
  if not (fat.lr_decay >= 0 and math.isfinite(fat.lr_decay)):
    raise ValueError(f"config.fat.lr_decay must be >= 0 and finite, got {fat.lr_decay}.")
  if fat.loss not in methods.LOSSES:
    raise ValueError(f"config.fat.loss must be one of {methods.LOSSES}, got {fat.loss!r}.")
  _nonnegative_int("fat.select_every", fat.select_every, "at each epoch end")
  _nonnegative_int("fat.patience", fat.patience, "no early stop")
  for name in ("keep_best", "project_thresholds"):
    if not isinstance(fat[name], bool):
      raise ValueError(f"config.fat.{name} must be True or False, got {fat[name]!r}.")
  if fat.patience and not fat.keep_best:
    raise ValueError("config.fat.patience needs config.fat.keep_best=True (early stopping "
                     "uses its scores); set patience=0 or keep_best=True.")
  if config.qat.enabled:
    for name in ("batch_size", "epochs"):
      _positive_int(f"qat.{name}", config.qat[name])
    if not 0.0 < config.qat.train_fraction <= 1.0:
      raise ValueError(f"config.qat.train_fraction must be in (0, 1], got "
                       f"{config.qat.train_fraction}.")
  if not config.settings:
    raise ValueError("config.settings is empty; add at least one quantization setting.")
  names = [s.name for s in config.settings]
  if len(set(names)) != len(names):
    raise ValueError(f"config.settings names must be unique, got {names}.")
  for s in config.settings:
    for role, bits, kind in (("weight", s.weight_bits, s.weight_kind),
                             ("act", s.act_bits, s.act_kind)):
      try:
        quant.QuantSpec(bits=bits, kind=kind, alpha_range=tuple(fat.alpha_range),
                        beta_range=tuple(fat.beta_range))
      except (ValueError, TypeError) as e:
        raise ValueError(f"config.settings[{s.name!r}] {role}: {e}") from e
    if s.weight_kind == "unsigned":
      raise ValueError(f"config.settings[{s.name!r}].weight_kind cannot be 'unsigned'; "
                       "use 'symmetric' or 'asymmetric'.")


def _number(name: str, value, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and (value > lo if lo_open else value >= lo) and value <= hi)
  if not ok:
    where = f"{'(' if lo_open else '['}{lo}, {hi}{']' if math.isfinite(hi) else ')'}"
    raise ValueError(f"config.{name} must be a number in {where}, got {value!r}.")


def validate_float(config: ml_collections.ConfigDict) -> None:
  """The float-training job's config (config.job == "float"); raises ValueError
  naming the first bad field and its allowed values."""
  if config.model not in models.REGISTRY:
    raise ValueError(f"config.model must be one of {models.MODELS}, got {config.model!r}.")
  if config.dataset != "fashion_mnist":
    raise ValueError(f"config.dataset must be 'fashion_mnist' for float training, got "
                     f"{config.dataset!r}.")
  for name in ("batch_size", "epochs", "eval_batch_size"):
    _positive_int(name, config[name])
  _nonnegative_int("train_examples", config.train_examples, "the whole train split")
  _number("learning_rate", config.learning_rate, 0.0, lo_open=True)
  _number("weight_decay", config.weight_decay, 0.0)
  _number("warmup_epochs", config.warmup_epochs, 0.0)
  _number("label_smoothing", config.label_smoothing, 0.0, 1.0)
  models.check_width(config.model, config.width, "config.width")
  if config.get("optimizer", "adamw") not in float_training.OPTIMIZERS:
    raise ValueError(f"config.optimizer must be one of {float_training.OPTIMIZERS}, got "
                     f"{config.optimizer!r}.")
  if not config.output:
    raise ValueError("config.output is empty; set it to the checkpoint folder to write.")


def ensure_writable(workdir: str) -> None:
  """Creates ``workdir`` and checks that a file can be written there."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise OSError(f"workdir {workdir!r} cannot be written ({e.strerror or e}); "
                  "pass a writable --workdir.") from e


def only_settings(config: ml_collections.ConfigDict, names) -> None:
  """Keeps the settings of ``config`` named in ``names`` (a script's ``--only``),
  in config order; all when ``names`` is empty. An unknown name is an error."""
  if not names:
    return
  known = [s.name for s in config.settings]
  unknown = sorted(set(names) - set(known))
  if unknown:
    raise ValueError(f"--only: unknown settings {unknown}; the config has {known}.")
  config.settings = [s for s in config.settings if s.name in names]
