"""Bad input to the float-training job (experiments/train_float.py): refused up
front, or, for a diverging run, no checkpoint and no outputs."""

import os

import pytest

from configs.fashion_mnist import mobilenet_v2_fp
from experiments.train_float import train_float
from conftest import run_main

pytestmark = pytest.mark.slow  # subprocesses and whole-network training


def test_unknown_model_exits_2_with_message(tmp_path):
  r = run_main("--config=configs/fashion_mnist/mobilenet_v2_fp.py:smoke",
               f"--workdir={tmp_path / 'w'}", "--config.model=resnet")
  assert r.returncode == 2 and "config.model must be one of" in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_diverging_run_saves_nothing(tmp_path):
  config = mobilenet_v2_fp.get_config("smoke")
  config.learning_rate = 1e12
  config.output = str(tmp_path / "ckpt")
  with pytest.raises(FloatingPointError, match="float training diverged .*lower "
                                               "config.learning_rate"):
    train_float(config, str(tmp_path / "w"))
  assert not os.path.exists(config.output) and not os.listdir(tmp_path / "w")


def test_more_train_examples_than_images_is_named(tmp_path):
  config = mobilenet_v2_fp.get_config("smoke")
  config.train_examples = 70000
  with pytest.raises(ValueError, match="config.train_examples is 70000, more than the 60000"):
    train_float(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
