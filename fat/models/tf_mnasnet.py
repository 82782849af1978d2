"""Importer for the TF-hosted MNASNet-B1 weights: the paper's release files and tensorflow/tpu's.

``load_tf_mnasnet(path)`` takes any of:

* the release the paper used, ``mnasnet_<w>_<size>_09_07_2018.tgz`` from
  download.tensorflow.org (``configs/paper/README.md``): the archive itself,
  the folder it was extracted into (its ``*_frozen.pb``, at the top or one
  folder down, is read), or the ``*_frozen.pb`` file. A frozen graph's weights
  are its ``Const`` nodes, read by name from the parsed GraphDef (no session):
  the float Consts whose last name part is a weight name (``kernel``,
  ``depthwise_kernel``, ``bias``, ``gamma``, ``beta``, ``moving_mean``,
  ``moving_variance``); every other node (ops, shapes, epsilons) is ignored;
* a TF checkpoint: its prefix (``.../model.ckpt``), one of its files
  (``.index``, ``.meta``, ``.data-*``), or a folder holding one checkpoint and
  no frozen graph.

Two namings are recognized, by the stem kernel present. **The release's**, as
the authors' extraction script reads it (``<p>`` is ``mnasnet/`` or any one
prefix)::

  <p>stem/conv/tf_layer/kernel                      BN <p>stem/bn/tf_layer/<f>
  <p>lead_cell_0/op_0/depthwise_0/depthwise_kernel  BN <p>lead_cell_0/op_0/bn1_0/tf_layer/<f>
  <p>lead_cell_0/op_0/project_0/tf_layer/kernel     BN <p>lead_cell_0/op_0/bn2_0/tf_layer/<f>
  <p><cell_i>/op_0/expand_0/tf_layer/kernel         BN <p><cell_i>/op_0/bn0_0/tf_layer/<f>
  <p><cell_i>/op_0/depthwise_0/depthwise_kernel     BN <p><cell_i>/op_0/bn1_0/tf_layer/<f>
  <p><cell_i>/op_0/project_0/tf_layer/kernel        BN <p><cell_i>/op_0/bn2_0/tf_layer/<f>
  <p>lead_cell_17/op_0/conv2d_0/tf_layer/kernel     BN <p>lead_cell_17/op_0/bn_0/tf_layer/<f>
  <p>output/fc/tf_layer/{kernel,bias}

with ``<f>`` in ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``
(a BN's fields directly in its scope, ``.../bn0_0/gamma``, are accepted too)
and ``<cell_i>``, i = 1..16, the scope below ``<p>`` named ``cell_<i>`` or
``<anything>_cell_<i>`` (``lead_cell_<i>`` opens a stage). ``lead_cell_0`` is
our ``sep_dw`` + ``sep_project``, ``<cell_i>`` our ``block_{i-1}``,
``lead_cell_17`` our ``head``, ``output/fc`` our ``classifier``.

**tensorflow/tpu's** (``mnasnet_model.py``), named by scope and creation order::

  <model>/<stem>/conv2d/kernel, <model>/<stem>/<bn>/{gamma,beta,moving_mean,moving_variance}
  <model>/<blocks_i>/conv2d[_k]/kernel, <model>/<blocks_i>/depthwise_conv2d/depthwise_kernel,
  <model>/<blocks_i>/<bn>[_k]/..., <model>/<head>/conv2d/kernel, <model>/<head>/dense/{kernel,bias}

with ``<stem>``/``<blocks_i>``/``<head>`` spelled ``stem``/``blocks_i``/``head``
or ``mnas_stem``/``mnas_blocks_i``/``mnas_head`` (both versions of that code),
``<bn>`` = ``batch_normalization`` or ``tpu_batch_normalization``, and
``<model>`` any single prefix (``mnasnet-b1``, ...). TF's ``blocks_0`` is our
``sep_dw`` + ``sep_project``; TF's ``blocks_{i+1}`` is our ``block_i``.

In checkpoints, where a variable has an ``/ExponentialMovingAverage`` shadow,
the shadow is read (as the TF evaluation does); optimizer slots and
``global_step`` are ignored. The model gets TF "same" padding and BN epsilon
1e-3; a 1001-way classifier loses its class 0 ("background"). The released
files were not available to check against (the tests synthesize files with
these names); an import that does not match names every missing and
unexpected tensor.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tarfile
from collections.abc import Callable

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
WEIGHT_NAMES = frozenset(("kernel", "depthwise_kernel", "bias", *KERAS_BN))
RELEASE_STEM = "stem/conv/tf_layer/kernel"
RELEASE_CELLS = 16  # <cell_1> .. <cell_16> between lead_cell_0 and lead_cell_17
CELL = re.compile(r"(?:\w+_)?cell_(\d+)")
PLAIN_BN = re.compile(r"(^|/)(bn(?:\d*_\d+)?)/(gamma|beta|moving_mean|moving_variance)$")
CHECKPOINT_FILE = re.compile(r"(.+)\.(index|meta|data-\d+-of-\d+)$")
ARCHIVES = (".tgz", ".tar.gz", ".tar")


# --------------------------------------------------------------------------
# Reading files.
# --------------------------------------------------------------------------


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
                     "pass the checkpoint prefix (e.g. .../model.ckpt), its folder, or the "
                     "release's *_frozen.pb.") from e
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def read_frozen_graph(source, what: str = "") -> dict[str, np.ndarray]:
  """The weights of a frozen GraphDef (a ``.pb`` path or its bytes): its float ``Const``
  nodes whose last name part is in ``WEIGHT_NAMES``, by node name."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from google.protobuf.message import DecodeError  # pylint: disable=import-outside-toplevel
  what = what or f"frozen graph {source}"
  if not isinstance(source, bytes):
    with open(source, "rb") as f:
      source = f.read()
  graph = tf.compat.v1.GraphDef()
  try:
    graph.ParseFromString(source)
  except DecodeError as e:
    raise ValueError(f"{what} is not a binary TF GraphDef ({e}); pass the release's "
                     "*_frozen.pb, its folder or its .tgz, or a TF checkpoint.") from e
  out = {}
  for node in graph.node:
    if (node.op == "Const" and node.name.rsplit("/", 1)[-1] in WEIGHT_NAMES
        and tf.as_dtype(node.attr["dtype"].type).is_floating):
      out[node.name] = tf.make_ndarray(node.attr["value"].tensor)
  return out


