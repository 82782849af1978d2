"""Importer for ``keras.applications.MobileNetV2`` weight files (read with h5py).

Reads ``.h5`` (weights only or full model, Keras 2 or 3), ``.weights.h5`` and
``.keras``; Keras itself is not needed. The matching of tensors to our
variables is ``fat.models.importers.assign``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import numpy as np

from fat.models import mobilenet_v2
from fat.models.importers import (KERAS_BN, KERAS_BN_EPS, KERAS_DEPTHWISE, Entry, Tensors,
                                  assign, conv_units, float_model, unit_entries,
                                  variable_template)
from fat.models.mobilenet_v2 import MobileNetV2, make_divisible

KERAS_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
KERAS_ZIP_WEIGHTS = "model.weights.h5"
# Keras 3 weight files store a layer's variables by position only.
KERAS3_VARS = {1: ("kernel",), 2: ("kernel", "bias"),
               4: ("gamma", "beta", "moving_mean", "moving_variance")}
KERAS_PARTS = {"expand": "expand", "dw": "depthwise", "project": "project"}
WIDTH_LO, WIDTH_HI = mobilenet_v2.WIDTH_RANGE


def _attr_strings(group, name: str) -> list[str]:
  """A string-list attribute, also in Keras' chunked form (``name0``, ``name1``, ...)."""
  if name in group.attrs:
    chunks = [group.attrs[name]]
  else:
    chunks, i = [], 0
    while f"{name}{i}" in group.attrs:
      chunks.append(group.attrs[f"{name}{i}"])
      i += 1
  return [s.decode() if isinstance(s, bytes) else str(s) for c in chunks for s in np.ravel(c)]


def keras_key(weight_name: str) -> str:
  """'block_1_depthwise/depthwise_kernel:0' -> 'block_1_depthwise/kernel'."""
  parts = weight_name.split(":")[0].split("/")
  var = "kernel" if parts[-1] == "depthwise_kernel" else parts[-1]
  return f"{parts[-2]}/{var}" if len(parts) > 1 else var


def _dataset(ds) -> np.ndarray:
  arr = ds[()]
  if ds.attrs.get("dtype") == "bfloat16":  # Keras 3 stores bfloat16 as uint16 bits
    arr = (arr.astype(np.uint32) << 16).view(np.float32)
  return np.asarray(arr)


def _put(out: dict, key: str, arr: np.ndarray) -> None:
  if key in out:
    raise ValueError(f"Keras file holds the tensor {key!r} twice.")
  out[key] = arr


def _read_legacy(root) -> dict[str, np.ndarray]:
  """HDF5 with ``layer_names``/``weight_names`` attrs (Keras 2, ``model.save('x.h5')``)."""
  out = {}
  for layer in _attr_strings(root, "layer_names"):
    group = root[layer]
    for wname in _attr_strings(group, "weight_names"):
      _put(out, keras_key(wname), _dataset(group[wname]))
  return out


def _read_keras3(layers, out: dict) -> dict[str, np.ndarray]:
  """Keras 3 ``layers/<attr>/vars/<i>`` groups, named by their ``name`` attr."""
  for group in layers.values():
    if "vars" in group and len(group["vars"]):
      vars_ = group["vars"]
      if "name" not in vars_.attrs:
        raise ValueError(f"Keras file records no layer name for group {group.name!r}; "
                         "re-save it with a newer Keras 3 or in the legacy .h5 format.")
      values = [_dataset(vars_[str(i)]) for i in range(len(vars_))]
      names = KERAS3_VARS.get(len(values), [f"vars/{i}" for i in range(len(values))])
      for var, arr in zip(names, values):
        _put(out, f"{vars_.attrs['name']}/{var}", arr)
    if "layers" in group:
      _read_keras3(group["layers"], out)
  return out


def _read_h5(f) -> dict[str, np.ndarray]:
  root = f["model_weights"] if "model_weights" in f else f
  if _attr_strings(root, "layer_names"):
    return _read_legacy(root)
  if "layers" in f:
    return _read_keras3(f["layers"], {})
  raise ValueError("Not a Keras weight file: no 'layer_names' attribute and no 'layers' group.")


def read_keras_weights(path) -> dict[str, np.ndarray]:
  """Every weight tensor of a Keras ``.h5``, ``.weights.h5`` or ``.keras`` file.

  Returns ``{"<layer>/<var>": array}`` with var in kernel, bias, gamma, beta,
  moving_mean, moving_variance (a Keras 2 ``depthwise_kernel`` is ``kernel``).
  Optimizer state in the file is not read.
  """
  try:
    import h5py  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Reading Keras weight files needs h5py (pip install h5py).") from e
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      if KERAS_ZIP_WEIGHTS not in z.namelist():
        raise ValueError(f"{path}: a zip without {KERAS_ZIP_WEIGHTS}, not a .keras file.")
      path = io.BytesIO(z.read(KERAS_ZIP_WEIGHTS))
  with h5py.File(path, "r") as f:
    return _read_h5(f)


