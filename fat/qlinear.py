"""A linear op on a fake-quantized weight, ``op(x, fake_quant(w))``, pure JAX.

``op`` is any function linear in its second argument: a convolution, a
depthwise convolution or a matmul. The value and every gradient equal those of
``op(x, quant.fake_quant(w, qp, spec))`` under autodiff; only the way the
threshold gradients are computed differs.

Autodiff reaches alpha through the weight gradient dL/dW_q, the costly
"correlate input with cotangent" pass of a convolution. When the weights are
frozen, as in threshold training (FAT), that pass is needed for nothing else.
Linearity gives the same number from a forward op:

  dL/dalpha_c = sum_k dL/dW_q[k, c] * dW_q[k, c]/dalpha_c
              = sum_(n, c) g[n, c] * op(x, dW_q/dalpha)[n, c]

so the backward pass here runs ``op`` forward on the elementwise derivative
kernel (``quant.partials``) and multiplies by the cotangent. The weight's own
gradient (straight-through, masked to the grid's range) is still returned;
under ``jit`` XLA drops it when nothing uses it.

The sum over positions is chosen per backend (``position_sum``). On the CPU,
XLA fuses ``jnp.sum`` with the depthwise taps into one reduction that runs
several times slower than the taps themselves; a product with a vector of
ones keeps the taps a separate loop and sums in a matrix-vector product
(benchmarks/fat_step_profile.py times both in one run).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from fat import quant

# "auto": "dot" on the CPU, "reduce" (jnp.sum) elsewhere.
POSITION_SUM_IMPLS = ("auto", "dot", "reduce")
POSITION_SUM_IMPL = "auto"


def quantized_linear(x: jax.Array, w: jax.Array, qp: quant.QuantParams,
                     spec: quant.QuantSpec, op: Callable) -> jax.Array:
  """``op(x, fake_quant(w, qp, spec).astype(x.dtype))``; ``w``'s channel axis is
  ``spec.axis`` and must be the last axis of ``op``'s output."""
  if spec.per_channel and spec.axis % w.ndim != w.ndim - 1:
    raise ValueError(f"quantized_linear needs the output-channel axis last, got axis "
                     f"{spec.axis} for a weight of shape {w.shape}.")
  return _quantized_linear(x, w, quant.as_float32(qp),
                           spec, op)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _quantized_linear(x, w, qp, spec, op):
  return op(x, quant.fake_quant(w, qp, spec).astype(x.dtype))


def _fwd(x, w, qp, spec, op):
  return _quantized_linear(x, w, qp, spec, op), (x, w, qp)


def _bwd(spec, op, saved, g):
  x, w, qp = saved
  wq, in_range, dy_dalpha, dy_dbeta = quant.partials(w, qp, spec)
  _, op_vjp = jax.vjp(op, x, wq.astype(x.dtype))
  dx, dwq = op_vjp(g)
  dw = jnp.where(in_range, dwq.astype(jnp.float32), 0.0).astype(w.dtype)

  acc = jnp.promote_types(x.dtype, jnp.float32)  # float32 sums for bf16, float64 stays

  def contract(dk):  # sum over everything but the output channel (or all of it)
    y = op(x, dk.astype(x.dtype)).astype(acc) * g.astype(acc)
    per_channel = position_sum(y)
    return (per_channel if spec.per_channel else jnp.sum(per_channel)).reshape(
        jnp.shape(qp.alpha))

  grad_beta = None if dy_dbeta is None else contract(dy_dbeta)
  return dx, dw, quant.threshold_grads(qp, contract(dy_dalpha), grad_beta)


_quantized_linear.defvjp(_fwd, _bwd)


def position_sum(y: jax.Array, impl: str | None = None) -> jax.Array:
  """Sum of ``y`` over every axis but the last (``impl`` defaults to
  ``POSITION_SUM_IMPL``)."""
  impl = POSITION_SUM_IMPL if impl is None else impl
  if impl not in POSITION_SUM_IMPLS:
    raise ValueError(f"position_sum impl must be one of {POSITION_SUM_IMPLS}, got {impl!r}.")
  if impl == "auto":
    impl = "dot" if jax.default_backend() == "cpu" else "reduce"
  if impl == "reduce":
    return jnp.sum(y, axis=tuple(range(y.ndim - 1)))
  rows = y.reshape(-1, y.shape[-1])
  return jnp.dot(jnp.ones((rows.shape[0],), y.dtype), rows,
                 precision=jax.lax.Precision.HIGHEST)
