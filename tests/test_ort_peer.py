"""ORT's own quantizer as the peer row (benchmarks/ort_peer.py) and what ORT computes
int4 convolutions with (benchmarks/onnx_latency.py), on a hand-built float model.

The model is written with ``onnx.helper`` in the layout of our fp32 export (NHWC
``images``, one transpose, convs with ReLU, a dense classifier), so these tests need no
JAX model, no training and no export: they stay in the fast tier.
"""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks import onnx_latency, ort_peer
from fat import data, runtime
from fat.errors import ExportError

from conftest import REPO

SIZE, CLASSES = 8, 10


def _fp32_model(path):
  """images (N, 8, 8, 1) -> transpose -> 3x3 conv (8) -> ReLU -> 1x1 conv (8) -> ReLU
  -> flatten -> dense (10): opset 17, the layout of ``model_fp32.onnx``."""
  rng = np.random.default_rng(0)
  inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
      ("w1", rng.normal(0, 0.5, (8, 1, 3, 3))), ("b1", rng.normal(0, 0.1, 8)),
      ("w2", rng.normal(0, 0.5, (8, 8, 1, 1))), ("b2", rng.normal(0, 0.1, 8)),
      ("w3", rng.normal(0, 0.1, (8 * SIZE * SIZE, CLASSES))), ("b3", np.zeros(CLASSES)))]
  nodes = [helper.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2]),
           helper.make_node("Conv", ["t", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
           helper.make_node("Relu", ["c1"], ["r1"]),
           helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
           helper.make_node("Relu", ["c2"], ["r2"]),
           helper.make_node("Flatten", ["r2"], ["f"]),
           helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"])]
  graph = helper.make_graph(
      nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                    [None, SIZE, SIZE, 1])],
      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, CLASSES])], inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  model.ir_version = 8
  onnx.checker.check_model(model)
  onnx.save(model, path)
  return path


