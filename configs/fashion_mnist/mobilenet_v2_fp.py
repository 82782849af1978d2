"""Float MobileNet-v2 on Fashion-MNIST (SGD with Nesterov momentum): the checkpoint recipe.

Run:
  python -m experiments.main --config=configs/fashion_mnist/mobilenet_v2_fp.py \
      --workdir=runs/mobilenet_v2_fp
It writes the checkpoint to ``config.output`` (checkpoints/fashion_mnist/mobilenet_v2).
"""

import ml_collections

from configs import default


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  default.check_arg(arg)
  c = ml_collections.ConfigDict()
  c.job = "float"
  c.model = "mobilenet_v2"
  c.width = 1.0
  c.small_input = True   # stem stride 1: 28 px keeps a 2x2 map before the pool
  c.num_classes = 10
  c.dataset = "fashion_mnist"
  c.data_dir = ""
  c.seed = 0
  c.batch_size = 128
  c.epochs = 10
  c.optimizer = "sgd"    # Nesterov momentum 0.9, L2 weight decay; or "adamw"
  c.learning_rate = 0.05
  c.weight_decay = 5e-4
  c.warmup_epochs = 0.5
  c.label_smoothing = 0.0
  c.bn_momentum = 0.9    # BN running-average decay (flax convention); 0.9 keeps up with SGD
  c.augment = True
  c.eval_batch_size = 500
  c.train_examples = 0  # 0: the whole train split
  c.output = "checkpoints/fashion_mnist/mobilenet_v2"
  c.checkpoint_every = 200  # steps between step checkpoints (a killed job resumes from one)
  if arg == "smoke":
    c.epochs = 1
    c.train_examples = 256
    c.batch_size = 64
    c.width = 0.35
    c.output = "runs/smoke/mobilenet_v2_fp"
  return c
