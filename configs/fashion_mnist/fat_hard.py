"""FAT where post-training quantization loses accuracy (issue 21): W4A4 and W3A8
per-channel and W6A6 per-tensor on MobileNet-v2, or W8A8 per-tensor on MNASNet
with mutual rescaling (``:mnasnet``): the default recipe (config.fat) with
per-width learning rates and keep_best on 500 held-out unlabeled images.

Run:
  python -m experiments.main --config=configs/fashion_mnist/fat_hard.py --workdir=runs/fat_hard
  python -m experiments.main --config=configs/fashion_mnist/fat_hard.py:mnasnet \
      --workdir=runs/fat_hard_mnasnet
Curves (docs/convergence.md):
  python -m benchmarks.fat_convergence --config=configs/fashion_mnist/fat_hard.py \
      --workdir=runs/convergence --label=after
"""

from configs import default

ARGS = ("", "smoke", "mnasnet")


def get_config(arg: str = ""):
  if arg not in ARGS:
    raise ValueError(f"unknown config argument {arg!r}; valid: '' (MobileNet-v2), 'smoke' "
                     "(a tiny run) or 'mnasnet' (MNASNet W8A8 per-tensor, rescaled).")
  c = default.get_config("smoke" if arg == "smoke" else "")
  c.fat.lr_by_width = True
  if arg != "smoke":
    c.fat.holdout_images = 500
  if arg == "mnasnet":
    c.model_checkpoint = "checkpoints/fashion_mnist/mnasnet"
    c.equalize = True
    c.settings = [default.setting("w8a8_per_tensor", 8, 8, False)]
  else:
    c.settings = [default.setting("w4a4_per_channel", 4, 4, True),
                  default.setting("w3a8_per_channel", 3, 8, True),
                  default.setting("w6a6_per_tensor", 6, 6, False)]
  return c
