"""A three-block MobileNet-v2 for smoke runs and tests ("mobilenet_v2_tiny").

stem -> block_0 (no expansion) -> block_1 (stride 2) -> block_2 (residual,
``add_q``) -> head -> classifier, with MobileNet-v2's layer names and blocks
(BatchNorm, depthwise, a residual add, ReLU6). It exercises every part of the
pipeline (folding, calibration, FAT, export, the integer reference) and
compiles in about a tenth of the whole network's time; its accuracy means
nothing.
"""

from __future__ import annotations

import flax.linen as nn

from fat.layers import ActQuant
from fat.models.blocks import ConvBNAct, InvertedResidual, Network, classifier_head

WIDTHS = (1.0,)


class TinyMobileNetV2(Network):
  """Three MobileNet-v2 blocks at fixed widths 8-16-16, a 32-channel head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.width not in WIDTHS:
      raise ValueError(f"TinyMobileNetV2 width must be one of {WIDTHS}, got {self.width}.")
    c = self.common()
    x, step = ActQuant(self.mode, signed=True, trainable=False, name="input_q")(x)
    x, step = ConvBNAct(8, 3, 1 if self.small_input else 2, name="stem", **c)(x, train, step)
    x, step = InvertedResidual(8, 1, name="block_0", residual=False, **c)(x, train, step)
    x, step = InvertedResidual(16, 6, strides=2, name="block_1", **c)(x, train, step)
    x, step = InvertedResidual(16, 6, name="block_2", **c)(x, train, step)
    x, _ = ConvBNAct(32, name="head", **c)(x, train, step)
    return classifier_head(x, self.num_classes, self.mode)
