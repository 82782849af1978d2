"""AdaRound's hardened weights in ONNX Runtime: export, run, compare with fake quant.

  python -m benchmarks.adaround_onnx --config=configs/fashion_mnist/peers.py \
      --setting=w4a8_per_channel

Runs ``ptq_adaround`` (or, with ``--method=fat_adaround_joint``, AdaRound with
the activation thresholds trained jointly) as the main job runs it (the
config's float model, calibration images, PTQ start and ``config.adaround``,
whose ``images`` picks the reconstruction images) on one setting, exports the
result as ONNX QDQ (``fat.graph``, ``fat.export_onnx``), runs it in ONNX
Runtime on the eval split and prints, as one JSON line: fake-quant and ORT
top-1, their argmax agreement (the target: >= 99.5%), the integer reference's
agreement with fake quant on the first ``--integer_examples`` images, the
reconstruction stats and the wall times. A setting ONNX cannot represent (4-bit activations) gets its fake-quant
numbers and the export's reason.
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

from experiments import cli, config_checks
from experiments.train import load_float
from fat import (calibrate, data, evaluate, export_onnx, fold, graph, integer, models,
                 pipeline, reconstruction, runtime, steps)
from fat.errors import ExportError
from fat.methods import adaround

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", "configs/fashion_mnist/peers.py", "Main-job config.")
  flags.DEFINE_string("setting", "w4a8_per_channel", "The config's setting to run.")
  flags.DEFINE_enum("method", "ptq_adaround", ["ptq_adaround", adaround.JOINT],
                    "ptq_adaround, or AdaRound with the activation thresholds trained jointly.")
  flags.DEFINE_integer("integer_examples", 1000, "Images for the integer reference.")


def run(config, setting: str, integer_examples: int, method: str = "ptq_adaround") -> dict:
  config_checks.only_settings(config, [setting])
  s = config.settings[0]
  name, kwargs, float_vars, _ = load_float(config)
  model = models.create(name, **kwargs)
  load = lambda split: data.load(config.dataset, split, config.data_dir or None)
  train, test = load("train"), load("test")
  if config.eval_examples:
    test = test.head(config.eval_examples)
  unlabeled, calib = data.distillation_splits(
      train, train_fraction=config.fat.train_fraction,
      calibration_images=config.calibration_images, seed=config.seed)
  # The main job's reconstruction images (fat.methods.adaround.images).
  recon_images = unlabeled.head(config.adaround.images) if config.adaround.images else calib
  folded = fold.fold_variables(float_vars, model.bn_eps)
  qmodel, qvars = pipeline.quantize(model, folded, pipeline.config_rules(s, config.fat),
                                    pipeline.first_batch(calib))
  fmodel = pipeline.Prepared(qmodel=qmodel, variables=qvars, folded=folded).fmodel
  init, start = _start(config, qmodel, qvars, calib, fmodel, folded)
  t0 = time.time()
  out, stats, _ = reconstruction.reconstruct(qmodel, start, recon_images,
                                             adaround.method_spec(config, method),
                                             batch_size=config.calibration_batch_size,
                                             pattern=config.adaround.layers)
  seconds = time.time() - t0
  x = np.concatenate([b for b, _ in test.batches(500)])
  sim = evaluate.predict(evaluate.make_predict(qmodel.apply), out, test, 500, progress=False)
  fp = evaluate.predict(evaluate.make_predict(fmodel.apply), folded, test, 500, progress=False)
  try:
    deployed = _deploy(qmodel, out, x, sim, test.labels, integer_examples)
  except ExportError as e:  # e.g. 4-bit activations: fake quant only, and why
    deployed = {"onnx": f"not exported: {e}"}
  return {"setting": setting, "method": method,
          "fp32_top1_pct": evaluate.top1_pct(fp, test.labels),
          "fake_quant_top1_pct": evaluate.top1_pct(sim, test.labels),
          "agreement_with_fp32_pct": evaluate.agreement_pct(sim, fp), **deployed,
          "eval_examples": len(x), "adaround_seconds": seconds,
          "adaround_images": len(recon_images), "init": init, "devices": str(jax.devices()),
          **stats}


def _start(config, qmodel, qvars, calib, fmodel, folded) -> tuple[str, dict]:
  """``(name, variables)`` of the PTQ start the main job gives ``ptq_adaround``
  (``config.adaround.start``; "best": the lowest distillation loss on the
  calibration images), among min/max and MSE."""
  batches = lambda: data.image_batches(calib, 128)[0]
  candidates = {"ptq_minmax": calibrate.calibrate(qmodel, qvars, batches(), progress=False)}
  if "ptq_mse" in config.methods:
    candidates["ptq_mse"] = calibrate.mse_search(qmodel, candidates["ptq_minmax"], batches(),
                                                 progress=False)
  name = config.adaround.start
  if name == adaround.BEST:
    teacher = evaluate.logits(jax.jit(fmodel.apply), folded, calib, 128)
    apply = jax.jit(qmodel.apply)
    loss = lambda v: float(steps.distillation_loss(evaluate.logits(apply, v, calib, 128),
                                                    teacher, config.fat.loss))
    name = min(candidates, key=lambda n: loss(candidates[n]))
  if name not in candidates:
    raise ValueError(f"config.adaround.start {name!r}: this benchmark starts from "
                     f"{sorted(candidates)} or 'best'.")
  return name, candidates[name]


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
  ints = integer.logits(nodes, x[:n]).argmax(-1)
  return {"ort_top1_pct": evaluate.top1_pct(ort, labels),
          "ort_agreement_pct": evaluate.agreement_pct(ort, sim),
          "integer_agreement_pct": evaluate.agreement_pct(ints, sim[:n]),
          "integer_examples": n, "onnx_bytes": size}


def main(argv):
  del argv
  with cli.exit_on_user_error():
    print(json.dumps(run(FLAGS.config, FLAGS.setting, FLAGS.integer_examples, FLAGS.method)))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