def _split(n, seed):
  """Blocky uint8 images (2x2 random blocks plus noise), so that pooled features differ."""
  rng = np.random.default_rng(seed)
  blocks = np.kron(rng.uniform(0, 255, (n, 2, 2, 1)), np.ones((1, SIZE // 2, SIZE // 2, 1)))
  images = np.clip(blocks + rng.normal(0, 20, blocks.shape), 0, 255).astype(np.uint8)
  return data.Split(images, rng.integers(0, CLASSES, n))


def _weight_storage(model):
  """{conv weight name: (element type, number of scales)} of a QDQ model."""
  inits = {t.name: t for t in model.graph.initializer}
  dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
  out = {}
  for conv in (n for n in model.graph.node if n.op_type == "Conv"):
    q = dq[conv.input[1]]
    out[q.input[0]] = (inits[q.input[0]].data_type, int(np.prod(inits[q.input[1]].dims)))
  return out


def test_ort_quantize_static_int8_and_int4_per_channel_and_what_ort_runs(tmp_path):
  """quantize_static through ``ort_quantize``: int8 weights stay at opset 17 and run as
  QLinearConv; int4 weights are moved to opset 21 and run as float Conv on
  DequantizeLinear of the int4 initializers (what the latency docs state). Both
  keep the float model's argmax on most images; ``score`` reads their predictions."""
  fp32 = _fp32_model(str(tmp_path / "fp32.onnx"))
  calib, test = _split(64, 0), _split(300, 1)
  float_preds = ort_peer.predictions(runtime.session(fp32), test, "fp32")
  assert len(set(float_preds)) >= 3  # a model whose argmax means something
  for wt, calibration, opset, element in (("int8", "minmax", 17, TensorProto.INT8),
                                          ("int4", "percentile", 21, TensorProto.INT4)):
    path = str(tmp_path / f"{wt}.onnx")
    ort_peer.ort_quantize(fp32, path, calib, calibration, wt, True, 32)
    model = onnx.load(path)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
    assert _weight_storage(model) == {"w1_quantized": (element, 8), "w2_quantized": (element, 8)}
    opt = str(tmp_path / f"{wt}_optimized.onnx")
    sess = runtime.session(path, optimized_path=opt)
    summary = onnx_latency.compute_summary(onnx.load(opt).graph)
    if wt == "int8":
      assert summary.startswith("integer kernels {'QLinearConv': 2") and \
          "float convolutions 0" in summary, summary
    else:
      assert summary == ("integer kernels none; float convolutions 2, 2 of them on "
                         "DequantizeLinear of int4 weights"), summary
    s = ort_peer.score(ort_peer.predictions(sess, test, wt), test.labels, float_preds,
                       float_preds)
    assert s["agreement_pct"] >= (95 if wt == "int8" else 80), (wt, s)
    assert abs(s["top1_pct"] - 100 * np.mean(float_preds == test.labels)) <= 100 - \
        s["agreement_pct"] + 1e-9


def _entry(rows, fat_top1=90.0):
  return {"name": "w4a8_per_channel", "weight_bits": 4, "act_bits": 8, "per_channel": True,
          "weight_kind": "symmetric", "eval_examples": 8, "float": {"top1_pct": 95.0},
          "job": {"ptq_minmax": {"top1_pct": 80.0, "agreement_pct": 81.0,
                                 "vs_fat": {"fat_only_correct": 9, "method_only_correct": 1,
                                            "p_value": 0.02}},
                  "fat": {"top1_pct": 90.5, "agreement_pct": 92.0}},
          "fat_ort": {"top1_pct": fat_top1, "agreement_pct": 91.0,
                      "vs_fat": {"fat_only_correct": 0, "method_only_correct": 0,
                                 "p_value": 1.0}},
          "ort": rows}


def test_score_best_variant_and_table():
  """McNemar counts against FAT, the best ORT variant of the setting's own weight type
  (an int8 row scoring higher and an unsupported row are not it), and the table."""
  labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
  fat = np.array([0, 1, 2, 3, 4, 5, 0, 0])        # 6 right
  ort = np.array([0, 1, 2, 0, 0, 0, 6, 0])        # 4 right: 3 only FAT, 1 only ORT
  s = ort_peer.score(ort, labels, labels, fat)
  assert s["top1_pct"] == 50.0 and s["agreement_pct"] == 50.0
  assert (s["vs_fat"]["fat_only_correct"], s["vs_fat"]["method_only_correct"]) == (3, 1)
  assert s["vs_fat"]["p_value"] == pytest.approx(0.625)  # 2 * P(X <= 1), X ~ B(4, 1/2)
  rows = [{"calibration": "minmax", "weight_type": "int4", **s},
          {"calibration": "entropy", "weight_type": "int4", "unsupported": "NotImplemented: x"},
          {"calibration": "percentile", "weight_type": "int4", **s, "top1_pct": 87.5},
          {"calibration": "minmax", "weight_type": "int8", **s, "top1_pct": 99.0}]
  entry = ort_peer.summarize(_entry(rows))
  assert entry["best_ort"] == {"calibration": "percentile", "weight_type": "int4"}
  assert entry["fat_minus_best_ort_pts"] == pytest.approx(2.5)
  text = ort_peer.markdown({"eval_examples": 8, "job_eval_examples": 10,
                            "calibration_images": 4, "onnxruntime": "1.32.0",
                            "settings": [entry]})
  assert "| w4a8_per_channel | ORT entropy | ORT | int4 per channel | unsupported: " \
      "NotImplemented: x |" in text
  assert "| w4a8_per_channel | ptq_minmax (ours) | JAX fake quant | int4 per channel | 80.00 | " \
      "81.00 | 9 / 1 | 0.02 |" in text
  assert "| w4a8_per_channel | ORT minmax | ORT | int4 per channel | 50.00 | 50.00 | 3 / 1 | " \
      "0.62 |" in text
  assert "| w4a8_per_channel | percentile, int4 | +2.50 | 0.62 |" in text
  assert "report.json's, on 10 images" in text
  none = ort_peer.summarize(_entry(rows[1:2]))
  text = ort_peer.markdown({"eval_examples": 8, "job_eval_examples": 8, "calibration_images": 4,
                            "onnxruntime": "1.32.0", "settings": [none]})
  assert none["best_ort"] is None
  assert "| w4a8_per_channel | no ORT variant at its weight width ran | – | – |" in text
  assert "report.json's" not in text  # same images: no note


def _job(workdir):
  """A report.json and config.json of a main job (no checkpoints, no export)."""
  settings = [{"name": n, "weight_bits": w, "act_bits": a, "per_channel": True,
               "weight_kind": "symmetric", "methods": {}}
              for n, w, a in (("w8a8_per_channel", 8, 8), ("w4a8_per_channel", 4, 8),
                              ("w4a4_per_channel", 4, 4))]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump({"settings": settings, "eval_examples": 10, "calibration_images": 4}, f)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"dataset": "fashion_mnist", "seed": 0, "calibration_images": 4,
               "calibration_batch_size": 2, "fat": {"train_fraction": 0.1}}, f)


def test_bad_input_names_the_fix(tmp_path):
  """No report, no export, a setting without 8-bit activations, unknown choices: each an
  error naming the command or the valid values, before any data is read."""
  w = str(tmp_path)
  with pytest.raises(ExportError, match=r"report\.json.*python -m experiments\.main"):
    ort_peer.compare(w, [], ["minmax"], ["auto"], 0)
  _job(w)
  with pytest.raises(ExportError, match=r"no .*w8a8_per_channel/model_fp32\.onnx; run python -m "
                     r"experiments\.export --workdir=.* --setting=w8a8_per_channel first"):
    ort_peer.compare(w, [], ["minmax"], ["auto"], 0)
  with pytest.raises(ValueError, match=r"\['w4a4_per_channel'\] do not have 8-bit activations"):
    ort_peer.compare(w, ["w4a4_per_channel"], ["minmax"], ["auto"], 0)
  with pytest.raises(ValueError, match=r"unknown settings \['w2'\]"):
    ort_peer.compare(w, ["w2"], ["minmax"], ["auto"], 0)
  with pytest.raises(ValueError, match=r"--calibrations: \['kl'\]; choose from minmax"):
    ort_peer.compare(w, [], ["kl"], ["auto"], 0)
  with pytest.raises(ValueError, match=r"--weight_types: \['int2'\]"):
    ort_peer.compare(w, [], ["minmax"], ["int2"], 0)
  report = json.load(open(tmp_path / "report.json"))
  assert [ort_peer.weight_types(s, ["auto", "int8"]) for s in report["settings"][:2]] == \
      [["int8"], ["int4", "int8"]]
  assert not (tmp_path / ort_peer.OUTPUT).exists()


@pytest.mark.slow
def test_missing_export_exits_2_with_one_line(tmp_path):
  _job(str(tmp_path))
  r = subprocess.run([sys.executable, "-m", "benchmarks.ort_peer", f"--workdir={tmp_path}",
                      "--settings=w4a8_per_channel"], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no "), r.stderr
  assert "experiments.export" in lines[0] and "--setting=w4a8_per_channel" in lines[0]
  assert r.stdout == "" and not (tmp_path / ort_peer.OUTPUT).exists()
