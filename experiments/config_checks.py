"""Up-front checks of a main-job config and workdir, before anything is written."""

from __future__ import annotations

import os
import tempfile

import ml_collections

from fat import (checks, data, equalize, float_training, imagenet, methods, models, pipeline,
                 quant)


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
               "log_every", "image_size", "checkpoint_every"):
    checks.positive_int(name, config[name])
  if isinstance(config.eval_examples, bool) or config.eval_examples < 0:
    raise ValueError(f"config.eval_examples must be >= 0 (0: all), got {config.eval_examples}.")
  for name in ("equalize", "bias_correction", "mse_shift"):
    checks.boolean(name, config.get(name, False))
  target = config.get("equalize_target", "weights")
  if target not in equalize.TARGETS:
    raise ValueError(f"config.equalize_target must be one of {equalize.TARGETS}, got "
                     f"{target!r}.")
  fat = config.fat
  checks.fraction("fat.train_fraction", fat.train_fraction)
  methods.validate(config)
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
    if s.get("overrides"):  # per-layer widths (fat.pipeline.Setting.overrides)
      try:
        pipeline.config_rules(s, fat)
      except (ValueError, TypeError) as e:
        raise ValueError(f"config.settings[{s.name!r}].overrides: {e}") from e


def validate_float(config: ml_collections.ConfigDict) -> None:
  """The float-training job's config (config.job == "float"); raises ValueError
  naming the first bad field and its allowed values."""
  if config.model not in models.REGISTRY:
    raise ValueError(f"config.model must be one of {models.MODELS}, got {config.model!r}.")
  if config.dataset != "fashion_mnist":
    raise ValueError(f"config.dataset must be 'fashion_mnist' for float training, got "
                     f"{config.dataset!r}.")
  for name in ("batch_size", "epochs", "eval_batch_size", "checkpoint_every"):
    checks.positive_int(name, config[name])
  checks.nonnegative_int("train_examples", config.train_examples, "the whole train split")
  checks.number("learning_rate", config.learning_rate, 0.0, lo_open=True)
  checks.number("weight_decay", config.weight_decay, 0.0)
  checks.number("warmup_epochs", config.warmup_epochs, 0.0)
  checks.number("label_smoothing", config.label_smoothing, 0.0, 1.0)
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
