"""Session-wide test settings, applied before any test module imports a library;
the helpers and fixtures that several test files share.

Tiers: ``pytest -m "not slow"`` is the fast tier; the slow tier (``@pytest.mark.slow``)
runs jobs end to end. ``pytest tests`` runs both.
"""

import contextlib
import json
import os
import subprocess
import sys

import pytest

# Keras picks its backend once, at its first import; the importer tests need JAX.
# TensorFlow-based test modules collected earlier could otherwise import Keras
# with its TensorFlow default first.
os.environ.setdefault("KERAS_BACKEND", "jax")
# A persistent JAX compilation cache shared by both test workers and every
# subprocess a test starts (they inherit the environment): a program compiled
# once is read back elsewhere instead of compiled again.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Most of the suite's time is XLA compiling programs it runs a few times on tiny
# inputs. JAX's switch for that case turns off XLA's backend (LLVM) optimizations
# and keeps its HLO passes: the same programs, compiled faster to slower code
# (float rounding may differ, as it does across CPUs). Subprocesses inherit it;
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite fully optimized.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The test workers (pytest-xdist starts them after this file is imported) and the
# entry points a test starts run with transparent huge pages for XLA:CPU's per-call
# buffers, as the entry points do on their own (experiments/huge_pages.py); with
# the tunable already set, those entry points do not start themselves again.
from experiments import huge_pages  # noqa: E402
if huge_pages.wanted(os.environ):
  os.environ.update(huge_pages.with_tunable(os.environ))

import jax  # noqa: E402  (after the environment above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


# --------------------------------------------------------------------------
# Scheduling: the two xdist workers take whole files (--dist loadfile) in
# collection order (--no-loadscope-reorder); the longest files go first so that
# no long file starts last. Seconds per file (setup, call and teardown summed),
# whole suite on an empty compilation cache, 2026-12-03.
# --------------------------------------------------------------------------

LONGEST_FIRST = (
    "test_main_smoke.py",   # 200 s: the smoke job, kill-and-resume, export
    "test_adaround.py",     # 150 s: reconstruction on tiny_net, its ONNX benchmark
    "test_export.py",       # 115 s
    "test_models.py",       # 100 s
    "test_paper.py",        # 95 s: a paper row end to end
    "test_float_job.py",    # 75 s
    "test_equalize.py",     # 70 s
    "test_steps.py",        # 60 s
    "test_readme.py",       # 45 s
    "test_ladder.py",       # 45 s
    "test_quant.py",        # 45 s
    "test_qlinear.py",      # 45 s
    "test_depthwise.py",    # 30 s
    "test_benchmarks.py",   # 25 s: every entry point's --help and flag checks
    "test_parallel.py",     # 25 s
)


