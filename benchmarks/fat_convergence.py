"""FAT's convergence, recipe against recipe: training loss and score by step.

Runs the main job (``experiments.train.train_and_evaluate``) with ``--config``
(and its ``--config.*`` overrides: the recipe) into ``<workdir>/<label>``,
logging FAT's training loss every ``--log_every`` steps. Then it gathers every
run under ``<workdir>`` (this one and those of earlier labels) into
``<workdir>/convergence.json`` and ``convergence.png``: per setting, FAT's
training loss (each step's batch, and its running mean) and the score keep-best
saw (held-out or calibration images: ``scored_on``), by step, one line per
label; and a markdown table with the start and kept scores, kept step, FAT's
top-1 and its wall time, and a second with one row per label and one column
per setting (FAT's top-1 and kept step); both tables also go to
``convergence.md``. Run it once per recipe, e.g. "before" and "after"::

  python -m benchmarks.fat_convergence --config=configs/fashion_mnist/fat_hard.py \\
      --workdir=runs/convergence --label=after --only=w4a4_per_channel
  python -m benchmarks.fat_convergence --config=configs/fashion_mnist/fat_hard.py \\
      --workdir=runs/convergence --label=before --only=w4a4_per_channel \\
      --config.fat.holdout_images=0 --config.fat.lr_by_width=False

``--plot_only`` redraws the files from the runs already there.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import cli, config_checks

FLAGS = flags.FLAGS
DEFAULT_CONFIG = "configs/default.py"
with cli.flag_errors(default_config=DEFAULT_CONFIG):
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Main-job config.")
flags.DEFINE_string("workdir", "runs/convergence", "One subfolder per label goes here.")
flags.DEFINE_string("label", "run", "Name of this recipe in the plot and the table.")
flags.DEFINE_list("only", [], "Run only these settings (by name); all when empty.")
flags.DEFINE_integer("log_every", 1, "Log FAT's training loss every this many steps.")
flags.DEFINE_bool("plot_only", False, "Run nothing; redraw from the runs under --workdir.")


def collect(workdir: str) -> dict:
  """``{label: {setting: curves and results}}`` from every ``<workdir>/<label>/report.json``."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "*", "report.json"))):
    label = os.path.basename(os.path.dirname(path))
    with open(path) as f:
      report = json.load(f)
    rows = {}
    for s in report["settings"]:
      fat = s["methods"]["fat"]
      best = s["methods"][s["best_ptq"]]
      rows[s["name"]] = {
          "fp32_top1_pct": report["fp32"]["top1_pct"], "top1_pct": fat["top1_pct"],
          "agreement_pct": fat["agreement_pct"], "init": fat.get("init"),
          "recipe": fat.get("recipe", "ours"), "train_seconds": fat.get("train_seconds"),
          "steps": fat.get("steps"), "kept_step": fat.get("kept_step"),
          "scored_on": fat.get("scored_on"), "best_ptq": s["best_ptq"],
          "best_ptq_top1_pct": best["top1_pct"], "loss_by_step": fat.get("loss_by_step", []),
          "score_by_step": fat.get("calibration_loss_by_step", [])}
    out[label] = rows
  return out


