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


# On x86 CPUs without VNNI (SSE4.1, AVX2, AVX-512 without VNNI), ORT computes uint8 x
# int8 products with VPMADDUBSW, whose int16 sum of two products saturates once
# |weight| > 63 (255 * 127 * 2 > 32767): ORT's QLinearConv then differs from
# integer arithmetic (W8A8 per channel on an AVX2 machine: 97.1% agreement with
# fake quant instead of 99.8%). This session option makes ORT use its exact uint8 x
# uint8 kernels for such weights on those CPUs; on VNNI and ARM CPUs it changes
# nothing (docs/deployment.md#int8-on-x86-cpus-without-vnni).
EXACT_INT8 = {"session.x64quantprecision": "1"}


def session(path: str, threads: int = 0, optimized_path: str | None = None,
            exact_int8: bool = True):
  """A CPU session; ``threads`` 0 lets ORT choose. ``optimized_path`` saves the
  graph ORT actually executes. ``exact_int8``: no int16 saturation in uint8 x int8
  products on x86 CPUs without VNNI (``EXACT_INT8``)."""
  so = ort.SessionOptions()
  so.intra_op_num_threads = threads
  so.inter_op_num_threads = 1
  so.log_severity_level = 3
  if exact_int8:
    for key, value in EXACT_INT8.items():
      so.add_session_config_entry(key, value)
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
