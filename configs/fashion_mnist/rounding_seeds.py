"""Learned rounding at W4A8 and W4A4 per channel, for its spread over seeds.

The peers harness (configs/fashion_mnist/peers.py: MobileNet-v2, 512
calibration images) with PTQ min/max and MSE (the starts), FAT (every report
compares with it), AdaRound alone and ``fat_qdrop``: the methods of the
learned-rounding targets at W4A8 (AdaRound's share of the min/max-to-float
gap; FAT with learned rounding ≥ float − 0.2) and W4A4. The seed draws the
unlabeled and calibration images and every batch order.

One setting over five seeds, about 57 minutes on the 2-core machine (the first
seed, with compilation, takes about 20 of them; ``--reuse`` reads the seeds
already finished in the workdir instead of running them again):
  python -m benchmarks.seed_spread --config=configs/fashion_mnist/rounding_seeds.py \\
      --workdir=runs/rounding_seeds_w4a8 --seeds=0,1,2,3,4 --only=w4a8_per_channel --reuse
W4A4: ``--only=w4a4_per_channel`` and its own workdir. Both settings, one seed k:
  python -m experiments.main --config=configs/fashion_mnist/rounding_seeds.py \\
      --config.seed=k --workdir=runs/rounding_seeds/seed_k
"""

from configs.fashion_mnist import peers

METHODS = ("ptq_minmax", "ptq_mse", "fat", "ptq_adaround", "fat_qdrop")
SETTINGS = ("w4a8_per_channel", "w4a4_per_channel")


def get_config(arg: str = ""):
  return peers.subset(arg, METHODS, SETTINGS)
