"""Float MNASNet-B1 on Fashion-MNIST: the checkpoint recipe (MobileNet-v2's SGD recipe).

Run:
  python -m experiments.main --config=configs/fashion_mnist/mnasnet_fp.py \
      --workdir=runs/mnasnet_fp
It writes the checkpoint to ``config.output`` (checkpoints/fashion_mnist/mnasnet).
"""

from configs.fashion_mnist import mobilenet_v2_fp


def get_config(arg: str = ""):
  c = mobilenet_v2_fp.get_config(arg)
  c.model = "mnasnet"
  c.output = "checkpoints/fashion_mnist/mnasnet"
  if arg == "smoke":
    c.width = 0.5
    c.output = "runs/smoke/mnasnet_fp"
  return c
