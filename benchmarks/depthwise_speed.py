"""Depthwise 3x3 conv speed per implementation: forward, and forward + gradients.

  python -m benchmarks.depthwise_speed

Prints milliseconds (median of 7 runs after one compile) at MobileNet-v2-like
shapes, for "shift" (hand-written VJP), "shift_autodiff" and the grouped XLA
"conv". fat.depthwise's "auto" picks "shift" on the CPU and "conv" elsewhere.

A second table times one W8 per-channel quantized depthwise layer ("auto"
impl), its forward and the gradient of its weight thresholds
(``fat.qlinear``), for each ``fat.qlinear.POSITION_SUM_IMPLS`` choice of the
sum over positions.
"""

from unittest import mock

import jax
import jax.numpy as jnp

from benchmarks import timing
from experiments import cli
from fat import qlinear, quant
from fat.depthwise import depthwise_conv

SHAPES = ((128, 28, 28, 96, 1), (128, 14, 14, 192, 1), (128, 14, 14, 192, 2), (128, 7, 7, 576, 1))
IMPLS = ("shift", "shift_autodiff", "conv")


def median_ms(fn, *args, repeats=7):
  return 1000 * timing.timed(lambda: fn(*args), repeats, warmup=0)[1]


def main(argv):
  del argv
  print(f"backend: {jax.default_backend()}, devices: {len(jax.devices())}")
  print("| B, H, W, C, stride | impl | forward ms | forward + grads ms |")
  print("|---|---|---|---|")
  for b, h, w, c, s in SHAPES:
    x = jax.random.normal(jax.random.PRNGKey(0), (b, h, w, c))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, c))
    for impl in IMPLS:
      fwd = jax.jit(lambda x, k, impl=impl: depthwise_conv(x, k, s, "same", impl))
      grad = jax.jit(jax.grad(
          lambda x, k, impl=impl: jnp.sum(depthwise_conv(x, k, s, "same", impl) ** 2), (0, 1)))
      print(f"| {b}, {h}, {w}, {c}, {s} | {impl} | {median_ms(fwd, x, k):.1f} | "
            f"{median_ms(grad, x, k):.1f} |", flush=True)
  print("\nQuantized depthwise layer (W8 per channel), weight-threshold gradient by "
        "position sum:")
  print("| B, H, W, C, stride | forward ms | " + " | ".join(
      f"{impl!r} grad ms" for impl in qlinear.POSITION_SUM_IMPLS[1:]) + " |")
  print("|---|---|" + "---|" * len(qlinear.POSITION_SUM_IMPLS[1:]))
  spec = quant.QuantSpec(bits=8, per_channel=True)
  for b, h, w, c, s in SHAPES:
    x = jax.random.normal(jax.random.PRNGKey(0), (b, h, w, c))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, c))
    qp = quant.init_params(k, spec)
    op = lambda x, k, s=s: depthwise_conv(x, k, s, "same")
    g = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(op, x, k).shape)
    layer = lambda a, x, g: jnp.sum(g * qlinear.quantized_linear(x, k, qp._replace(alpha=a),
                                                                 spec, op))
    forward = lambda a, x: qlinear.quantized_linear(x, k, qp._replace(alpha=a), spec, op)
    cells = [median_ms(jax.jit(forward), qp.alpha, x)]
    for impl in qlinear.POSITION_SUM_IMPLS[1:]:
      with mock.patch.object(qlinear, "POSITION_SUM_IMPL", impl):
        cells.append(median_ms(jax.jit(jax.grad(layer)), qp.alpha, x, g))
    print(f"| {b}, {h}, {w}, {c}, {s} | " + " | ".join(f"{v:.1f}" for v in cells) + " |",
          flush=True)


if __name__ == "__main__":
  cli.run(main)
