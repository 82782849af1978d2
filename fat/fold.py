"""Batch-norm folding, on arrays (METHOD.md section 2).

``W' = W * gamma / sqrt(var + eps)`` per output channel (the last kernel axis,
also for depthwise kernels ``(kh, kw, 1, C)``), and
``b' = beta + (b - mean) * gamma / sqrt(var + eps)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def fold_batch_norm(kernel, bias, scale, offset, mean, var, eps):
  """Folds an inference-mode batch norm into the preceding conv or dense.

  Args:
    kernel: conv ``(kh, kw, cin, cout)``, depthwise ``(kh, kw, 1, C)`` or
      dense ``(cin, cout)`` kernel; the output channel is the last axis.
    bias: the layer's bias of shape ``(cout,)``, or None for no bias.
    scale, offset: BN gamma and beta, shape ``(cout,)``; None means 1 and 0.
    mean, var: BN running statistics, shape ``(cout,)``.
    eps: BN epsilon.

  Returns:
    ``(kernel, bias)`` such that ``x @ kernel + bias == BN(x @ W + b)``.

  Concrete arrays fold in numpy (the same correctly rounded float32 operations
  as JAX's eager ones, without compiling each op for each layer's shape);
  traced ones (under ``jit``) in ``jax.numpy``.
  """
  traced = any(isinstance(a, jax.core.Tracer) for a in (kernel, bias, scale, offset, mean, var))
  xp = jnp if traced else np
  kernel = xp.asarray(kernel)
  cout = kernel.shape[-1]
  scale = xp.ones((cout,), kernel.dtype) if scale is None else xp.asarray(scale)
  offset = xp.zeros((cout,), kernel.dtype) if offset is None else xp.asarray(offset)
  bias = xp.zeros((cout,), kernel.dtype) if bias is None else xp.asarray(bias)
  mean = xp.asarray(mean, kernel.dtype)
  var = xp.asarray(var, kernel.dtype)
  for name, v in (("bias", bias), ("scale", scale), ("offset", offset), ("mean", mean),
                  ("var", var)):
    if v.shape != (cout,):
      raise ValueError(f"BN {name} has shape {v.shape}, expected ({cout},) "
                       f"for kernel shape {kernel.shape}.")
  mult = scale / xp.sqrt(var + xp.asarray(eps, var.dtype))
  folded = kernel * mult, offset + (bias - mean) * mult
  return folded if traced else tuple(jax.device_put(a) for a in folded)


def fold_variables(variables, eps: float) -> dict:
  """Folds every ``{conv, bn}`` pair of a float model's variables.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a model built from
      ``fat.models.blocks.ConvBNAct`` (submodules ``conv`` and ``bn``).
    eps: the model's BN epsilon.

  Returns:
    ``{"params": ...}`` for the same model in a folded stage: each ``bn`` is
    gone and its ``conv`` has ``kernel`` and ``bias``.
  """
  if "params" not in variables or "batch_stats" not in variables:
    raise ValueError("fold_variables needs float variables with 'params' and "
                     f"'batch_stats', got collections {sorted(variables)}.")

  def walk(params, stats, path):
    out = {}
    for name, value in params.items():
      if name == "bn":
        continue
      if name == "conv" and "bn" in params:
        bn, st = params["bn"], stats.get("bn")
        if st is None:
          raise ValueError(f"no batch_stats for {'/'.join(path + ('bn',))}.")
        kernel, bias = fold_batch_norm(value["kernel"], value.get("bias"), bn.get("scale"),
                                       bn.get("bias"), st["mean"], st["var"], eps)
        out[name] = {"kernel": kernel, "bias": bias}
      elif isinstance(value, dict) or hasattr(value, "items"):
        out[name] = walk(value, stats.get(name, {}), path + (name,))
      else:
        out[name] = value
    return out

  return {"params": walk(variables["params"], variables["batch_stats"], ())}
