"""Depthwise convolution, pure JAX, with the implementation chosen per backend.

On the CPU, XLA's grouped convolution (``feature_group_count=C``) is several
times slower than a k*k-tap shifted multiply-add; on GPU/TPU the grouped
convolution is the fast path. ``depthwise_conv(..., impl="auto")`` picks by
``jax.default_backend()``. Both implementations compute the same function
(tested in tests/test_depthwise.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "conv", "shift")
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
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(
          xp, (0, i, j, 0),
          (xp.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
          (1, stride, stride, 1))
      term = tap * kernel[i, j, 0].astype(x.dtype)
      out = term if out is None else out + term
  return out
