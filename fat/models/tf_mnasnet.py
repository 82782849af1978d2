"""Importer for the TF-hosted MNASNet checkpoints (tensorflow/tpu ``mnasnet_model.py``).

The paper's MNASNet models (``mnasnet_{0.5,0.75,1.0,1.3}_224``,
``mnasnet_1.0_128``) are TF checkpoints of tensorflow/tpu's MNASNet-B1, whose
variables are named by scope and creation order:

  <model>/<stem>/conv2d/kernel, <model>/<stem>/<bn>/{gamma,beta,moving_mean,moving_variance}
  <model>/<blocks_i>/conv2d[_k]/kernel, <model>/<blocks_i>/depthwise_conv2d/depthwise_kernel,
  <model>/<blocks_i>/<bn>[_k]/..., <model>/<head>/conv2d/kernel, <model>/<head>/dense/{kernel,bias}

with ``<stem>``/``<blocks_i>``/``<head>`` spelled ``stem``/``blocks_i``/``head``
or ``mnas_stem``/``mnas_blocks_i``/``mnas_head`` (both versions of that code),
``<bn>`` = ``batch_normalization`` or ``tpu_batch_normalization``, and
``<model>`` any single prefix (``mnasnet-b1``, ...). TF's ``blocks_0`` is our
``sep_dw`` + ``sep_project``; TF's ``blocks_{i+1}`` is our ``block_i``.
Where a variable has an ``/ExponentialMovingAverage`` shadow, the shadow is
read (as the TF evaluation does); optimizer slots and ``global_step`` are
ignored. The model gets TF "same" padding and BN epsilon 1e-3. The layout of
the released files was not available to check against; an import that does
not match names every missing and unexpected tensor.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from fat.models import mnasnet
from fat.models.importers import (KERAS_BN, KERAS_BN_EPS, KERAS_DEPTHWISE, Entry, Tensors,
                                  assign, conv_units, float_model, unit_entries,
                                  variable_template)
from fat.models.mnasnet import MNASNet

EMA = "/ExponentialMovingAverage"
IGNORED = re.compile(r"(^|/)(global_step|RMSProp(_\d+)?|Momentum|Adam(_\d+)?|"
                     r"beta[12]_power)($|/)")
SCOPES = (("stem", "head", "blocks_"), ("mnas_stem", "mnas_head", "mnas_blocks_"))


def read_tf_checkpoint(path) -> dict[str, np.ndarray]:
  """Every tensor of a TF checkpoint (prefix or folder), read with ``tf.train.load_checkpoint``."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  path = str(path)
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, "checkpoint")):
    indices = sorted(glob.glob(os.path.join(glob.escape(path), "*.index")))
    if len(indices) == 1:  # a folder holding one checkpoint but no "checkpoint" file
      path = indices[0][:-len(".index")]
  try:
    reader = tf.train.load_checkpoint(path)
  except Exception as e:  # TF raises NotFoundError / DataLossError / ValueError
    raise ValueError(f"TF checkpoint {path!r} cannot be read ({type(e).__name__}: {e}); "
                     "pass the checkpoint prefix (e.g. .../model.ckpt) or its folder.") from e
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def resolve(tensors: Tensors, use_ema: bool = True) -> dict[str, np.ndarray]:
  """Drops optimizer state; with ``use_ema``, each variable takes its EMA shadow's value."""
  out = {n: v for n, v in tensors.items() if not n.endswith(EMA) and not IGNORED.search(n)}
  if use_ema:
    out.update({n[:-len(EMA)]: v for n, v in tensors.items()
                if n.endswith(EMA) and n[:-len(EMA)] in out})
  return out


def _names(tensors: Tensors) -> tuple[str, tuple[str, str, str], str]:
  """(model prefix, scope names, BN layer base name) used by ``tensors``."""
  for stem, head, blocks in SCOPES:
    hits = [n for n in tensors if re.search(rf"(^|/){stem}/conv2d/kernel$", n)]
    if hits:
      prefix = hits[0][:-len(f"{stem}/conv2d/kernel")]
      bn = ("tpu_batch_normalization"
            if any("tpu_batch_normalization" in n for n in tensors) else "batch_normalization")
      return prefix, (stem, head, blocks), bn
  raise ValueError("no MNASNet stem kernel ('.../stem/conv2d/kernel' or "
                   "'.../mnas_stem/conv2d/kernel') in the checkpoint; is it a tensorflow/tpu "
                   "MNASNet checkpoint?")


