"""A run's outputs appear in its workdir only when the run succeeds.

The main job and the float job write into ``<workdir>/.partial`` and, at the
end, move each entry up into ``<workdir>``, replacing an entry of the same
name from an earlier run (others, such as an earlier ``export/``, stay). If
the run fails (bad input found late, NaN during training, Ctrl-C),
``.partial`` is removed and the workdir is as it was.
"""

from __future__ import annotations

import json
import os
from typing import ContextManager

import jax

from fat import atomic

STAGE = ".partial"


def _publish(stage: str, workdir: str) -> None:
  """Moves each entry of ``stage`` into ``workdir``, replacing one of the same name."""
  for name in sorted(os.listdir(stage)):
    atomic.replace(os.path.join(stage, name), os.path.join(workdir, name))


def staged(workdir: str) -> ContextManager[str]:
  """Yields the folder to write into; publishes it into ``workdir`` on success.

  Only process 0 publishes; other processes stage into their own folder
  (``.partial-<k>``), which is discarded.
  """
  pid = jax.process_index()
  stage = os.path.join(workdir, STAGE if pid == 0 else f"{STAGE}-{pid}")
  return atomic.staging(stage, (lambda s: _publish(s, workdir)) if pid == 0 else None)


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
