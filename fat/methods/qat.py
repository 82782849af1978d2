"""Full QAT baseline: weights and thresholds trained with labels and cross-entropy.

Adam at ``config.qat.learning_rate`` on ``params`` and ``thresholds``
(``fat.steps.make_qat_step``), starting from the min/max PTQ result, on a
``config.qat.train_fraction`` share of the labeled train split.
"""

from __future__ import annotations

import functools

import optax

from fat import checks, data, loop, steps, variables
from fat.methods.registry import TRAINED, Context, Method, Result, batches_fit, register


def optimizer(learning_rate: float) -> optax.GradientTransformation:
  """Adam on the trainable tree raveled into one vector (``optax.flatten``):
  fewer ops to compile than one update per leaf."""
  return optax.flatten(optax.adam(learning_rate))


@functools.lru_cache(maxsize=4)
def _update(qmodel, learning_rate: float):
  """(optimizer, jitted step), built once per process like FAT's."""
  tx = optimizer(learning_rate)
  return tx, steps.make_qat_step(qmodel, tx)


def run(ctx: Context) -> Result:
  cfg = ctx.config.qat
  train = ctx.train.sample(cfg.train_fraction, ctx.config.seed)
  tx, step = _update(ctx.qmodel, cfg.learning_rate)
  part = variables.partition(ctx.results["ptq_minmax"], variables.QAT_TRAINABLE)
  stream = train.batches(cfg.batch_size, seed=ctx.config.seed, epochs=cfg.epochs,
                         drop_remainder=True)
  spec = loop.LoopSpec(name="qat", tag=ctx.setting.name,
                       steps_per_epoch=data.num_batches(len(train), cfg.batch_size, True),
                       epochs=cfg.epochs, train_images=len(train),
                       knob="config.qat.learning_rate", log_every=ctx.config.log_every,
                       checkpoint_dir=ctx.method_checkpoints("qat"),
                       checkpoint_every=ctx.config.checkpoint_every)
  out = loop.train(step, part, tx.init(part.trainable), stream, spec, ctx.writer)
  return Result(out.variables, out.stats, out.losses)


def validate(config) -> None:
  qat = config.qat
  for name in ("batch_size", "epochs"):
    checks.positive_int(f"qat.{name}", qat[name])
  checks.fraction("qat.train_fraction", qat.train_fraction)
  checks.learning_rate("qat.learning_rate", qat.learning_rate)


register(Method(name="qat", kind=TRAINED, order=1, run=run, validate=validate,
                check_data=batches_fit("qat", "QAT"), description="full QAT with labels"))
