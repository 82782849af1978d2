"""Flax MobileNet-v2 and MNASNet-B1 with float, folded and quantized modes."""

from fat.models.mnasnet import MNASNet
from fat.models.mobilenet_v2 import MobileNetV2

__all__ = ["MNASNet", "MobileNetV2"]
