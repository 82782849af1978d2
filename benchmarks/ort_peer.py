"""ONNX Runtime's own quantizer (quantize_static) as the peer of our PTQ and FAT rows.

  python -m benchmarks.ort_peer --workdir=runs/default

Needs the main job and ``python -m experiments.export --workdir=...`` first.
For each of the main job's settings with 8-bit activations (``--settings``),
it quantizes that setting's exported float model (``export/<setting>/
model_fp32.onnx``) with ``onnxruntime.quantization.quantize_static`` on the
main job's calibration images, after ORT's pre-processing
(``shape_inference.quant_pre_process``), once per calibration method
(``--calibrations``: MinMax, Entropy, Percentile, with ORT's default options;
at those, ORT 1.32's Entropy picks the same ranges as MinMax: docs/deployment.md)
and weight type (``--weight_types``; "auto": the setting's own width, int8 for
5-8-bit weights and int4 for 2-4-bit ones). The form is ORT's usual CPU one:
QDQ, uint8 asymmetric activations, symmetric weights, per channel or per
tensor as the setting. For int4 the float model is first converted to opset 21,
where ``DequantizeLinear`` takes int4 (the form of our own export).

Each quantized model runs in ORT on the job's test split (``--eval_examples``,
0: all the job evaluated). The table gives top-1, argmax agreement with the
fp32 model in ORT and the exact McNemar test against FAT. report.json keeps no
per-image predictions, so FAT's are recomputed: its exported QDQ model
(``model_int8.onnx``) run in ORT is the FAT reference. The job's own rows
(JAX fake quant, from report.json, with report.json's McNemar against FAT's
fake-quant predictions) sit beside them. The table is printed and written
with its numbers to ``<workdir>/ort_peer.json``. A combination ORT cannot
quantize or run is a table row saying so, not a crash.

Flags are defined only when this runs as a script, so tests can import its
functions alongside other scripts that also define ``--workdir``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging as std_logging
import os
import tempfile

import numpy as np
import onnx
from absl import flags
from tqdm import tqdm

from experiments import cli, deploy
from fat import atomic, data, evaluate, export_onnx, runtime
from fat.errors import ExportError

FLAGS = flags.FLAGS
OUTPUT = "ort_peer.json"
CALIBRATIONS = ("minmax", "entropy", "percentile")
WEIGHT_TYPES = ("int8", "int4", "uint8", "uint4")
INT4_OPSET = 21


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Main-job workdir with report.json and export/<setting>/.")
  flags.DEFINE_list("settings", [], "Settings to compare (default: every setting of the main "
                    "job with 8-bit activations).")
  flags.DEFINE_list("calibrations", list(CALIBRATIONS),
                    f"ORT calibration methods, from {', '.join(CALIBRATIONS)}.")
  flags.DEFINE_list("weight_types", ["auto"],
                    f"ORT weight types, from {', '.join(WEIGHT_TYPES)}; auto: the "
                    "setting's own width (int8 for 5-8-bit weights, int4 for 2-4-bit).")
  flags.DEFINE_integer("eval_examples", 0, "Test images to evaluate (0: all the job evaluated).")
  flags.mark_flags_as_required(["workdir"])


# --------------------------------------------------------------------------
# Inputs: the main job's report, config, settings and calibration images.
# --------------------------------------------------------------------------


def read_job(workdir: str) -> tuple[dict, dict]:
  """``(report.json, config.json)`` of a finished main job in ``workdir``."""
  out = []
  for name in ("report.json", "config.json"):
    path = os.path.join(workdir, name)
    try:
      with open(path) as f:
        out.append(json.load(f))
    except (OSError, ValueError) as e:
      raise ExportError(f"cannot read {path!r} ({type(e).__name__}); run the main job to the "
                        f"end first: python -m experiments.main --config=configs/default.py "
                        f"--workdir={workdir}") from e
  return out[0], out[1]


def select_settings(report: dict, names: list[str]) -> list[dict]:
  """The report entries of ``names`` (all with 8-bit activations when empty)."""
  eight = [s for s in report["settings"] if s["act_bits"] == 8]
  if not names:
    if not eight:
      raise ValueError("the main job has no setting with 8-bit activations; ORT's "
                       "quantize_static is compared at 8-bit activations only.")
    return eight
  known = {s["name"]: s for s in report["settings"]}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"--settings: unknown settings {unknown}; the main job has "
                     f"{sorted(known)}.")
  narrow = [n for n in names if known[n]["act_bits"] != 8]
  if narrow:
    raise ValueError(f"--settings: {narrow} do not have 8-bit activations; choose from "
                     f"{[s['name'] for s in eight]}.")
  return [known[n] for n in names]


def weight_types(setting: dict, chosen: list[str]) -> list[str]:
  """The ORT weight types to run on ``setting``: ``chosen``, with "auto" as the
  type that holds the setting's grid."""
  own = ("u" if setting["weight_kind"] == "asymmetric" else "") + (
      "int4" if setting["weight_bits"] <= 4 else "int8")
  out = []
  for t in chosen:
    t = own if t == "auto" else t
    if t not in out:
      out.append(t)
  return out


