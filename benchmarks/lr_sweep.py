"""FAT's learning rate per setting, chosen on the calibration loss alone.

Runs the main job once per learning rate and seed, in
``<workdir>/lr_<rate>/seed_<k>``, and prints per setting and rate: the
distillation loss on the unlabeled calibration images before training and at
the kept step (mean over seeds), the kept step, and, for information only, the
test top-1 and agreement. The rate marked "chosen" has the lowest mean kept
calibration loss; test labels play no part in the choice.

  python -m benchmarks.lr_sweep --config=configs/default.py --workdir=runs/lr_sweep \\
      --learning_rates=1e-4,3e-4,1e-3,3e-3 --seeds=0
  python -m benchmarks.lr_sweep --config=configs/default.py --workdir=runs/lr_sweep8 \\
      --learning_rates=1e-4,1e-3,3e-3 --seeds=1,2 --only=w8a8_per_channel,w8a8_per_tensor
"""

import os

from absl import flags
from ml_collections import config_flags

from benchmarks import tables
from experiments import cli, config_checks

FLAGS = flags.FLAGS
DEFAULT_CONFIG = "configs/default.py"
# ml_collections loads the default config and applies its --config.* overrides here, at
# import: a bad one is reported like any other bad flag.
with cli.flag_errors(default_config=DEFAULT_CONFIG):
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Main-job config.")
flags.DEFINE_string("workdir", "runs/lr_sweep", "One subfolder per rate and seed goes here.")
flags.DEFINE_list("learning_rates", ["1e-4", "3e-4", "1e-3"], "FAT learning rates to try.")
flags.DEFINE_list("seeds", ["0"], "Seeds to run at each rate.")
flags.DEFINE_list("only", [], "Run only these settings (by name); all when empty.")


def main(argv):
  del argv
  with cli.quiet_native_import():  # TensorFlow, through clu
    from experiments.train import train_and_evaluate
  config = FLAGS.config
  with cli.exit_on_user_error():
    config_checks.only_settings(config, FLAGS.only)
    try:
      rates = [float(x) for x in FLAGS.learning_rates]
      seeds = [int(k) for k in FLAGS.seeds]
    except ValueError:
      raise ValueError("--learning_rates must be comma-separated numbers and --seeds "
                       f"comma-separated integers, got {FLAGS.learning_rates} and "
                       f"{FLAGS.seeds}.") from None
    if not rates or not seeds or min(rates) <= 0:
      raise ValueError("--learning_rates must be positive and --seeds non-empty, got "
                       f"{FLAGS.learning_rates} and {FLAGS.seeds}.")
    if not config.fat.keep_best:
      raise ValueError("lr_sweep chooses on the kept calibration loss: set "
                       "config.fat.keep_best=True.")
    runs = {}
    for lr in rates:
      config.fat.learning_rate = lr
      for k in seeds:
        config.seed = k
        print(f"learning rate {lr:g}, seed {k}", flush=True)
        runs.setdefault(lr, []).append(
            train_and_evaluate(config, os.path.join(FLAGS.workdir, f"lr_{lr:g}", f"seed_{k}")))
    print()
    print(tables.lr_sweep_markdown(runs), end="")


if __name__ == "__main__":
  cli.run(main)
