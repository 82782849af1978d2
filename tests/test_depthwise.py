"""Tests of the depthwise convolution (fat/depthwise.py).

The "shift" (k*k shifted multiply-adds) and "conv" (grouped XLA convolution)
implementations must compute the same function, values and gradients. Both are
checked against references written here: a float64 numpy loop and
``jax.lax.conv_general_dilated`` with ``feature_group_count``, each padded by
the TF SAME / PyTorch ``k//2`` formulas computed in this file (not by
``conv_padding``).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fat import depthwise
from fat.depthwise import conv_padding, depthwise_conv
from fat.models import MNASNet, MobileNetV2

HI = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------
# Independent references.
# --------------------------------------------------------------------------


def ref_pads(size, kernel, stride, padding):
  """(low, high) padding of one axis, from the TF / PyTorch definitions."""
  if padding == "same":
    # TF SAME: output ceil(size / stride); the odd pixel goes at the end.
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2)
  # PyTorch Conv2d(padding=kernel // 2) on both sides.
  return (kernel // 2, kernel // 2)


def ref_out_size(size, kernel, stride, padding):
  if padding == "same":
    return math.ceil(size / stride)
  return (size + 2 * (kernel // 2) - kernel) // stride + 1


def np_depthwise(x, kernel, stride, padding):
  """float64 direct depthwise convolution, NHWC x and (kh, kw, 1, C) kernel."""
  x = np.asarray(x, np.float64)
  k = np.asarray(kernel, np.float64)
  kh, kw = k.shape[:2]
  ph = ref_pads(x.shape[1], kh, stride, padding)
  pw = ref_pads(x.shape[2], kw, stride, padding)
  xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
  for i in range(ho):
    for j in range(wo):
      win = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j, :] = np.einsum("nabc,abc->nc", win, k[:, :, 0, :])
  return out


def lax_depthwise(x, kernel, stride, padding):
  pads = (ref_pads(x.shape[1], kernel.shape[0], stride, padding),
          ref_pads(x.shape[2], kernel.shape[1], stride, padding))
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1], precision=HI)


# --------------------------------------------------------------------------
# Implementations agree, values and gradients.
# --------------------------------------------------------------------------

C = 5
SIZES = [pytest.param((8, 6), id="even"), pytest.param((7, 9), id="odd")]


def _case_fn(stride, padding, cot):
  """One jit: outputs and (x, kernel) gradients of the three implementations."""

  def run(x, kernel):
    outs = {}
    for name, f in (
        ("shift", lambda a, b: depthwise_conv(a, b, stride, padding, "shift")),
        ("shift_autodiff",
         lambda a, b: depthwise_conv(a, b, stride, padding, "shift_autodiff")),
        ("conv", lambda a, b: depthwise_conv(a, b, stride, padding, "conv")),
        ("lax", lambda a, b: lax_depthwise(a, b, stride, padding)),
    ):
      y = f(x, kernel)
      gx, gk = jax.grad(lambda a, b: jnp.sum(f(a, b) * cot), argnums=(0, 1))(x, kernel)
      outs[name] = (y, gx, gk)
    return outs

  return jax.jit(run)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("padding", ["same", "symmetric"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_shift_and_conv_agree(k, stride, padding, size):
  rng = np.random.default_rng(k * 100 + stride * 10 + len(padding) + size[0])
  h, w = size
  x = rng.normal(size=(2, h, w, C)).astype(np.float32)
  kernel = rng.normal(size=(k, k, 1, C)).astype(np.float32)
  ho, wo = ref_out_size(h, k, stride, padding), ref_out_size(w, k, stride, padding)
  cot = rng.normal(size=(2, ho, wo, C)).astype(np.float32)

  outs = _case_fn(stride, padding, cot)(x, kernel)
  want = np_depthwise(x, kernel, stride, padding)
  assert want.shape == (2, ho, wo, C)
  for name in ("shift", "shift_autodiff", "conv", "lax"):
    y = np.asarray(outs[name][0], np.float64)
    assert y.shape == want.shape, name
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=0, err_msg=name)

  ys, gxs, gks = (np.asarray(a) for a in outs["shift"])
  yc, gxc, gkc = (np.asarray(a) for a in outs["conv"])
  np.testing.assert_allclose(ys, yc, atol=1e-5, rtol=0)
  np.testing.assert_allclose(gxs, gxc, atol=1e-4, rtol=0)
  np.testing.assert_allclose(gks, gkc, atol=1e-4, rtol=0)
  # And both against the reference's gradients.
  _, gxr, gkr = (np.asarray(a) for a in outs["lax"])
  np.testing.assert_allclose(gxs, gxr, atol=1e-4, rtol=0)
  np.testing.assert_allclose(gks, gkr, atol=1e-4, rtol=0)
  # The hand-written VJP of "shift" equals autodiff of the same taps.
  _, gxa, gka = (np.asarray(a) for a in outs["shift_autodiff"])
  np.testing.assert_allclose(gxs, gxa, atol=1e-5, rtol=0)
  np.testing.assert_allclose(gks, gka, atol=1e-4, rtol=0)
  # The gradients are not trivially zero.
  assert np.abs(gxr).max() > 0.1 and np.abs(gkr).max() > 0.1


@pytest.mark.parametrize("batch", [1, 7, 9, 24])
@pytest.mark.parametrize("stride", [1, 2])
def test_custom_vjp_batch_chunking(batch, stride):
  """The weight gradient is reduced over batch chunks (1, 7, 3 and 8 images here)."""
  rng = np.random.default_rng(batch + stride)
  x = rng.normal(size=(batch, 7, 6, 4)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 1, 4)).astype(np.float32)
  ho, wo = ref_out_size(7, 3, stride, "same"), ref_out_size(6, 3, stride, "same")
  cot = rng.normal(size=(batch, ho, wo, 4)).astype(np.float32)

  def grads(impl):
    f = lambda a, b: jnp.sum(depthwise_conv(a, b, stride, "same", impl) * cot)
    return jax.jit(jax.grad(f, argnums=(0, 1)))(x, kernel)

  (gx, gk), (gxr, gkr) = grads("shift"), grads("conv")
  np.testing.assert_allclose(np.asarray(gx), np.asarray(gxr), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(gkr), atol=1e-3, rtol=1e-5)
  assert np.abs(np.asarray(gk)).max() > 0.1


def test_kernel_gradient_matches_numpy():
  """d sum(y * g) / d kernel[a, b, 0, c] = sum over windows of x * g, float64."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 1, 3)).astype(np.float32)
  cot = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)  # stride 2, SAME: 8 -> 4
  ph, pw = ref_pads(8, 3, 2, "same"), ref_pads(8, 3, 2, "same")
  xp = np.pad(x.astype(np.float64), ((0, 0), ph, pw, (0, 0)))
  want = np.zeros((3, 3, 1, 3))
  for a in range(3):
    for b in range(3):
      win = xp[:, a:a + 7:2, b:b + 7:2, :]
      want[a, b, 0] = np.einsum("nijc,nijc->c", win, cot)
  for impl in ("shift", "conv"):
    g = jax.grad(lambda kk: jnp.sum(depthwise_conv(x, kk, 2, "same", impl) * cot))(kernel)
    np.testing.assert_allclose(np.asarray(g, np.float64), want, atol=1e-4, err_msg=impl)