def check_choices(calibrations: list[str], types: list[str]) -> None:
  bad = [c for c in calibrations if c not in CALIBRATIONS]
  if bad or not calibrations:
    raise ValueError(f"--calibrations: {bad or 'empty'}; choose from {', '.join(CALIBRATIONS)}.")
  bad = [t for t in types if t not in WEIGHT_TYPES + ("auto",)]
  if bad or not types:
    raise ValueError(f"--weight_types: {bad or 'empty'}; choose from auto, "
                     f"{', '.join(WEIGHT_TYPES)}.")


def calibration_split(config: dict):
  """The main job's calibration images (``fat.data.distillation_splits``, as
  ``experiments.train`` selects them) from its ``config.json``."""
  train = data.load(config["dataset"], "train", config.get("data_dir") or None,
                    preprocess=config.get("preprocess", "keras"),
                    image_size=config.get("image_size", 224),
                    manual_dir=config.get("manual_dir") or None)
  return data.distillation_splits(train, train_fraction=config["fat"]["train_fraction"],
                                 calibration_images=config["calibration_images"],
                                 seed=config["seed"])[1]


# --------------------------------------------------------------------------
# ORT's quantizer and evaluation.
# --------------------------------------------------------------------------


def ort_quantize(fp32_path: str, out_path: str, calib, calibration: str, weight_type: str,
                 per_channel: bool, batch_size: int) -> None:
  """``quant_pre_process`` then ``quantize_static`` of ``fp32_path`` into ``out_path``,
  calibrated on the images of ``calib`` (a ``fat.data`` split); ORT's console
  chatter is dropped."""
  from onnxruntime import quantization as q  # pylint: disable=import-outside-toplevel
  from onnxruntime.quantization import shape_inference  # pylint: disable=import-outside-toplevel

  class Reader(q.CalibrationDataReader):

    def __init__(self, name):
      self._batches = ({name: x} for x, _ in calib.batches(batch_size))

    def get_next(self):
      return next(self._batches, None)

  model = onnx.load(fp32_path)
  if weight_type.endswith("int4") and export_onnx.opset(model) < INT4_OPSET:
    model = onnx.version_converter.convert_version(model, INT4_OPSET)
  quiet, root = io.StringIO(), std_logging.getLogger()
  level = root.level
  root.setLevel(std_logging.ERROR)
  try:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(quiet):
      pre = os.path.join(tmp, "pre.onnx")
      shape_inference.quant_pre_process(model, pre)
      q.quantize_static(
          pre, out_path, Reader(model.graph.input[0].name), quant_format=q.QuantFormat.QDQ,
          per_channel=per_channel, activation_type=q.QuantType.QUInt8,
          weight_type={"int8": q.QuantType.QInt8, "int4": q.QuantType.QInt4,
                       "uint8": q.QuantType.QUInt8, "uint4": q.QuantType.QUInt4}[weight_type],
          calibrate_method={"minmax": q.CalibrationMethod.MinMax,
                            "entropy": q.CalibrationMethod.Entropy,
                            "percentile": q.CalibrationMethod.Percentile}[calibration])
  finally:
    root.setLevel(level)


def predictions(sess, split, desc: str) -> np.ndarray:
  """Argmax of an ORT session over ``split``, streamed a batch at a time."""
  return np.concatenate([
      runtime.logits(sess, x).argmax(-1)
      for x, _ in tqdm(split.batches(deploy.VERIFY_BATCH), desc=desc, leave=False,
                       total=data.num_batches(len(split), deploy.VERIFY_BATCH))])


