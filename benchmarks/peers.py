"""The peers' table and targets, from a finished peers job (docs/peers.md).

  python -m experiments.main --config=configs/fashion_mnist/peers.py --workdir=runs/peers
  python -m benchmarks.peers --workdir=runs/peers
  python -m benchmarks.peers --workdir=runs/peers_qdrop --join=runs/peers

Reads the job's report.json and its per-image predictions
(``predictions/<setting>.npz``) and prints, then writes to ``peers.md``:

* per setting and method: top-1, agreement with float, the difference from
  float, wall seconds and images read, the exact McNemar test against FAT and
  against the float model;
* the learned-rounding targets, each with its measured value and "met" or
  "not met": AdaRound's share of the min/max-to-float gap at W4A8, FAT after
  AdaRound against float (each variant in the job: ``fat_adaround`` trains the
  activation thresholds, ``fat_adaround_all`` every threshold) and against
  AdaRound alone, no method significantly below float at W8A8, and the cost of
  FAT after AdaRound (its wall time plus AdaRound's) against FAT's.

``--join`` adds the methods of other finished runs of the same harness (same
model, float top-1, test and calibration images, and the same float
predictions per setting) that ``--workdir`` does not have, so that methods from
separate runs are tested against each other image by image; each joined
method's cost is against the FAT of its own run.

Flags are defined only when this runs as a script.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags

from experiments import cli
from fat import evaluate, report

FLAGS = flags.FLAGS
# FAT + learned rounding
ROUNDED = ("fat_adaround", "fat_adaround_all", "fat_adaround_joint", "fat_qdrop")
AFTER = ("fat_adaround", "fat_adaround_all")  # these start from ptq_adaround's result
# (weight bits, activation bits) of a per-channel setting -> (largest loss of FAT
# with learned rounding against float, in points; whether it must also be
# significantly above AdaRound alone). A setting with per-layer widths (e.g. the
# first and last layers at 8 bits) is checked against its bulk width's targets,
# under its own name.
TARGETS = {(4, 8): (0.2, False), (4, 4): (1.0, True), (3, 8): (0.5, False)}
GAP_SHARE = 0.9   # AdaRound's share of the min/max-to-float gap at W4A8
COST_RATIO = 3.0  # FAT with learned rounding against FAT, wall time


def read(workdir: str) -> tuple[dict, dict]:
  """``(report.json, {setting: {"labels", "fp32", method: argmax}})`` of ``workdir``."""
  path = os.path.join(workdir, "report.json")
  try:
    with open(path) as f:
      rep = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {path!r} ({type(e).__name__}); run the peers job to the end "
                     "first: python -m experiments.main --config=configs/fashion_mnist/peers.py "
                     f"--workdir={workdir}") from e
  preds = {}
  for s in rep["settings"]:
    p = os.path.join(workdir, "predictions", f"{s['name']}.npz")
    try:
      with np.load(p) as f:
        preds[s["name"]] = {k.removeprefix("method/"): f[k] for k in f.files}
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read {p!r} ({type(e).__name__}); the job that wrote "
                       f"{path!r} kept no per-image predictions: run it again into a new "
                       "workdir") from e
  return rep, preds


HARNESS = ("model", "width", "dataset", "eval_examples", "calibration_images", "seed")


def check_same_harness(rep: dict, other: dict, where: str) -> None:
  """Refuses ``other`` (the report of run ``where``) unless it ran ``rep``'s
  harness and float model."""
  if not all(rep[k] == other[k] for k in HARNESS) or rep["fp32"] != other["fp32"]:
    raise ValueError(f"{where} ran another harness or float model (it differs in "
                     f"{', '.join(HARNESS)} or fp32); use only runs of the same one.")


def check_same_images(p: dict, q: dict, setting: str, where: str) -> None:
  """Refuses one setting's predictions ``q`` of run ``where`` unless its test
  labels and float predictions are ``p``'s."""
  if not (np.array_equal(p["labels"], q["labels"]) and np.array_equal(p["fp32"], q["fp32"])):
    raise ValueError(f"{where}: setting {setting!r} has other test labels or float "
                     "predictions; use only runs of the same harness.")


def join(rep: dict, preds: dict, other: dict, other_preds: dict, where: str) -> None:
  """Adds to ``rep``/``preds``, in place, the methods of ``other`` that ``rep``
  lacks, for the settings both have; refuses another harness or float model.

  A joined entry records its run (``"from"``: ``where``) and that run's FAT
  wall time (``"fat_wall_seconds"``): its cost is compared with the FAT of
  its own run, on the same machine load.
  """
  check_same_harness(rep, other, where)
  theirs = {s["name"]: s for s in other["settings"]}
  for s in (s for s in rep["settings"] if s["name"] in theirs):
    p, q = preds[s["name"]], other_preds[s["name"]]
    check_same_images(p, q, s["name"], where)
    their_methods = theirs[s["name"]]["methods"]
    fat_wall = their_methods.get("fat", {}).get("wall_seconds")
    for m, entry in their_methods.items():
      if m not in s["methods"]:
        s["methods"][m], p[m] = {**entry, "from": where, "fat_wall_seconds": fat_wall}, q[m]


