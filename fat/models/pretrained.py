"""Float models from pretrained weight files the user downloaded (nothing is fetched).

``load(fmt, path, arch)`` returns ``(name, model_kwargs, variables)``, where
``models.create(name, **model_kwargs)`` rebuilds the model (so checkpoints of
the quantized model can name it), for:

* ``"keras"``: ``keras.applications.MobileNetV2`` ``.h5`` / ``.keras``;
* ``"timm"``: timm ``mobilenetv2_100`` / ``mnasnet_100`` safetensors (``arch``);
* ``"tf_mnasnet"``: the TF-hosted MNASNet release (``path``: its ``*_frozen.pb``, the
  folder it was extracted into, or the ``.tgz``) or a TF checkpoint (prefix or folder),
  in the release's or tensorflow/tpu's naming (``fat.models.tf_mnasnet``).

Which formats load which model is a column of ``fat.models.REGISTRY``.
"""

from __future__ import annotations

import glob
import os

from fat import models
from fat.checkpoints import CheckpointError

FORMATS = models.PRETRAINED_FORMATS  # ("keras", "timm", "tf_mnasnet")
MODEL_FIELDS = ("num_classes", "width", "small_input", "padding", "bn_eps")


def _exists(fmt: str, path: str) -> bool:
  if fmt == "tf_mnasnet":  # a file (.pb, .tgz, .index), a folder, or a checkpoint prefix
    return os.path.exists(path) or bool(glob.glob(glob.escape(path) + ".index"))
  return os.path.isfile(path)


def load(fmt: str, path: str, arch: str = "") -> tuple[str, dict, dict]:
  """(model name, model kwargs, {"params", "batch_stats"}) from a pretrained file."""
  if fmt not in FORMATS:
    raise ValueError(f"config.pretrained.format must be one of {FORMATS}, got {fmt!r}.")
  if not path or not _exists(fmt, path):
    raise CheckpointError(f"pretrained {fmt} weights not found at {path!r}; download them "
                          "(configs/paper/README.md says from where) and set "
                          "config.pretrained.path.")
  # pylint: disable=import-outside-toplevel
  if fmt == "keras":
    from fat.models.keras_mobilenet_v2 import load_keras_mobilenet_v2
    model, variables = load_keras_mobilenet_v2(path)
  elif fmt == "timm":
    from fat.models.timm_safetensors import load_timm_safetensors
    model, variables = load_timm_safetensors(path, arch)
  elif fmt == "tf_mnasnet":
    from fat.models.tf_mnasnet import load_tf_mnasnet
    model, variables = load_tf_mnasnet(path)
  else:
    raise ValueError(f"fat.models.REGISTRY names format {fmt!r}, which has no loader here.")
  return models.name_of(model), {f: getattr(model, f) for f in MODEL_FIELDS}, variables
