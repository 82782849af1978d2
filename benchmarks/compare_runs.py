"""Two main-job runs of one harness, method by method, with McNemar's test.

  python -m benchmarks.compare_runs --baseline=runs/act_equalize_off --variant=runs/act_equalize

For a config switch (rescaling, a recipe option) run the same config twice,
with and without it, then compare: for each setting and method both runs
have, top-1 of each, the difference, and the exact McNemar test on the
images only one of them gets right (``fat.evaluate.mcnemar``). The two runs
must share the harness (model, data, seed, calibration images) and the
float predictions, as ``benchmarks.peers`` checks when it joins runs.
"""

import os

from absl import flags

from benchmarks import peers, tables
from experiments import cli
from fat import evaluate

FLAGS = flags.FLAGS
flags.DEFINE_string("baseline", None, "Main-job workdir of the run without the change.")
flags.DEFINE_string("variant", None, "Main-job workdir of the run with it.")
flags.mark_flags_as_required(["baseline", "variant"])

HEAD = ["setting", "method", "baseline top-1 %", "variant top-1 %", "Δ pt",
        "baseline-only / variant-only correct, McNemar"]


def rows(base: tuple[dict, dict], variant: tuple[dict, dict], where: str) -> list[list[str]]:
  """One row per (setting, method) of both runs, in the baseline's order."""
  (rep, preds), (other, other_preds) = base, variant
  peers.check_same_harness(rep, other, where)
  out = []
  for s in rep["settings"]:
    if s["name"] not in other_preds:
      continue
    p, q = preds[s["name"]], other_preds[s["name"]]
    peers.check_same_images(p, q, s["name"], where)
    labels = p["labels"]
    for m in (m for m in p if m not in ("labels", "fp32") and m in q):
      a, b = evaluate.top1_pct(p[m], labels), evaluate.top1_pct(q[m], labels)
      a_only, b_only, pv = evaluate.mcnemar(p[m], q[m], labels)
      out.append([s["name"], m, f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}",
                  f"{a_only} / {b_only}, p = {pv:.2g}"])
  if not out:
    raise ValueError(f"{where} has no setting and method in common with the baseline; "
                     "compare two runs of the same config.")
  return out


def read(workdir: str) -> tuple[dict, dict]:
  """``benchmarks.peers.read`` of a finished main-job workdir."""
  if not os.path.isfile(os.path.join(workdir, "report.json")):
    raise ValueError(f"no report.json in {workdir!r}: give the workdir of a finished main job "
                     "(python -m experiments.main --config=... --workdir=...).")
  return peers.read(workdir)


def main(argv):
  del argv
  with cli.exit_on_user_error():
    table = rows(read(FLAGS.baseline), read(FLAGS.variant), FLAGS.variant)
  print(tables.markdown(HEAD, table))


if __name__ == "__main__":
  cli.run(main)
