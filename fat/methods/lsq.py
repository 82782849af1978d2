"""LSQ / LSQ+: QAT whose step sizes (and offsets) train with LSQ's gradient scale.

Like ``qat`` (weights and thresholds, labels, cross-entropy, ``fat.steps.make_qat_step``),
but the model runs with ``QuantMode(lsq=True)``: every alpha and beta passes
its gradient scaled so that an SGD step on it is LSQ's step on the step size
(LSQ+: and on the offset, for asymmetric settings), with g = 1/sqrt(N * Q_p)
(``fat.lsq``). LSQ's optimizer: SGD with momentum and cosine decay
(``config.lsq.optimizer="sgd"``); with Adam the gradient scale cancels. It
starts from ``config.lsq.start`` (a PTQ result) and trains on a
``config.lsq.train_fraction`` share of the labeled train split, at
``config.lsq.learning_rate``, or at the rate ``config.lsq.lr_by_bits`` gives the
setting's weight width (``((8, 1e-4),)``: 8-bit settings at 1e-4): one epoch at
the low-bit rate moves a converged network's weights more than 8 bits need,
and the 8-bit rate does not move them far enough at 3 or 4 bits (docs/peers.md).
"""

from __future__ import annotations

import dataclasses
import functools

import optax

from fat import checks, data, loop, steps, variables
from fat.methods.registry import (PTQ, TRAINED, Context, Method, Result, batches_fit, of_kind,
                                  register)

OPTIMIZERS = ("sgd", "adam")


def optimizer(name: str, learning_rate: float, total_steps: int,
              momentum: float = 0.9) -> optax.GradientTransformation:
  """SGD with momentum (LSQ's) or Adam, the learning rate cosine-decayed to 0."""
  schedule = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
  # optax.flatten: the update runs on one raveled vector, as FAT's optimizer does.
  if name == "sgd":
    return optax.flatten(optax.sgd(schedule, momentum=momentum))
  return optax.flatten(optax.adam(schedule))


@functools.lru_cache(maxsize=4)
def _update(qmodel, name: str, learning_rate: float, total_steps: int, momentum: float):
  tx = optimizer(name, learning_rate, total_steps, momentum)
  lsq_model = qmodel.clone(mode=dataclasses.replace(qmodel.mode, lsq=True))
  return tx, steps.make_qat_step(lsq_model, tx)


def learning_rate(cfg, weight_bits: int) -> tuple[float, str]:
  """``(rate, the config field it came from)`` for a setting of ``weight_bits``-wide
  weights: ``cfg.lr_by_bits``'s rate for that width, else ``cfg.learning_rate``."""
  by_bits = {int(b): float(r) for b, r in cfg.get("lr_by_bits", ())}
  if weight_bits in by_bits:
    return by_bits[weight_bits], "config.lsq.lr_by_bits"
  return float(cfg.learning_rate), "config.lsq.learning_rate"


def run(ctx: Context) -> Result:
  cfg = ctx.config.lsq
  train = ctx.train.sample(cfg.train_fraction, ctx.config.seed)
  spe = data.num_batches(len(train), cfg.batch_size, True)
  lr, knob = learning_rate(cfg, ctx.setting.weight_bits)
  tx, step = _update(ctx.qmodel, cfg.optimizer, lr, spe * cfg.epochs, cfg.momentum)
  part = variables.partition(ctx.results[cfg.start], variables.QAT_TRAINABLE)
  stream = train.batches(cfg.batch_size, seed=ctx.config.seed, epochs=cfg.epochs,
                         drop_remainder=True)
  spec = loop.LoopSpec(name="lsq", tag=ctx.setting.name, steps_per_epoch=spe,
                       epochs=cfg.epochs, train_images=len(train),
                       knob=knob, log_every=ctx.config.log_every,
                       checkpoint_dir=ctx.method_checkpoints("lsq"),
                       checkpoint_every=ctx.config.checkpoint_every)
  out = loop.train(step, part, tx.init(part.trainable), stream, spec, ctx.writer)
  return Result(out.variables, {**out.stats, "init": cfg.start, "learning_rate": lr},
                out.losses)


def validate(config) -> None:
  cfg = config.lsq
  for name in ("batch_size", "epochs"):
    checks.positive_int(f"lsq.{name}", cfg[name])
  checks.fraction("lsq.train_fraction", cfg.train_fraction)
  checks.learning_rate("lsq.learning_rate", cfg.learning_rate)
  checks.number("lsq.momentum", cfg.momentum, 0.0, 1.0)
  _check_lr_by_bits(cfg.get("lr_by_bits", ()))
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f"config.lsq.optimizer must be one of {OPTIMIZERS}, got "
                     f"{cfg.optimizer!r}.")
  if cfg.start not in of_kind(config.methods, PTQ):
    raise ValueError(f"config.lsq.start must be a PTQ method in config.methods, got "
                     f"{cfg.start!r}; add it to config.methods or start from 'ptq_minmax'.")


def _check_lr_by_bits(pairs) -> None:
  fix = "write it as ((weight bits, rate), ...), e.g. ((8, 1e-4),), or () for none"
  if not isinstance(pairs, (tuple, list)):
    raise ValueError(f"config.lsq.lr_by_bits must be pairs; {fix}; got {pairs!r}.")
  seen = set()
  for pair in pairs:
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2
    bits = pair[0] if ok else None
    if not ok or isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
      raise ValueError(f"config.lsq.lr_by_bits: {pair!r} is not a (weight bits in 2..16, "
                       f"rate) pair; {fix}.")
    if bits in seen:
      raise ValueError(f"config.lsq.lr_by_bits gives {bits}-bit weights two rates; keep one.")
    seen.add(bits)
    checks.number(f"lsq.lr_by_bits rate of {bits}-bit weights", pair[1], 0.0, lo_open=True)


register(Method(name="lsq", kind=TRAINED, order=2, run=run, validate=validate,
                check_data=batches_fit("lsq", "LSQ"),
                description="LSQ/LSQ+: QAT with LSQ-scaled steps"))