# --------------------------------------------------------------------------
# Padding rules and argument validation.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5])
def test_padding_same_vs_symmetric_stride2_even(k):
  same = conv_padding(8, k, 2, "same")
  sym = conv_padding(8, k, 2, "symmetric")
  assert same != sym
  assert same == ref_pads(8, k, 2, "same")  # TF: extra pad at the end
  assert sym == (k // 2, k // 2)
  assert same[1] - same[0] == 1


@pytest.mark.parametrize("size,stride", [(8, 1), (7, 1), (7, 2), (9, 2)])
@pytest.mark.parametrize("k", [3, 5])
def test_padding_same_equals_symmetric_otherwise(size, stride, k):
  """Odd kernels: stride 1, or stride 2 on odd inputs, pad k//2 both ways."""
  assert conv_padding(size, k, stride, "same") == (k // 2, k // 2)
  assert conv_padding(size, k, stride, "symmetric") == (k // 2, k // 2)


def test_padding_values():
  # 224 -> 112 with a stride-2 3x3 conv: TF pads (0, 1), PyTorch (1, 1).
  assert conv_padding(224, 3, 2, "same") == (0, 1)
  assert conv_padding(224, 3, 2, "symmetric") == (1, 1)
  # 1x1 kernels need no padding under SAME.
  assert conv_padding(7, 1, 1, "same") == (0, 0)
  assert conv_padding(8, 1, 2, "same") == (0, 0)


def test_same_and_symmetric_give_different_outputs():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1, 8, 8, 2)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 1, 2)).astype(np.float32)
  a = depthwise_conv(x, kernel, 2, "same", "shift")
  b = depthwise_conv(x, kernel, 2, "symmetric", "shift")
  assert a.shape == b.shape == (1, 4, 4, 2)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2


