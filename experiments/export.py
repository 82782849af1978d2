"""Export the settings of a main-job workdir to ONNX (QDQ and fp32).

  python -m experiments.export --workdir=runs/default [--setting=w8a8_per_channel]

Writes ``<workdir>/export/<setting>/model_int8.onnx`` (8-bit activations; int8
weights, or int4 for 2-4-bit weights) and ``model_fp32.onnx``. Without
``--setting`` it exports every setting under ``<workdir>/checkpoints`` that
ONNX can represent and prints one ``skipped <setting>: <reason>`` line for
each other one; exit status 0 when at least one was exported, 2 when none
was. With ``--setting`` it exports that one, and one it cannot represent is
an ``error:`` line (exit 2). ``python -m experiments.verify_onnx
--workdir=...`` then checks them in ONNX Runtime.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Main-job workdir (holds checkpoints/<setting>).")
flags.DEFINE_string("setting", None,
                    "Setting to export; default: every setting ONNX can represent.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from experiments import deploy
  with cli.exit_on_user_error():
    written, skipped = deploy.export(FLAGS.workdir, FLAGS.setting)
  for out in written:
    sizes = ", ".join(f"{name} ({os.path.getsize(os.path.join(out, name)) / 1e6:.2f} MB)"
                      for name in (deploy.INT8, deploy.FP32))
    print(f"wrote {out}: {sizes}")
  for setting, reason in skipped.items():
    print(f"skipped {setting}: {' '.join(reason.split())}", file=sys.stderr)
  if not written:
    cli.fail(f"no setting under {os.path.join(FLAGS.workdir, 'checkpoints')!r} can be "
             f"exported ({len(skipped)} skipped, reasons above).")


if __name__ == "__main__":
  cli.run(main)
