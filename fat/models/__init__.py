"""Flax MobileNet-v2 and MNASNet-B1 with float, folded and quantized modes
(and a three-block MobileNet-v2, ``mobilenet_v2_tiny``, for smoke runs and tests).

``REGISTRY`` is the one table of models: name -> ``ModelEntry`` (constructor,
allowed widths, the pretrained formats of ``fat.models.pretrained`` that load
it). ``create``, the config checks and ``pretrained.load`` read it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn

from fat.models import mnasnet, mobilenet_v2, tiny
from fat.models.mnasnet import MNASNet
from fat.models.mobilenet_v2 import MobileNetV2

__all__ = ["MNASNet", "MobileNetV2", "MODELS", "ModelEntry", "PRETRAINED_FORMATS", "REGISTRY",
           "check_width", "create", "name_of"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelEntry:
  """One model of the table.

  constructor: builds the model from its keyword arguments (``model_kwargs``).
  widths: the allowed width multipliers, or
  width_range: the closed interval they lie in.
  pretrained: the ``fat.models.pretrained`` formats whose files load it.
  """

  constructor: Callable[..., nn.Module]
  widths: tuple[float, ...] = ()
  width_range: tuple[float, float] | None = None
  pretrained: tuple[str, ...] = ()

  def allows(self, width) -> bool:
    """Whether ``width`` is one of this model's width multipliers."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width):
      return False
    if self.width_range is not None:
      return self.width_range[0] <= width <= self.width_range[1]
    return width in self.widths

  def describe_widths(self) -> str:
    if self.width_range is not None:
      return f"in [{self.width_range[0]}, {self.width_range[1]}]"
    return f"one of {self.widths}"


REGISTRY: dict[str, ModelEntry] = {
    "mobilenet_v2": ModelEntry(constructor=MobileNetV2, width_range=mobilenet_v2.WIDTH_RANGE,
                               pretrained=("keras", "timm")),
    "mnasnet": ModelEntry(constructor=MNASNet, widths=mnasnet.WIDTHS,
                          pretrained=("timm", "tf_mnasnet")),
    # Three MobileNet-v2 blocks: smoke runs and tests (fat/models/tiny.py).
    "mobilenet_v2_tiny": ModelEntry(constructor=tiny.TinyMobileNetV2, widths=tiny.WIDTHS),
}
MODELS = tuple(REGISTRY)
# Every pretrained format some model loads, in table order.
PRETRAINED_FORMATS = tuple(dict.fromkeys(f for e in REGISTRY.values() for f in e.pretrained))


def _entry(name: str) -> ModelEntry:
  if name not in REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}.")
  return REGISTRY[name]


def create(name: str, **kwargs) -> nn.Module:
  """The model ``name`` of ``REGISTRY`` ("mobilenet_v2": ``MobileNetV2``,
  "mnasnet": ``MNASNet``) with keyword arguments ``kwargs``."""
  return _entry(name).constructor(**kwargs)


def check_width(name: str, width, what: str = "width") -> None:
  """Raises ValueError, naming ``what``, unless model ``name`` allows ``width``."""
  entry = _entry(name)
  if not entry.allows(width):
    raise ValueError(f"{what} must be {entry.describe_widths()} for {name}, got {width!r}.")


def name_of(model: nn.Module) -> str:
  """The ``REGISTRY`` name of a model instance."""
  for name, entry in REGISTRY.items():
    if type(model) is entry.constructor:  # pylint: disable=unidiomatic-typecheck
      return name
  raise ValueError(f"{type(model).__name__} is not in fat.models.REGISTRY.")
