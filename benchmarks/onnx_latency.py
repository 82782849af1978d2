"""ONNX Runtime latency of the exported models: fp32, W8A8 and W4A8 QDQ, in one run.

  python -m benchmarks.onnx_latency --workdir=runs/default
  python -m benchmarks.onnx_latency --workdir=runs/default --settings=w8a8_per_channel

Needs ``python -m experiments.export --workdir=...`` first. Times the fp32
model and the QDQ model of each setting of ``--settings`` (default: W8A8 and
W4A8 per channel) at batch 1 and 64, with 1 and 2 intra-op threads, and prints
one table: the median latency over repeated runs (after warm-up) and the ratio
fp32 / QDQ (> 1: the QDQ model is faster). Each QDQ model runs with ORT's
exact-int8 option (``fat.runtime.EXACT_INT8``) and, unless ``--noinexact``,
also without it. ``--setting`` is an alias of
``--settings``. Flags are defined only when this runs as a script, so tests can
import ``compute_summary``.

What ORT computes: before the table, one line per QDQ model counts the ops of
the graph ORT optimizes and runs. With ORT 1.32 on CPU, 8-bit weights become
``QLinearConv`` (integer arithmetic, u8 activations × s8 weights). int4 weights
do NOT: the optimized graph keeps a ``DequantizeLinear`` on every int4 weight
initializer feeding a float ``Conv`` (no ``QLinearConv``/``ConvInteger``), and
ORT's profiler shows those ``DequantizeLinear`` kernels running on every
inference. So ORT dequantizes the int4 weights to float at run time, each call,
not once at load time, and convolves in float; int4 saves file size, not time.
"""

import collections
import os
import tempfile

import numpy as np
import onnx
from absl import flags

from benchmarks import timing
from experiments import cli, deploy
from fat import runtime
from fat.graph import ExportError

FLAGS = flags.FLAGS
BATCHES, THREADS = (1, 64), (1, 2)


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Main-job workdir with export/<setting>/.")
  flags.DEFINE_list("settings", ["w8a8_per_channel", "w4a8_per_channel"],
                    "Exported settings whose QDQ models are timed against fp32 (comma-separated).")
  flags.DEFINE_alias("setting", "settings")
  flags.DEFINE_integer("repeats", 50, "Timed runs per case (batch 64 uses a fifth).")
  flags.DEFINE_bool("inexact", True, "Also time each QDQ model without ORT's exact-int8 "
                    "option (fat.runtime.EXACT_INT8), as '<setting> inexact': ORT's default "
                    "uint8 x int8 kernel, which saturates on x86 CPUs without VNNI.")
  flags.mark_flags_as_required(["workdir"])


def median_ms(sess, x, repeats):
  name = sess.get_inputs()[0].name
  return 1000 * timing.timed(lambda: sess.run(None, {name: x}), repeats, warmup=2)[1]


def compute_summary(graph: onnx.GraphProto) -> str:
  """What an optimized graph computes convolutions with, in words: integer kernels,
  and float ``Conv``s with how many of them take dequantized int4 weights."""
  ops = collections.Counter(n.op_type for n in graph.node)
  int4 = {t.name for t in graph.initializer
          if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
  dq_int4 = {n.output[0] for n in graph.node
             if n.op_type == "DequantizeLinear" and n.input[0] in int4}
  float_convs = [n for n in graph.node if n.op_type in ("Conv", "FusedConv", "NchwcConv")]
  on_int4 = sum(len(n.input) > 1 and n.input[1] in dq_int4 for n in float_convs)
  integer = {k: ops[k] for k in runtime.INT8_OPS if ops[k]}
  return (f"integer kernels {integer or 'none'}; float convolutions {len(float_convs)}, "
          f"{on_int4} of them on DequantizeLinear of int4 weights")


def main(argv):
  del argv
  with cli.exit_on_user_error():
    if not FLAGS.settings:
      raise ValueError("--settings is empty; name at least one exported setting, "
                       "e.g. --settings=w8a8_per_channel,w4a8_per_channel.")
    paths, exact = {}, {}
    for setting in FLAGS.settings:
      folder = os.path.join(FLAGS.workdir, deploy.EXPORT_DIR, setting)
      paths[setting] = os.path.join(folder, deploy.INT8)
      paths.setdefault("fp32", os.path.join(folder, deploy.FP32))
      if FLAGS.inexact:
        paths[f"{setting} inexact"] = paths[setting]
        exact[f"{setting} inexact"] = False
    for p in paths.values():
      if not os.path.isfile(p):
        setting = os.path.basename(os.path.dirname(p))
        raise ExportError(f"no {p}; run python -m experiments.export "
                          f"--workdir={FLAGS.workdir} --setting={setting} first.")
    sessions, summaries = {t: {} for t in THREADS}, {}
    with tempfile.TemporaryDirectory() as tmp:
      for name, p in paths.items():
        setting = os.path.basename(os.path.dirname(p))
        for threads in THREADS:
          opt = os.path.join(tmp, f"{name.replace(' ', '_')}_{threads}.onnx")
          make = lambda q, t=threads, o=opt, e=exact.get(name, True): runtime.session(
              q, t, optimized_path=o, exact_int8=e)
          sessions[threads][name] = deploy.open_exported(make, p, FLAGS.workdir, setting)
        if name != "fp32":
          summaries[name] = compute_summary(onnx.load(opt).graph)
  run(sessions, summaries)


def run(sessions, summaries):
  rng = np.random.default_rng(0)
  names = [n for n in sessions[THREADS[0]] if n != "fp32"]
  image_shape = sessions[THREADS[0]]["fp32"].get_inputs()[0].shape[1:]
  print(f"cores: {os.cpu_count()}, input {image_shape} (NHWC), median ms")
  for name in names:
    print(f"{name} QDQ, what ORT runs: {summaries[name]}")
  head = "".join(f" {n} ms | fp32 / {n} |" for n in names)
  print(f"| batch | threads | fp32 ms |{head}")
  print("|---|---|---|" + "---|---|" * len(names))
  for batch in BATCHES:
    for threads in THREADS:
      x = rng.uniform(-1, 1, [batch] + image_shape).astype(np.float32)
      reps = FLAGS.repeats if batch == 1 else max(5, FLAGS.repeats // 5)
      f = median_ms(sessions[threads]["fp32"], x, reps)
      cells = ""
      for name in names:
        q = median_ms(sessions[threads][name], x, reps)
        cells += f" {q:.2f} | {f / q:.2f} |"
      print(f"| {batch} | {threads} | {f:.2f} |{cells}", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
