"""Entry point of the training jobs: their flags (--config, --workdir) are defined here only.

  python -m experiments.main --config=configs/default.py --workdir=runs/default

``config.job`` picks the job: "fat" (the quantization pipeline, the default
main job) or "float" (training a float base model).
"""

from __future__ import annotations


from absl import app, flags
from ml_collections import config_flags

from fat import parallel
from experiments import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config = FLAGS.config
  parallel.initialize_distributed()
  with cli.exit_on_user_error():
    if config.job == "float":
      from experiments.train_float import train_float
      train_float(config, FLAGS.workdir)
    elif config.job == "fat":
      from experiments.train import train_and_evaluate
      train_and_evaluate(config, FLAGS.workdir)
    else:
      raise ValueError(f"config.job must be 'fat' or 'float', got {config.job!r}.")

if __name__ == "__main__":
  app.run(main)
