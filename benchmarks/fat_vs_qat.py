"""FAT vs full QAT on W8A8 per-channel: wall time to reach float top-1, and step-time ratios.

Both start from the same folded, min/max-calibrated model. FAT trains alpha/beta
by distillation on the unlabeled subset; QAT trains weights and thresholds with
labels. Every ``--eval_every`` steps both are evaluated on the first
``--eval_examples`` test images; the clock (evaluation excluded) stops when
top-1 is within ``--target_pt`` of float, or at ``--max_seconds``. The step
ratios time the quantized FAT and QAT steps against the float train step at
the same batch size, in this same run.

  python -m benchmarks.fat_vs_qat --checkpoint=checkpoints/fashion_mnist/mobilenet_v2
"""

import time

import jax
import numpy as np
import optax
from absl import flags

from benchmarks import timing
from configs import default
from experiments import cli
from fat import (checkpoints, data, evaluate, float_training, models, pipeline, schedules,
                 steps)
from fat import variables as fat_variables
from fat.methods import qat

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "checkpoints/fashion_mnist/mobilenet_v2", "Float checkpoint.")
flags.DEFINE_integer("batch_size", 100, "Train batch size for FAT, QAT and the float step.")
flags.DEFINE_integer("eval_examples", 2000, "Test images per evaluation.")
flags.DEFINE_integer("eval_every", 60, "Steps between evaluations.")
flags.DEFINE_float("target_pt", 0.1, "Stop once top-1 is within this many points of float.")
flags.DEFINE_float("max_seconds", 240.0, "Training-time budget per method.")
flags.DEFINE_float("qat_learning_rate", 1e-5, "Adam learning rate for QAT.")
flags.DEFINE_integer("seed", 0, "Seed for the subset and batch order.")


def median_step_seconds(run, repeats=5):
  return timing.timed(run, repeats, warmup=0)[1]


def race(name, step, state, batches, predict, make_vars, test, fp32, reference):
  """Trains until within target of float or out of budget; returns (seconds to the
  target or None, best top-1, agreement with float at that evaluation, steps,
  seconds trained)."""
  trained, best, agreement, reached, steps = 0.0, -1.0, None, None, 0
  while trained < FLAGS.max_seconds and reached is None:
    t = time.perf_counter()
    for _ in range(FLAGS.eval_every):
      state = step(state, next(batches))
      steps += 1
    jax.block_until_ready(state)
    trained += time.perf_counter() - t
    preds = evaluate.predict(predict, make_vars(state), test, 500, progress=False)
    top1, agree = evaluate.top1_pct(preds, test.labels), evaluate.agreement_pct(preds, reference)
    if top1 > best:
      best, agreement = top1, agree
    if top1 >= fp32 - FLAGS.target_pt:
      reached = trained
    print(f"{name}: step {steps}, {trained:.0f} s, top-1 {top1:.2f} (agreement {agree:.2f})",
          flush=True)
  return reached, best, agreement, steps, trained


def main(argv):
  del argv
  with cli.exit_on_user_error():  # bad input only: errors while training keep their traceback
    for name in ("batch_size", "eval_examples", "eval_every", "max_seconds", "target_pt"):
      if not FLAGS[name].value > 0:
        raise ValueError(f"--{name} must be positive, got {FLAGS[name].value}.")
    variables, meta = checkpoints.load(FLAGS.checkpoint)
    train = data.load("fashion_mnist", "train")
    test = data.load("fashion_mnist", "test").take(np.arange(FLAGS.eval_examples))
  run(variables, meta, train, test)


def run(variables, meta, train, test):
  model = models.create(meta["model"], **meta["model_kwargs"])
  unlabeled = data.subset(train, 0.1, FLAGS.seed)
  config = default.get_config()
  p = pipeline.prepare(model, variables, pipeline.config_rules(config.settings[0], config.fat),
                       data.normalize(unlabeled.images[:512]), batch_size=128)
  qmodel, qvars, folded, fmodel = p.qmodel, p.variables, p.folded, p.fmodel
  reference = evaluate.predict(evaluate.make_predict(fmodel.apply), folded, test, 500,
                               progress=False)
  fp32 = evaluate.top1_pct(reference, test.labels)
  predict = evaluate.make_predict(qmodel.apply)
  teacher_fn = jax.jit(fmodel.apply)
  bs = FLAGS.batch_size

  def unlabeled_batches():
    for x, _ in data.batches(unlabeled, bs, seed=FLAGS.seed, epochs=1000, drop_remainder=True):
      yield x, teacher_fn(folded, x)

  fat_tx = schedules.fat_optimizer(config.fat.learning_rate, config.fat.reset_steps)
  fat_step = steps.make_fat_step(qmodel, fat_tx)
  fat_part = fat_variables.partition(qvars)
  fat_state = (fat_part.trainable, fat_tx.init(fat_part.trainable))
  fat_run = lambda s, b: fat_step(s[0], s[1], fat_part.frozen, *b)[:2]
  qat_tx = qat.optimizer(FLAGS.qat_learning_rate)
  qat_step = steps.make_qat_step(qmodel, qat_tx)
  qat_part = fat_variables.partition(qvars, fat_variables.QAT_TRAINABLE)
  qat_run = lambda s, b: qat_step(s[0], s[1], qat_part.frozen, *b)[:2]
  qat_state = (qat_part.trainable, qat_tx.init(qat_part.trainable))

  x, y = next(data.batches(train, bs))
  teacher = teacher_fn(folded, x)
  float_tx = optax.adam(1e-3)
  float_step = float_training.make_train_step(model, float_tx)
  opt = float_tx.init(variables["params"])
  t_float = median_step_seconds(lambda: float_step(variables["params"], variables["batch_stats"],
                                                   opt, x, y))
  t_fat = median_step_seconds(lambda: fat_run(fat_state, (x, teacher)))
  t_qat = median_step_seconds(lambda: qat_run(qat_state, (x, y)))

  rows = {
      "FAT": race("FAT", fat_run, fat_state, unlabeled_batches(), predict,
                  lambda s: fat_part.with_trainable(s[0]).merged(), test, fp32, reference),
      "QAT": race("QAT", qat_run, qat_state,
                  data.batches(train, bs, seed=FLAGS.seed, epochs=1000, drop_remainder=True),
                  predict, lambda s: qat_part.with_trainable(s[0]).merged(), test, fp32, reference),
  }
  print(f"\nW8A8 per-channel, {meta['model']} width {meta['model_kwargs']['width']}, "
        f"float top-1 {fp32:.2f} on {len(test)} test images, batch {bs}, "
        f"backend {jax.default_backend()}")
  print(f"| method | seconds to within {FLAGS.target_pt:.1f} pt | best top-1 | agreement with "
        "float there | steps | step time / float step |")
  print("|---|---|---|---|---|---|")
  for name, t_step in (("FAT", t_fat), ("QAT", t_qat)):
    reached, best, agreement, n_steps, trained = rows[name]
    when = f"{reached:.0f}" if reached is not None else f"not within {trained:.0f} s"
    print(f"| {name} | {when} | {best:.2f} | {agreement:.2f}% | {n_steps} | "
          f"{t_step / t_float:.2f} |")
  print(f"float train step: {t_float * 1e3:.0f} ms; FAT step {t_fat * 1e3:.0f} ms; "
        f"QAT step {t_qat * 1e3:.0f} ms")


if __name__ == "__main__":
  cli.run(main)
