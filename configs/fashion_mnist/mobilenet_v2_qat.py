"""Full-QAT baseline beside FAT on MobileNet-v2, W8A8 per-channel.

QAT trains weights and thresholds with labels and cross-entropy, starting from
the same folded, min/max-calibrated model as the PTQ baselines.

Run:
  python -m experiments.main --config=configs/fashion_mnist/mobilenet_v2_qat.py --workdir=runs/mnv2_qat
"""

from configs import default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.settings = [default.setting("w8a8_per_channel", 8, 8, True)]
  c.methods += ("qat",)
  if arg == "smoke":
    c.qat.train_fraction = 0.004
    c.qat.batch_size = 32
  return c