def test_invalid_impl_and_padding_raise():
  x = jnp.zeros((1, 4, 4, 2))
  k = jnp.zeros((3, 3, 1, 2))
  with pytest.raises(ValueError):
    depthwise_conv(x, k, 1, "same", "fft")
  with pytest.raises(ValueError):
    depthwise_conv(x, k, 1, "valid", "shift")
  with pytest.raises(ValueError):
    depthwise_conv(x, k, 1, "valid", "conv")
  with pytest.raises(ValueError):
    conv_padding(8, 3, 1, "VALID")
  with pytest.raises(ValueError):
    depthwise.resolve_impl("Conv")


def test_auto_picks_by_backend():
  want = "shift" if jax.default_backend() == "cpu" else "conv"
  assert depthwise.resolve_impl("auto") == want
  assert depthwise.resolve_impl("shift") == "shift"
  assert depthwise.resolve_impl("conv") == "conv"


# --------------------------------------------------------------------------
# A whole model: dw_impl="shift" and "conv" give the same logits.
# --------------------------------------------------------------------------


def _random_variables(shapes, seed):
  """Random kernels, BN affine and BN statistics for a float model."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      return (rng.normal(size=s.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if name in ("bias", "mean"):
      return rng.normal(0.0, 0.2, s.shape).astype(np.float32)
    raise AssertionError(f"unexpected leaf {path}")

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.mark.parametrize("model_cls", [MobileNetV2, pytest.param(MNASNet, marks=pytest.mark.slow)],
                         ids=["mobilenet_v2", "mnasnet"])  # MNASNet's network check: slow tier
def test_model_shift_equals_conv(model_cls):
  """Float logits at width 0.5, 32 px (stride-2 layers on even sizes down to 1x1)."""
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  base = model_cls(num_classes=10, width=0.5)
  shapes = jax.eval_shape(base.init, jax.random.PRNGKey(0), x)
  variables = _random_variables(shapes, seed=1)
  out = {}
  for impl in ("shift", "conv"):
    m = base.clone(dw_impl=impl)
    out[impl] = np.asarray(jax.jit(m.apply)(variables, x))
  assert out["shift"].shape == (2, 10)
  assert np.all(np.isfinite(out["shift"]))
  scale = max(1.0, float(np.abs(out["conv"]).max()))
  np.testing.assert_allclose(out["shift"], out["conv"], atol=1e-5 * scale, rtol=0)
  # The logits depend on the input (not a constant network).
  assert np.abs(out["conv"][0] - out["conv"][1]).max() > 1e-3
