"""Pretrained-weight importers: Keras MobileNetV2 files and timm safetensors.

Each importer builds our model with the source's conventions (Keras: TF "same"
padding and BN epsilon 1e-3; timm/PyTorch: symmetric padding and 1e-5),
infers the width and class count from the tensor shapes, and maps every
source tensor to one variable of ``model.init``'s tree, transposing layouts:

* Keras: conv kernels are already HWIO; depthwise ``(kh, kw, C, 1)`` becomes
  ``(kh, kw, 1, C)``; Dense ``(in, out)`` is ours as is.
* PyTorch: conv ``OIHW`` and depthwise ``(C, 1, kh, kw)`` become ``HWIO`` and
  ``(kh, kw, 1, C)`` (one transpose serves both); Linear ``(out, in)`` becomes
  ``(in, out)``.

Every source tensor must be consumed exactly once with the expected shape and
every model variable filled; otherwise a ``ValueError`` names the missing,
unexpected and mis-shaped tensors. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import zipfile
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fat.models import mnasnet, mobilenet_v2
from fat.models.mnasnet import MNASNet
from fat.models.mobilenet_v2 import MobileNetV2, make_divisible

Tensors = Mapping[str, np.ndarray]

KERAS_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5
KERAS_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
KERAS_ZIP_WEIGHTS = "model.weights.h5"
TORCH_CONV = (2, 3, 1, 0)      # OIHW -> HWIO, and (C, 1, kh, kw) -> (kh, kw, 1, C)
KERAS_DEPTHWISE = (0, 1, 3, 2)  # (kh, kw, C, 1) -> (kh, kw, 1, C)
KERAS_BN = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
            "moving_mean": ("batch_stats", "mean"),
            "moving_variance": ("batch_stats", "var")}
TORCH_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
            "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
# Keras 3 weight files store a layer's variables by position only.
KERAS3_VARS = {1: ("kernel",), 2: ("kernel", "bias"),
               4: ("gamma", "beta", "moving_mean", "moving_variance")}
KERAS_PARTS = {"expand": "expand", "dw": "depthwise", "project": "project"}
# timm block attribute names: inverted residual, and the depthwise-separable first block.
TIMM_IR = {"expand": ("conv_pw", "bn1"), "dw": ("conv_dw", "bn2"), "project": ("conv_pwl", "bn3")}
TIMM_DS = {"dw": ("conv_dw", "bn1"), "project": ("conv_pw", "bn2"),
           "sep_dw": ("conv_dw", "bn1"), "sep_project": ("conv_pw", "bn2")}
# arch -> (model class, width, index of the timm stage holding our block_0).
TIMM_ARCHS = {"mobilenetv2_100": (MobileNetV2, 1.0, 0), "mnasnet_100": (MNASNet, 1.0, 1)}
MAX_LISTED = 20
WIDTH_LO, WIDTH_HI = mobilenet_v2.WIDTH_RANGE


@dataclasses.dataclass(frozen=True)
class Entry:
  """One source tensor and the model variable it fills.

  ``dst`` is the variable's path, collection first; ``perm`` transposes the
  source into our layout (``None``: same layout).
  """

  src: str
  dst: tuple[str, ...]
  perm: tuple[int, ...] | None = None


# --------------------------------------------------------------------------
# Generic matching of source tensors to model variables.
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def variable_template(cls, num_classes: int, width: float) -> dict:
  """Shapes of a float ``cls(num_classes, width)``'s variables, without computing anything.

  Shapes depend on neither the image size, padding, epsilon nor depthwise
  implementation, so one template serves every such setting.
  """
  model = cls(num_classes=num_classes, width=width, dw_impl="conv")
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))


def float_model(cls, **kwargs):
  """``cls(**kwargs)``, refusing folded/quantized modes: weights import into the float net."""
  model = cls(**kwargs)
  if model.mode.folded:
    raise ValueError(f"Import into the float model (mode stage 'float'), then fold; got "
                     f"stage {model.mode.stage!r}.")
  return model


def conv_units(params: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
  """Paths of the conv(+BN) units in a params tree: ("stem",), ("block_3", "dw"), ..."""
  for name, node in params.items():
    if isinstance(node, Mapping):
      yield from [prefix + (name,)] if "conv" in node else conv_units(node, prefix + (name,))


def unit_entries(unit, conv_src: str, conv_perm, bn_prefix: str, bn_fields: Mapping,
                 sep: str) -> list[Entry]:
  """Entries of one conv + BN unit; ``bn_fields`` maps source field -> (collection, name)."""
  return [Entry(conv_src, ("params", *unit, "conv", "kernel"), conv_perm)] + [
      Entry(f"{bn_prefix}{sep}{field}", (col, *unit, "bn", name))
      for field, (col, name) in bn_fields.items()]


def source_shape(shape: tuple[int, ...], perm) -> tuple[int, ...]:
  """The source shape that ``perm`` transposes into ``shape``."""
  return tuple(shape) if perm is None else tuple(shape[i] for i in np.argsort(perm))


def _leaf(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _listing(title: str, items: list[str]) -> str:
  shown = items[:MAX_LISTED]
  more = f"    ... and {len(items) - MAX_LISTED} more\n" if len(items) > MAX_LISTED else ""
  return f"  {title} ({len(items)}):\n" + "".join(f"    {s}\n" for s in shown) + more


def assign(tensors: Tensors, entries: list[Entry], template: Mapping, what: str,
           ignore: Callable[[str], bool] = lambda name: False) -> dict:
  """Fills ``template``'s variables from ``tensors`` as ``entries`` say.

  Raises ValueError naming every missing, unexpected (neither consumed nor
  ignored) and mis-shaped source tensor.
  """
  out, used, missing, misshaped = {}, set(), [], []
  for e in entries:
    leaf = _leaf(template, e.dst)
    if leaf is None or e.src in used:
      raise RuntimeError(f"importer bug: bad entry {e}")
    used.add(e.src)
    want = source_shape(leaf.shape, e.perm)
    if e.src not in tensors:
      missing.append(f"{e.src} {want}")
    elif (arr := np.asarray(tensors[e.src])).shape != want:
      misshaped.append(f"{e.src}: {arr.shape}, expected {want}")
    else:
      _set(out, e.dst, jnp.asarray(arr if e.perm is None else arr.transpose(e.perm), jnp.float32))
  unexpected = sorted(n for n in tensors if n not in used and not ignore(n))
  if missing or unexpected or misshaped:
    parts = [(t, l) for t, l in (("missing", missing), ("unexpected", unexpected),
                                 ("mis-shaped", misshaped)) if l]
    raise ValueError(f"{what}: the tensors do not match the model.\n"
                     + "".join(_listing(t, l) for t, l in parts))
  unfilled = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(template)
              if _leaf(out, tuple(k.key for k in p)) is None]
  if unfilled:
    raise RuntimeError(f"importer bug: {what} leaves variables unfilled: {unfilled}")
  return out


# --------------------------------------------------------------------------
# Keras MobileNetV2.
# --------------------------------------------------------------------------


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
  for attr, group in layers.items():
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


# --------------------------------------------------------------------------
# timm MobileNetV2 / MNASNet.
# --------------------------------------------------------------------------


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


__all__ = ["assign", "import_keras_mobilenet_v2", "import_timm", "load_keras_mobilenet_v2",
           "load_timm_safetensors", "read_keras_weights"]
