"""FAT: trained threshold scale factors, by distillation from the float model.

Adam with the cosine-and-reset schedule (``fat.schedules``) on alpha and beta
only (``fat.steps.make_fat_step``), on the unlabeled subset, against the
float model's logits. It starts from the PTQ result with the lowest
distillation loss on the calibration images (no labels). With
``config.fat.keep_best`` the thresholds with the lowest such loss, scored
during training, are kept (``fat.loop``).
"""

from __future__ import annotations

import functools
import math

from fat import checks, loop, schedules, steps, variables
from fat.methods.registry import PTQ, TRAINED, Context, Method, Result, get, register


@functools.lru_cache(maxsize=4)
def _update(qmodel, learning_rate: float, reset_steps: int, lr_decay: float, loss: str,
            project: bool):
  """(optimizer, jitted step), built once per process and recipe, so that
  repeated runs of one setting reuse the compiled step."""
  tx = schedules.fat_optimizer(learning_rate, reset_steps, lr_decay)
  return tx, steps.make_fat_step(qmodel, tx, loss, project)


def start(ctx: Context) -> str:
  """The PTQ result FAT starts from: the lowest distillation loss."""
  candidates = [n for n in ctx.results if get(n).kind == PTQ]
  return min(candidates, key=lambda n: ctx.distill(ctx.results[n]))


def run(ctx: Context) -> Result:
  cfg = ctx.config.fat
  init = start(ctx)
  tx, step = _update(ctx.qmodel, cfg.learning_rate, cfg.reset_steps, cfg.lr_decay, cfg.loss,
                     cfg.project_thresholds)
  part = variables.partition(ctx.results[init], variables.FAT_TRAINABLE)
  n = len(ctx.unlabeled)
  stream = ((x, ctx.teacher[idx]) for x, _, idx in ctx.unlabeled.batches(
      cfg.batch_size, seed=ctx.config.seed, epochs=cfg.epochs,
      drop_remainder=n >= cfg.batch_size, with_index=True))
  spec = loop.LoopSpec(name="fat", tag=ctx.setting.name,
                       steps_per_epoch=max(1, n // cfg.batch_size), epochs=cfg.epochs,
                       train_images=n, knob="config.fat.learning_rate",
                       log_every=ctx.config.log_every,
                       score=ctx.distill if cfg.keep_best else None,
                       select_every=cfg.select_every, patience=cfg.patience,
                       checkpoint_dir=ctx.method_checkpoints("fat"),
                       checkpoint_every=ctx.config.checkpoint_every)
  out = loop.train(step, part, tx.init(part.trainable), stream, spec, ctx.writer)
  return Result(out.variables, {**out.stats, "init": init}, out.losses)


def validate(config) -> None:
  fat = config.fat
  for name in ("batch_size", "epochs", "reset_steps"):
    checks.positive_int(f"fat.{name}", fat[name])
  checks.learning_rate("fat.learning_rate", fat.learning_rate)
  if not (fat.lr_decay >= 0 and math.isfinite(fat.lr_decay)):
    raise ValueError(f"config.fat.lr_decay must be >= 0 and finite, got {fat.lr_decay}.")
  if fat.loss not in steps.LOSSES:
    raise ValueError(f"config.fat.loss must be one of {steps.LOSSES}, got {fat.loss!r}.")
  checks.nonnegative_int("fat.select_every", fat.select_every, "at each epoch end")
  checks.nonnegative_int("fat.patience", fat.patience, "no early stop")
  for name in ("keep_best", "project_thresholds"):
    checks.boolean(f"fat.{name}", fat[name])
  if fat.patience and not fat.keep_best:
    raise ValueError("config.fat.patience needs config.fat.keep_best=True (early stopping "
                     "uses its scores); set patience=0 or keep_best=True.")


register(Method(name="fat", kind=TRAINED, order=0, run=run, validate=validate,
                description="trained thresholds, distillation on unlabeled images"))
