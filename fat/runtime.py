"""ONNX Runtime sessions for exported models: logits, and the ops it really runs."""

from __future__ import annotations

import collections
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

# Integer kernels ORT runs for QDQ patterns, and the float ops that would mean a fallback.
# int4 weights (opset 21) are such a fallback: ORT dequantizes them and runs a float Conv.
INT8_OPS = ("QLinearConv", "ConvInteger", "QLinearAdd", "QLinearGlobalAveragePool",
            "QLinearMatMul", "MatMulInteger", "QGemm")
FLOAT_COMPUTE_OPS = ("Conv", "Add", "GlobalAveragePool", "Gemm", "MatMul", "FusedConv",
                     "NchwcConv")


def session(path: str, threads: int = 0, optimized_path: str | None = None):
  """A CPU session; ``threads`` 0 lets ORT choose. ``optimized_path`` saves the
  graph ORT actually executes."""
  so = ort.SessionOptions()
  so.intra_op_num_threads = threads
  so.inter_op_num_threads = 1
  so.log_severity_level = 3
  if optimized_path:
    so.optimized_model_filepath = optimized_path
  return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def logits(sess, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Logits for float NHWC ``images`` in batches."""
  name = sess.get_inputs()[0].name
  return np.concatenate([sess.run(None, {name: np.asarray(images[i:i + batch_size],
                                                          np.float32)})[0]
                         for i in range(0, len(images), batch_size)])


def session_and_ops(path: str, threads: int = 0):
  """``(session, op-type counts)``: one CPU session, and the op types of the graph it
  built after ORT's optimizations (what it really runs)."""
  with tempfile.TemporaryDirectory() as tmp:
    opt = os.path.join(tmp, "optimized.onnx")
    sess = session(path, threads, optimized_path=opt)
    graph = onnx.load(opt).graph
  return sess, dict(sorted(collections.Counter(n.op_type for n in graph.node).items()))


def executed_ops(path: str) -> dict[str, int]:
  """Op-type counts of the graph ORT builds for ``path`` after its optimizations."""
  return session_and_ops(path)[1]
