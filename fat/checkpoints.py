"""Saving and loading variable trees with orbax, plus a JSON sidecar of metadata.

A checkpoint is a directory ``path/`` holding orbax's ``state/`` and
``meta.json`` (model name and constructor arguments, dataset, metrics).
Errors name the path and what to do.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from fat import atomic
from fat.errors import CheckpointError  # also fat.checkpoints.CheckpointError, its older name

META = "meta.json"
STATE = "state"


def _to_host(a):
  """numpy copy of a leaf; a replicated multi-host array is read from a local shard."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    return np.asarray(a.addressable_data(0))
  return np.asarray(a)


def save(path: str, variables, meta: dict) -> None:
  """Writes ``variables`` and ``meta`` to ``path``, replacing an older checkpoint.

  The checkpoint is written to ``path.tmp`` and renamed (``atomic.staged_dir``),
  so an interrupted save never leaves a half-written checkpoint at ``path``.
  """
  if jax.process_index() != 0:  # multi-host: replicated state, one writer
    return
  host = jax.tree.map(_to_host, variables)
  # Only process 0 gets here: orbax's save barrier must not wait for the others.
  only_0 = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
  with atomic.staged_dir(path) as tmp:
    with ocp.StandardCheckpointer(multiprocessing_options=only_0) as ckptr:
      ckptr.save(os.path.join(tmp, STATE), host)
    # The bytes of json.dump, as the committed checkpoints' meta.json files hold them.
    pathlib.Path(tmp, META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_meta(path: str) -> dict:
  meta_path = os.path.join(path, META)
  if not os.path.isfile(meta_path):
    raise CheckpointError(
        f"no checkpoint at {path!r} (missing {META}); check the path, or create it "
        "with the float-training config named in README.md.")
  try:
    with open(meta_path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"checkpoint {path!r} has a corrupt {META}: {e}; "
                          "restore it from git or retrain it.") from e


def require(meta: dict, keys, path: str, fix: str) -> dict:
  """``meta``, or a ``CheckpointError`` naming the keys its meta.json lacks and ``fix``."""
  missing = [k for k in keys if k not in meta]
  if missing:
    raise CheckpointError(f"checkpoint {path!r} has no {missing} in its {META}; {fix}.")
  return meta


def load(path: str) -> tuple[dict, dict]:
  """Returns ``(variables, meta)`` as numpy trees."""
  meta = load_meta(path)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(os.path.join(os.path.abspath(path), STATE))
  except Exception as e:  # orbax raises many types for damaged files
    raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {e}); "
                          "restore it from git or retrain it.") from e
  return jax.tree.map(np.asarray, state), meta
