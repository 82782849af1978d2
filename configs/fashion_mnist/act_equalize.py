"""Rescaling that equalizes activations (``config.equalize_target =
"activations"``, fat/equalize.py) at W4A4 per channel: every channel of each
tensor read by a depthwise conv gets the same range, so the per-tensor 4-bit
activation grid there fits every channel. PTQ and FAT (docs/convergence.md).

Run (MobileNet-v2; ``:mnasnet`` for MNASNet-B1):
  python -m experiments.main --config=configs/fashion_mnist/act_equalize.py \\
      --workdir=runs/act_equalize
The same settings without rescaling, for the comparison:
  python -m experiments.main --config=configs/fashion_mnist/act_equalize.py \\
      --config.equalize=False --workdir=runs/act_equalize_off
Learned rounding on the rescaled network (``:rounding``: the peers harness's
PTQ min/max and MSE, AdaRound, FAT and ``fat_qdrop``; docs/peers.md has them
without rescaling):
  python -m experiments.main --config=configs/fashion_mnist/act_equalize.py:rounding \\
      --workdir=runs/act_equalize_rounding
"""

from configs import default
from configs.fashion_mnist import peers

ARGS = ("", "smoke", "mnasnet", "rounding")
ROUNDING_METHODS = ("ptq_minmax", "ptq_mse", "ptq_adaround", "fat", "fat_qdrop")


def get_config(arg: str = ""):
  if arg not in ARGS:
    raise ValueError(f"unknown config argument {arg!r}; valid: '' (MobileNet-v2), 'smoke' "
                     "(a tiny run), 'mnasnet' (MNASNet-B1) or 'rounding' (with learned "
                     "rounding).")
  if arg == "rounding":
    c = peers.subset("", ROUNDING_METHODS, ("w4a4_per_channel",))
  else:
    c = default.get_config("smoke" if arg == "smoke" else "")
  if arg == "mnasnet":
    c.model_checkpoint = "checkpoints/fashion_mnist/mnasnet"
  c.equalize = True
  c.equalize_target = "activations"
  if arg in ("", "mnasnet"):
    c.settings = [default.setting("w4a4_per_channel", 4, 4, True)]
  return c
