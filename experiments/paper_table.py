"""Prints configs/paper/README.md's results table from the runs' report.json files.

  python -m experiments.paper_table --runs=runs/paper

A row's "ours" is the FAT top-1 of ``<runs>/<config name>/report.json``, or
"not run here" when there is no report.
"""

from __future__ import annotations

import glob
import importlib
import json
import os

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("runs", "runs/paper", "Folder holding one workdir per paper config.")

PAPER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "configs", "paper")


def rows(runs: str) -> list[tuple[str, str, str, float, str, str]]:
  """(config, net, setting, paper top-1, our FAT top-1, our FP32) per paper config."""
  out = []
  for path in sorted(glob.glob(os.path.join(PAPER_DIR, "*.py"))):
    name = os.path.basename(path)[:-3]
    if name.startswith("_"):
      continue
    config = importlib.import_module(f"configs.paper.{name}").get_config()
    ours = fp32 = "not run here"
    report = os.path.join(runs, name, "report.json")
    if os.path.isfile(report):
      with open(report) as f:
        r = json.load(f)
      ours = f"{r['settings'][0]['methods']['fat']['top1_pct']:.2f}"
      fp32 = f"{r['fp32']['top1_pct']:.2f}"
    out.append((name, config.paper.net, config.settings[0].name, config.paper.top1_pct, ours,
                fp32))
  return out


def markdown(table) -> str:
  lines = ["| config | net | setting | paper top-1 | ours (FAT) | ours (FP32) |",
           "|---|---|---|---|---|---|"]
  lines += [f"| `{c}` | {n} | {s} | {p} | {o} | {f} |" for c, n, s, p, o, f in table]
  return "\n".join(lines)


def main(argv):
  del argv
  print(markdown(rows(FLAGS.runs)))


if __name__ == "__main__":
  cli.run(main)