def _test(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> str:
  a_only, b_only, p = evaluate.mcnemar(a, b, labels)
  return f"{a_only} / {b_only}, p = {p:.2g}"


def methods_markdown(rep: dict, preds: dict) -> str:
  """One table row per setting and method."""
  fp32 = rep["fp32"]["top1_pct"]
  lines = [f"{rep['model']} on {rep['dataset']}, float top-1 {fp32:.2f}, "
           f"{rep['eval_examples']} test images, {rep['calibration_images']} calibration images",
           "", "| setting | method | top-1 % | agreement % | Δ vs float (pt) | wall s | images | "
           "FAT-only / method-only correct, McNemar | float-only / method-only correct, McNemar |",
           "|---|---|---|---|---|---|---|---|---|"]
  for s in rep["settings"]:
    p = preds[s["name"]]
    for m in report.method_order(s["methods"]):
      e = s["methods"][m]
      vs_fat = "" if m == "fat" else _test(p["fat"], p[m], p["labels"])
      label = f"{m} ({e['from']})" if "from" in e else m
      lines.append(f"| {s['name']} | {label} | {e['top1_pct']:.2f} | {e['agreement_pct']:.2f} | "
                   f"{e['top1_pct'] - fp32:+.2f} | {e.get('wall_seconds', 0):.0f} | "
                   f"{e.get('images', '')} | {vs_fat} | "
                   f"{_test(p['fp32'], p[m], p['labels'])} |")
  return "\n".join(lines) + "\n"


def targets(rep: dict, preds: dict) -> list[tuple[str, str, str, bool]]:
  """``(setting, target, measured, met)`` for each target the job's settings cover."""
  fp32 = rep["fp32"]["top1_pct"]
  rows = []
  for s in rep["settings"]:
    name, ms, p = s["name"], s["methods"], preds[s["name"]]
    top1 = lambda m: ms[m]["top1_pct"]
    bits = (s["weight_bits"], s["act_bits"]) if s["per_channel"] else None
    if bits == (4, 8) and {"ptq_minmax", "ptq_adaround"} <= set(ms):
      gap = fp32 - top1("ptq_minmax")
      share = (top1("ptq_adaround") - top1("ptq_minmax")) / gap if gap > 0 else float("nan")
      rows.append((name, f"AdaRound closes ≥ {GAP_SHARE:.0%} of the min/max-to-float gap",
                   f"{share:.0%} ({top1('ptq_minmax'):.2f} → {top1('ptq_adaround'):.2f}, "
                   f"float {fp32:.2f})", bool(share >= GAP_SHARE)))
    for m in (m for m in ROUNDED if m in ms and bits in TARGETS):
      loss, above = TARGETS[bits]
      rows.append((name, f"{m} ≥ float − {loss:g} pt", f"{top1(m) - fp32:+.2f} pt",
                   bool(top1(m) >= fp32 - loss)))
      if above and "ptq_adaround" in ms:
        a_only, b_only, pv = evaluate.mcnemar(p[m], p["ptq_adaround"], p["labels"])
        rows.append((name, f"{m} above ptq_adaround, p < 0.05",
                     f"{top1(m) - top1('ptq_adaround'):+.2f} pt; {a_only} / {b_only}, "
                     f"p = {pv:.2g}", bool(a_only > b_only and pv < 0.05)))
    if s["weight_bits"] == 8 and s["act_bits"] == 8:
      below = []
      for m in ms:
        f_only, m_only, pv = evaluate.mcnemar(p["fp32"], p[m], p["labels"])
        if f_only > m_only and pv < 0.05:
          below.append(f"{m} (p = {pv:.2g})")
      rows.append((name, "no method significantly below float (p < 0.05)",
                   ", ".join(below) or f"none of {len(ms)}", not below))
    if "fat" in ms:
      for m in (m for m in ROUNDED if m in ms and (m not in AFTER or "ptq_adaround" in ms)):
        before = "ptq_adaround + " if m in AFTER else ""
        if before and ms[m].get("from") != ms["ptq_adaround"].get("from"):
          continue  # AdaRound and FAT after it timed in different runs
        fat_wall = ms[m]["fat_wall_seconds"] if "from" in ms[m] else ms["fat"]["wall_seconds"]
        if fat_wall is None:
          continue  # its run had no FAT to compare with
        wall = ms[m]["wall_seconds"] + (ms["ptq_adaround"]["wall_seconds"] if before else 0)
        ratio = wall / fat_wall
        run = f", both in {ms[m]['from']}" if "from" in ms[m] else ""
        rows.append((name, f"{before}{m} wall ≤ {COST_RATIO:g}× fat's",
                     f"{ratio:.2f}× ({wall:.0f} s against {fat_wall:.0f} s{run}; "
                     f"images {ms[m]['images']} against {ms['fat']['images']})",
                     bool(ratio <= COST_RATIO)))
  return rows


def targets_markdown(rows) -> str:
  lines = ["| setting | target | measured | |", "|---|---|---|---|"]
  lines += [f"| {s} | {t} | {v} | {'met' if ok else 'not met'} |" for s, t, v, ok in rows]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  with cli.exit_on_user_error():
    rep, preds = read(FLAGS.workdir)
    for other in FLAGS.join:
      join(rep, preds, *read(other), other)
    text = methods_markdown(rep, preds) + "\n" + targets_markdown(targets(rep, preds))
    from fat import atomic  # pylint: disable=import-outside-toplevel
    atomic.write_text(os.path.join(FLAGS.workdir, "peers.md"), text)
    print(text, end="")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", "runs/peers", "A finished peers job's workdir.")
  flags.DEFINE_list("join", [], "Finished runs of the same harness whose methods "
                    "--workdir lacks join its table (comma-separated workdirs).")
  cli.run(main)