def find_weights(path) -> tuple[str, str]:
  """What ``path`` is: ("frozen", .pb) | ("archive", .tgz) | ("checkpoint", prefix or folder)."""
  path = str(path)
  if os.path.isdir(path):
    root = glob.escape(path)
    graphs = sorted({*glob.glob(os.path.join(root, "*_frozen.pb")),
                     *glob.glob(os.path.join(root, "*", "*_frozen.pb"))})
    if len(graphs) > 1:
      raise ValueError(f"{path} holds several frozen graphs ({', '.join(graphs)}); set "
                       "pretrained.path to the one to import.")
    return ("frozen", graphs[0]) if graphs else ("checkpoint", path)
  if os.path.isfile(path):
    if path.endswith(".pb"):
      return "frozen", path
    if path.endswith(ARCHIVES):
      return "archive", path
    if m := CHECKPOINT_FILE.fullmatch(path):
      return "checkpoint", m.group(1)
    raise ValueError(f"{path} is neither a frozen graph (.pb), the release archive (.tgz) nor "
                     "a TF checkpoint file (.index/.meta/.data-*); pass one of those, the "
                     "checkpoint prefix or the extracted release folder.")
  return "checkpoint", path


def _archived_graph(path: str) -> tuple[bytes, str]:
  """The bytes and name of the one ``*_frozen.pb`` in a release archive."""
  with tarfile.open(path) as tar:
    members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith("_frozen.pb")]
    if len(members) != 1:
      found = ", ".join(m.name for m in members) or "none"
      raise ValueError(f"{path} should hold one *_frozen.pb (found: {found}); extract it and "
                       "set pretrained.path to the frozen graph or checkpoint to import.")
    return tar.extractfile(members[0]).read(), members[0].name


def read_tf_mnasnet(path) -> tuple[dict[str, np.ndarray], str]:
  """(tensors, description) of any file ``load_tf_mnasnet`` takes."""
  kind, where = find_weights(path)
  if kind == "frozen":
    what = f"TF MNASNet frozen graph {where}"
    return read_frozen_graph(where, what), what
  if kind == "archive":
    data, member = _archived_graph(where)
    what = f"TF MNASNet frozen graph {member} in {where}"
    return read_frozen_graph(data, what), what
  return read_tf_checkpoint(where), f"TF MNASNet checkpoint {where}"


def resolve(tensors: Tensors, use_ema: bool = True) -> dict[str, np.ndarray]:
  """Drops optimizer state; with ``use_ema``, each variable takes its EMA shadow's value."""
  out = {n: v for n, v in tensors.items() if not n.endswith(EMA) and not IGNORED.search(n)}
  if use_ema:
    out.update({n[:-len(EMA)]: v for n, v in tensors.items()
                if n.endswith(EMA) and n[:-len(EMA)] in out})
  return out