def keras_layer_names(unit: tuple[str, ...]) -> tuple[str, str]:
  """Our conv unit -> Keras MobileNetV2's (conv layer, BN layer) names."""
  if unit == ("stem",):
    return "Conv1", "bn_Conv1"
  if unit == ("head",):
    return "Conv_1", "Conv_1_bn"
  block, part = unit
  i = int(block.removeprefix("block_"))
  name = f"{'expanded_conv' if i == 0 else block}_{KERAS_PARTS[part]}"
  return name, f"{name}_BN"


def keras_entries(template: Mapping) -> list[Entry]:
  entries = []
  for unit in conv_units(template["params"]):
    conv, bn = keras_layer_names(unit)
    perm = KERAS_DEPTHWISE if unit[-1] == "dw" else None
    entries += unit_entries(unit, f"{conv}/kernel", perm, bn, KERAS_BN, "/")
  entries += [Entry("predictions/kernel", ("params", "classifier", "kernel")),
              Entry("predictions/bias", ("params", "classifier", "bias"))]
  return entries


def mobilenet_v2_channels(width: float) -> tuple[int, ...]:
  """Output channels of stem, block_0..block_16 and head (as ``MobileNetV2``)."""
  blocks = [make_divisible(int(c * width)) for _, c, n, _ in mobilenet_v2.STAGES
            for _ in range(n)]
  head = make_divisible(1280 * width) if width > 1.0 else 1280
  return (make_divisible(32 * width), *blocks, head)


def infer_keras_width(tensors: Tensors) -> float:
  """The width multiplier whose channel counts match the Keras tensors."""
  names = (["Conv1/kernel", "expanded_conv_project/kernel"]
           + [f"block_{i}_project/kernel" for i in range(1, 17)] + ["Conv_1/kernel"])
  seen = tuple(tensors[n].shape[-1] if n in tensors else None for n in names)
  grid = [round(w, 2) for w in np.arange(WIDTH_LO, WIDTH_HI + 1e-9, 0.01)]
  for width in (*KERAS_ALPHAS, *grid):
    if mobilenet_v2_channels(width) == seen:
      return width
  raise ValueError(f"No MobileNetV2 width in {mobilenet_v2.WIDTH_RANGE} gives the channel "
                   f"counts of {names[0]}, ..., {names[-1]}: {seen}.")


def import_keras_mobilenet_v2(tensors: Tensors, width: float | None = None,
                              what: str = "Keras MobileNetV2", **model_kwargs):
  """(model, variables) from ``read_keras_weights``' tensors; see ``load_keras_mobilenet_v2``."""
  if "predictions/kernel" not in tensors:
    raise ValueError(f"{what} has no classifier (no 'predictions' layer, as with "
                     "include_top=False); only full classifiers can be imported.")
  width = infer_keras_width(tensors) if width is None else width
  num_classes = tensors["predictions/kernel"].shape[-1]
  model = float_model(MobileNetV2, num_classes=num_classes, width=width, padding="same",
                      bn_eps=KERAS_BN_EPS, **model_kwargs)
  template = variable_template(MobileNetV2, num_classes, width)
  return model, assign(tensors, keras_entries(template), template, what)


def load_keras_mobilenet_v2(path, width: float | None = None, **model_kwargs):
  """Our MobileNetV2 and its variables from a ``keras.applications.MobileNetV2`` file.

  Reads ``.h5`` (weights only or full model, Keras 2 or 3), ``.weights.h5``
  and ``.keras`` with h5py; Keras is not needed. The width and class count
  are inferred from the tensor shapes (``width`` overrides); the model gets
  TF "same" padding and BN epsilon 1e-3. As in Keras, input preprocessing
  (scaling to [-1, 1]) is the caller's; the model returns logits (Keras'
  softmax is not part of the weights). ``model_kwargs`` go to ``MobileNetV2``.

  Returns:
    (model, {"params": ..., "batch_stats": ...}).
  """
  return import_keras_mobilenet_v2(read_keras_weights(path), width,
                                   what=f"Keras MobileNetV2 file {path}", **model_kwargs)


__all__ = ["import_keras_mobilenet_v2", "load_keras_mobilenet_v2", "read_keras_weights"]
