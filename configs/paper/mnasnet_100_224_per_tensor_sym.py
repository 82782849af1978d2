"""MNASNet 1.0/224, W8A8 per-tensor symmetric: paper top-1 72.42 (FP32 74.34; METHOD.md section 5 table).

Run (see configs/paper/README.md for the data and weight files):
  python -m experiments.main --config=configs/paper/mnasnet_100_224_per_tensor_sym.py \
      --workdir=runs/paper/mnasnet_100_224_per_tensor_sym \
      --config.data_dir=$TFDS_DATA_DIR --config.pretrained.path=weights/mnasnet_1.0_224
"""

from configs.paper import _base


def get_config(arg: str = ""):
  return _base.paper_config("mnasnet_1.0_224", per_channel=False, asymmetric=False,
                            paper_top1=72.42, arg=arg)