# --------------------------------------------------------------------------
# Namings.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Naming:
  """One naming of a file: its stem kernel and classifier, and each conv unit's names.

  ``unit`` maps our conv unit (("stem",), ("block_3", "dw"), ...) to its
  source (kernel name, BN scope).
  """

  label: str
  stem_kernel: str
  classifier: tuple[str, str]
  unit: Callable[[tuple[str, ...]], tuple[str, str]]


def _indexed(base: str, k: int) -> str:
  return base if k == 0 else f"{base}_{k}"


def tpu_naming(tensors: Tensors) -> Naming | None:
  """tensorflow/tpu's naming, if ``tensors`` has its stem kernel."""
  for stem, head, blocks in SCOPES:
    hits = sorted(n for n in tensors if re.search(rf"(^|/){stem}/conv2d/kernel$", n))
    if hits:
      break
  else:
    return None
  p = hits[0][:-len(f"{stem}/conv2d/kernel")]
  bn = ("tpu_batch_normalization"
        if any("tpu_batch_normalization" in n for n in tensors) else "batch_normalization")

  def unit(u):
    if u in (("stem",), ("head",)):
      scope = stem if u == ("stem",) else head
      return f"{p}{scope}/conv2d/kernel", f"{p}{scope}/{bn}"
    if u == ("sep_dw",):
      return f"{p}{blocks}0/depthwise_conv2d/depthwise_kernel", f"{p}{blocks}0/{bn}"
    if u == ("sep_project",):
      return f"{p}{blocks}0/conv2d/kernel", f"{p}{blocks}0/{_indexed(bn, 1)}"
    block, part = u
    scope = f"{p}{blocks}{int(block.removeprefix('block_')) + 1}"
    conv, k = {"expand": ("conv2d/kernel", 0), "dw": ("depthwise_conv2d/depthwise_kernel", 1),
               "project": ("conv2d_1/kernel", 2)}[part]
    return f"{scope}/{conv}", f"{scope}/{_indexed(bn, k)}"

  return Naming("tensorflow/tpu naming", f"{p}{stem}/conv2d/kernel",
                (f"{p}{head}/dense/kernel", f"{p}{head}/dense/bias"), unit)


def cell_scopes(tensors: Tensors, prefix: str) -> dict[int, str]:
  """Release naming: cell index (1..16) -> its scope below ``prefix`` (``cell_<i>`` if none)."""
  found: dict[int, set[str]] = {}
  for name in tensors:
    if name.startswith(prefix) and (m := CELL.fullmatch(name[len(prefix):].split("/")[0])):
      found.setdefault(int(m.group(1)), set()).add(m.group(0))
  out = {}
  for i in range(1, RELEASE_CELLS + 1):
    scopes = sorted(found.get(i, ()))
    if len(scopes) > 1:
      raise ValueError(f"cell {i} has several scopes ({', '.join(prefix + s for s in scopes)}); "
                       "a release MNASNet file has one scope named '[<x>_]cell_<i>' per cell.")
    out[i] = scopes[0] if scopes else f"cell_{i}"
  return out


def with_tf_layer_bn(tensors: Tensors) -> dict[str, np.ndarray]:
  """Release naming: BN fields stored directly in their scope (``.../bn0_0/gamma``) renamed
  to the ``.../bn0_0/tf_layer/gamma`` the importer expects (unless that exists too)."""
  out = dict(tensors)
  for name in tensors:
    canonical = PLAIN_BN.sub(r"\1\2/tf_layer/\3", name)
    if canonical != name and canonical not in tensors:
      out[canonical] = out.pop(name)
  return out


def release_naming(tensors: Tensors) -> Naming | None:
  """The release's naming (the authors' extraction script), if ``tensors`` has its stem kernel."""
  hits = sorted(n for n in tensors if re.search(rf"(^|/){RELEASE_STEM}$", n))
  if not hits:
    return None
  p = hits[0][:-len(RELEASE_STEM)]
  cells = cell_scopes(tensors, p)
  parts = {"expand": ("expand_0/tf_layer/kernel", "bn0_0"),
           "dw": ("depthwise_0/depthwise_kernel", "bn1_0"),
           "project": ("project_0/tf_layer/kernel", "bn2_0")}

  def unit(u):
    if u == ("stem",):
      return f"{p}{RELEASE_STEM}", f"{p}stem/bn/tf_layer"
    if u == ("head",):
      return (f"{p}lead_cell_17/op_0/conv2d_0/tf_layer/kernel",
              f"{p}lead_cell_17/op_0/bn_0/tf_layer")
    if u in (("sep_dw",), ("sep_project",)):
      op, part = f"{p}lead_cell_0/op_0", "dw" if u == ("sep_dw",) else "project"
    else:
      block, part = u
      op = f"{p}{cells[int(block.removeprefix('block_')) + 1]}/op_0"
    conv, bn = parts[part]
    return f"{op}/{conv}", f"{op}/{bn}/tf_layer"

  return Naming("release naming", f"{p}{RELEASE_STEM}",
                (f"{p}output/fc/tf_layer/kernel", f"{p}output/fc/tf_layer/bias"), unit)