def _indexed(base: str, k: int) -> str:
  return base if k == 0 else f"{base}_{k}"


def tf_layer_names(unit: tuple[str, ...], scopes, bn: str) -> tuple[str, str]:
  """Our conv unit -> TF's (kernel name, BN scope) below the model prefix."""
  stem, head, blocks = scopes
  if unit in (("stem",), ("head",)):
    scope = stem if unit == ("stem",) else head
    return f"{scope}/conv2d/kernel", f"{scope}/{bn}"
  if unit == ("sep_dw",):
    return f"{blocks}0/depthwise_conv2d/depthwise_kernel", f"{blocks}0/{bn}"
  if unit == ("sep_project",):
    return f"{blocks}0/conv2d/kernel", f"{blocks}0/{_indexed(bn, 1)}"
  block, part = unit
  scope = f"{blocks}{int(block.removeprefix('block_')) + 1}"
  conv, bn_k = {"expand": ("conv2d", 0), "dw": ("depthwise_conv2d", 1),
                "project": ("conv2d_1", 2)}[part]
  kernel = "depthwise_kernel" if part == "dw" else "kernel"
  return f"{scope}/{conv}/{kernel}", f"{scope}/{_indexed(bn, bn_k)}"


def infer_width(tensors: Tensors, prefix: str, stem: str) -> float:
  channels = tensors[f"{prefix}{stem}/conv2d/kernel"].shape[-1]
  for width in mnasnet.WIDTHS:
    if mnasnet.round_to_multiple_of(32 * width) == channels:
      return width
  raise ValueError(f"the stem has {channels} channels, which no MNASNet width in "
                   f"{mnasnet.WIDTHS} gives.")


def import_tf_mnasnet(tensors: Tensors, what: str = "TF MNASNet checkpoint",
                      use_ema: bool = True, **model_kwargs):
  """(model, variables) from ``read_tf_checkpoint``'s tensors; see ``load_tf_mnasnet``."""
  tensors = resolve(tensors, use_ema)
  prefix, scopes, bn = _names(tensors)
  dense = f"{prefix}{scopes[1]}/dense"
  if f"{dense}/kernel" not in tensors:
    raise ValueError(f"{what} has no classifier ('{dense}/kernel'); only full classifiers "
                     "can be imported.")
  width = infer_width(tensors, prefix, scopes[0])
  num_classes = tensors[f"{dense}/kernel"].shape[-1]
  if num_classes == 1001:  # class 0 is "background": keep ImageNet's 1000 labels
    tensors = {**tensors, f"{dense}/kernel": tensors[f"{dense}/kernel"][:, 1:],
               f"{dense}/bias": tensors[f"{dense}/bias"][1:]}
    num_classes = 1000
  model = float_model(MNASNet, num_classes=num_classes, width=width, padding="same",
                      bn_eps=KERAS_BN_EPS, **model_kwargs)
  template = variable_template(MNASNet, num_classes, width)
  entries = []
  for unit in conv_units(template["params"]):
    kernel, bn_scope = tf_layer_names(unit, scopes, bn)
    perm = KERAS_DEPTHWISE if kernel.endswith("depthwise_kernel") else None
    entries += unit_entries(unit, prefix + kernel, perm, prefix + bn_scope, KERAS_BN, "/")
  entries += [Entry(f"{dense}/kernel", ("params", "classifier", "kernel")),
              Entry(f"{dense}/bias", ("params", "classifier", "bias"))]
  return model, assign(tensors, entries, template, what)


def load_tf_mnasnet(path, use_ema: bool = True, **model_kwargs):
  """Our MNASNet and its variables from a tensorflow/tpu MNASNet-B1 TF checkpoint.

  The width and class count come from the tensor shapes; a 1001-way
  classifier loses its class 0 ("background"), so logits index TFDS's 1000
  ImageNet labels. Inputs are normalized as
  ``fat.imagenet.PREPROCESS["tf_mnasnet"]`` (the caller's job).

  Returns:
    (model, {"params": ..., "batch_stats": ...}).
  """
  return import_tf_mnasnet(read_tf_checkpoint(path), what=f"TF MNASNet checkpoint {path}",
                           use_ema=use_ema, **model_kwargs)

