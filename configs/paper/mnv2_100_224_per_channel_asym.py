"""MobileNet-v2 1.0/224, W8A8 per-channel asymmetric: paper top-1 71.39 (FP32 71.55; METHOD.md section 5 table).

Run (see configs/paper/README.md for the data and weight files):
  python -m experiments.main --config=configs/paper/mnv2_100_224_per_channel_asym.py \
      --workdir=runs/paper/mnv2_100_224_per_channel_asym \
      --config.data_dir=$TFDS_DATA_DIR --config.pretrained.path=weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5
"""

from configs.paper import _base


def get_config(arg: str = ""):
  return _base.paper_config("mobilenet_v2_1.0_224", per_channel=True, asymmetric=True,
                            paper_top1=71.39, arg=arg)
