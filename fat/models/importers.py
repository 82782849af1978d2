"""Generic machinery of the pretrained-weight importers.

One importer per source format lives in its own module and uses these pieces:
``fat.models.keras_mobilenet_v2`` (Keras MobileNetV2 files),
``fat.models.timm_safetensors`` (timm MobileNetV2 / MNASNet) and
``fat.models.tf_mnasnet`` (the TF MNASNet checkpoints).

Each importer builds our model with the source's conventions (Keras/TF: "same"
padding and BN epsilon 1e-3; timm/PyTorch: symmetric padding and 1e-5),
infers the width and class count from the tensor shapes, and maps every
source tensor to one variable of ``model.init``'s tree, transposing layouts:

* Keras: conv kernels are already HWIO; depthwise ``(kh, kw, C, 1)`` becomes
  ``(kh, kw, 1, C)``; Dense ``(in, out)`` is ours as is.
* PyTorch: conv ``OIHW`` and depthwise ``(C, 1, kh, kw)`` become ``HWIO`` and
  ``(kh, kw, 1, C)`` (one transpose serves both); Linear ``(out, in)`` becomes
  ``(in, out)``.

Every source tensor must be consumed exactly once with the expected shape and
every model variable filled (``assign``); otherwise a ``ValueError`` names the
missing, unexpected and mis-shaped tensors. Nothing is downloaded.

A new source format is one new module: a list of ``Entry`` (source tensor ->
model variable) built from ``variable_template``, passed to ``assign``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np


Tensors = Mapping[str, np.ndarray]

# Source conventions shared by several importers.
KERAS_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5
TORCH_CONV = (2, 3, 1, 0)      # OIHW -> HWIO, and (C, 1, kh, kw) -> (kh, kw, 1, C)
KERAS_DEPTHWISE = (0, 1, 3, 2)  # (kh, kw, C, 1) -> (kh, kw, 1, C)
KERAS_BN = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
            "moving_mean": ("batch_stats", "mean"),
            "moving_variance": ("batch_stats", "var")}
TORCH_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
            "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class Entry:
  """One source tensor and the model variable it fills.

  ``dst`` is the variable's path, collection first; ``perm`` transposes the
  source into our layout (``None``: same layout).
  """

  src: str
  dst: tuple[str, ...]
  perm: tuple[int, ...] | None = None


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


__all__ = ["Entry", "assign", "conv_units", "float_model", "unit_entries", "variable_template"]