def score(preds: np.ndarray, labels: np.ndarray, float_preds: np.ndarray,
          fat_preds: np.ndarray) -> dict:
  """Top-1, agreement with the float model and the exact McNemar test against FAT."""
  fat_only, other_only, p = evaluate.mcnemar(fat_preds, preds, labels)
  return {"top1_pct": evaluate.top1_pct(preds, labels),
          "agreement_pct": evaluate.agreement_pct(preds, float_preds),
          "vs_fat": {"fat_only_correct": fat_only, "method_only_correct": other_only,
                     "p_value": p}}


def summarize(entry: dict) -> dict:
  """``entry`` with ``best_ort``: the supported ORT variant of the setting's own
  weight type with the highest top-1, and FAT's (ORT) margin over it in points."""
  own = weight_types(entry, ["auto"])[0]
  rows = [r for r in entry["ort"] if "top1_pct" in r and r["weight_type"] == own]
  best = max(rows, key=lambda r: r["top1_pct"], default=None)
  margin = None if best is None else entry["fat_ort"]["top1_pct"] - best["top1_pct"]
  return {**entry, "best_ort": best and {"calibration": best["calibration"],
                                         "weight_type": best["weight_type"]},
          "fat_minus_best_ort_pts": margin}


def markdown(result: dict) -> str:
  """The peer table of ``result`` (as ``ort_peer.json`` holds it), then FAT's margin
  over the best ORT variant per setting."""
  lines = [f"{result['eval_examples']} test images, {result['calibration_images']} "
           f"calibration images, ONNX Runtime {result['onnxruntime']}", "",
           "| setting | method | runs in | weights | top-1 % | agreement with float % | "
           "FAT-only / method-only correct | McNemar p vs FAT |",
           "|---|---|---|---|---|---|---|---|"]
  for s in result["settings"]:
    own = weight_types(s, ["auto"])[0]
    gran = "per channel" if s["per_channel"] else "per tensor"
    lines.append(_row(s["name"], "fp32", "ORT", "fp32", s["float"]))
    for name, m in s["job"].items():
      lines.append(_row(s["name"], f"{name} (ours)", "JAX fake quant", f"{own} {gran}", m))
    lines.append(_row(s["name"], "fat (ours, exported)", "ORT", f"{own} {gran}",
                      s["fat_ort"], reference=True))
    for r in s["ort"]:
      lines.append(_row(s["name"], f"ORT {r['calibration']}", "ORT",
                        f"{r['weight_type']} {gran}", r))
  lines += ["", "| setting | best ORT quantize_static variant | FAT (exported, ORT) − it, pt | "
            "McNemar p |", "|---|---|---|---|"]
  for s in result["settings"]:
    best = s["best_ort"]
    if best is None:
      lines.append(f"| {s['name']} | no ORT variant at its weight width ran | – | – |")
      continue
    row = next(r for r in s["ort"] if r.get("calibration") == best["calibration"]
               and r.get("weight_type") == best["weight_type"])
    lines.append(f"| {s['name']} | {best['calibration']}, {best['weight_type']} | "
                 f"{s['fat_minus_best_ort_pts']:+.2f} | {row['vs_fat']['p_value']:.2g} |")
  notes = ["", "Agreement: our rows against the JAX float model, ORT rows against the fp32 "
           "model in ORT. McNemar: exact, on the test images only FAT or only the method gets "
           "right; our PTQ rows against FAT's fake-quant predictions (report.json), ORT rows "
           "against the exported FAT model run in ORT."]
  if result["eval_examples"] != result["job_eval_examples"]:
    notes.append(f"Our JAX rows are report.json's, on {result['job_eval_examples']} images.")
  return "\n".join(lines + notes) + "\n"


def _row(setting, method, runs, weights, m, reference=False) -> str:
  if "unsupported" in m:
    return f"| {setting} | {method} | {runs} | {weights} | unsupported: {m['unsupported']} | | | |"
  t = m.get("vs_fat")
  vs = ("reference", "reference") if reference else (
      (f"{t['fat_only_correct']} / {t['method_only_correct']}", f"{t['p_value']:.2g}")
      if t else ("", ""))
  agree = m.get("agreement_pct")
  return (f"| {setting} | {method} | {runs} | {weights} | {m['top1_pct']:.2f} | "
          f"{'' if agree is None else f'{agree:.2f}'} | {vs[0]} | {vs[1]} |")


