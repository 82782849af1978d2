"""Saving and loading variable trees with orbax, plus a JSON sidecar of metadata.

A checkpoint is a directory ``path/`` holding orbax's ``state/`` and
``meta.json`` (model name and constructor arguments, dataset, metrics).
Errors name the path and what to do.

Checksums: ``save`` records in ``meta.json`` a ``"checksums"`` key mapping each
array's '/'-joined tree path to ``"sha256:<hex>"`` of its dtype, shape and raw
bytes, e.g. ``{"params/stem/conv/kernel": "sha256:9f2c..."}``; ``load`` recomputes
them and raises ``CheckpointError`` on any mismatched, missing or extra array,
so a damaged file under ``state/`` that orbax still reads is caught too. A
checkpoint written before checksums loads with one warning (per path and process)
until it is re-saved.

* ``checksums(variables)``: the ``{path: "sha256:<hex>"}`` dict that ``save`` records.
* ``verify(variables, meta, path)``: the check ``load`` runs on what it read.
* ``fingerprint(meta)``: 16 hex digits of sha256 over a checkpoint's sorted
  checksums, which ties an export or report to the exact arrays it came from.
* ``check_shapes(expected, variables, path)``: a ``CheckpointError`` naming the
  first tensor whose shape differs from the model's (``expected`` is a tree of
  shapes, arrays or ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``), and
  any missing or extra tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from fat import atomic
from fat.errors import CheckpointError  # also fat.checkpoints.CheckpointError, its older name

META = "meta.json"
STATE = "state"
CHECKSUMS = "checksums"  # the meta.json key
# Restoring the file or retraining replaces a damaged checkpoint.
_RESTORE = ("restore the checkpoint from git (git checkout -- {path}) or retrain it / "
            "re-run the job that wrote it")
_warned_unverified: set[str] = set()  # paths already warned about, once per process


def _to_host(a):
  """numpy copy of a leaf; a replicated multi-host array is read from a local shard."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    return np.asarray(a.addressable_data(0))
  return np.asarray(a)


def save(path: str, variables, meta: dict) -> None:
  """Writes ``variables`` and ``meta`` to ``path``, replacing an older checkpoint.

  The checkpoint is written to ``path.tmp`` and renamed (``atomic.staged_dir``),
  so an interrupted save never leaves a half-written checkpoint at ``path``.
  ``meta.json`` gets ``meta`` plus the arrays' ``checksums`` (replacing any in ``meta``).
  """
  if jax.process_index() != 0:  # multi-host: replicated state, one writer
    return
  host = jax.tree.map(_to_host, variables)
  meta = {**meta, CHECKSUMS: checksums(host)}
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
  """Returns ``(variables, meta)`` as numpy trees, each array checked against its
  checksum in ``meta.json`` (``verify``)."""
  meta = load_meta(path)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(os.path.join(os.path.abspath(path), STATE))
  except Exception as e:  # orbax raises many types for damaged files
    raise CheckpointError(
        f"checkpoint {path!r} cannot be read ({type(e).__name__}: {e}); a file under "
        f"{os.path.join(path, STATE)}/ is missing or corrupted: "
        f"{_RESTORE.format(path=path)}.") from e
  variables = jax.tree.map(np.asarray, state)
  verify(variables, meta, path)
  return variables, meta


# --------------------------------------------------------------------------
# Checksums.
# --------------------------------------------------------------------------


def _key(k) -> str:
  """One tree-path entry as text: a dict key, list index or attribute name."""
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path(keys) -> str:
  return "/".join(_key(k) for k in keys)


def _sha256(a: np.ndarray) -> str:
  h = hashlib.sha256(f"{a.dtype.name}{list(a.shape)}".encode())
  h.update(np.ascontiguousarray(a).tobytes())
  return "sha256:" + h.hexdigest()


def checksums(variables) -> dict[str, str]:
  """``{"params/stem/conv/kernel": "sha256:<hex>", ...}``: per array, sha256 of its
  dtype name, shape and raw bytes, keyed by its '/'-joined tree path."""
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  return {_path(keys): _sha256(_to_host(a)) for keys, a in leaves}


