"""Float train-step throughput on 28 px Fashion-MNIST-shaped batches, per model option.

Plans the float-checkpoint recipes: it prints images/s (median of 5 steps after
one compile) and the minutes that 10 epochs of the 60k train split would take.

  python -m benchmarks.float_step_speed
"""

import jax
import jax.numpy as jnp
import optax

from benchmarks import timing
from experiments import cli
from fat import float_training, models

CASES = (("mobilenet_v2", 1.0, False), ("mobilenet_v2", 1.0, True), ("mnasnet", 1.0, True))


def images_per_second(name, width, small_input, batch=128, px=28, repeats=5):
  model = models.create(name, num_classes=10, width=width, small_input=small_input)
  x = jnp.ones((batch, px, px, 1))
  y = jnp.zeros((batch,), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  tx = optax.adam(1e-3)
  step = float_training.make_train_step(model, tx)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
  compile_s, median_s = timing.timed(lambda: step(*state, x, y), repeats, warmup=0)
  return batch / median_s, compile_s


def main(argv):
  del argv
  print(f"backend: {jax.default_backend()}, devices: {len(jax.devices())}")
  print("| model | width | small_input | compile s | img/s | 10 epochs (min) |")
  print("|---|---|---|---|---|---|")
  for name, width, small in CASES:
    rate, compile_s = images_per_second(name, width, small)
    print(f"| {name} | {width} | {small} | {compile_s:.0f} | {rate:.0f} | "
          f"{600000 / rate / 60:.0f} |", flush=True)


if __name__ == "__main__":
  cli.run(main)
