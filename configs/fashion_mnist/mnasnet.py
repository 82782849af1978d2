"""FAT main job on MNASNet-B1 (the same settings as configs/default.py).

Run:
  python -m experiments.main --config=configs/fashion_mnist/mnasnet.py --workdir=runs/mnasnet
"""

from configs import default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.model_checkpoint = "checkpoints/fashion_mnist/mnasnet"
  return c
