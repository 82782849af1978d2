"""Train-step throughput: float, FAT and full QAT, per model, width and input size.

  python -m benchmarks.step_speed                       # the full table
  python -m benchmarks.step_speed --models=mobilenet_v2 --widths=1.0 --sizes=32

Random weights with random BN statistics, random inputs, 10 classes, stem
stride 2 (the ImageNet architecture). Per case, in one process:

* float: ``fat.float_training`` step (BN in train mode, Adam);
* FAT: the float (folded) teacher's forward plus the threshold step
  (W8A8 per-channel, gradients to alpha and beta only); "FAT, teacher cached"
  is the step alone, as the main job runs it with precomputed teacher logits;
* QAT: the full-QAT step (weights and thresholds, cross-entropy).

Figures are images/s from the median of ``--repeats`` timed steps after one
warm-up step; compile time (first call) is reported separately. Where torch is
installed, the same float architecture in PyTorch (``benchmarks/torch_models.py``)
is timed in the same run as the reference.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax
from absl import flags

from benchmarks.timing import random_stats, timed
from configs import default
from experiments import cli
from fat import float_training, models, pipeline, schedules, steps
from fat import variables as fat_variables
from fat.methods import qat

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mobilenet_v2", "mnasnet"], "Models to time.")
flags.DEFINE_list("widths", ["0.5", "1.0"], "Width multipliers.")
flags.DEFINE_list("sizes", ["32", "224"], "Input sizes (px).")
flags.DEFINE_integer("batch", 128, "Batch size at 32 px.")
flags.DEFINE_integer("batch_224", 32, "Batch size at 224 px (CPU memory and minutes).")
flags.DEFINE_integer("repeats", 5, "Timed steps per figure (median).")
flags.DEFINE_bool("torch", True, "Time the PyTorch reference where torch is installed.")


def jax_case(name: str, width: float, size: int, batch: int, repeats: int) -> dict:
  model = models.create(name, num_classes=10, width=width)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (batch, size, size, 3))
  y = jnp.arange(batch) % 10
  variables = random_stats(model.init(key, x[:1]), key)
  out = {}

  tx = optax.adam(1e-3)
  step = float_training.make_train_step(model, tx)
  opt = tx.init(variables["params"])
  out["float"] = timed(lambda: step(variables["params"], variables["batch_stats"], opt, x, y),
                       repeats)

  config = default.get_config()
  p = pipeline.prepare(model, variables, pipeline.config_rules(config.settings[0], config.fat),
                       x, batch_size=batch)
  teacher_fn = jax.jit(p.fmodel.apply)
  fat_tx = schedules.fat_optimizer(config.fat.learning_rate, config.fat.reset_steps)
  fat_step = steps.make_fat_step(p.qmodel, fat_tx)
  part = fat_variables.partition(p.variables)
  fat_opt = fat_tx.init(part.trainable)
  teacher = teacher_fn(p.folded, x)
  out["fat"] = timed(lambda: fat_step(part.trainable, fat_opt, part.frozen, x,
                                      teacher_fn(p.folded, x)), repeats)
  out["fat_cached"] = timed(lambda: fat_step(part.trainable, fat_opt, part.frozen, x, teacher),
                            repeats)

  qat_tx = qat.optimizer(1e-5)
  qat_step = steps.make_qat_step(p.qmodel, qat_tx)
  qat_part = fat_variables.partition(p.variables, fat_variables.QAT_TRAINABLE)
  qat_opt = qat_tx.init(qat_part.trainable)
  out["qat"] = timed(lambda: qat_step(qat_part.trainable, qat_opt, qat_part.frozen, x, y),
                     repeats)
  return out


def torch_case(name: str, width: float, size: int, batch: int, repeats: int):
  """(first-call seconds, median seconds) of the PyTorch float step, or None without torch."""
  try:
    from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return torch_models.time_train_step(name, width, size, batch, repeats)


def main(argv):
  del argv
  print(f"backend: {jax.default_backend()}, devices: {jax.device_count()}, "
        f"repeats: {FLAGS.repeats}")
  head = ("| model | width | px | batch | float img/s | FAT img/s | FAT / float | "
          "FAT (teacher cached) / float | QAT img/s | QAT / float | compile s (float, FAT, "
          "QAT) | PyTorch float img/s | float JAX / PyTorch time |")
  print(head)
  print("|---" * (head.count("|") - 1) + "|")
  for name in FLAGS.models:
    for width in map(float, FLAGS.widths):
      for size in map(int, FLAGS.sizes):
        batch = FLAGS.batch if size <= 64 else FLAGS.batch_224
        r = jax_case(name, width, size, batch, FLAGS.repeats)
        rate = {k: batch / v[1] for k, v in r.items()}
        ref = torch_case(name, width, size, batch, FLAGS.repeats) if FLAGS.torch else None
        torch_cols = (f"{batch / ref[1]:.0f} | {r['float'][1] / ref[1]:.2f}" if ref
                      else "no torch | -")
        print(f"| {name} | {width} | {size} | {batch} | {rate['float']:.0f} | "
              f"{rate['fat']:.0f} | {r['fat'][1] / r['float'][1]:.2f} | "
              f"{r['fat_cached'][1] / r['float'][1]:.2f} | {rate['qat']:.0f} | "
              f"{r['qat'][1] / r['float'][1]:.2f} | {r['float'][0]:.0f}, {r['fat'][0]:.0f}, "
              f"{r['qat'][0]:.0f} | {torch_cols} |", flush=True)


if __name__ == "__main__":
  cli.run(main)
