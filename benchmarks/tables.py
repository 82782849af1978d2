"""The benchmark tables: seed spread (benchmarks/seed_spread.py) and learning-rate
sweep (benchmarks/lr_sweep.py), as markdown, from the main job's reports, and
``markdown`` for any header and rows.

Defines no flags, unlike the scripts, so tests can import it.
"""

from __future__ import annotations

import numpy as np

from fat import report
from fat.methods import registry


def markdown(head: list[str], rows: list[list[str]]) -> str:
  """A markdown table of string cells."""
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def seed_spread_markdown(reports: list[dict]) -> str:
  """Markdown tables of several reports of one config that differ only in seed.

  First, per setting and method: top-1 mean, sample standard deviation and range
  over the seeds, and the mean agreement with the float argmax. Then, per
  setting, FAT against the best PTQ method of the same seed (the highest top-1
  of the methods registered as PTQ, min/max included, so chosen on the eval
  labels; a trained method such as ``ptq_adaround`` is a peer, not a start): the
  gap in points, in how many seeds FAT reaches it, and in how many it is below
  with McNemar p < 0.05. The last column compares FAT with the PTQ method chosen
  without labels, FAT's own start (``init``: the lowest distillation loss on the
  calibration images), over the reports that record it.
  """
  if not reports:
    raise ValueError("seed_spread_markdown: no reports given.")
  names = [s["name"] for s in reports[0]["settings"]]
  if any([s["name"] for s in r["settings"]] != names for r in reports):
    raise ValueError("seed_spread_markdown: the reports have different settings.")
  n = len(reports)
  top = [f"{reports[0]['model']} on {reports[0]['dataset']}, {n} seeds "
         f"({', '.join(str(r['seed']) for r in reports)}), float top-1 "
         f"{reports[0]['fp32']['top1_pct']:.2f}", "",
         "| setting | method | top-1 mean | sd | min | max | agreement mean |",
         "|---|---|---|---|---|---|---|"]
  gap = ["", "| setting | FAT − best PTQ, mean (min, max) | FAT ≥ best PTQ | "
         "FAT below it, p < 0.05 | FAT − its start (PTQ chosen without labels), mean "
         "(min, max); FAT ≥ it |", "|---|---|---|---|---|"]
  for i, name in enumerate(names):
    runs = [r["settings"][i] for r in reports]
    for m in report.method_order(runs[0]["methods"]):
      top1 = np.array([s["methods"][m]["top1_pct"] for s in runs])
      sd = float(np.std(top1, ddof=1)) if n > 1 else 0.0
      agree = np.mean([s["methods"][m]["agreement_pct"] for s in runs])
      top.append(f"| {name} | {m} | {top1.mean():.2f} | {sd:.2f} | {top1.min():.2f} | "
                 f"{top1.max():.2f} | {agree:.2f} |")
    gaps, below, vs_start = [], 0, []
    for s in runs:
      init = s["methods"]["fat"].get("init")
      if init is not None:
        vs_start.append(s["methods"]["fat"]["top1_pct"] - s["methods"][init]["top1_pct"])
      best = max(registry.of_kind(s["methods"], registry.PTQ),
                 key=lambda m: s["methods"][m]["top1_pct"])
      gaps.append(s["methods"]["fat"]["top1_pct"] - s["methods"][best]["top1_pct"])
      t = s["methods"][best]["vs_fat"]
      below += int(t["p_value"] < 0.05 and t["method_only_correct"] > t["fat_only_correct"])
    start = f"{_spread(vs_start)}; {_reached(vs_start)}" if vs_start else "–"
    gap.append(f"| {name} | {_spread(gaps)} | {_reached(gaps)} | {below}/{n} seeds | {start} |")
  return "\n".join(top + gap) + "\n"


def _spread(gaps: list[float]) -> str:
  """``mean (min, max)`` of top-1 differences in points, signed."""
  return f"{np.mean(gaps):+.2f} ({min(gaps):+.2f}, {max(gaps):+.2f})"


def _reached(gaps: list[float]) -> str:
  """In how many seeds FAT is at least the other method: ``k/n seeds``."""
  return f"{sum(g >= 0 for g in gaps)}/{len(gaps)} seeds"


def _kept_loss(fat: dict) -> tuple[float, float, int]:
  """(loss before training, lowest scored loss, its step) of one FAT entry."""
  scores = fat["calibration_loss_by_step"]
  step, loss = min(scores, key=lambda p: p[1])
  return scores[0][1], loss, step


def lr_sweep_markdown(runs: dict[float, list[dict]]) -> str:
  """A markdown table of ``{learning rate: [report per seed]}``, one row per
  setting and rate; "chosen" marks each setting's rate with the lowest mean
  kept calibration loss."""
  if not runs or any(not reports for reports in runs.values()):
    raise ValueError("lr_sweep_markdown: every learning rate needs at least one report.")
  for reports in runs.values():
    for r in reports:
      for s in r["settings"]:
        if "calibration_loss_by_step" not in s["methods"]["fat"]:
          raise ValueError(f"lr_sweep_markdown: setting {s['name']} has no calibration "
                           "scores; run with config.fat.keep_best = True.")
  first = next(iter(runs.values()))[0]
  names = [s["name"] for s in first["settings"]]
  lines = ["| setting | FAT lr | calibration loss at start | kept calibration loss | "
           "kept step | top-1 % (not used) | agreement % (not used) | |",
           "|---|---|---|---|---|---|---|---|"]
  for i, name in enumerate(names):
    rows = []
    for lr, reports in sorted(runs.items()):
      fats = [r["settings"][i]["methods"]["fat"] for r in reports]
      start, kept, step = zip(*map(_kept_loss, fats))
      rows.append((lr, np.mean(start), np.mean(kept), step,
                   np.mean([f["top1_pct"] for f in fats]),
                   np.mean([f["agreement_pct"] for f in fats])))
    chosen = min(rows, key=lambda r: r[2])[0]
    for lr, start, kept, step, top1, agree in rows:
      lines.append(f"| {name} | {lr:g} | {start:.4f} | {kept:.4f} | "
                   f"{', '.join(map(str, step))} | {top1:.2f} | {agree:.2f} | "
                   f"{'chosen' if lr == chosen else ''} |")
  return "\n".join(lines) + "\n"
