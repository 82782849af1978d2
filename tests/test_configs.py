"""Every config loads, passes validation and names a known model (configs/paper: test_paper.py);
a bad --config flag gets one error line."""

import glob
import importlib
import os
import re

import ml_collections
import pytest

from experiments import config_checks
from fat import models
from conftest import run_parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, REPO)[:-3].replace("/", ".")
                 for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
                 if not os.path.basename(p).startswith("_")
                 and os.sep + "paper" + os.sep not in p)


def _args(name: str) -> tuple[str, ...]:
  """The config arguments ``name`` declares in ``ARGS`` ("" and "smoke" where none)."""
  return getattr(importlib.import_module(name), "ARGS", ("", "smoke"))


@pytest.mark.parametrize("name, arg", [(n, a) for n in CONFIGS for a in _args(n)])
def test_config_is_valid(name, arg):
  module = importlib.import_module(name)
  assert "python -m experiments.main --config=" in module.__doc__
  config = module.get_config(arg)
  if config.job == "fat":
    config_checks.validate(config)
  else:
    config_checks.validate_float(config)
    assert config.model in models.MODELS
    assert config.output.startswith("runs/smoke/" if arg else "checkpoints/")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_rejects_an_unknown_argument(name):
  """A typo after ':' (--config=configs/default.py:smok) would otherwise run the full job."""
  with pytest.raises(ValueError, match="unknown config argument 'smok'; valid: '' .* 'smoke'"):
    importlib.import_module(name).get_config("smok")


# (entry point, flags, what its one error line says, and what else it holds). The
# first five are caught while absl parses the flags (lr_sweep's default config is
# parsed when its flag is defined, at import); the last in main, by the config checks.
SMOKE = "--config=configs/default.py:smoke"
BAD_FLAGS = [
    ("experiments.main", (SMOKE, "--config.nonexistent=1"),
     "--config.nonexistent: config has no field 'nonexistent'; valid fields: ",
     "calibration_images, checkpoint_every, "),
    ("experiments.main", (SMOKE, "--config.fat.learnig_rate=0.1"),
     "--config.fat.learnig_rate: config.fat has no field 'learnig_rate' (did you mean "
     "'learning_rate'?); valid fields: ", "alpha_range, batch_size, beta_range, epochs, "),
    ("experiments.main", (SMOKE, "--config.settings[5].weight_bits=4"),
     "--config.settings[5].weight_bits: config.settings has 2 items: index 5 is out of range",
     "valid indices: 0 to 1"),
    ("experiments.main", ("--config=configs/default.py:smok",),
     "--config=configs/default.py:smok: unknown config argument 'smok'", "or 'smoke'"),
    ("benchmarks.lr_sweep", ("--config.fat.learnig_rate=0.1",),
     "--config.fat.learnig_rate: config.fat has no field 'learnig_rate'", "learning_rate, "),
    ("experiments.main", (SMOKE, "--config.percentile=150"),
     "config.percentile must be in (50, 100]", ""),
]


@pytest.mark.slow
def test_bad_flags_get_one_error_line(tmp_path):
  """Exit status 2, the message once (on one ``error:`` line), no traceback, no INFO
  log lines, and no workdir. The commands run in parallel."""
  runs = run_parallel([(module, *flags, f"--workdir={tmp_path / str(i)}")
                       for i, (module, flags, _, _) in enumerate(BAD_FLAGS)])
  for i, (r, (module, flags, message, also)) in enumerate(zip(runs, BAD_FLAGS)):
    err = r.stderr
    case = (module, flags, err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, case
    assert errors[0].startswith(f"error: {message}") and also in errors[0], case
    assert err.count(message) == 1 and "Traceback" not in err, case
    assert not re.search(r"^I\d{4} ", err, re.M), case  # INFO lines stay off the console
    assert not (tmp_path / str(i)).exists(), case


def test_validation_rejects_unsigned_weights():
  from configs import default
  c = default.get_config()
  c.settings[0].weight_kind = "unsigned"
  with pytest.raises(ValueError, match="weight_kind cannot be 'unsigned'"):
    config_checks.validate(c)


def test_validation_rejects_duplicate_setting_names():
  from configs import default
  c = default.get_config()
  c.settings[1].name = c.settings[0].name
  with pytest.raises(ValueError, match="names must be unique"):
    config_checks.validate(c)


def test_validation_rejects_negative_select_every():
  """(A value of the wrong type is refused by ml_collections on assignment.)"""
  from configs import default
  c = default.get_config()
  c.fat.select_every = -1
  with pytest.raises(ValueError, match="config.fat.select_every must be an integer >= 0"):
    config_checks.validate(c)


def test_validation_rejects_bad_patience():
  from configs import default
  c = default.get_config()
  c.fat.patience = -1
  with pytest.raises(ValueError, match="config.fat.patience must be an integer >= 0"):
    config_checks.validate(c)
  c.fat.patience, c.fat.keep_best = 2, False
  with pytest.raises(ValueError, match="config.fat.patience needs config.fat.keep_best=True"):
    config_checks.validate(c)


@pytest.mark.parametrize("field, value, message", [
    ("percentile", 150.0, "config.percentile must be in (50, 100]"),
    ("fat.lr_decay", -5.0, "config.fat.lr_decay must be >= 0"),
    ("qat.train_fraction", 0.0, "config.qat.train_fraction must be in (0, 1]"),
])
def test_validation_names_the_bad_field(field, value, message):
  from configs.fashion_mnist import mobilenet_v2_qat
  c = mobilenet_v2_qat.get_config()  # QAT enabled: its fields are checked
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_checks.validate(c)


def test_validation_rejects_non_bool_projection():
  from configs import default
  c = default.get_config()
  # A config file that sets the field to 1 (assignment would keep the bool type).
  c.fat = ml_collections.ConfigDict({**c.fat.to_dict(), "project_thresholds": 1})
  with pytest.raises(ValueError, match="config.fat.project_thresholds must be True or False"):
    config_checks.validate(c)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "config.batch_size must be a positive integer"),
    ("epochs", 0, "config.epochs must be a positive integer"),
    ("train_examples", -1, "config.train_examples must be an integer >= 0"),
    ("learning_rate", float("nan"), "config.learning_rate must be a number in (0.0, inf)"),
    ("label_smoothing", 1.5, "config.label_smoothing must be a number in [0.0, 1.0]"),
    ("optimizer", "lamb", "config.optimizer must be one of"),
    ("model", "resnet", "config.model must be one of"),
    ("output", "", "config.output is empty"),
])
def test_float_validation_names_the_bad_field(field, value, message):
  from configs.fashion_mnist import mobilenet_v2_fp
  c = mobilenet_v2_fp.get_config("smoke")
  c[field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_checks.validate_float(c)
