"""Deployment stages after the main job: ONNX export and its verification.

    export(workdir, setting)  ->  workdir/export/<setting>/{model_int8,model_fp32}.onnx
    export(workdir)           ->  the same for every setting ONNX can represent
    verify(workdir)           ->  workdir/onnx_report.json

``model_int8.onnx`` is the QDQ model: 8-bit activations, int8 weights, or int4
for settings of 2-4-bit weights (``fat.export_onnx``). A setting it cannot
represent (activations not 8 bits, ...) is an ``ExportError`` naming the
setting and the reason; ``export(workdir)`` skips it and says why.

Both read the main job's per-setting checkpoint (``workdir/checkpoints/<setting>``),
whose metadata names the model, the setting and the eval data. ``export.json``
records the checkpoint's fingerprint (``fat.checkpoints.fingerprint``);
``verify`` refuses an export whose checkpoint has changed since.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
from tqdm import tqdm

from fat import (atomic, calibrate, checkpoints, data, evaluate, export_onnx, graph, integer,
                 models, pipeline, runtime)
from fat.errors import CheckpointError, ExportError

EXPORT_DIR = "export"
INT8, FP32, EXPORT_JSON = "model_int8.onnx", "model_fp32.onnx", "export.json"
VERIFY_BATCH = 500


def setting_names(workdir: str) -> list[str]:
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    raise CheckpointError(
        f"no main-job checkpoints under {root!r}; run the main job with --workdir={workdir} "
        "first.")
  names = sorted(d for d in os.listdir(root) if not d.endswith(".tmp"))
  if not names:
    raise CheckpointError(
        f"no finished setting under {root!r}; run the main job with --workdir={workdir} "
        "to the end first.")
  return names


def load_setting(workdir: str, setting: str):
  """``(qmodel, qvars, meta)`` of one setting of a main-job workdir."""
  path = os.path.join(workdir, "checkpoints", setting)
  if not os.path.isdir(path):
    raise CheckpointError(
        f"no setting {setting!r} in {workdir!r}; it has {setting_names(workdir)}.")
  qvars, meta = checkpoints.load(path)
  checkpoints.require(meta, ("model", "model_kwargs", "config", "fat", "dataset",
                             "eval_examples"), path, "re-run the main job")
  model = models.create(meta["model"], **meta["model_kwargs"])
  rules = pipeline.config_rules(meta["config"], meta["fat"])
  return calibrate.quantized(model, rules), qvars, meta


def eval_split(meta: dict):
  """The main job's eval examples (a ``data.Split`` or ``imagenet.StreamSplit``)."""
  test = data.load(meta["dataset"], "test", meta.get("data_dir") or None,
                   preprocess=meta.get("preprocess", "keras"),
                   image_size=meta.get("image_size", 224))
  return test.head(meta["eval_examples"])


def export(workdir: str, setting: str | None = None) -> tuple[list[str], dict[str, str]]:
  """Writes the QDQ and fp32 ONNX models of ``setting``, or of every setting of
  ``workdir`` when None: ``(the directories written, {setting skipped: reason})``.

  A named setting ONNX cannot represent is an ``ExportError`` ("cannot export
  setting 'x': <reason>"); with None such settings are skipped. Other errors (a
  damaged checkpoint, missing data) raise either way. A failed setting leaves
  nothing behind.
  """
  if setting is not None:
    try:
      return [_export(workdir, setting)], {}
    except ExportError as e:
      raise ExportError(f"cannot export setting {setting!r}: {e}") from e
  written, skipped = [], {}
  for name in setting_names(workdir):
    try:
      written.append(_export(workdir, name))
    except ExportError as e:
      skipped[name] = str(e)
  return written, skipped


def _export(workdir: str, setting: str) -> str:
  qmodel, qvars, meta = load_setting(workdir, setting)
  sample = next(eval_split(meta).batches(2))[0]
  nodes = graph.trace(qmodel, qvars, sample)
  shape = (None,) + sample.shape[1:]
  qdq, fp32 = export_onnx.to_qdq(nodes, shape), export_onnx.to_float(nodes, shape)
  out = os.path.join(workdir, EXPORT_DIR, setting)
  with atomic.staged_dir(out) as tmp:
    onnx.save(qdq, os.path.join(tmp, INT8))
    onnx.save(fp32, os.path.join(tmp, FP32))
    atomic.write_json(os.path.join(tmp, EXPORT_JSON), {
        "setting": setting, "checkpoint_fingerprint": checkpoints.fingerprint(meta),
        "model": meta["model"], "model_kwargs": meta["model_kwargs"],
        "opset": export_onnx.opset(qdq), "weight_types": export_onnx.weight_types(qdq),
        "nodes": len(nodes),
        "ops": {op: sum(n.op == op for n in nodes)
                for op in ("quantize", "conv", "add", "mean", "dense")}})
  return out