def compare_setting(workdir: str, entry: dict, calib, types: list[str], calibrations: list[str],
                    eval_examples: int, batch_size: int) -> dict:
  """One setting's rows: the job's (report.json), FAT's exported model and every ORT
  variant, all but the job's run in ORT on the test split."""
  name = entry["name"]
  _, _, meta = deploy.load_setting(workdir, name)
  deploy.check_fingerprint(workdir, name, meta)
  split = deploy.eval_split(meta)
  split = split.head(eval_examples) if eval_examples else split
  folder = os.path.join(workdir, deploy.EXPORT_DIR, name)
  fp32_path, fat_path = os.path.join(folder, deploy.FP32), os.path.join(folder, deploy.INT8)
  open_ = lambda p: deploy.open_exported(runtime.session, p, workdir, name)
  labels = split.labels
  float_preds = predictions(open_(fp32_path), split, f"{name} fp32")
  fat_preds = predictions(open_(fat_path), split, f"{name} FAT")
  out = {k: entry[k] for k in ("name", "weight_bits", "act_bits", "per_channel", "weight_kind")}
  out["eval_examples"] = len(split)
  out["float"] = {"top1_pct": evaluate.top1_pct(float_preds, labels)}
  out["job"] = {m: {k: v[k] for k in ("top1_pct", "agreement_pct", "vs_fat") if k in v}
                for m, v in entry["methods"].items()}
  out["fat_ort"] = score(fat_preds, labels, float_preds, fat_preds)
  out["fat_ort"]["file_bytes"] = os.path.getsize(fat_path)
  out["ort"] = []
  with tempfile.TemporaryDirectory() as tmp:
    for wt in types:
      for c in calibrations:
        row = {"calibration": c, "weight_type": wt}
        path = os.path.join(tmp, f"{c}_{wt}.onnx")
        try:
          ort_quantize(fp32_path, path, calib, c, wt, entry["per_channel"], batch_size)
          sess = runtime.session(path)
        except Exception as e:  # pylint: disable=broad-except  (ORT raises many types)
          row["unsupported"] = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        else:
          row.update(score(predictions(sess, split, f"{name} ORT {c} {wt}"), labels,
                           float_preds, fat_preds))
          row["file_bytes"] = os.path.getsize(path)
        out["ort"].append(row)
  return summarize(out)


def compare(workdir: str, settings: list[str], calibrations: list[str], types: list[str],
            eval_examples: int) -> dict:
  """The whole peer comparison of ``workdir``; written to ``<workdir>/ort_peer.json``."""
  import onnxruntime  # pylint: disable=import-outside-toplevel
  check_choices(calibrations, types)
  if eval_examples < 0:
    raise ValueError(f"--eval_examples must be 0 (all) or positive, got {eval_examples}.")
  report, config = read_job(workdir)
  chosen = select_settings(report, settings)
  for s in chosen:
    for f in (deploy.FP32, deploy.INT8):
      path = os.path.join(workdir, deploy.EXPORT_DIR, s["name"], f)
      if not os.path.isfile(path):
        raise ExportError(f"no {path}; run python -m experiments.export --workdir={workdir} "
                          f"--setting={s['name']} first.")
  calib = calibration_split(config)
  if len(calib) != report["calibration_images"]:
    raise ValueError(f"selected {len(calib)} calibration images, but the main job used "
                     f"{report['calibration_images']}; is config.json from the same run as "
                     "report.json? Re-run the main job.")
  result = {"workdir": workdir, "onnxruntime": onnxruntime.__version__,
            "calibration_images": len(calib), "job_eval_examples": report["eval_examples"],
            "activations": "uint8, asymmetric (ORT's QUInt8)",
            "settings": []}
  for s in chosen:
    result["settings"].append(compare_setting(
        workdir, s, calib, weight_types(s, types), calibrations, eval_examples,
        config["calibration_batch_size"]))
  result["eval_examples"] = result["settings"][0]["eval_examples"]
  atomic.write_json(os.path.join(workdir, OUTPUT), result)
  return result


def main(argv):
  del argv
  with cli.exit_on_user_error():
    result = compare(FLAGS.workdir, FLAGS.settings, FLAGS.calibrations, FLAGS.weight_types,
                     FLAGS.eval_examples)
  print(markdown(result))
  print(f"written: {os.path.join(FLAGS.workdir, OUTPUT)}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
