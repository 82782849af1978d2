"""ONNX Runtime latency of an exported setting: int8 QDQ vs fp32, in one run.

  python -m benchmarks.onnx_latency --workdir=runs/default [--setting=w8a8_per_channel]

Needs ``python -m experiments.export --workdir=...`` first. Prints the median
latency over repeated runs (after warm-up) at batch 1 and 64, with 1 and 2
intra-op threads, and the fp32/int8 ratio (> 1: int8 is faster).
"""

import os

import numpy as np
from absl import flags

from benchmarks import timing
from experiments import cli, deploy
from fat import runtime
from fat.graph import ExportError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Main-job workdir with export/<setting>/.")
flags.DEFINE_string("setting", "w8a8_per_channel", "Exported setting.")
flags.DEFINE_integer("repeats", 50, "Timed runs per case (batch 64 uses a fifth).")
flags.mark_flags_as_required(["workdir"])


def median_ms(sess, x, repeats):
  name = sess.get_inputs()[0].name
  return 1000 * timing.timed(lambda: sess.run(None, {name: x}), repeats, warmup=2)[1]


def main(argv):
  del argv
  with cli.exit_on_user_error():
    folder = os.path.join(FLAGS.workdir, deploy.EXPORT_DIR, FLAGS.setting)
    paths = {"int8": os.path.join(folder, deploy.INT8), "fp32": os.path.join(folder, deploy.FP32)}
    for p in paths.values():
      if not os.path.isfile(p):
        raise ExportError(f"no {p}; run python -m experiments.export "
                          f"--workdir={FLAGS.workdir} --setting={FLAGS.setting} first.")
    sessions = {
        threads: {k: deploy.open_exported(lambda q, t=threads: runtime.session(q, t), p,
                                          FLAGS.workdir, FLAGS.setting)
                  for k, p in paths.items()}
        for threads in (1, 2)}
  run(sessions)


def run(sessions):
  rng = np.random.default_rng(0)
  image_shape = sessions[1]["fp32"].get_inputs()[0].shape[1:]
  print(f"setting: {FLAGS.setting}, cores: {os.cpu_count()}")
  print("| batch | threads | fp32 ms | int8 ms | fp32 / int8 |")
  print("|---|---|---|---|---|")
  for batch in (1, 64):
    for threads, sess in sessions.items():
      x = rng.uniform(-1, 1, [batch] + image_shape).astype(np.float32)
      reps = FLAGS.repeats if batch == 1 else max(5, FLAGS.repeats // 5)
      f = median_ms(sess["fp32"], x, reps)
      q = median_ms(sess["int8"], x, reps)
      print(f"| {batch} | {threads} | {f:.2f} | {q:.2f} | {f / q:.2f} |", flush=True)


if __name__ == "__main__":
  cli.run(main)
