"""MNASNet 1.3/224, W8A8 per-channel asymmetric: paper top-1 75.72 (FP32 75.79; METHOD.md section 5 table).

Run (see configs/paper/README.md for the data and weight files):
  python -m experiments.main --config=configs/paper/mnasnet_130_224_per_channel_asym.py \
      --workdir=runs/paper/mnasnet_130_224_per_channel_asym \
      --config.data_dir=$TFDS_DATA_DIR --config.pretrained.path=weights/mnasnet_1.3_224
"""

from configs.paper import _base


def get_config(arg: str = ""):
  return _base.paper_config("mnasnet_1.3_224", per_channel=True, asymmetric=True,
                            paper_top1=75.72, arg=arg)