def pytest_collection_modifyitems(items):
  """Files in ``LONGEST_FIRST`` order, then the rest as collected; a file's
  tests stay together and in their order."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  key = lambda pair: (rank.get(os.path.basename(str(pair[1].path)), len(rank)), pair[0])
  items[:] = [item for _, item in sorted(enumerate(items), key=key)]


# --------------------------------------------------------------------------
# Subprocesses: the entry points as a user runs them.
# --------------------------------------------------------------------------


def run_module(module, *args, env=None, timeout=600):
  """``python -m module args`` from the repo root on the CPU."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def run_parallel(commands, env=None, timeout=600):
  """Runs each ``[module, *args]`` as ``python -m module args`` would, all at the
  same time; returns their ``CompletedProcess`` results in order. Each runs in a
  fork of one process that has imported JAX, Flax and optax once
  (``tests/forked_modules.py``): entry points define absl flags at import, so
  each needs a process of its own, but not its own imports."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "forked_modules.py")],
                     input=json.dumps([list(cmd) for cmd in commands]), cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]
  return [subprocess.CompletedProcess([sys.executable, "-m", *cmd], out["returncode"],
                                      out["stdout"], out["stderr"])
          for cmd, out in zip(commands, json.loads(r.stdout))]


def run_main(*args, env=None, timeout=300):
  """``python -m experiments.main args``."""
  return run_module("experiments.main", *args, env=env, timeout=timeout)


# --------------------------------------------------------------------------
# The end-to-end fixtures: a tiny float checkpoint and one smoke run of the
# main job, both once per test process (the files that use them are slow).
# --------------------------------------------------------------------------

# The smoke run: configs/default.py:smoke on the tiny float checkpoint.
# SMOKE_FLAGS says the same on a command line (the cross-process determinism
# test reruns it). It leaves out the full-QAT baseline, whose whole-network
# compile per setting would double the run: the QAT step trains in
# tests/test_steps.py, and tests/test_methods.py checks what the QAT method
# hands the training loop, which the main job drives as it drives FAT.


TINY_MODEL = "mobilenet_v2_tiny"


def smoke_config(ckpt):
  from configs import default
  config = default.get_config("smoke")
  config.model_checkpoint = ckpt
  return config


def smoke_flags(ckpt):
  return ["--config=configs/default.py:smoke", f"--config.model_checkpoint={ckpt}"]


@pytest.fixture(scope="session")
def float_ckpt(tmp_path_factory):
  """A float ``mobilenet_v2_tiny`` (three MobileNet-v2 blocks, fat/models/tiny.py)
  trained for a few steps by the float job's smoke config: every stage of the
  main job runs on it at a tenth of the whole network's compile time (the
  whole networks are compiled by the model, export and paper-row tests)."""
  from configs.fashion_mnist import mobilenet_v2_fp
  from experiments.train_float import train_float
  root = tmp_path_factory.mktemp("float")
  config = mobilenet_v2_fp.get_config("smoke")
  config.model, config.width = TINY_MODEL, 1.0
  config.output = str(root / "ckpt")
  meta = train_float(config, str(root / "work"))
  assert meta["model"] == TINY_MODEL and meta["epochs"] == 1
  return config.output


@contextlib.contextmanager
def xla_optimized():
  """XLA's full optimizations, in this process and in the subprocesses it starts,
  for the tests that run many real steps: there they pay for their compile time
  (the suite's default turns them off, at the top of this file)."""
  env = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"]
  flag = jax.config.values["jax_disable_most_optimizations"]
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = env
    jax.config.update("jax_disable_most_optimizations", flag)


@pytest.fixture
def optimized():
  """``xla_optimized`` around one test."""
  with xla_optimized():
    yield


@pytest.fixture(scope="session")
def smoke_run(float_ckpt, tmp_path_factory):
  """(workdir, report) of one in-process smoke run of the main job, compiled with
  XLA's full optimizations (as the kill-and-resume run it is compared with)."""
  from experiments.train import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp("main"))
  with xla_optimized():
    report = train_and_evaluate(smoke_config(float_ckpt), workdir)
  with open(os.path.join(workdir, "report.json")) as f:
    assert json.load(f)["settings"][0]["name"] == report["settings"][0]["name"]
  return workdir, report


# --------------------------------------------------------------------------
# A three-block network from the library's blocks: what the MobileNet-v2 tests
# check about steps, loops and parallelism, at a tenth of its compile time.
# --------------------------------------------------------------------------


def tiny_net(num_classes=10, **kwargs):
  """``fat.models.tiny`` ("mobilenet_v2_tiny"): stem -> block_0 (no expansion) ->
  block_1 (stride 2) -> block_2 (residual, ``add_q``) -> head -> classifier,
  with MobileNet-v2's layer names; stem stride 1 unless ``small_input=False``."""
  from fat.models.tiny import TinyMobileNetV2  # pylint: disable=import-outside-toplevel
  return TinyMobileNetV2(num_classes=num_classes, **{"small_input": True, **kwargs})


