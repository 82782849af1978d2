"""The trained peers (full QAT and LSQ) below 8 bits, for their spread over seeds.

The peers harness (configs/fashion_mnist/peers.py: MobileNet-v2, 512
calibration images) at W4A4, W3A8 and W4A8 per channel with PTQ min/max and MSE,
FAT (every report compares with it), full QAT and LSQ (at its shipped 1e-3
below 8-bit weights). The seed draws the unlabeled, labeled and calibration
images and every batch order.

One setting over five seeds, about 18 minutes on the 2-core machine (``--reuse``
reads the seeds already finished in the workdir instead of running them again):
  python -m benchmarks.seed_spread --config=configs/fashion_mnist/trained_seeds.py \\
      --workdir=runs/trained_seeds_w4a4 --seeds=0,1,2,3,4 --only=w4a4_per_channel --reuse
W3A8 and W4A8: ``--only=w3a8_per_channel`` or ``--only=w4a8_per_channel`` and
a workdir of its own. Every setting, one seed k:
  python -m experiments.main --config=configs/fashion_mnist/trained_seeds.py \\
      --config.seed=k --workdir=runs/trained_seeds/seed_k
"""

from configs.fashion_mnist import peers

METHODS = ("ptq_minmax", "ptq_mse", "fat", "qat", "lsq")
SETTINGS = ("w4a4_per_channel", "w3a8_per_channel", "w4a8_per_channel")


def get_config(arg: str = ""):
  return peers.subset(arg, METHODS, SETTINGS)
