"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Everything is written beside its destination and renamed over it at the end;
on any failure the temporary is removed and the destination is left as it was.

* ``write_file(path, write)``: ``write(tmp)`` fills a temp file, renamed to ``path``;
  ``write_text`` and ``write_json`` are its common forms.
* ``staged_dir(path)``: a folder, built in ``path + TMP_SUFFIX`` and renamed to ``path``.
* ``staging(stage, publish)``: the general form, for a folder whose contents are
  published some other way (``experiments/run_dir.py`` moves them up one by one).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

# Every temporary ends in this, so listings can skip unfinished writes.
TMP_SUFFIX = ".tmp"


def _umask() -> int:
  mask = os.umask(0)  # the only way to read it; set back at once
  os.umask(mask)
  return mask


# Read once, at import: reading it briefly sets it to 0, which must not race
# with files that other threads (orbax's writers) create later.
_FILE_MODE = 0o666 & ~_umask()


def write_file(path: str, write: Callable[[str], None]) -> None:
  """``write(tmp)`` to a temp file beside ``path`` (folders created), then renames it over ``path``.

  The file gets the usual mode (0666 less the umask). On any failure the temp
  file is removed and ``path`` is left as it was.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                             suffix=TMP_SUFFIX)
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, _FILE_MODE)  # mkstemp's file is owner-only; give it the usual mode
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  write_file(path, lambda tmp: pathlib.Path(tmp).write_text(text, "utf-8"))


def json_default(value: Any) -> Any:
  """numpy scalars and arrays as plain Python values (others fail as in ``json``)."""
  if not isinstance(value, (np.generic, np.ndarray)):
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
  return value.tolist()


def dumps(obj: Any, *, sort_keys: bool = False) -> str:
  """``obj`` as indented JSON with a final newline, numpy values as plain ones."""
  return json.dumps(obj, indent=2, sort_keys=sort_keys, default=json_default) + "\n"


def write_json(path: str, obj: Any, *, sort_keys: bool = False) -> None:
  """``obj`` as indented JSON (numpy values as plain ones), written atomically.

  The text is made before anything is written, so an unserializable ``obj``
  leaves ``path`` untouched.
  """
  write_text(path, dumps(obj, sort_keys=sort_keys))


def replace(src: str, dst: str) -> None:
  """Renames ``src`` (file or folder) to ``dst``, replacing what is there.

  A folder at ``dst`` is removed first (a rename cannot replace a non-empty
  folder), so between the two steps ``dst`` is briefly absent, never partial.
  """
  if os.path.isdir(dst) and not os.path.islink(dst):
    shutil.rmtree(dst)
  os.replace(src, dst)


@contextlib.contextmanager
def staging(stage: str, publish: Callable[[str], None] | None) -> Iterator[str]:
  """Yields ``stage``, a new empty folder (a leftover of a killed run is discarded).

  When the block succeeds, ``publish(stage)`` moves its contents where they
  belong (``publish`` None: the stage is discarded). In every case, whatever
  is still at ``stage`` afterwards is removed.
  """
  shutil.rmtree(stage, ignore_errors=True)
  os.makedirs(stage)
  try:
    yield stage
    if publish is not None:
      publish(stage)
  finally:
    shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path: str) -> Iterator[str]:
  """Yields a temp folder ``path + TMP_SUFFIX`` to fill; renames it over ``path`` on success.

  On failure the temp folder is removed and ``path`` is left as it was.
  """
  path = os.path.abspath(path)
  with staging(path + TMP_SUFFIX, lambda tmp: replace(tmp, path)) as tmp:
    yield tmp
