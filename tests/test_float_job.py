"""Bad input to the float-training job (experiments/train_float.py): refused up
front, or, for a diverging run, no checkpoint and no outputs."""

import os

import pytest

from configs.fashion_mnist import mobilenet_v2_fp
from experiments.train_float import train_float
from conftest import TINY_MODEL, run_main

pytestmark = pytest.mark.slow  # subprocesses and whole-network training


def test_unknown_model_exits_2_with_message(tmp_path):
  r = run_main("--config=configs/fashion_mnist/mobilenet_v2_fp.py:smoke",
               f"--workdir={tmp_path / 'w'}", "--config.model=resnet")
  assert r.returncode == 2 and "config.model must be one of" in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def tiny_config():
  """The float job's smoke config on ``mobilenet_v2_tiny``: what these tests check
  does not depend on the network, and it compiles ten times faster."""
  config = mobilenet_v2_fp.get_config("smoke")
  config.model, config.width = TINY_MODEL, 1.0
  return config


def test_diverging_run_saves_nothing(tmp_path):
  config = tiny_config()
  config.learning_rate = 1e12
  config.output = str(tmp_path / "ckpt")
  with pytest.raises(FloatingPointError, match="float training diverged .*lower "
                                               "config.learning_rate"):
    train_float(config, str(tmp_path / "w"))
  assert not os.path.exists(config.output) and not (tmp_path / "w").exists()  # as it was


def test_more_train_examples_than_images_is_named(tmp_path):
  config = mobilenet_v2_fp.get_config("smoke")
  config.train_examples = 70000
  with pytest.raises(ValueError, match="config.train_examples is 70000, more than the 60000"):
    train_float(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


# The two resume checks run tens of real steps: compiled fully optimized
# (``conftest.optimized``), they take about a quarter less CPU time.
def test_a_killed_float_job_resumes_to_the_same_weights(tmp_path, optimized):
  """Interrupted (Ctrl-C) after its step checkpoint at step 2 of 4, the float job
  started again resumes there and saves the weights of an uninterrupted run."""
  import jax
  import numpy as np
  from fat import checkpoints, float_training

  def config(name):
    c = tiny_config()
    c.checkpoint_every = 2
    c.output = str(tmp_path / name / "ckpt")
    return c
  full = config("full")
  train_float(full, str(tmp_path / "full" / "w"))
  original, calls = float_training.make_train_step, []

  def make_step(*args, **kwargs):
    step = original(*args, **kwargs)
    def counted(*a):
      calls.append(1)
      if len(calls) == 3:  # step 3, after the checkpoint at step 2
        raise KeyboardInterrupt
      return step(*a)
    return counted
  cut = config("cut")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(float_training, "make_train_step", make_step)
    with pytest.raises(KeyboardInterrupt):
      train_float(cut, str(tmp_path / "cut" / "w"))
  assert not os.path.exists(cut.output)
  meta = train_float(cut, str(tmp_path / "cut" / "w"))
  a, _ = checkpoints.load(full.output)
  b, _ = checkpoints.load(cut.output)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert meta["top1_pct"] == checkpoints.load_meta(full.output)["top1_pct"]


def test_ctrl_c_during_a_compile_exits_130_and_the_job_resumes(tmp_path, optimized):
  """SIGINT while the first train steps compile or run: one line, exit status 130,
  no crash; the stage stays for the same command, which then finishes. The child
  gets the default SIGINT handling (a test worker may ignore SIGINT, and a child
  inherits that), and 3,200 examples (50 steps, 7 s on the 2-core machine) keep the
  job running past the signal when a warm compilation cache makes the compile quick."""
  import signal
  import subprocess
  import sys
  import time
  from conftest import REPO
  args = ["--config=configs/fashion_mnist/mobilenet_v2_fp.py:smoke", f"--workdir={tmp_path / 'w'}",
          f"--config.output={tmp_path / 'ckpt'}", f"--config.model={TINY_MODEL}",
          "--config.width=1.0", "--config.train_examples=3200"]
  proc = subprocess.Popen([sys.executable, "-m", "experiments.main", *args], cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          # A test worker may ignore SIGINT, and a child inherits that.
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  started = tmp_path / "w" / ".partial" / "resume.json"
  deadline = time.time() + 300
  while not started.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(1.0)  # model init and the first step's compile
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, (proc.returncode, err[-3000:])
  assert "interrupted; run the same command to resume" in err and "Traceback" not in err, err
  assert started.exists() and not (tmp_path / "ckpt").exists()
  r = run_main(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.isfile(tmp_path / "ckpt" / "meta.json") and not started.exists()
