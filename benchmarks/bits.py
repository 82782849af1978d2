"""What the ladder and mixed-precision benchmarks share: main-job settings run once
and kept one file per setting, and the tables built from them. Defines no flags,
unlike the scripts, so tests can import it.

A benchmark workdir holds:

* ``settings/<name>.json``: one finished setting: its report entry, the float
  row, and what it was run with (the setting and the rest of the config);
* ``checkpoints/<name>``: its FAT checkpoint (as the main job writes it);
* ``job/``: the main-job workdir of the latest run (report.md, plots; while it
  runs, ``job/.partial``, its resume state).

``run(config, workdir)`` runs the settings of ``config`` that have no finished
file there (with the same config otherwise) as one main job in ``job/``, then
files each. A killed run, started again with the same command, resumes the job:
the finished settings are read back and the first unfinished one starts (at its
last FAT step checkpoint). A later command with other settings reuses the ones
already finished. Only the config is compared, as ``run_dir.finished_report``
does: reuse is for runs of the same code and float checkpoint on one machine.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_collections

from configs.fashion_mnist import ladder
from experiments import run_dir
from fat import atomic

SETTINGS, CHECKPOINTS, JOB = "settings", "checkpoints", "job"


def _json(obj):
  return json.loads(obj.to_json_best_effort() if hasattr(obj, "to_json_best_effort")
                    else json.dumps(obj))


def base_key(config: ml_collections.ConfigDict) -> dict:
  """The config as JSON without its settings: what a finished setting must share."""
  key = _json(config)
  key.pop("settings", None)
  return key


def _record_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, SETTINGS, f"{name}.json")


def _read(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _published(workdir: str, base: dict) -> tuple[dict | None, dict]:
  """The job report published in ``workdir/job`` when its config (settings aside) is
  ``base``: ``(report, {name: setting as run})``, else ``(None, {})``."""
  job = os.path.join(workdir, JOB)
  report, config = _read(os.path.join(job, "report.json")), _read(os.path.join(job, "config.json"))
  if not report or not config:
    return None, {}
  config = dict(config)
  settings = {s["name"]: s for s in config.pop("settings", [])}
  return (report, settings) if config == base else (None, {})


def finished(workdir: str, config: ml_collections.ConfigDict, *,
             include_partial: bool = False) -> tuple[dict | None, dict]:
  """``(fp32 row or None, {setting name: report entry})`` of the settings of
  ``config`` finished in ``workdir`` (filed, or in the last job's report); with
  ``include_partial`` also those an interrupted job there had finished (its
  ``.partial`` records)."""
  base, fp32, entries = base_key(config), None, {}
  wanted = {s.name: _json(s) for s in config.settings}
  for name, setting in wanted.items():
    rec = _read(_record_path(workdir, name))
    if rec and rec["base"] == base and rec["setting"] == setting:
      entries[name], fp32 = rec["entry"], fp32 or rec["fp32"]
  report, ran = _published(workdir, base)
  for e in (report or {}).get("settings", []):
    if e["name"] not in entries and ran.get(e["name"]) == wanted.get(e["name"]):
      entries[e["name"]], fp32 = e, fp32 or report["fp32"]
  if include_partial:
    stage = os.path.join(workdir, JOB, run_dir.STAGE)
    key = _read(os.path.join(stage, run_dir.RESUME)) or {}
    job_config = dict(key.get("config") or {})
    job_settings = {s["name"]: s for s in job_config.pop("settings", [])}
    if job_config == base:
      for name, setting in wanted.items():
        done = _read(os.path.join(stage, run_dir.DONE, f"{name}.json"))
        if name not in entries and done and job_settings.get(name) == setting:
          entries[name] = done["entry"]
  return fp32, entries


def _file(workdir: str, config: ml_collections.ConfigDict, overwrite: bool = False) -> None:
  """Files each setting of the last job's published report that ``config`` names
  (its record and a copy of its checkpoint), unless already filed (``overwrite``:
  even then)."""
  base = base_key(config)
  report, ran = _published(workdir, base)
  wanted = {s.name: _json(s) for s in config.settings}
  for entry in (report or {}).get("settings", []):
    name = entry["name"]
    rec = _read(_record_path(workdir, name))
    if wanted.get(name) is None or ran.get(name) != wanted[name] or (
        not overwrite and rec and rec["base"] == base and rec["setting"] == wanted[name]):
      continue
    src = os.path.join(workdir, JOB, CHECKPOINTS, name)
    dst = os.path.join(workdir, CHECKPOINTS, name)
    if os.path.isdir(src):
      tmp = dst + atomic.TMP_SUFFIX
      shutil.rmtree(tmp, ignore_errors=True)
      shutil.copytree(src, tmp)
      atomic.replace(tmp, dst)
    atomic.write_json(_record_path(workdir, name), {
        "base": base, "setting": wanted[name], "entry": entry, "fp32": report["fp32"],
        "model": report["model"], "dataset": report["dataset"],
        "eval_examples": report["eval_examples"]})


def run(config: ml_collections.ConfigDict, workdir: str, fresh: bool = False
        ) -> tuple[dict, dict]:
  """Runs the unfinished settings of ``config`` (see the module doc); returns
  ``(fp32 row, {setting name: report entry})`` for every setting of ``config``."""
  from experiments.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  if not fresh:
    _file(workdir, config)
  fp32, entries = (None, {}) if fresh else finished(workdir, config)
  todo = [s for s in config.settings if s.name not in entries]
  if todo:
    job = config.copy_and_resolve_references()
    job.settings = todo
    train_and_evaluate(job, os.path.join(workdir, JOB), fresh=fresh)
    _file(workdir, job, overwrite=True)
    fp32, entries = finished(workdir, config)
  return fp32, entries


def method_rows(entries: dict, names) -> list[dict]:
  """Per setting in ``names`` order that has an entry: its fields and, per
  method, top-1 and agreement (the ladder and mixed-precision JSON rows)."""
  rows = []
  for name in names:
    e = entries.get(name)
    if e is None:
      continue
    rows.append({**{k: e[k] for k in ("name", "weight_bits", "act_bits", "per_channel")},
                 "best_ptq": e.get("best_ptq"),
                 "methods": {m: {"top1_pct": v["top1_pct"], "agreement_pct": v["agreement_pct"]}
                             for m, v in e["methods"].items()}})
  return rows


def ladder_table(config: ml_collections.ConfigDict, fp32, entries: dict) -> dict:
  """ladder.json: the config's rungs in order, those finished with their rows."""
  names = [s.name for s in config.settings]
  rows = method_rows(entries, names)
  for r in rows:
    r["label"] = ladder.rung_label(r["weight_bits"], r["act_bits"])
  fl = int(config.settings[0].first_last_bits)
  return {"model": os.path.basename(config.model_checkpoint.rstrip("/")),
          "checkpoint": config.model_checkpoint, "dataset": config.dataset,
          "first_last_bits": fl, "first_last": first_last_text(fl),
          "methods": list(config.methods), "fp32": fp32, "rungs": rows,
          "missing": [n for n in names if n not in entries]}


def ladder_markdown(table: dict) -> str:
  """A markdown table of ``ladder.json``: one row per rung, top-1 / agreement per method."""
  methods = list(dict.fromkeys(m for r in table["rungs"] for m in r["methods"]))
  fp32 = table.get("fp32") or {}
  head = ["rung", "granularity"] + methods
  lines = [f"{table['model']}, float top-1 {fp32.get('top1_pct', float('nan')):.2f}; "
           f"{table['first_last']}; cells: top-1 % / agreement with float %", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in table["rungs"]:
    cells = [r["label"], "per-channel" if r["per_channel"] else "per-tensor"]
    cells += [f"{r['methods'][m]['top1_pct']:.2f} / {r['methods'][m]['agreement_pct']:.2f}"
              if m in r["methods"] else "" for m in methods]
    lines.append("| " + " | ".join(cells) + " |")
  if table.get("missing"):
    lines += ["", "not finished: " + ", ".join(table["missing"])]
  return "\n".join(lines) + "\n"


def first_last_text(first_last_bits: int) -> str:
  return ("stem and classifier weights at 8 bits" if first_last_bits
          else "stem and classifier weights at the rung's width")
