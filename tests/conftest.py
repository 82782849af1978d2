"""Session-wide test settings, applied before any test module imports a library,
and the tiny float checkpoint the main-job test files share."""

import os

import pytest

# Keras picks its backend once, at its first import; the importer tests need JAX.
# TensorFlow-based test modules collected earlier could otherwise import Keras
# with its TensorFlow default first.
os.environ.setdefault("KERAS_BACKEND", "jax")


@pytest.fixture(scope="session")
def float_ckpt(tmp_path_factory):
  """A tiny float MobileNet-v2 trained for a few steps by the float job's smoke config
  (once per test process)."""
  from configs.fashion_mnist import mobilenet_v2_fp
  from experiments.train_float import train_float
  root = tmp_path_factory.mktemp("float")
  config = mobilenet_v2_fp.get_config("smoke")
  config.output = str(root / "ckpt")
  meta = train_float(config, str(root / "work"))
  assert meta["model_kwargs"]["width"] == 0.35
  assert 0.0 <= meta["top1_pct"] <= 100.0
  return config.output
