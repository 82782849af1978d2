"""ONNX Runtime latency of an exported setting: int8 QDQ vs fp32, in one run.

  python -m benchmarks.onnx_latency --workdir=runs/default [--setting=w8a8_per_channel]

Needs ``python -m experiments.export --workdir=...`` first. Prints the median
latency over repeated runs (after warm-up) at batch 1 and 64, with 1 and 2
intra-op threads, and the fp32/int8 ratio (> 1: int8 is faster).
"""

import os

import numpy as np
import onnx
from absl import app, flags

from benchmarks import timing
from fat import runtime

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
  folder = os.path.join(FLAGS.workdir, "export", FLAGS.setting)
  paths = {k: os.path.join(folder, f"model_{k}.onnx") for k in ("int8", "fp32")}
  for p in paths.values():
    if not os.path.isfile(p):
      raise SystemExit(f"error: no {p}; run python -m experiments.export "
                       f"--workdir={FLAGS.workdir} --setting={FLAGS.setting} first.")
  rng = np.random.default_rng(0)
  dims = onnx.load(paths["fp32"]).graph.input[0].type.tensor_type.shape.dim[1:]
  image_shape = [d.dim_value for d in dims]
  print(f"setting: {FLAGS.setting}, cores: {os.cpu_count()}")
  print("| batch | threads | fp32 ms | int8 ms | fp32 / int8 |")
  print("|---|---|---|---|---|")
  for batch in (1, 64):
    for threads in (1, 2):
      sess = {k: runtime.session(p, threads) for k, p in paths.items()}
      x = rng.uniform(-1, 1, [batch] + image_shape).astype(np.float32)
      reps = FLAGS.repeats if batch == 1 else max(5, FLAGS.repeats // 5)
      f = median_ms(sess["fp32"], x, reps)
      q = median_ms(sess["int8"], x, reps)
      print(f"| {batch} | {threads} | {f:.2f} | {q:.2f} | {f / q:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
