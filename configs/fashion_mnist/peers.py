"""The peers a quantization paper is judged against, in one harness, on MobileNet-v2.

PTQ min/max and MSE, AdaRound (learned rounding), FAT, FAT after AdaRound
(activation thresholds only, and every threshold), full QAT and LSQ, on one
float checkpoint with the same 512 calibration images, per-channel at W8A8,
W4A8, W4A4 and W3A8. QAT and LSQ train on 6,000
labeled train images (``train_fraction`` 0.1), as many as FAT's unlabeled
ones. Results: docs/peers.md.

Run:
  python -m experiments.main --config=configs/fashion_mnist/peers.py --workdir=runs/peers
MNASNet: add --config.model_checkpoint=checkpoints/fashion_mnist/mnasnet
"""

from configs import default

METHODS = ("ptq_minmax", "ptq_mse", "ptq_adaround", "fat", "fat_adaround", "fat_adaround_all",
           "qat", "lsq")


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.methods = METHODS
  c.settings = [default.setting("w8a8_per_channel", 8, 8, True),
                default.setting("w4a8_per_channel", 4, 8, True),
                default.setting("w4a4_per_channel", 4, 4, True),
                default.setting("w3a8_per_channel", 3, 8, True)]
  c.qat.train_fraction = 0.1
  c.lsq.train_fraction = 0.1
  if arg == "smoke":
    c.settings = [default.setting("w4a8_per_channel", 4, 8, True)]
    c.adaround.iterations = 5
    for block in (c.qat, c.lsq):
      block.train_fraction, block.batch_size = 0.004, 32
  return c


def subset(arg: str, methods, settings=()):
  """The peers job with only ``methods``, and only the settings named in
  ``settings`` (all when empty; the smoke run keeps its own)."""
  c = get_config(arg)
  c.methods = tuple(methods)
  if settings and arg != "smoke":
    c.settings = [s for s in c.settings if s.name in settings]
  return c
