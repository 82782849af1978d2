"""Paper configs, the TF MNASNet checkpoint importer, and one paper row end to end on fake data."""

import functools
import glob
import importlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs.paper import _base
from experiments import config_checks
from experiments.train import train_and_evaluate
from fat import calibrate, models, pipeline
from fat.models import pretrained, tf_mnasnet
from conftest import CLASSES, write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs/paper/*.py"))
               if not os.path.basename(p).startswith("_"))

# tensorflow/tpu mnasnet_models.py, mnasnet_b1: the reference block list.
TF_B1_BLOCKS = ("r1_k3_s11_e1_i32_o16_noskip", "r3_k3_s22_e3_i16_o24", "r3_k5_s22_e3_i24_o40",
                "r3_k5_s22_e6_i40_o80", "r2_k3_s11_e6_i80_o96", "r4_k5_s22_e6_i96_o192",
                "r1_k3_s11_e6_i192_o320_noskip")


def round_filters(f, mult):
  """tensorflow/tpu's round_filters (depth divisor 8)."""
  new = max(8, int(f * mult + 4) // 8 * 8)
  return new + 8 if new < 0.9 * f * mult else new


def tf_mnasnet_tensors(width, classes, *, prefix="mnasnet-b1", mnas=True,
                       bn="batch_normalization", seed=0):
  """Names and shapes of a tensorflow/tpu MNASNet-B1 checkpoint, written out independently."""
  rng = np.random.default_rng(seed)
  stem, blocks, head = ("mnas_stem", "mnas_blocks_", "mnas_head") if mnas else \
      ("stem", "blocks_", "head")
  t = {}

  def conv(scope, name, shape):
    t[f"{prefix}/{scope}/{name}"] = rng.normal(0, 0.3, shape).astype(np.float32)

  def norm(scope, k, c):
    s = f"{prefix}/{scope}/{bn if k == 0 else f'{bn}_{k}'}"
    t[f"{s}/gamma"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    t[f"{s}/beta"] = rng.normal(0, 0.1, c).astype(np.float32)
    t[f"{s}/moving_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    t[f"{s}/moving_variance"] = rng.uniform(0.5, 2, c).astype(np.float32)

  c0 = round_filters(32, width)
  conv(stem, "conv2d/kernel", (3, 3, 3, c0))
  norm(stem, 0, c0)
  idx = 0
  for spec in TF_B1_BLOCKS:
    r, k, _, e, i, o = (int(re.search(rf"{key}(\d+)", spec).group(1))
                        for key in ("r", "_k", "_s", "_e", "_i", "_o"))
    for rep in range(r):
      scope, cin = f"{blocks}{idx}", round_filters(i if rep == 0 else o, width)
      n = 0
      if e != 1:
        conv(scope, "conv2d/kernel", (1, 1, cin, cin * e))
        norm(scope, 0, cin * e)
        n = 1
      conv(scope, "depthwise_conv2d/depthwise_kernel", (k, k, cin * e, 1))
      norm(scope, n, cin * e)
      conv(scope, "conv2d_1/kernel" if e != 1 else "conv2d/kernel",
           (1, 1, cin * e, round_filters(o, width)))
      norm(scope, n + 1, round_filters(o, width))
      idx += 1
  conv(head, "conv2d/kernel", (1, 1, round_filters(320, width), 1280))
  norm(head, 0, 1280)
  t[f"{prefix}/{head}/dense/kernel"] = rng.normal(0, 0.05, (1280, classes)).astype(np.float32)
  t[f"{prefix}/{head}/dense/bias"] = rng.normal(0, 0.1, classes).astype(np.float32)
  return t


def save_tf_checkpoint(prefix, tensors):
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tensors[n] for n in names])
  return prefix


# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _float_shapes(model_name, width, size, eps):
  """(model, its variables' shapes): several paper rows share a network."""
  model = models.create(model_name, num_classes=1000, width=width, padding="same", bn_eps=eps)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return model, jax.eval_shape(lambda v: model.init(jax.random.PRNGKey(0), v), x)


# The fast tier builds every setting kind on MobileNet-v2 and one config per
# other network shape; the slow tier builds the rest (each build traces a
# whole network at 224 px).
PAPER_FAST = {"mnv2_100_224_per_tensor_sym", "mnv2_100_224_per_tensor_asym",
              "mnv2_100_224_per_channel_sym", "mnv2_100_224_per_channel_asym",
              "mnasnet_100_224_per_channel_asym", "released_mnasnet_050_224",
              "released_mnasnet_100_128"}


@pytest.mark.parametrize("name", [n if n in PAPER_FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PAPER])
def test_paper_config_loads_and_builds(name):
  module = importlib.import_module(f"configs.paper.{name}")
  assert f"--config=configs/paper/{name}.py" in module.__doc__
  assert re.search(r"paper top-1 \d+(\.\d+)?", module.__doc__)
  for arg in ("smoke", ""):
    config = module.get_config(arg)
    config_checks.validate(config)
    assert f"paper top-1 {config.paper.top1_pct}" in module.__doc__
  net = config.paper.net
  model_name = "mobilenet_v2" if net.startswith("mobilenet_v2") else "mnasnet"
  width, size = float(net.split("_")[-2]), int(net.split("_")[-1])
  fmt = _base.NETS[net][0]
  eps = 1e-3  # both Keras and TF sources
  model, variables = _float_shapes(model_name, width, size, eps)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  qmodel = calibrate.quantized(model, pipeline.config_rules(config.settings[0], config.fat))
  out = jax.eval_shape(lambda v: qmodel.init(jax.random.PRNGKey(0), v), x)
  assert out["params"].keys() == variables["params"].keys()
  assert fmt in pretrained.FORMATS
  assert config.image_size == size and config.preprocess == _base.NETS[net][2]


def test_paper_configs_cover_the_tables():
  assert len(PAPER) == 17 and PAPER_FAST <= set(PAPER)
  tops = {importlib.import_module(f"configs.paper.{n}").get_config().paper.top1_pct for n in PAPER}
  assert {8.1, 19.86, 71.11, 71.39, 72.42, 73.46, 73.96, 74.25, 74.92, 75.30, 75.56, 75.72,
          66.6, 70.11, 66.76, 72.45, 74.74} == tops


@pytest.mark.parametrize("mnas,bn", [(True, "batch_normalization"),
                                     (False, "tpu_batch_normalization")])
def test_tf_mnasnet_importer_maps_every_tensor(tmp_path, mnas, bn):
  tensors = tf_mnasnet_tensors(0.5, 7, mnas=mnas, bn=bn)
  ema = {n + "/ExponentialMovingAverage": v + 1.0 for n, v in tensors.items()
         if n.endswith("/dense/bias")}
  slots = {"global_step": np.int64(5), f"{next(iter(tensors))}/RMSProp": np.ones(1, np.float32)}
  path = save_tf_checkpoint(str(tmp_path / "model.ckpt"), {**tensors, **ema, **slots})
  name, kwargs, variables = pretrained.load("tf_mnasnet", str(tmp_path))  # the folder works too
  assert name == "mnasnet" and kwargs["width"] == 0.5 and kwargs["num_classes"] == 7
  assert kwargs["padding"] == "same" and kwargs["bn_eps"] == 1e-3
  p, s = variables["params"], variables["batch_stats"]
  stem, blocks, head = ("mnas_stem", "mnas_blocks_", "mnas_head") if mnas else \
      ("stem", "blocks_", "head")
  pre = "mnasnet-b1/"
  np.testing.assert_array_equal(p["stem"]["conv"]["kernel"], tensors[f"{pre}{stem}/conv2d/kernel"])
  np.testing.assert_array_equal(  # TF blocks_4 is our block_3; its depthwise (k, k, C, 1)
      p["block_3"]["dw"]["conv"]["kernel"],
      tensors[f"{pre}{blocks}4/depthwise_conv2d/depthwise_kernel"].transpose(0, 1, 3, 2))
  np.testing.assert_array_equal(p["block_3"]["project"]["bn"]["scale"],
                                tensors[f"{pre}{blocks}4/{bn}_2/gamma"])
  np.testing.assert_array_equal(s["sep_project"]["bn"]["var"],
                                tensors[f"{pre}{blocks}0/{bn}_1/moving_variance"])
  np.testing.assert_array_equal(p["classifier"]["bias"],  # the EMA shadow wins
                                tensors[f"{pre}{head}/dense/bias"] + 1.0)
  model = models.create(name, **kwargs)
  logits = jax.jit(model.apply)(variables, jnp.ones((1, 32, 32, 3)))
  assert logits.shape == (1, 7) and bool(jnp.all(jnp.isfinite(logits)))
  del path


def test_tf_mnasnet_importer_names_missing_tensors(tmp_path):
  tensors = tf_mnasnet_tensors(1.0, 10)
  gone = "mnasnet-b1/mnas_blocks_7/batch_normalization_1/moving_mean"
  del tensors[gone]
  tensors["mnasnet-b1/mnas_blocks_7/extra/kernel"] = np.zeros(3, np.float32)
  save_tf_checkpoint(str(tmp_path / "model.ckpt"), tensors)
  with pytest.raises(ValueError) as e:
    pretrained.load("tf_mnasnet", str(tmp_path / "model.ckpt"))
  assert gone in str(e.value) and "missing (1)" in str(e.value)
  assert "mnas_blocks_7/extra/kernel" in str(e.value)


def test_tf_mnasnet_drops_the_background_class():
  tensors = tf_mnasnet_tensors(0.5, 1001)
  _, variables = tf_mnasnet.import_tf_mnasnet(tensors)
  np.testing.assert_array_equal(variables["params"]["classifier"]["bias"],
                                tensors["mnasnet-b1/mnas_head/dense/bias"][1:])


def test_missing_pretrained_file_is_explained(tmp_path):
  with pytest.raises(Exception, match="pretrained tf_mnasnet weights not found"):
    pretrained.load("tf_mnasnet", str(tmp_path / "absent"))
  with pytest.raises(ValueError, match="config.pretrained.format"):
    pretrained.load("onnx", "x")


@pytest.mark.slow
def test_paper_row_runs_end_to_end_on_fake_imagenet(tmp_path):
  """configs/paper/released_mnasnet_050_224.py, smoke: 64 px, 2 FAT steps, fake data."""
  root = write_image_folder(tmp_path / "imagenet", per_class=2)  # 6 train, 6 validation
  ckpt = save_tf_checkpoint(str(tmp_path / "model.ckpt"),
                            tf_mnasnet_tensors(0.5, len(CLASSES)))
  from configs.paper import released_mnasnet_050_224 as cfg
  config = cfg.get_config("smoke")
  config.dataset = "imagenet_folder"
  config.data_dir = root
  config.pretrained.path = ckpt
  config.fat.train_fraction = 4 / 6   # 4 unlabeled images, batch 2: 2 steps
  workdir = str(tmp_path / "run")
  out = train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "report.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(out))
  assert saved["model"] == "mnasnet" and saved["dataset"] == "imagenet_folder"
  assert saved["eval_examples"] == 6 and saved["paper"]["top1_pct"] == 66.6
  (s,) = saved["settings"]
  assert s["name"] == "w8a8_per_tensor_sym" and not s["per_channel"]
  fat = s["methods"]["fat"]
  assert fat["steps"] == 2 and fat["train_images"] == 4 and fat["epochs"] == 1
  for m in s["methods"].values():
    assert 0.0 <= m["top1_pct"] <= 100.0 and 0.0 <= m["agreement_pct"] <= 100.0
  assert os.path.isdir(os.path.join(workdir, "checkpoints", s["name"]))
