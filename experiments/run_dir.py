"""A job's workdir: one job at a time, outputs only on success, resume after a kill.

``job(workdir, key)`` is the context every training job runs in:

* **Lock.** It holds an exclusive ``fcntl`` lock on ``<workdir>/.lock`` for
  the job's life; a second job on the same workdir stops at once with a
  ``WorkdirBusy`` error naming the running job's pid, and touches nothing.
* **Staging.** The job writes into ``<workdir>/.partial``; at the end each
  entry moves up into ``<workdir>``, replacing an entry of the same name from
  an earlier run (others, such as ``export/``, stay, except the exports of
  the settings whose checkpoints were replaced, which are removed).
* **Resume.** ``.partial/resume.json`` holds ``key`` (the job's config as
  JSON). A job interrupted by Ctrl-C, SIGTERM or SIGKILL leaves ``.partial``
  behind; the same command finds it, and the job skips what it recorded as
  finished (``Stage.done``) and resumes step checkpoints under ``.partial``.
  A stage made for another key, or any stage when ``fresh`` is set, is
  discarded. A job that fails otherwise (bad input, NaN) removes
  ``.partial``: its workdir is left as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import signal
from typing import Any, Iterator

import jax
from absl import logging

from fat import atomic

STAGE = ".partial"
LOCK = ".lock"
RESUME = "resume.json"       # in the stage: the key the progress belongs to
DONE = "done"                # in the stage: one JSON file per finished unit of work
PRIVATE = (RESUME, DONE, "steps")  # stage entries that are not published
EXPORT, CHECKPOINTS = "export", "checkpoints"


class WorkdirBusy(OSError):
  """Another job holds the workdir's lock."""


@dataclasses.dataclass(frozen=True)
class Stage:
  """The folder a job writes into, and what an earlier, interrupted run of the
  same job recorded as finished there."""

  path: str
  resumed: bool = False

  def _done_path(self, name: str) -> str:
    return os.path.join(self.path, DONE, f"{name}.json")

  def done(self, name: str) -> Any | None:
    """What ``finish(name, ...)`` recorded, or None."""
    try:
      with open(self._done_path(name)) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def finish(self, name: str, record: Any) -> None:
    """Records unit ``name`` as finished (atomically: a kill leaves it or not)."""
    atomic.write_json(self._done_path(name), record)

  def steps_dir(self, name: str) -> str:
    """Where unit ``name`` keeps its step checkpoints."""
    return os.path.join(self.path, "steps", name)


def _remove_stale_exports(stage: str, workdir: str) -> None:
  """Exports of the settings this run writes checkpoints for belong to older checkpoints."""
  root = os.path.join(stage, CHECKPOINTS)
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    old = os.path.join(workdir, EXPORT, name)
    if os.path.isdir(old):
      shutil.rmtree(old)


def _publish(stage: str, workdir: str) -> None:
  """Moves each public entry of ``stage`` into ``workdir``, replacing one of the same name."""
  _remove_stale_exports(stage, workdir)
  for name in sorted(os.listdir(stage)):
    if name not in PRIVATE:
      atomic.replace(os.path.join(stage, name), os.path.join(workdir, name))


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on ``workdir`` (created if needed) for the block.

  A workdir this call created is removed again if the block leaves it empty.
  """
  created = not os.path.isdir(workdir)
  path = os.path.join(workdir, LOCK)
  while True:
    try:
      os.makedirs(workdir, exist_ok=True)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise OSError(f"workdir {workdir!r} cannot be written ({e.strerror or e}); "
                    "pass a writable --workdir.") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirBusy(f"workdir {workdir!r} is in use by another job (pid {holder}); wait "
                        "for it to finish, or pass another --workdir.") from None
    # The holder before us may have removed the file after we opened it: then
    # our lock is on a file nobody else sees; open it again.
    try:
      same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    yield
  finally:
    os.remove(path)
    os.close(fd)
    if created and not os.listdir(workdir):
      os.rmdir(workdir)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
  """SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does."""
  def handler(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
  try:
    old = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: leave signals alone
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


def _open_stage(stage: str, key: Any, fresh: bool) -> bool:
  """Prepares ``stage`` for a job with ``key``; True when it resumes an earlier one."""
  try:
    with open(os.path.join(stage, RESUME)) as f:
      earlier = json.load(f)
  except (OSError, ValueError):
    earlier = None
  if earlier is not None and earlier == key and not fresh:
    return True
  if os.path.exists(stage):
    if earlier is not None:
      logging.warning("discarding the unfinished progress in %s (%s)", stage,
                      "--fresh" if fresh else "an earlier run with another config")
    shutil.rmtree(stage)
  os.makedirs(stage)
  atomic.write_json(os.path.join(stage, RESUME), key)
  return False


@contextlib.contextmanager
def job(workdir: str, key: Any, fresh: bool = False) -> Iterator[Stage]:
  """Locks ``workdir`` and yields the ``Stage`` to write into; publishes on success.

  ``key`` (JSON-like) says which job the stage belongs to: the same key
  resumes an interrupted stage. Only process 0 locks, resumes and publishes;
  other processes stage into their own folder (``.partial-<k>``), discarded.
  """
  pid = jax.process_index()
  if pid != 0:
    with atomic.staging(os.path.join(workdir, f"{STAGE}-{pid}"), None) as stage:
      yield Stage(stage)
    return
  with lock(workdir), _sigterm_interrupts():
    stage = os.path.join(workdir, STAGE)
    resumed = _open_stage(stage, key, fresh)
    try:
      yield Stage(stage, resumed)
    except KeyboardInterrupt:
      raise  # the stage stays: the same command resumes it
    except BaseException:
      shutil.rmtree(stage, ignore_errors=True)
      raise
    _publish(stage, workdir)
    shutil.rmtree(stage, ignore_errors=True)


def finished_report(workdir: str, config) -> dict | None:
  """The ``report.json`` of a finished run in ``workdir`` whose ``config.json``
  equals ``config`` (an ml_collections config, compared as the JSON the run
  wrote); None when there is no such run. On one machine, the same code,
  float checkpoint, config and seed give the same report, so benchmarks may read
  it instead of running again; only the config is compared here."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
    with open(os.path.join(workdir, "report.json")) as f:
      report = json.load(f)
  except (OSError, ValueError):
    return None
  return report if saved == json.loads(config.to_json_best_effort()) else None