def tiny_prepared(weight, act, images=16):
  """``(Prepared, x)``: tiny_net with BN statistics from ``images`` random
  16x16 images, folded, quantized by ``uniform_rules(weight=, act=)`` and
  calibrated on the same images."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from fat import pipeline, rules  # pylint: disable=import-outside-toplevel
  model = tiny_net()
  x = jax.random.normal(jax.random.PRNGKey(1), (images, 16, 16, 1))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  train_apply = jax.jit(functools.partial(model.clone(bn_momentum=0.0).apply, train=True,
                                          mutable=["batch_stats"]))
  _, upd = train_apply(variables, x)
  r = rules.uniform_rules(weight=weight, act=act)
  return pipeline.prepare(model, {"params": variables["params"], **upd}, r, x,
                          batch_size=len(x)), x


@pytest.fixture
def tiny_ckpt(tmp_path, monkeypatch):
  """A float tiny_net checkpoint (random weights), and ``models.create``
  building tiny_net whatever the name."""
  from fat import checkpoints, models  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(models, "create", lambda name, **kwargs: tiny_net(**kwargs))
  model = tiny_net()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))
  path = str(tmp_path / "ckpt")
  checkpoints.save(path, variables, {"model": "tiny_net",
                                     "model_kwargs": {"num_classes": 10, "width": 1.0}})
  return path


def random_variables(model, x, seed=0):
  """``model``'s float variables for inputs like ``x``, drawn in numpy from its
  shapes: He-normal kernels, biases ~ N(0, 0.2), BN scale in [0.5, 1.5], BN mean
  0 and variance 1. (``jax.jit(model.init)`` compiles a random draw per tensor:
  13-20 s for a whole network here.)"""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])

  def draw(path, s):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, s.shape)
    elif name == "bias":
      value = rng.normal(0.0, 0.2, s.shape)
    elif name in ("mean", "var"):
      value = np.zeros(s.shape) if name == "mean" else np.ones(s.shape)
    else:
      raise AssertionError(f"unexpected variable {jax.tree_util.keystr(path)}")
    return value.astype(s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def assert_integer_layers_match(nodes, acts, x, min_equal=0.999):
  """Each integer op of ``fat.integer``, given the simulation's integer inputs,
  reproduces the simulation's grid indices: within one step everywhere and at
  least ``min_equal`` of them exactly."""
  from fat import integer  # pylint: disable=import-outside-toplevel
  equal = total = 0
  for name, d in integer.layer_differences(nodes, acts, x).items():
    assert d.max() <= 1, name
    equal += int((d == 0).sum())
    total += d.size
  assert equal / total >= min_equal, equal / total


# --------------------------------------------------------------------------
# Independent references of the quantizer (METHOD.md section 1), shared by
# the quantizer, layer and step tests.
# --------------------------------------------------------------------------

KINDS = ("symmetric", "unsigned", "asymmetric")
TINY = 1e-12


def qrange(kind, bits):
  if kind == "symmetric":
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


def bshape(p, ndim, spec, xp=np):
  """Per-channel parameter (C,) -> broadcastable against an ndim input."""
  p = xp.asarray(p)
  if not spec.per_channel:
    return p
  shape = [1] * ndim
  shape[spec.axis % ndim] = -1
  return p.reshape(shape)


def np_params(x, spec):
  """float64 calibration thresholds (t_min, t_max)."""
  x = np.asarray(x, np.float64)
  axes = tuple(a for a in range(x.ndim)
               if not (spec.per_channel and a == spec.axis % x.ndim))
  if spec.kind == "symmetric":
    t_max = np.abs(x).max(axis=axes)
    return -t_max, t_max
  if spec.kind == "unsigned":
    t_max = np.maximum(x.max(axis=axes), 0.0)
    return np.zeros_like(t_max), t_max
  return np.minimum(x.min(axis=axes), 0.0), np.maximum(x.max(axis=axes), 0.0)


def np_grid(spec, ndim, t_min, t_max, alpha, beta):
  """float64 scale s and zero point z, broadcastable against the input."""
  b = lambda p: bshape(np.asarray(p, np.float64), ndim, spec)
  qmin, qmax = qrange(spec.kind, spec.bits)
  a = np.clip(b(alpha), *spec.alpha_range)
  if spec.kind == "asymmetric":
    r = b(t_max) - b(t_min)
    s = qmax / np.maximum(a * r, TINY)
    z = np.round((b(t_min) + np.clip(b(beta), *spec.beta_range) * r) * s)
  else:
    s = qmax / np.maximum(a * b(t_max), TINY)
    z = np.zeros_like(s)
  return s, z


def np_fake_quant(x, spec, t_min, t_max, alpha, beta):
  """float64 integer-grid forward; returns (y, q, s, z)."""
  x = np.asarray(x, np.float64)
  qmin, qmax = qrange(spec.kind, spec.bits)
  s, z = np_grid(spec, x.ndim, t_min, t_max, alpha, beta)
  q = np.clip(np.round(x * s) - z, qmin, qmax)
  return (q + z) / s, q, s, z


def near_tie(u, tol=1e-4):
  """Where float32 and float64 may legitimately round u differently."""
  return np.abs(np.abs(u - np.floor(u)) - 0.5) < tol


def ambiguous(x, spec, t_min, t_max, alpha, beta):
  """Elements whose round(x*s) or channel's round(T_l*s) is a near-tie."""
  x = np.asarray(x, np.float64)
  s, z = np_grid(spec, x.ndim, t_min, t_max, alpha, beta)
  amb = near_tie(x * s)
  if spec.kind == "asymmetric":
    b = lambda p: bshape(np.asarray(p, np.float64), x.ndim, spec)
    r = b(t_max) - b(t_min)
    t_low = b(t_min) + np.clip(b(beta), *spec.beta_range) * r
    amb = amb | near_tie(t_low * s)
  return np.broadcast_to(amb, x.shape)


