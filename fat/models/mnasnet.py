"""MNASNet-B1 (Tan et al. 2019, no squeeze-excitation), as torchvision's ``mnasnet1_0``.

Layer paths: ``input_q``, ``stem``, ``sep_dw``, ``sep_project``, ``block_0`` ..
``block_15`` (``expand``, ``dw``, ``project`` and, on residual blocks, ``add_q``),
``head``,
``pool_q``, ``classifier``, ``logits_q``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from fat.layers import ActQuant
from fat.models.blocks import ConvBNAct, InvertedResidual, Network, classifier_head

# (expansion, kernel, channels, repeats, first stride)
STAGES = ((3, 3, 24, 3, 2), (3, 5, 40, 3, 2), (6, 5, 80, 3, 2), (6, 3, 96, 2, 1),
          (6, 5, 192, 4, 2), (6, 3, 320, 1, 1))
WIDTHS = (0.5, 0.75, 1.0, 1.3)


def round_to_multiple_of(v: float, divisor: int = 8, round_up_bias: float = 0.9) -> int:
  """torchvision's MNASNet channel rounding."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v if new_v >= round_up_bias * v else new_v + divisor


class MNASNet(Network):
  """MNASNet-B1 classifier. Attributes as ``MobileNetV2``; width in {0.5, 0.75, 1.0, 1.3},
  and PyTorch's defaults: padding "symmetric", bn_eps 1e-5."""

  padding: str = dataclasses.field(default="symmetric", kw_only=True)
  bn_eps: float = dataclasses.field(default=1e-5, kw_only=True)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.width not in WIDTHS:
      raise ValueError(f"MNASNet width must be one of {WIDTHS}, got {self.width}.")
    common = self.common()
    ch = lambda c: round_to_multiple_of(c * self.width)
    x, step = ActQuant(self.mode, signed=True, trainable=False, name="input_q")(x)
    x, step = ConvBNAct(ch(32), 3, 1 if self.small_input else 2, act="relu", name="stem",
                        **common)(x, train, step)
    x, step = ConvBNAct(ch(32), 3, 1, depthwise=True, act="relu", name="sep_dw",
                        **common)(x, train, step)
    x, step = ConvBNAct(ch(16), act=None, name="sep_project", **common)(x, train, step)
    i = 0
    for e, k, c, n, s in STAGES:
      for r in range(n):
        x, step = InvertedResidual(ch(c), e, k, s if r == 0 else 1, act="relu",
                                   name=f"block_{i}", **common)(x, train, step)
        i += 1
    x, _ = ConvBNAct(1280, act="relu", name="head", **common)(x, train, step)
    return classifier_head(x, self.num_classes, self.mode)
