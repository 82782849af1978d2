"""The main job over several seeds: how much of each method's top-1 is chance.

The seed draws the unlabeled subset (and with it the calibration images) and
FAT's batch order; the float model and the test split stay fixed. Each seed is
a full ``train_and_evaluate`` run in ``<workdir>/seed_<k>``; the script then
prints, per setting and method, top-1 mean, standard deviation and range, and
how often FAT reaches the best PTQ method of the same seed.

  python -m benchmarks.seed_spread --config=configs/default.py --workdir=runs/seeds \\
      --seeds=0,1,2,3,4 --only=w8a8_per_channel

``--reuse`` reads each seed's finished run of the same config instead of
running it again (the tables of an earlier run, in seconds). It compares the
config only: use it for runs of the same code and float checkpoint on this
machine.
"""

import os

from absl import flags
from ml_collections import config_flags

from benchmarks import tables
from experiments import cli, config_checks, run_dir

FLAGS = flags.FLAGS
DEFAULT_CONFIG = "configs/default.py"
# ml_collections loads the default config and applies its --config.* overrides here, at
# import: a bad one is reported like any other bad flag.
with cli.flag_errors(default_config=DEFAULT_CONFIG):
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Main-job config.")
flags.DEFINE_string("workdir", "runs/seeds", "One subfolder per seed goes here.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds to run.")
flags.DEFINE_list("only", [], "Run only these settings (by name); all when empty.")
flags.DEFINE_bool("reuse", False, "Read a seed's finished run of the same config "
                  "(report.json and config.json in its folder) instead of running it again; "
                  "only for runs of the same code and float checkpoint on this machine.")


def main(argv):
  del argv
  with cli.quiet_native_import():  # TensorFlow, through clu
    from experiments.train import train_and_evaluate
  config = FLAGS.config
  with cli.exit_on_user_error():
    config_checks.only_settings(config, FLAGS.only)
    if not FLAGS.seeds or not all(k.lstrip("-").isdigit() for k in FLAGS.seeds):
      raise ValueError(f"--seeds must be comma-separated integers, got {FLAGS.seeds}.")
    seeds = [int(k) for k in FLAGS.seeds]
    reports = []
    for k in seeds:
      config.seed = k
      workdir = os.path.join(FLAGS.workdir, f"seed_{k}")
      done = run_dir.finished_report(workdir, config) if FLAGS.reuse else None
      print(f"seed {k}" + (f": the finished run in {workdir}" if done else ""), flush=True)
      reports.append(done if done is not None else train_and_evaluate(config, workdir))
    print()
    print(tables.seed_spread_markdown(reports), end="")


if __name__ == "__main__":
  cli.run(main)
