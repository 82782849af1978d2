"""AdaRound's hardened weights in ONNX Runtime: export, run, compare with fake quant.

  python -m benchmarks.adaround_onnx --config=configs/fashion_mnist/peers.py \
      --setting=w4a8_per_channel

Runs ``ptq_adaround`` (or, with ``--method=fat_adaround_joint``, AdaRound with
the activation thresholds trained jointly; ``--method=fat_qdrop``, that block
by block on QDrop's inputs) as the main job runs it, through
the main job's own inputs and method context (``experiments.train``: the
config's float model and data, rescaling, the PTQ methods of
``config.methods`` as starts, ``config.adaround``) on one setting, exports the
result as ONNX QDQ (``fat.graph``, ``fat.export_onnx``), runs it in ONNX
Runtime on the eval split and prints, as one JSON line: fake-quant and ORT
top-1, their argmax agreement (the target: >= 99.5%), the integer reference's
agreement with fake quant on the first ``--integer_examples`` images, the
reconstruction stats and the wall times. A setting ONNX cannot represent
(4-bit activations) gets its fake-quant numbers and the export's reason.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np
import onnx
from absl import flags
from ml_collections import config_flags

from experiments import cli, config_checks, train
from fat import evaluate, export_onnx, graph, integer, methods, runtime
from fat.errors import ExportError
from fat.methods import adaround

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", "configs/fashion_mnist/peers.py", "Main-job config.")
  flags.DEFINE_string("setting", "w4a8_per_channel", "The config's setting to run.")
  flags.DEFINE_enum("method", "ptq_adaround", list(adaround.RECONSTRUCTIONS),
                    "ptq_adaround; AdaRound with the activation thresholds trained jointly; or "
                    "that by block on QDrop's inputs (fat_qdrop).")
  flags.DEFINE_integer("integer_examples", 1000,
                       "Images for the integer reference (0: no integer reference).")


def run(config, setting: str, integer_examples: int, method: str = "ptq_adaround") -> dict:
  if integer_examples < 0:
    raise ValueError(f"--integer_examples must be >= 0 (0: no integer reference), got "
                     f"{integer_examples}.")
  config_checks.only_settings(config, [setting])
  inputs = train.load_inputs(config)
  config, test = inputs.config, inputs.splits["test"]
  shared = train.shared_float(config, inputs)
  ctx = train.setting_context(config.settings[0], config, shared, inputs.splits)
  for name in methods.of_kind(methods.ordered(config.methods), methods.PTQ):  # the starts
    ctx.results[name] = methods.get(name).run(ctx).variables
  t0 = time.time()
  result = methods.get(method).run(ctx)
  seconds = time.time() - t0
  x = np.concatenate([b for b, _ in test.batches(500)])
  sim = evaluate.predict(evaluate.make_predict(ctx.qmodel.apply), result.variables, test, 500,
                         progress=False)
  fp = evaluate.predict(evaluate.make_predict(shared.fmodel.apply), shared.folded, test, 500,
                        progress=False)
  try:
    deployed = _deploy(ctx.qmodel, result.variables, x, sim, test.labels, integer_examples)
  except ExportError as e:  # e.g. 4-bit activations: fake quant only, and why
    deployed = {"onnx": f"not exported: {e}"}
  return {"setting": setting, "method": method,
          "fp32_top1_pct": evaluate.top1_pct(fp, test.labels),
          "fake_quant_top1_pct": evaluate.top1_pct(sim, test.labels),
          "agreement_with_fp32_pct": evaluate.agreement_pct(sim, fp), **deployed,
          "eval_examples": len(x), "adaround_seconds": seconds,
          "adaround_images": len(adaround.images(ctx)), "devices": str(jax.devices()),
          **result.stats}


def _deploy(qmodel, variables, x, sim, labels, integer_examples: int) -> dict:
  """ORT's and the integer reference's agreement with fake quant ``sim`` on ``x``."""
  nodes = graph.trace(qmodel, variables, x[:2])
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "adaround.onnx")
    onnx.save(export_onnx.to_qdq(nodes, (None,) + x.shape[1:]), path)
    size = os.path.getsize(path)
    sess, _ = runtime.session_and_ops(path)
    ort = runtime.logits(sess, x).argmax(-1)
  n = min(integer_examples, len(x))
  out = {"ort_top1_pct": evaluate.top1_pct(ort, labels),
         "ort_agreement_pct": evaluate.agreement_pct(ort, sim),
         "integer_examples": n, "onnx_bytes": size}
  if n:  # 0: no integer reference
    out["integer_agreement_pct"] = evaluate.agreement_pct(integer.logits(nodes, x[:n]).argmax(-1),
                                                          sim[:n])
  return out


def main(argv):
  del argv
  with cli.exit_on_user_error():
    print(json.dumps(run(FLAGS.config, FLAGS.setting, FLAGS.integer_examples, FLAGS.method)))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