def verify(workdir: str, integer_examples: int = 1000) -> dict:
  """Runs every exported setting in ONNX Runtime against our models; writes
  ``onnx_report.json``."""
  if isinstance(integer_examples, bool) or integer_examples < 1:
    raise ValueError(f"--integer_examples must be a positive number of images, got "
                     f"{integer_examples}.")
  root = os.path.join(workdir, EXPORT_DIR)
  exported = sorted(d for d in os.listdir(root) if not d.endswith(".tmp")) \
      if os.path.isdir(root) else []
  if not exported:
    raise ExportError(f"nothing exported under {root!r}; run "
                      f"python -m experiments.export --workdir={workdir} first.")
  report = {"settings": []}
  for setting in exported:
    report["settings"].append(_verify_setting(workdir, setting, integer_examples))
  atomic.write_json(os.path.join(workdir, "onnx_report.json"), report)
  return report


def open_exported(make, path: str, workdir: str, setting: str):
  """``make(path)``, with a missing or unreadable ONNX file as an ``ExportError``."""
  try:
    return make(path)
  except Exception as e:  # ORT raises its own types (NoSuchFile, InvalidProtobuf, ...)
    raise ExportError(f"cannot load {path!r} in ONNX Runtime ({type(e).__name__}: {e}); "
                      f"re-run python -m experiments.export --workdir={workdir} "
                      f"--setting={setting}.") from e


def check_fingerprint(workdir: str, setting: str, meta: dict) -> dict:
  """``export.json`` of ``export/<setting>``; an ``ExportError`` unless that export
  came from the checkpoint now there."""
  path = os.path.join(workdir, EXPORT_DIR, setting, EXPORT_JSON)
  try:
    with open(path) as f:
      record = json.load(f)
    recorded = record.get("checkpoint_fingerprint")
  except (OSError, ValueError, AttributeError):
    record, recorded = {}, None
  if recorded != checkpoints.fingerprint(meta):
    raise ExportError(
        f"{os.path.dirname(path)!r} was not exported from the checkpoint now in "
        f"checkpoints/{setting} (the main job ran again since, or {EXPORT_JSON} is missing); "
        f"re-export it: python -m experiments.export --workdir={workdir} --setting={setting}")
  return record


def _verify_setting(workdir: str, setting: str, integer_examples: int) -> dict:
  qmodel, qvars, meta = load_setting(workdir, setting)
  record = check_fingerprint(workdir, setting, meta)
  split = eval_split(meta)
  fmodel = calibrate.quantized(qmodel, (), stage="folded")
  folded = {"params": qvars["params"]}
  predict = lambda apply, v, desc: evaluate.predict(evaluate.make_predict(apply), v, split,
                                                    VERIFY_BATCH, desc=desc)
  fake = predict(qmodel.apply, qvars, "fake quant")
  flt = predict(fmodel.apply, folded, "fp32")
  out_dir = os.path.join(workdir, EXPORT_DIR, setting)
  int8_path, fp32_path = os.path.join(out_dir, INT8), os.path.join(out_dir, FP32)
  int8_sess, ops = open_exported(runtime.session_and_ops, int8_path, workdir, setting)
  fp32_sess = open_exported(runtime.session, fp32_path, workdir, setting)
  nodes = graph.trace(qmodel, qvars, next(split.batches(2))[0])
  n_int = min(integer_examples, len(split))
  # One streamed pass: no more than a batch of images in memory.
  ort_int8, ort_fp32, ref = [], [], []
  for x, _ in tqdm(split.batches(VERIFY_BATCH), total=data.num_batches(len(split), VERIFY_BATCH),
                   desc="ONNX Runtime", leave=False):
    ort_int8.append(runtime.logits(int8_sess, x).argmax(-1))
    ort_fp32.append(runtime.logits(fp32_sess, x).argmax(-1))
    done = sum(map(len, ref))
    if done < n_int:
      ref.append(integer.logits(nodes, x[:n_int - done]).argmax(-1))
  ort_int8, ort_fp32, ref = (np.concatenate(a) for a in (ort_int8, ort_fp32, ref))
  labels = split.labels
  return {
      "setting": setting, "eval_examples": len(split), "opset": record.get("opset"),
      "weight_types": record.get("weight_types"),
      "fake_quant": {"top1_pct": evaluate.top1_pct(fake, labels),
                     "report_top1_pct": meta.get("fake_quant_top1_pct")},
      "int8": {"top1_pct": evaluate.top1_pct(ort_int8, labels),
               "agreement_pct": evaluate.agreement_pct(ort_int8, fake),
               "file_bytes": os.path.getsize(int8_path)},
      "fp32": {"top1_pct": evaluate.top1_pct(ort_fp32, labels),
               "agreement_pct": evaluate.agreement_pct(ort_fp32, flt),
               "jax_top1_pct": evaluate.top1_pct(flt, labels),
               "file_bytes": os.path.getsize(fp32_path)},
      "integer_reference": {"examples": n_int,
                            "agreement_pct": evaluate.agreement_pct(ref, fake[:n_int]),
                            "ort_int8_agreement_pct": evaluate.agreement_pct(ref,
                                                                             ort_int8[:n_int])},
      "ort_ops": ops,
      "int8_ops": {k: v for k, v in ops.items() if k in runtime.INT8_OPS},
      "float_fallback_ops": {k: v for k, v in ops.items() if k in runtime.FLOAT_COMPUTE_OPS},
  }
