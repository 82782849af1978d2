"""Depthwise convolution, pure JAX, with the implementation chosen per backend.

On the CPU, XLA's grouped convolution (``feature_group_count=C``) is several
times slower than a k*k-tap shifted multiply-add; on GPU/TPU the grouped
convolution is the fast path. ``depthwise_conv(..., impl="auto")`` picks by
``jax.default_backend()``. "shift" has a hand-written VJP (input gradient as
the flipped-kernel conv of the dilated cotangent, weight gradient as k*k
reductions over cache-sized batch chunks); "shift_autodiff" is the same forward
differentiated by JAX, kept as the reference. All compute the same function
(tested in tests/test_depthwise.py); benchmarks/depthwise_speed.py times them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLS = ("auto", "conv", "shift", "shift_autodiff")
# float32 products in every convolution and matmul of the models: the backends'
# default rounds their operands to bfloat16 (TPU) or TF32 (recent GPUs), which
# moves fake-quantized values off their grid. (Elementwise "shift" taps are
# float32 anyway.)
PRECISION = jax.lax.Precision.HIGHEST
PADDINGS = ("same", "symmetric")


def conv_padding(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
  """(low, high) padding of one spatial axis.

  "same" is TensorFlow's SAME (output ceil(size/stride), extra pad at the
  end); "symmetric" is PyTorch's ``padding=kernel//2`` on both sides. They
  differ on stride-2 layers with even inputs.
  """
  if padding == "same":
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2
  if padding == "symmetric":
    return kernel // 2, kernel // 2
  raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}.")


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"depthwise impl must be one of {IMPLS}, got {impl!r}.")
  if impl == "auto":
    return "shift" if jax.default_backend() == "cpu" else "conv"
  return impl


def depthwise_conv(x, kernel, stride: int, padding: str, impl: str = "auto"):
  """Depthwise conv of NHWC ``x`` with a ``(kh, kw, 1, C)`` kernel."""
  kh, kw, _, c = kernel.shape
  pads = (conv_padding(x.shape[1], kh, stride, padding),
          conv_padding(x.shape[2], kw, stride, padding))
  if resolve_impl(impl) == "conv":
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(stride, stride), padding=pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
        precision=PRECISION)
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  w = kernel[:, :, 0, :].astype(x.dtype)
  if impl == "shift_autodiff":
    return _shift_forward(xp, w, stride)
  return _shift_conv(xp, w, stride)


def _shift_forward(xp, w, stride: int):
  """Sum over the kh*kw taps of the strided window of padded ``xp`` times w[i, j]."""
  kh, kw, c = w.shape
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      term = _tap(xp, i, j, ho, wo, stride) * w[i, j]
      out = term if out is None else out + term
  return out


def _tap(xp, i, j, ho, wo, stride):
  return jax.lax.slice(
      xp, (0, i, j, 0),
      (xp.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, xp.shape[3]),
      (1, stride, stride, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shift_conv(xp, w, stride):
  return _shift_forward(xp, w, stride)


def _shift_conv_fwd(xp, w, stride):
  return _shift_forward(xp, w, stride), (xp, w)


def _shift_conv_bwd(stride, res, g):
  """Hand-written gradients; autodiff of the taps costs k*k full-size pads.

  Input: the transposed conv, i.e. the cotangent (dilated by the stride) padded
  by k-1 and correlated with the flipped kernel, stride 1. Weight: one fused
  multiply-reduce per tap.
  """
  xp, w = res
  kh, kw, _ = w.shape
  ho, wo = g.shape[1], g.shape[2]
  extra_h = xp.shape[1] - (stride * (ho - 1) + kh)
  extra_w = xp.shape[2] - (stride * (wo - 1) + kw)
  zero = jnp.zeros((), g.dtype)
  gp = jax.lax.pad(g, zero, ((0, 0, 0), (kh - 1, kh - 1 + extra_h, stride - 1),
                             (kw - 1, kw - 1 + extra_w, stride - 1), (0, 0, 0)))
  dxp = _shift_forward(gp, w[::-1, ::-1], 1)
  return dxp, _weight_grad(xp, g, kh, kw, stride).astype(w.dtype)


def _weight_grad(xp, g, kh, kw, stride, max_chunk: int = 8):
  """dL/dw[i, j, c] = sum over (b, h, w) of tap_ij(xp) * g.

  The k*k reductions run over batch chunks of at most ``max_chunk`` images so
  each chunk stays in cache; one pass over the whole batch per tap is several
  times slower on the CPU (benchmarks/depthwise_speed.py).
  """
  b, ho, wo, c = g.shape
  chunk = max(d for d in range(1, min(b, max_chunk) + 1) if b % d == 0)
  acc = jnp.promote_types(xp.dtype, jnp.float32)  # float32 sums for bf16 inputs

  def taps(xc, gc):
    return jnp.stack([
        jnp.stack([jnp.sum(_tap(xc, i, j, ho, wo, stride).astype(acc) * gc,
                           axis=(0, 1, 2)) for j in range(kw)]) for i in range(kh)])

  xs = xp.reshape(b // chunk, chunk, *xp.shape[1:])
  gs = g.reshape(b // chunk, chunk, *g.shape[1:]).astype(acc)
  total, _ = jax.lax.scan(lambda acc_, xg: (acc_ + taps(*xg), None),
                          jnp.zeros((kh, kw, c), acc), (xs, gs))
  return total


_shift_conv.defvjp(_shift_conv_fwd, _shift_conv_bwd)