def markdown(runs: dict) -> str:
  """One row per (setting, label)."""
  lines = ["| setting | label | recipe | scored on | start score | kept score | kept step / "
           "steps | FAT top-1 % | vs fp32 (pt) | best PTQ top-1 % | FAT train s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  settings = sorted({s for rows in runs.values() for s in rows})
  for name in settings:
    for label, rows in runs.items():
      r = rows.get(name)
      if r is None:
        continue
      scores = r["score_by_step"]
      start = f"{scores[0][1]:.4f}" if scores else ""
      kept = f"{min(v for _, v in scores):.4f}" if scores else ""
      lines.append(
          f"| {name} | {label} | {r['recipe']} | {r['scored_on'] or '—'} | {start} | {kept} | "
          f"{r['kept_step'] if r['kept_step'] is not None else 'last'} / {r['steps']} | "
          f"{r['top1_pct']:.2f} | {r['top1_pct'] - r['fp32_top1_pct']:+.2f} | "
          f"{r['best_ptq_top1_pct']:.2f} ({r['best_ptq']}) | {r['train_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def by_label(runs: dict) -> str:
  """One row per label, one column per setting: FAT's top-1, its change from
  fp32 and its kept step (an ablation's table)."""
  settings = sorted({s for rows in runs.values() for s in rows})
  lines = ["| label | recipe | " + " | ".join(settings) + " |",
           "|---|---|" + "---|" * len(settings)]
  for label, rows in runs.items():
    recipe = next(iter(rows.values()))["recipe"] if rows else ""
    cells = []
    for name in settings:
      r = rows.get(name)
      if r is None:
        cells.append("–")
        continue
      kept = r["kept_step"] if r["kept_step"] is not None else "last"
      cells.append(f"{r['top1_pct']:.2f} ({r['top1_pct'] - r['fp32_top1_pct']:+.2f}), "
                   f"kept {kept} / {r['steps']}")
    lines.append(f"| {label} | {recipe} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _running_mean(values, width: int = 10) -> np.ndarray:
  v = np.asarray(values, np.float64)
  c = np.cumsum(np.insert(v, 0, 0.0))
  lo = np.maximum(np.arange(1, len(v) + 1) - width, 0)
  return (c[1:] - c[lo]) / (np.arange(1, len(v) + 1) - lo)


def plot(runs: dict, path: str) -> None:
  """Training loss (top row) and keep-best score (bottom row) by step, one column per setting."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from fat import atomic
  settings = sorted({s for rows in runs.values() for s in rows})
  if not settings:
    raise ValueError(f"fat_convergence: no report.json under {FLAGS.workdir}/*/; run a label "
                     "first.")
  fig, axes = plt.subplots(2, len(settings), figsize=(5 * len(settings), 7), squeeze=False)
  for j, name in enumerate(settings):
    top, bottom = axes[0, j], axes[1, j]
    for k, (label, rows) in enumerate(runs.items()):
      r = rows.get(name)
      if r is None:
        continue
      color = f"C{k}"
      if r["loss_by_step"]:
        steps_, loss = zip(*r["loss_by_step"])
        top.plot(steps_, loss, color=color, alpha=0.25, lw=0.8)
        top.plot(steps_, _running_mean(loss), color=color, lw=1.6, label=label)
      if r["score_by_step"]:
        steps_, score = zip(*r["score_by_step"])
        bottom.plot(steps_, score, "o-", color=color, ms=3,
                    label=f"{label} ({r['scored_on'] or 'calibration'}), kept {r['kept_step']}")
    top.set_title(name)
    top.set_ylabel("training loss (batch; line: mean of 10)")
    bottom.set_ylabel("keep-best score (distillation RMSE)")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
      ax.grid(alpha=0.3)
      if ax.has_data():
        ax.legend(fontsize=7)
  try:
    fig.tight_layout()
    atomic.write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
  finally:
    plt.close(fig)


def main(argv):
  del argv
  config = FLAGS.config
  with cli.exit_on_user_error():
    if not FLAGS.plot_only:
      with cli.quiet_native_import():  # TensorFlow, through clu
        from experiments.train import train_and_evaluate
      if not FLAGS.label or os.sep in FLAGS.label or FLAGS.label.startswith("."):
        raise ValueError(f"--label must be a plain folder name, got {FLAGS.label!r}.")
      if FLAGS.log_every < 1:
        raise ValueError(f"--log_every must be >= 1, got {FLAGS.log_every}.")
      config_checks.only_settings(config, FLAGS.only)
      config.log_every = FLAGS.log_every
      train_and_evaluate(config, os.path.join(FLAGS.workdir, FLAGS.label))
    runs = collect(FLAGS.workdir)
    plot(runs, os.path.join(FLAGS.workdir, "convergence.png"))
    table = markdown(runs) + "\n" + by_label(runs)
    from fat import atomic
    atomic.write_json(os.path.join(FLAGS.workdir, "convergence.json"), runs)
    atomic.write_text(os.path.join(FLAGS.workdir, "convergence.md"), table)
    print(table, end="")


if __name__ == "__main__":
  cli.run(main)
