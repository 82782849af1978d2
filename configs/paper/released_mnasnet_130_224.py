"""Released MNASNet 1.3/224 8-bit model: paper top-1 74.74 (METHOD.md section 5, released models).

W8A8 per-tensor symmetric: our reading of the released models' setting, the
table entry closest to them (MNASNet 1.0/224: 72.45 released, 72.42 in the table).

Run (see configs/paper/README.md for the data and weight files):
  python -m experiments.main --config=configs/paper/released_mnasnet_130_224.py \
      --workdir=runs/paper/released_mnasnet_130_224 \
      --config.data_dir=$TFDS_DATA_DIR --config.pretrained.path=weights/mnasnet_1.3_224
"""

from configs.paper import _base


def get_config(arg: str = ""):
  return _base.paper_config("mnasnet_1.3_224", per_channel=False, asymmetric=False,
                            paper_top1=74.74, arg=arg)
