"""LSQ / LSQ+ step-size gradients on this project's quantizers, pure JAX.

LSQ (Esser et al. 2020) trains each quantizer's step size ``d`` with the STE
gradient of ``y = clip(round(x / d), qmin, qmax) * d`` scaled by

  g = 1 / sqrt(N * Q_p)

(``N``: weights per channel, or features per image for activations; ``Q_p``:
the grid's top), so that steps train at the pace of the weights. LSQ+ (Bhalgat
et al. 2020) also trains an offset, with the same scale.

Here the quantizers keep FAT's parameters (``fat.quant``): the step is
``d = alpha_c * span / qmax`` (span: ``t_max``, or ``t_max - t_min`` when
asymmetric) and the offset ``T_l = t_min + beta_c * span``. Their STE gradients
are the LSQ ones up to the constant ``dd/dalpha = span / qmax`` (METHOD.md
section 1: in range ``(y - x) / alpha_c = (round(x/d) - x/d) * span / qmax``,
saturated ``t_max = Q_p * span / qmax``). An optimizer step of ``lr * grad`` on
the step size moves alpha by ``lr * grad_d * qmax / span``; since
``grad_alpha = grad_d * span / qmax``, that is ``lr * grad_alpha * (qmax/span)^2``.
So ``scale_grads`` multiplies the gradient reaching alpha by

  c_alpha = g * (qmax / span)^2,   and the one reaching beta by  c_beta = g / span^2,

and an SGD step on alpha (beta) is exactly LSQ's SGD step on the step size
(offset), read in alpha (beta) units. The forward pass is unchanged, so the
result runs in the same quantized model, export and integer reference; alpha
and beta stay inside the setting's clip ranges (a bound LSQ does not have).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fat import quant


@jax.custom_vjp
def _scale_grad(x, c):
  return x


def _scale_fwd(x, c):
  return x, c


def _scale_bwd(c, g):
  return g * c, jnp.zeros_like(c)


_scale_grad.defvjp(_scale_fwd, _scale_bwd)


def scale_grad(x: jax.Array, c: jax.Array) -> jax.Array:
  """``x`` in the forward pass; its gradient multiplied by ``c`` (elementwise)."""
  x = jnp.asarray(x, jnp.float32)
  return _scale_grad(x, jnp.broadcast_to(jax.lax.stop_gradient(jnp.asarray(c, jnp.float32)),
                                         x.shape))


def grad_scale(n: int, spec: quant.QuantSpec) -> float:
  """LSQ's g = 1 / sqrt(N * Q_p)."""
  return 1.0 / float(max(n, 1) * spec.qmax) ** 0.5


def scale_grads(qp: quant.QuantParams, spec: quant.QuantSpec, n: int) -> quant.QuantParams:
  """``qp`` whose alpha and beta pass gradients scaled to LSQ's step-size and
  offset updates (module docstring); ``n``: weights per channel or features
  per image. All-zero channels (span 0) get no gradient."""
  qp = quant.as_float32(qp)
  span = jax.lax.stop_gradient(quant.KINDS[spec.kind].span(qp.t_min, qp.t_max))
  g = grad_scale(n, spec)
  live = span > 0
  safe = jnp.where(live, span, 1.0)
  c_alpha = jnp.where(live, g * (spec.qmax / safe) ** 2, 0.0)
  c_beta = jnp.where(live, g / safe ** 2, 0.0)
  return qp._replace(alpha=scale_grad(qp.alpha, c_alpha), beta=scale_grad(qp.beta, c_beta))


def features(x: jax.Array) -> int:
  """N of an activation: its features per image (all but the batch axis)."""
  return int(x.size // x.shape[0]) if x.ndim > 1 else int(x.size)


def weights_per_channel(kernel: jax.Array, spec: quant.QuantSpec) -> int:
  """N of a weight: its elements per output channel (or all, per tensor)."""
  return int(kernel.size // kernel.shape[-1]) if spec.per_channel else int(kernel.size)