def ste_round(u):
  return u + jax.lax.stop_gradient(jnp.round(u) - u)


def ste_clip(v, lo, hi):
  return jnp.where((v >= lo) & (v <= hi), v,
                   jax.lax.stop_gradient(jnp.clip(v, lo, hi)))


def ste_fake_quant(x, alpha, beta, t_min, t_max, spec):
  """jnp forward whose autodiff is the STE gradient of METHOD.md."""
  b = lambda p: bshape(jnp.asarray(p, jnp.float32), x.ndim, spec, jnp)
  qmin, qmax = qrange(spec.kind, spec.bits)
  a = ste_clip(b(alpha), *spec.alpha_range)
  if spec.kind == "asymmetric":
    r = b(t_max) - b(t_min)
    s = qmax / jnp.maximum(a * r, TINY)
    z = ste_round((b(t_min) + ste_clip(b(beta), *spec.beta_range) * r) * s)
  else:
    s = qmax / jnp.maximum(a * b(t_max), TINY)
    z = 0.0
  v = ste_round(x * s) - z
  return (ste_clip(v, qmin, qmax) + z) / s


# --------------------------------------------------------------------------
# A fake ImageNet image folder.
# --------------------------------------------------------------------------

CLASSES = ("n01440764", "n01443537", "n01484850")
SIZES = ((40, 60), (64, 48), (33, 33), (50, 70))


def write_image_folder(root, split_dirs=("train", "validation"), per_class=2, seed=0):
  """root/<split>/<class>/<k>.JPEG with random content and sizes."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  for split in split_dirs:
    for c, cls in enumerate(CLASSES):
      os.makedirs(os.path.join(root, split, cls))
      for k in range(per_class):
        h, w = SIZES[(c + k) % len(SIZES)]
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        tf.io.write_file(os.path.join(root, split, cls, f"{k}.JPEG"), tf.io.encode_jpeg(img))
  return str(root)
