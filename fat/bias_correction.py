"""Empirical bias correction (DFQ, Nagel et al. 2019, section 4.2).

Quantizing a layer's weights ``W -> W_q`` shifts the mean of its output by

    d_c = E[W_q x + b_q]_c - E[W x + b]_c      (per output channel c)

(``b_q``: the bias on its int32 grid in the "quant" stage). DFQ's empirical
form measures ``d`` on data and subtracts it from the bias: ``b' = b - d``,
so the layer's output has the float layer's mean again.

Here ``x`` is the input the layer gets in the quantized network, and both
outputs are computed from that same ``x``: ``d`` is the layer's own error
(``E[(W_q - W) x]`` plus the bias rounding), not the error that earlier layers
hand it. DFQ corrects layer by layer, in network order, so that each layer is
measured on inputs whose upstream layers are already corrected. We get that
order in one pass over the calibration images: within each batch, each
layer's output is corrected by that batch's ``d`` before the next layer reads
it, and each bias gets the mean of its ``d`` over the batches (weighted by
batch size). One pass costs one quantized forward pass plus one float op per
layer, instead of a pass per layer; what it leaves is the batch-to-batch
spread of ``d`` and the rounding of the corrected bias to its int32 grid
(half a step of ``x_step * w_step``). Measured on a random tiny_net at W4A8
per tensor: the mean error of each layer but the first falls to 1-7% of its
start (the first one's was mostly its bias rounding, which stays), and a
second pass does not lower it further. (Measuring every layer on the uncorrected
network instead, all at once, converged about one layer per extra pass.)

Every conv and dense layer of the "quant" model is measured; one whose weights
the rules leave in float has ``d = 0``. The thresholds
are those of ``variables``: correct after the thresholds are chosen (a PTQ
method's result); training them later (FAT) starts from the corrected biases.

    variables = bias_correction.correct_biases(qmodel, variables, calib_images)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fat import data
from fat.layers import Conv, Dense


def _measuring(records: dict, reference: dict, sequential: bool):
  """An interceptor: each quantized ``Conv``/``Dense`` call records the mean
  over all but the channel axis of ``y_q - y_f`` into ``records[path]``, with
  ``y_f`` the layer's output in float with its params in ``reference``;
  ``sequential`` hands on ``y_q - d`` instead of ``y_q``."""

  def intercept(next_fun, args, kwargs, context):
    m = context.module
    if (context.method_name != "__call__" or not isinstance(m, (Conv, Dense))
        or m.mode.stage != "quant" or m.is_initializing()):
      return next_fun(*args, **kwargs)
    y_q = next_fun(*args, **kwargs)
    fmod = m.clone(parent=None, mode=dataclasses.replace(m.mode, stage="folded"))
    path = "/".join(m.scope.path)
    y_f = fmod.apply({"params": reference[path]}, args[0])
    e = y_q.astype(jnp.float32) - y_f.astype(jnp.float32)
    d = records[path] = jnp.mean(e, axis=tuple(range(e.ndim - 1)))
    return (y_q - d).astype(y_q.dtype) if sequential else y_q

  return intercept


def output_errors(qmodel: nn.Module, variables: dict, images, *, reference: dict | None = None,
                  sequential: bool = False, batch_size: int = 128) -> dict[str, np.ndarray]:
  """``{layer path: d}``: each quantized conv's or dense layer's mean output
  error per output channel over ``images`` (module docstring), keyed by the
  path of the ``Conv`` or ``Dense`` module ("block_1/expand/conv", "classifier").
  The float output uses the params of ``reference`` (default: ``variables``'
  own; pass the uncorrected params to measure a correction: with the same
  bias on both sides the bias cancels out of ``d``). ``sequential`` corrects
  each layer's output by its batch's ``d`` before the next layer reads it
  (what ``correct_biases`` measures; module docstring).

  ``qmodel`` is in the "quant" stage; ``images`` a ``fat.data.Split`` or NHWC array.
  """
  if qmodel.mode.stage != "quant":
    raise ValueError(f"output_errors needs a model in the 'quant' stage, got "
                     f"{qmodel.mode.stage!r}; build it with fat.pipeline.quantize.")

  reference = variables["params"] if reference is None else reference

  @jax.jit
  def batch_errors(v, ref, x):
    records = {}
    flat = {"/".join(k): p for k, p in traverse_util.flatten_dict(ref, is_leaf=(
        lambda _, t: "kernel" in t)).items()}  # layer path -> its {"kernel", "bias"}
    with nn.intercept_methods(_measuring(records, flat, sequential)):
      qmodel.apply(v, x)
    return records

  sums, count = None, 0
  batches, _ = data.image_batches(images, batch_size)
  for x in batches:
    e = jax.device_get(batch_errors(variables, reference, jnp.asarray(x)))
    e = {k: np.asarray(v, np.float64) * len(x) for k, v in e.items()}
    sums = e if sums is None else {k: sums[k] + v for k, v in e.items()}
    count += len(x)
  if sums is None:
    raise ValueError("output_errors got no images: give at least one calibration image.")
  return {k: v / count for k, v in sums.items()}


def correct_biases(qmodel: nn.Module, variables: dict, images, *,
                   batch_size: int = 128) -> dict:
  """``variables`` with each quantized layer's bias ``b - d`` (``output_errors``
  with ``sequential=True`` on ``images``, the calibration images, a
  ``fat.data.Split`` or NHWC array); everything else unchanged."""
  errors = output_errors(qmodel, variables, images, sequential=True, batch_size=batch_size)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  for path, d in errors.items():
    key = f"{path}/bias"
    if key not in flat:
      raise ValueError(f"no bias for layer {path!r} in the params; bias correction needs "
                       "folded params (fat.fold.fold_variables).")
    b = np.asarray(flat[key])
    flat[key] = jnp.asarray((b.astype(np.float64) - d).astype(b.dtype))
  return {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}
