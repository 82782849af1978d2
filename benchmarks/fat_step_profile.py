"""Where the FAT step's time goes: an ablation of its parts, timed in one process.

  python -m benchmarks.fat_step_profile [--model=mobilenet_v2 --width=1.0 --size=32 --batch=128]
  python -m benchmarks.fat_step_profile --small_input --size=28 --batch=100  # the shipped layout

Rows (ms per step, median of ``--repeats`` after warm-up, and the ratio to the
float train step):

* float train step (BN in train mode, weight gradients, Adam);
* folded float forward (the teacher);
* folded float forward + backward to the input (the FAT backward without
  quantizers: the same transposed convolutions, no weight gradients);
* quantized forward (W8A8 per-channel);
* FAT step with weights only / activations only / both quantized (teacher
  logits cached, as in the main job);
* the both-quantized FAT step again with each ``fat.qlinear.POSITION_SUM_IMPLS``
  choice that ``"auto"`` does not pick on this backend (the weight threshold
  gradients' sum over positions), and the ratio to the default step.

Random weights with random BN statistics; stem stride 2 (ImageNet layout), or
stride 1 with ``--small_input`` (the shipped Fashion-MNIST networks).
"""

from __future__ import annotations


from unittest import mock

import jax
import jax.numpy as jnp
import optax
from absl import flags

from benchmarks import timing
from configs import default
from experiments import cli
from fat import (calibrate, float_training, fold, models, pipeline, qlinear, rules, schedules,
                 steps)
from fat import variables as fat_variables

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "mobilenet_v2", "mobilenet_v2 or mnasnet.")
flags.DEFINE_float("width", 1.0, "Width multiplier.")
flags.DEFINE_integer("size", 32, "Input size (px).")
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_integer("repeats", 5, "Timed calls per row (median).")
flags.DEFINE_bool("small_input", False, "Stem stride 1, as the shipped 28 px networks.")


def median_ms(fn, repeats: int) -> float:
  return 1e3 * timing.timed(fn, repeats)[1]


def main(argv):
  del argv
  model = models.create(FLAGS.model, num_classes=10, width=FLAGS.width,
                        small_input=FLAGS.small_input)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (FLAGS.batch, FLAGS.size, FLAGS.size, 3))
  y = jnp.arange(FLAGS.batch) % 10
  variables = timing.random_stats(model.init(key, x[:1]), key)
  rows = []

  tx = optax.adam(1e-3)
  step = float_training.make_train_step(model, tx)
  opt = tx.init(variables["params"])
  rows.append(("float train step", median_ms(
      lambda: step(variables["params"], variables["batch_stats"], opt, x, y), FLAGS.repeats)))

  folded = fold.fold_variables(variables, model.bn_eps)
  fmodel = calibrate.quantized(model, (), stage="folded")
  teacher_fn = jax.jit(fmodel.apply)
  rows.append(("folded forward (teacher)", median_ms(lambda: teacher_fn(folded, x),
                                                     FLAGS.repeats)))
  input_grad = jax.jit(jax.grad(lambda v, a: jnp.sum(fmodel.apply(v, a) ** 2), argnums=1))
  rows.append(("folded forward + backward to the input",
               median_ms(lambda: input_grad(folded, x), FLAGS.repeats)))

  config = default.get_config()
  setting = config.settings[0]
  full = pipeline.config_rules(setting, config.fat)
  weight_spec, act_spec = full[-1].weight, full[-1].act
  variants = {"both": full,
              "weights only": rules.uniform_rules(weight=weight_spec, act=None),
              "activations only": rules.uniform_rules(weight=None, act=act_spec)}
  teacher = teacher_fn(folded, x)
  fat_tx = schedules.fat_optimizer(config.fat.learning_rate, config.fat.reset_steps)
  for name, rule_set in variants.items():
    p = pipeline.prepare(model, variables, rule_set, x, batch_size=FLAGS.batch)
    if name == "both":
      fwd = jax.jit(p.qmodel.apply)
      rows.append((f"quantized forward ({setting.name})",
                   median_ms(lambda: fwd(p.variables, x), FLAGS.repeats)))
    fat_step = steps.make_fat_step(p.qmodel, fat_tx)
    part = fat_variables.partition(p.variables)
    fat_opt = fat_tx.init(part.trainable)
    rows.append((f"FAT step, {name} quantized", median_ms(
        lambda: fat_step(part.trainable, fat_opt, part.frozen, x, teacher), FLAGS.repeats)))
    if name == "both":
      both_ms = rows[-1][1]
      default_impl = ("dot" if jax.default_backend() == "cpu" else "reduce")
      for impl in qlinear.POSITION_SUM_IMPLS[1:]:
        if impl == default_impl:
          continue
        with mock.patch.object(qlinear, "POSITION_SUM_IMPL", impl):
          other = steps.make_fat_step(p.qmodel, fat_tx)  # traced afresh with this impl
          ms = median_ms(lambda: other(part.trainable, fat_opt, part.frozen, x, teacher),
                         FLAGS.repeats)
        rows.append((f"FAT step, both quantized, position sum {impl!r} "
                     f"({ms / both_ms:.2f}x the {default_impl!r} default)", ms))

  base = rows[0][1]
  print(f"{FLAGS.model} width {FLAGS.width}, {FLAGS.size} px, batch {FLAGS.batch}, "
        f"stem stride {1 if FLAGS.small_input else 2}, "
        f"backend {jax.default_backend()}; specs: weights {weight_spec.bits}-bit "
        f"{'per-channel' if weight_spec.per_channel else 'per-tensor'}, activations "
        f"{act_spec.bits}-bit")
  print("| part | ms | / float train step |")
  print("|---|---|---|")
  for name, ms in rows:
    print(f"| {name} | {ms:.1f} | {ms / base:.2f} |")


if __name__ == "__main__":
  cli.run(main)
