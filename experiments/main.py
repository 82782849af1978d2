"""Entry point of the training jobs: their flags (--config, --workdir) are defined here only.

  python -m experiments.main --config=configs/default.py --workdir=runs/default

``config.job`` picks the job: "fat" (the quantization pipeline, the default
main job) or "float" (training a float base model). The main job prints the
report's table and where its report and plots are.

Both jobs resume after a kill: the same command continues from the last
finished setting and step checkpoint; ``--fresh`` starts over. One job at a
time per workdir (a second one exits 2 naming the first one's pid).
"""

from __future__ import annotations

import glob
import os

from absl import flags
from ml_collections import config_flags

from experiments import cli
from fat import parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for outputs.")
flags.DEFINE_bool("fresh", False, "Discard the progress of an interrupted run in --workdir "
                  "instead of resuming it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config = FLAGS.config
  parallel.initialize_distributed()
  with cli.exit_on_user_error():
    if config.job == "float":
      with cli.quiet_native_import():  # TensorFlow, through clu
        from experiments.train_float import train_float
      train_float(config, FLAGS.workdir, FLAGS.fresh)
    elif config.job == "fat":
      with cli.quiet_native_import():
        from experiments.train import train_and_evaluate
      print_summary(train_and_evaluate(config, FLAGS.workdir, FLAGS.fresh), FLAGS.workdir)
    else:
      raise ValueError(f"config.job must be 'fat' or 'float', got {config.job!r}.")


def print_summary(report: dict, workdir: str) -> None:
  """The per-(setting, method) table of report.md, then the paths of report.md and the plots."""
  import jax
  from fat import report as fat_report
  if jax.process_index() != 0:
    return
  lines = fat_report.format_markdown(report).splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| setting |"))
  end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
  print("\n".join(["", *lines[start:end], "",
                   f"report: {os.path.join(workdir, 'report.md')}",
                   "plots: " + ", ".join(sorted(glob.glob(os.path.join(workdir, "*.png"))))]))


if __name__ == "__main__":
  cli.run(main, interrupted="interrupted; run the same command to resume (--fresh starts over).")
