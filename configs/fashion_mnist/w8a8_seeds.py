"""Every peer at W8A8 per channel, for its spread over seeds.

The peers harness (configs/fashion_mnist/peers.py: MobileNet-v2, 512
calibration images) at W8A8 per channel, where no method may be significantly
below float: PTQ min/max and MSE, FAT, AdaRound alone, ``fat_qdrop``, full QAT
and LSQ (at its shipped 1e-4 for 8-bit weights). The seed draws the unlabeled
and calibration images and every batch order.

Five seeds, about 54 minutes on the 2-core machine (the first, with
compilation, about 15 of them; ``--reuse`` reads the seeds already finished in
the workdir instead of running them again):
  python -m benchmarks.seed_spread --config=configs/fashion_mnist/w8a8_seeds.py \\
      --workdir=runs/w8a8_seeds --seeds=0,1,2,3,4 --reuse
One seed, k, as the spread runs it:
  python -m experiments.main --config=configs/fashion_mnist/w8a8_seeds.py \\
      --config.seed=k --workdir=runs/w8a8_seeds/seed_k
"""

from configs.fashion_mnist import peers

METHODS = ("ptq_minmax", "ptq_mse", "fat", "ptq_adaround", "fat_qdrop", "qat", "lsq")
SETTINGS = ("w8a8_per_channel",)


def get_config(arg: str = ""):
  return peers.subset(arg, METHODS, SETTINGS)
