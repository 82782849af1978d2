"""Depthwise 3x3 conv speed per implementation: forward, and forward + gradients.

  python -m benchmarks.depthwise_speed

Prints milliseconds (median of 7 runs after one compile) at MobileNet-v2-like
shapes, for "shift" (hand-written VJP), "shift_autodiff" and the grouped XLA
"conv". fat.depthwise's "auto" picks "shift" on the CPU and "conv" elsewhere.
"""


import jax
import jax.numpy as jnp

from benchmarks import timing
from experiments import cli
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


if __name__ == "__main__":
  cli.run(main)