def fingerprint(meta: dict) -> str:
  """16 hex digits of sha256 over the sorted checksums in ``meta``: the same for
  the same arrays, different if any array differs."""
  if CHECKSUMS not in meta:
    raise CheckpointError(
        f"this checkpoint's {META} has no {CHECKSUMS!r} (it predates them), so it has no "
        "fingerprint; re-save it: variables, meta = load(path); save(path, variables, meta).")
  text = json.dumps(meta[CHECKSUMS], sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def verify(variables, meta: dict, path: str) -> None:
  """Raises ``CheckpointError`` unless ``variables`` match ``meta``'s checksums;
  warns once per ``path`` if ``meta`` has none (a checkpoint older than them)."""
  if CHECKSUMS not in meta:
    if os.path.abspath(path) not in _warned_unverified:
      _warned_unverified.add(os.path.abspath(path))
      logging.warning(
          "checkpoint %r is unverified: its %s has no %r (written before checksums); "
          "add them by re-saving it: variables, meta = fat.checkpoints.load(path); "
          "fat.checkpoints.save(path, variables, meta).", path, META, CHECKSUMS)
    return
  want, got = meta[CHECKSUMS], checksums(variables)
  state = os.path.join(path, STATE)
  fix = _RESTORE.format(path=path)
  for name in sorted(want):
    if name not in got:
      raise CheckpointError(
          f"checkpoint {path!r} has no array {name!r}, which its {META} lists; the files "
          f"under {state}/ are corrupted or from another checkpoint: {fix}.")
    if got[name] != want[name]:
      others = sum(got.get(k) != v for k, v in want.items()) - 1
      more = f" (and {others} more)" if others else ""
      raise CheckpointError(
          f"checkpoint {path!r}: array {name!r}{more} does not match its checksum in "
          f"{META}; a file under {state}/ is corrupted: {fix}.")
  extra = sorted(set(got) - set(want))
  if extra:
    raise CheckpointError(
        f"checkpoint {path!r} has arrays {extra} that its {META} does not list; the files "
        f"under {state}/ are from another checkpoint: {fix}.")


# --------------------------------------------------------------------------
# Shapes against the model's.
# --------------------------------------------------------------------------


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x)


def _shapes(tree) -> dict[str, tuple]:
  """``{path: shape}`` of a tree of arrays, ``jax.ShapeDtypeStruct``s or shape tuples."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_shape)[0]
  return {_path(keys): tuple(int(d) for d in (x if _is_shape(x) else np.shape(x)))
          for keys, x in leaves}


def _some(names: list[str], n: int = 5) -> str:
  return ", ".join(repr(x) for x in names[:n]) + (f" and {len(names) - n} more"
                                                  if len(names) > n else "")


def check_shapes(expected, variables, path: str) -> None:
  """Raises ``CheckpointError`` unless ``variables`` (loaded from checkpoint ``path``)
  has exactly the tensors of ``expected`` (the model's, e.g.
  ``jax.eval_shape(model.init, ...)``) with the same shapes."""
  want, got = _shapes(expected), _shapes(variables)
  fix = (f"check that the model and model_kwargs (e.g. width, num_classes) in "
         f"{os.path.join(path, META)} match the model you build, and that the data has "
         "the image size and channels the checkpoint was trained on")
  missing = [k for k in want if k not in got]
  extra = [k for k in got if k not in want]
  if missing or extra:
    parts = ([f"lacks {len(missing)} tensor(s) the model has: {_some(missing)}"] if missing
             else []) + ([f"has {len(extra)} tensor(s) the model lacks: {_some(extra)}"]
                         if extra else [])
    raise CheckpointError(f"checkpoint {path!r} does not fit the model: it "
                          f"{'; it '.join(parts)}; {fix}.")
  bad = [k for k in want if want[k] != got[k]]
  if bad:
    k = bad[0]
    more = f" ({len(bad) - 1} more tensors differ)" if len(bad) > 1 else ""
    raise CheckpointError(
        f"checkpoint {path!r} does not fit the model: tensor {k!r} has shape {got[k]} in "
        f"the checkpoint but {want[k]} in the model{more}; {fix}.")
