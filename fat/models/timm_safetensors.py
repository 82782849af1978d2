"""Importer for timm ``mobilenetv2_100`` / ``mnasnet_100`` safetensors (PyTorch layout).

The matching of tensors to our variables is ``fat.models.importers.assign``.
"""

from __future__ import annotations

from collections.abc import Mapping

from fat.models import mnasnet, mobilenet_v2
from fat.models.importers import (TORCH_BN, TORCH_BN_EPS, TORCH_CONV, Entry, Tensors, assign,
                                  conv_units, float_model, unit_entries, variable_template)
from fat.models.mnasnet import MNASNet
from fat.models.mobilenet_v2 import MobileNetV2

# timm block attribute names: inverted residual, and the depthwise-separable first block.
TIMM_IR = {"expand": ("conv_pw", "bn1"), "dw": ("conv_dw", "bn2"), "project": ("conv_pwl", "bn3")}
TIMM_DS = {"dw": ("conv_dw", "bn1"), "project": ("conv_pw", "bn2"),
           "sep_dw": ("conv_dw", "bn1"), "sep_project": ("conv_pw", "bn2")}
# arch -> (model class, width, index of the timm stage holding our block_0).
TIMM_ARCHS = {"mobilenetv2_100": (MobileNetV2, 1.0, 0), "mnasnet_100": (MNASNet, 1.0, 1)}


def timm_block_stages(arch: str) -> list[tuple[int, int]]:
  """timm's (stage, index) of each of our ``block_i``."""
  _, _, first = TIMM_ARCHS[arch]
  stages = mobilenet_v2.STAGES if first == 0 else mnasnet.STAGES
  repeats = [stage[-2] for stage in stages]
  return [(first + s, r) for s, n in enumerate(repeats) for r in range(n)]


def timm_layer_names(unit: tuple[str, ...], blocks: list[tuple[int, int]]) -> tuple[str, str]:
  """Our conv unit -> timm's (conv, BN) module names."""
  if unit == ("stem",):
    return "conv_stem", "bn1"
  if unit == ("head",):
    return "conv_head", "bn2"
  if len(unit) == 1:  # MNASNet's sep_dw / sep_project: timm's blocks.0.0
    conv, bn = TIMM_DS[unit[0]]
    return f"blocks.0.0.{conv}", f"blocks.0.0.{bn}"
  block, part = unit
  stage, index = blocks[int(block.removeprefix("block_"))]
  conv, bn = (TIMM_DS if stage == 0 else TIMM_IR)[part]
  return f"blocks.{stage}.{index}.{conv}", f"blocks.{stage}.{index}.{bn}"


def timm_entries(arch: str, template: Mapping) -> list[Entry]:
  blocks = timm_block_stages(arch)
  entries = []
  for unit in conv_units(template["params"]):
    conv, bn = timm_layer_names(unit, blocks)
    entries += unit_entries(unit, f"{conv}.weight", TORCH_CONV, bn, TORCH_BN, ".")
  entries += [Entry("classifier.weight", ("params", "classifier", "kernel"), (1, 0)),
              Entry("classifier.bias", ("params", "classifier", "bias"))]
  return entries


def import_timm(tensors: Tensors, arch: str, what: str | None = None, **model_kwargs):
  """(model, variables) from a timm state dict as numpy arrays; see ``load_timm_safetensors``."""
  if arch not in TIMM_ARCHS:
    raise ValueError(f"timm arch must be one of {sorted(TIMM_ARCHS)}, got {arch!r}.")
  what = what or f"timm {arch}"
  if "classifier.weight" not in tensors:
    raise ValueError(f"{what} has no classifier ('classifier.weight'); only full "
                     "classifiers can be imported.")
  cls, width, _ = TIMM_ARCHS[arch]
  num_classes = tensors["classifier.weight"].shape[0]
  model = float_model(cls, num_classes=num_classes, width=width, padding="symmetric",
                      bn_eps=TORCH_BN_EPS, **model_kwargs)
  template = variable_template(cls, num_classes, width)
  return model, assign(tensors, timm_entries(arch, template), template, what,
                       lambda name: name.endswith("num_batches_tracked"))


def load_timm_safetensors(path, arch: str, **model_kwargs):
  """Our model and its variables from a timm ``mobilenetv2_100``/``mnasnet_100`` safetensors.

  PyTorch conventions: symmetric padding, BN epsilon 1e-5. The class count
  comes from ``classifier.weight``; ``num_batches_tracked`` is ignored.
  ``model_kwargs`` go to the model. Inputs are NHWC, normalized as timm's
  data config says (the caller's job).

  Returns:
    (model, {"params": ..., "batch_stats": ...}).
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return import_timm(load_file(str(path)), arch, what=f"timm {arch} file {path}",
                     **model_kwargs)


__all__ = ["TIMM_ARCHS", "import_timm", "load_timm_safetensors"]
