"""MobileNet-v2 (Sandler et al. 2018), as in ``keras.applications.MobileNetV2``.

Layer paths: ``input_q``, ``stem``, ``block_0`` .. ``block_16`` (each with
``expand`` (not ``block_0``), ``dw``, ``project`` and, on residual blocks,
``add_q``), ``head``,
``pool_q``, ``classifier``, ``logits_q``.
"""

from __future__ import annotations

import flax.linen as nn

from fat.layers import ActQuant
from fat.models.blocks import ConvBNAct, InvertedResidual, Network, classifier_head

# (expansion t, channels c, repeats n, first stride s)
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
WIDTH_RANGE = (0.35, 1.4)


def make_divisible(v: float, divisor: int = 8) -> int:
  """Rounds a channel count to a multiple of ``divisor``, never below 90% of ``v``."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class MobileNetV2(Network):
  """MobileNet-v2 classifier.

  Attributes: those of ``fat.models.blocks.Network`` and ``Common``; width is
  the multiplier in 0.35..1.4 (the 1280 head is not shrunk below 1.0), and the
  defaults are Keras's: padding "same", bn_eps 1e-3.
  """

  @nn.compact
  def __call__(self, x, train: bool = False):
    if not WIDTH_RANGE[0] <= self.width <= WIDTH_RANGE[1]:
      raise ValueError(f"MobileNetV2 width must be in {WIDTH_RANGE}, got {self.width}.")
    common = self.common()
    x, step = ActQuant(self.mode, signed=True, trainable=False, name="input_q")(x)
    x, step = ConvBNAct(make_divisible(32 * self.width), 3, 1 if self.small_input else 2,
                        name="stem", **common)(x, train, step)
    i = 0
    for t, c, n, s in STAGES:
      features = make_divisible(int(c * self.width))
      for r in range(n):
        x, step = InvertedResidual(features, t, 3, s if r == 0 else 1, act="relu6",
                                   name=f"block_{i}", **common)(x, train, step)
        i += 1
    head = make_divisible(1280 * self.width) if self.width > 1.0 else 1280
    x, _ = ConvBNAct(head, name="head", **common)(x, train, step)
    return classifier_head(x, self.num_classes, self.mode)
