"""FAT with QDrop's recipe (``fat_qdrop``) and LSQ at a lower learning rate, in the peers harness.

The peers job (configs/fashion_mnist/peers.py: MobileNet-v2, 512 calibration
images, per channel at W8A8, W4A8, W4A4 and W3A8) with five of its methods:
PTQ min/max and MSE, FAT, ``fat_qdrop`` (AdaRound with the activation
thresholds trained jointly, block by block, on QDrop's inputs), and LSQ at
learning rate 1e-4 in every setting (the shipped rates: 1e-4 at 8-bit weights,
1e-3 below). Results: docs/peers.md.

Run:
  python -m experiments.main --config=configs/fashion_mnist/peers_qdrop.py \
      --workdir=runs/peers_qdrop
  python -m benchmarks.peers --workdir=runs/peers_qdrop
"""

from configs.fashion_mnist import peers

METHODS = ("ptq_minmax", "ptq_mse", "fat", "fat_qdrop", "lsq")


def get_config(arg: str = ""):
  c = peers.subset(arg, METHODS)
  c.lsq.learning_rate, c.lsq.lr_by_bits = 1e-4, ()  # 1e-4 in every setting
  return c
