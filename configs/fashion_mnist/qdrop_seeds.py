"""FAT and ``fat_qdrop`` at W3A8 per channel, for their spread over seeds.

The peers harness (configs/fashion_mnist/peers.py: MobileNet-v2, 512
calibration images) at W3A8 per channel, where ``fat_qdrop`` is closest to its
target (float − 0.5 pt), with PTQ min/max and MSE, FAT and ``fat_qdrop``. The
seed draws the unlabeled and calibration images and every batch order.

Five seeds, about 12 minutes each on the 2-core machine (``--reuse`` reads the
seeds already finished in the workdir instead of running them again):
  python -m benchmarks.seed_spread --config=configs/fashion_mnist/qdrop_seeds.py \\
      --workdir=runs/qdrop_seeds --seeds=0,1,2,3,4 --reuse
One seed, k, as the spread runs it:
  python -m experiments.main --config=configs/fashion_mnist/qdrop_seeds.py \\
      --config.seed=k --workdir=runs/qdrop_seeds/seed_k
"""

from configs.fashion_mnist import peers

METHODS = ("ptq_minmax", "ptq_mse", "fat", "fat_qdrop")
SETTINGS = ("w3a8_per_channel",)


def get_config(arg: str = ""):
  return peers.subset(arg, METHODS, SETTINGS)
