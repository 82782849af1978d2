"""Export one setting of a main-job workdir to ONNX (int8 QDQ and fp32).

  python -m experiments.export --workdir=runs/default [--setting=w8a8_per_channel]

Writes ``<workdir>/export/<setting>/model_int8.onnx`` and ``model_fp32.onnx``;
``python -m experiments.verify_onnx --workdir=...`` then checks them in ONNX Runtime.
"""

from __future__ import annotations


from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Main-job workdir (holds checkpoints/<setting>).")
flags.DEFINE_string("setting", None, "Setting to export; default: the first one.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from experiments import deploy
  with cli.exit_on_user_error():
    out = deploy.export(FLAGS.workdir, FLAGS.setting)
  print(f"wrote {out}/{deploy.INT8} and {deploy.FP32}")


if __name__ == "__main__":
  cli.run(main)
