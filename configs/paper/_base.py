"""Shared recipe of the paper configs (METHOD.md sections 3 and 5); not a config itself.

Every paper config is one network x one quantization setting on ImageNet
(TFDS ``imagenet2012``), starting from a pretrained float file the user
downloaded (configs/paper/README.md). Paths are set on the command line:
``--config.data_dir`` (TFDS data dir) and ``--config.pretrained.path``.

``arg="smoke"`` shrinks everything for a quick run on small or fake data:
64 px, a handful of eval and calibration images, one FAT epoch at batch 2 (on a
4-image train split, as in tests/test_paper.py, two steps).

Run one paper config (each file's docstring has its own command), e.g.:
  python -m experiments.main --config=configs/paper/mnasnet_100_224_per_channel_sym.py \
      --workdir=runs/paper/mnasnet_100_224_per_channel_sym \
      --config.data_dir=$TFDS_DATA_DIR --config.pretrained.path=weights/mnasnet_1.0_224
"""

import ml_collections

from configs import default

# net -> (pretrained format, default weights path, preprocessing, image size)
NETS = {
    "mobilenet_v2_1.0_224": ("keras", "weights/mobilenet_v2_weights_tf_dim_ordering_tf_"
                             "kernels_1.0_224.h5", "keras", 224),
    "mnasnet_0.5_224": ("tf_mnasnet", "weights/mnasnet_0.5_224", "tf_mnasnet", 224),
    "mnasnet_0.75_224": ("tf_mnasnet", "weights/mnasnet_0.75_224", "tf_mnasnet", 224),
    "mnasnet_1.0_128": ("tf_mnasnet", "weights/mnasnet_1.0_128", "tf_mnasnet", 128),
    "mnasnet_1.0_224": ("tf_mnasnet", "weights/mnasnet_1.0_224", "tf_mnasnet", 224),
    "mnasnet_1.3_224": ("tf_mnasnet", "weights/mnasnet_1.3_224", "tf_mnasnet", 224),
}


def paper_config(net: str, *, per_channel: bool, asymmetric: bool, paper_top1: float,
                 arg: str = "") -> ml_collections.ConfigDict:
  """W8A8 on ``net``: per-tensor or per-channel weights, symmetric or asymmetric quantizers."""
  if arg not in ("", "smoke"):
    raise ValueError(f"paper configs take '' or 'smoke', got {arg!r}.")
  fmt, path, preprocess, size = NETS[net]
  kind = "asymmetric" if asymmetric else "symmetric"
  name = f"w8a8_{'per_channel' if per_channel else 'per_tensor'}_{'asym' if asymmetric else 'sym'}"
  c = default.get_config()
  c.model_checkpoint = ""
  c.pretrained = ml_collections.ConfigDict(dict(format=fmt, path=path, arch=""))
  c.dataset = "imagenet2012"
  c.preprocess = preprocess
  c.image_size = size
  c.paper = ml_collections.ConfigDict(dict(net=net, top1_pct=paper_top1))
  c.settings = [default.setting(name, 8, 8, per_channel, weight_kind=kind, act_kind=kind)]
  c.eval_batch_size = 250
  c.calibration_images = 1000
  c.calibration_batch_size = 100
  c.fat.train_fraction = 0.1   # about 128k unlabeled train images
  c.fat.batch_size = 100
  c.fat.epochs = 6             # 5-8 in the paper
  c.fat.learning_rate = 1e-3
  c.fat.select_every = 0       # keep_best scores at epoch ends: 512 images at 224 px
  c.fat.patience = 0           # the paper trains every epoch
  c.log_every = 100
  if arg == "smoke":
    c.image_size = 64
    c.eval_examples = 8
    c.eval_batch_size = 4
    c.calibration_images = 4
    c.calibration_batch_size = 2
    c.methods = ("ptq_minmax", "fat")
    c.fat.train_fraction = 1.0
    c.fat.batch_size = 2
    c.fat.epochs = 1
    c.fat.holdout_images = 0   # a few images: keep-best scores the calibration ones
    c.log_every = 1
  return c
