"""Flax MobileNet-v2 and MNASNet-B1 with float, folded and quantized modes."""

from fat.models.mnasnet import MNASNet
from fat.models.mobilenet_v2 import MobileNetV2

__all__ = ["MNASNet", "MobileNetV2", "MODELS", "create"]

MODELS = ("mobilenet_v2", "mnasnet")


def create(name: str, **kwargs):
  """``MobileNetV2`` for "mobilenet_v2", ``MNASNet`` for "mnasnet"."""
  if name == "mobilenet_v2":
    return MobileNetV2(**kwargs)
  if name == "mnasnet":
    return MNASNet(**kwargs)
  raise ValueError(f"unknown model {name!r}; choose one of {MODELS}.")