def naming_of(tensors: Tensors, what: str) -> tuple[Naming, dict[str, np.ndarray]]:
  """The naming ``tensors`` use, and the tensors with BN names made canonical."""
  release = release_naming(tensors)
  if release is not None:
    return release, with_tf_layer_bn(tensors)
  tpu = tpu_naming(tensors)
  if tpu is not None:
    return tpu, dict(tensors)
  held = (f"Its {len(tensors)} weight tensors begin: {', '.join(sorted(tensors)[:8])}."
          if tensors else "It holds no weight tensors (float Consts or variables named "
          f"{', '.join(sorted(WEIGHT_NAMES))}).")
  raise ValueError(
      f"{what}: no MNASNet stem kernel: neither the release's '.../{RELEASE_STEM}' nor "
      "tensorflow/tpu's '.../stem/conv2d/kernel' or '.../mnas_stem/conv2d/kernel'. "
      f"{held} Is it an MNASNet-B1 frozen graph or checkpoint from the TF release "
      "(configs/paper/README.md)?")


# --------------------------------------------------------------------------
# Import.
# --------------------------------------------------------------------------


def infer_width(tensors: Tensors, stem_kernel: str) -> float:
  channels = tensors[stem_kernel].shape[-1]
  for width in mnasnet.WIDTHS:
    if mnasnet.round_to_multiple_of(32 * width) == channels:
      return width
  raise ValueError(f"the stem kernel {stem_kernel} has {channels} output channels, which no "
                   f"MNASNet width in {mnasnet.WIDTHS} gives; is it an MNASNet-B1 file?")


def import_tf_mnasnet(tensors: Tensors, what: str = "TF MNASNet weights",
                      use_ema: bool = True, **model_kwargs):
  """(model, variables) from ``read_tf_mnasnet``'s tensors; see ``load_tf_mnasnet``."""
  naming, tensors = naming_of(resolve(tensors, use_ema), what)
  what = f"{what} ({naming.label})"
  kernel, bias = naming.classifier
  if kernel not in tensors or bias not in tensors:
    raise ValueError(f"{what} has no classifier ('{kernel}' and '{bias}'); only full "
                     "classifiers can be imported.")
  width = infer_width(tensors, naming.stem_kernel)
  num_classes = tensors[kernel].shape[-1]
  if num_classes == 1001:  # class 0 is "background": keep ImageNet's 1000 labels
    tensors = {**tensors, kernel: tensors[kernel][:, 1:], bias: tensors[bias][1:]}
    num_classes = 1000
  model = float_model(MNASNet, num_classes=num_classes, width=width, padding="same",
                      bn_eps=KERAS_BN_EPS, **model_kwargs)
  template = variable_template(MNASNet, num_classes, width)
  entries = []
  for unit in conv_units(template["params"]):
    conv, bn_scope = naming.unit(unit)
    perm = KERAS_DEPTHWISE if conv.endswith("depthwise_kernel") else None
    entries += unit_entries(unit, conv, perm, bn_scope, KERAS_BN, "/")
  entries += [Entry(kernel, ("params", "classifier", "kernel")),
              Entry(bias, ("params", "classifier", "bias"))]
  return model, assign(tensors, entries, template, what)


def load_tf_mnasnet(path, use_ema: bool = True, **model_kwargs):
  """Our MNASNet and its variables from a TF MNASNet-B1 file (the module docstring lists
  the files and names taken).

  The width and class count come from the tensor shapes; a 1001-way
  classifier loses its class 0 ("background"), so logits index TFDS's 1000
  ImageNet labels. Inputs are normalized as
  ``fat.imagenet.PREPROCESS["tf_mnasnet"]`` (the caller's job).

  Returns:
    (model, {"params": ..., "batch_stats": ...}).
  """
  tensors, what = read_tf_mnasnet(path)
  return import_tf_mnasnet(tensors, what=what, use_ema=use_ema, **model_kwargs)
