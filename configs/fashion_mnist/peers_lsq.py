"""LSQ at its per-width learning rates (``config.lsq.lr_by_bits``), in the peers harness.

The peers job (configs/fashion_mnist/peers.py: MobileNet-v2, 512 calibration
images, per channel) at W8A8, the one setting whose LSQ rate the shipped
``lr_by_bits`` changes (1e-4; its other settings train at 1e-3, as the peers
job ran them), with the methods every report needs (PTQ min/max, FAT), PTQ MSE
(LSQ's start) and LSQ. ``--join`` adds the other methods of the peers and
``fat_qdrop`` jobs, tested image by image against these. Results:
docs/peers.md.

Run:
  python -m experiments.main --config=configs/fashion_mnist/peers_lsq.py \\
      --workdir=runs/peers_lsq
  python -m benchmarks.peers --workdir=runs/peers_lsq --join=runs/peers,runs/peers_qdrop
"""

from configs.fashion_mnist import peers

METHODS = ("ptq_minmax", "ptq_mse", "fat", "lsq")
SETTINGS = ("w8a8_per_channel",)


def get_config(arg: str = ""):
  return peers.subset(arg, METHODS, SETTINGS)
