"""Run the exported ONNX models in ONNX Runtime and compare them with our models.

  python -m experiments.verify_onnx --workdir=runs/default

Runs every setting under ``<workdir>/export`` and writes
``<workdir>/onnx_report.json``: QDQ ("int8": 8-bit activations, int8 or int4
weights) and fp32 ONNX top-1, their argmax agreement with the fake-quantized
and float JAX models, their file sizes on disk, the integer reference's
agreement, and the ops ORT actually ran.
"""

from __future__ import annotations

import json

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Main-job workdir with export/<setting>/.")
flags.DEFINE_integer("integer_examples", 1000,
                     "Eval images also run through the numpy integer reference.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from experiments import deploy
  with cli.exit_on_user_error():
    report = deploy.verify(FLAGS.workdir, FLAGS.integer_examples)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  cli.run(main)
