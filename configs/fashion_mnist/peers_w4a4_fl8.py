"""W4A4 per channel with the first and last layers at 8 bits, in the peers harness.

The convention of the learned-rounding literature's W4A4 rows (BRECQ, QDrop,
MQBench): the first and last layers stay at 8 bits. Here that is the stem's and
the classifier's weights (``first_last_bits``) and the tensors they read and
write: the network input (``input_q``), the pooled features (``pool_q``) and the
logits (``logits_q``). Every other weight and activation is 4-bit. PTQ min/max
and MSE, AdaRound, FAT and ``fat_qdrop`` on MobileNet-v2 with the peers job's
512 calibration images (configs/fashion_mnist/peers.py). Results:
docs/peers.md, section "W4A4 with 8-bit first and last layers".

Run (about 15 minutes on the 2-core machine):
  python -m experiments.main --config=configs/fashion_mnist/peers_w4a4_fl8.py \\
      --workdir=runs/peers_w4a4_fl8
"""

from configs import default
from configs.fashion_mnist import peers

METHODS = ("ptq_minmax", "ptq_mse", "ptq_adaround", "fat", "fat_qdrop")
# The activations the first and last layers read and write.
ENDS = (("^input_q$", 0, 8), ("^pool_q$", 0, 8), ("^logits_q$", 0, 8))


def get_config(arg: str = ""):
  c = peers.subset(arg, METHODS)
  w4a4 = default.setting("w4a4_per_channel_fl8", 4, 4, True, first_last_bits=8)
  w4a4.overrides = ENDS
  c.settings = [w4a4]
  return c
