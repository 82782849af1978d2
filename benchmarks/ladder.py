"""Bit-width ladder: every method of the config on each rung, W8A8 down to W2A8.

Each rung is a main-job setting (configs/fashion_mnist/ladder.py), run by
``experiments.train`` on the same calibration and unlabeled images, with every
method of ``config.methods`` (PTQ variants, FAT, any registered method). It
writes ``ladder.json`` (top-1 and agreement with float per rung and method),
``ladder.md`` and ``ladder.png`` into --workdir, and prints the table and its
wall time.

  python -m benchmarks.ladder --workdir=runs/ladder                 # 8 rungs x pc, pt
  python -m benchmarks.ladder --workdir=runs/ladder --quick         # 4 rungs, per channel
  python -m benchmarks.ladder --workdir=runs/ladder_mnasnet --net=mnasnet
  python -m benchmarks.ladder --workdir=runs/ladder --reuse         # redraw, run nothing

A finished rung is filed (``settings/<rung>.json``) and never run again for the
same config; a killed sweep, started again with the same command, resumes at
the first unfinished rung (benchmarks/bits.py). ``--first_last_bits=8`` keeps the
stem's and classifier's weights at 8 bits (0: at the rung's width); the output
says which.
"""

import os
import time

from absl import flags
from ml_collections import config_flags

from benchmarks import bits
from configs.fashion_mnist import ladder as ladder_config
from experiments import cli

FLAGS = flags.FLAGS
DEFAULT_CONFIG = "configs/fashion_mnist/ladder.py"
with cli.flag_errors(default_config=DEFAULT_CONFIG):
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Main-job config (its settings "
                                  "are replaced by the rungs).")
flags.DEFINE_string("workdir", "runs/ladder", "Where the rungs, ladder.json and ladder.png go.")
flags.DEFINE_list("rungs", [], "Rungs as w<bits>a<bits> (default: all eight; with --quick: "
                  + ",".join(f"w{w}a{a}" for w, a in ladder_config.QUICK) + ").")
flags.DEFINE_list("granularity", ["per_channel", "per_tensor"],
                  "per_channel and/or per_tensor (with --quick: per_channel unless given).")
flags.DEFINE_enum("net", "", ["", *ladder_config.NETWORKS],
                  "A shipped float checkpoint instead of the config's model_checkpoint.")
flags.DEFINE_enum("first_last_bits", "0", ["0", "8"],
                  "8: stem and classifier weights at 8 bits; 0: at the rung's width.")
flags.DEFINE_bool("quick", False, "Four rungs per channel: "
                  + ", ".join(ladder_config.rung_label(*r) for r in ladder_config.QUICK) + ".")
flags.DEFINE_bool("reuse", False, "Draw from the rungs already finished in --workdir "
                  "(also those of an interrupted run); run nothing.")
flags.DEFINE_bool("fresh", False, "Run every rung again (and discard an interrupted run).")


def ladder_config_from_flags():
  """The config with one setting per requested rung."""
  config = FLAGS.config
  if FLAGS.net:
    config.model_checkpoint = ladder_config.NETWORKS[FLAGS.net]
  rungs = ([ladder_config.parse_rung(r) for r in FLAGS.rungs] if FLAGS.rungs
           else ladder_config.QUICK if FLAGS.quick else ladder_config.RUNGS)
  granularity = (["per_channel"] if FLAGS.quick and not FLAGS["granularity"].present
                 else FLAGS.granularity)
  for w, a in rungs:
    for role, b in (("weight", w), ("activation", a)):
      if not 2 <= b <= 16:
        raise ValueError(f"--rungs: {role} bits must be in 2..16, got w{w}a{a}.")
  config.settings = ladder_config.rung_settings(rungs, granularity,
                                                int(FLAGS.first_last_bits))
  return config


def main(argv):
  del argv
  start = time.time()
  with cli.quiet_native_import():
    from benchmarks import bit_plots  # pylint: disable=import-outside-toplevel
  from fat import atomic  # pylint: disable=import-outside-toplevel
  with cli.exit_on_user_error():
    config = ladder_config_from_flags()
    if FLAGS.reuse:
      fp32, entries = bits.finished(FLAGS.workdir, config, include_partial=True)
      if not entries:
        raise ValueError(f"--reuse: no finished rung of this config in {FLAGS.workdir!r}; "
                         "run without --reuse first.")
      ran = 0
    else:
      before = bits.finished(FLAGS.workdir, config)[1] if not FLAGS.fresh else {}
      fp32, entries = bits.run(config, FLAGS.workdir, fresh=FLAGS.fresh)
      ran = len(entries) - len(before)
    out = bits.ladder_table(config, fp32, entries)
    out["wall_seconds"] = round(time.time() - start, 1)
    out["rungs_run"] = ran
    atomic.write_json(os.path.join(FLAGS.workdir, "ladder.json"), out)
    text = bits.ladder_markdown(out)
    atomic.write_text(os.path.join(FLAGS.workdir, "ladder.md"), text)
    bit_plots.plot_ladder(os.path.join(FLAGS.workdir, "ladder.png"), out)
  wall = time.time() - start
  print("\n" + text)
  print(f"ladder: {os.path.join(FLAGS.workdir, 'ladder.json')}, "
        f"{os.path.join(FLAGS.workdir, 'ladder.png')}")
  print(f"wall time {int(wall // 60)} min {wall % 60:.0f} s ({ran} rungs run, "
        f"{len(entries) - ran} read back)")


if __name__ == "__main__":
  cli.run(main, interrupted="interrupted; run the same command to resume at the first "
          "unfinished rung.")
