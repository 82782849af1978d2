"""FAT: trained threshold scale factors, by distillation from the float model.

Adam on alpha and beta only (``fat.steps.make_fat_step``), on the unlabeled
subset, against the float model's logits. ``config.fat.recipe`` picks the
recipe (``resolve``):

* ``"ours"`` (the default): the fields of ``config.fat`` as set. With
  ``holdout_images`` > 0, that many unlabeled images (drawn by the seed, none
  of them calibration images) are withheld from training; FAT starts from the
  PTQ result with the lowest distillation loss on them, and keep_best keeps
  the thresholds scored lowest on them (every ``select_every`` steps), so FAT
  never ends worse than its start on that held-out score. With 0, both are
  scored on the calibration images, which FAT also trains on.
* ``"paper"``: the paper's exact recipe (METHOD.md section 3, the authors'
  TF code): start from min/max calibration with alpha = 1 (``ptq_minmax``),
  Adam with the cosine-and-reset schedule, no projection, no keep_best, every
  unlabeled image trained on, and the unsigned quantizer without beta on
  ReLU outputs (``unsigned_relu``; it differs from "ours" only in asymmetric
  settings). ``"paper+projection"``, ``"paper+keep_best"``,
  ``"paper+best_start"``, ``"paper+relu_beta"`` (or several, joined by "+")
  switch one of our additions back on, for ablations.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fat import checks, evaluate, layers, loop, rules, schedules, steps, variables
from fat.recipes import Recipe, resolve
from fat.methods.registry import PTQ, TRAINED, Context, Method, Result, of_kind, register

@functools.lru_cache(maxsize=4)
def _update(qmodel, learning_rate: float, reset_steps: int, lr_decay: float, loss: str,
            project: bool, scales: tuple = ()):
  """(optimizer, jitted step), built once per process and recipe, so that
  repeated runs of one setting reuse the compiled step. ``scales``: the
  per-quantizer learning-rate factors as ``((path, factor), ...)`` ((): none)."""
  tree = traverse_util.unflatten_dict(dict(scales), sep="/") if scales else None
  tx = schedules.fat_optimizer(learning_rate, reset_steps, lr_decay, tree)
  return tx, steps.make_fat_step(qmodel, tx, loss, project)


def width_factor(bits: int) -> float:
  """The learning-rate factor of a ``bits``-wide quantizer: 7 / (2^(bits-1) - 1),
  1 at 4 bits. Adam moves every alpha by about the learning rate per step, and
  an alpha step moves the threshold by alpha-step * qmax grid steps; this keeps
  that move the same at every width (at 8 bits, 1/18 of the 4-bit rate)."""
  return 7.0 / (2 ** (bits - 1) - 1)


def lr_factors(qmodel, trainable: dict, sample) -> dict:
  """``{"thresholds/<quantizer path>/<alpha|beta>": width_factor}`` for every
  trainable threshold of ``qmodel``, by each quantizer's bit width under its
  rules (activation quantizers found by tracing the model on ``sample``'s shape)."""
  acts = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.ActQuant) and context.method_name == "__call__":
      acts.add(layers.layer_path(context.module))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), jnp.zeros((1,) + sample.shape[1:]))
  out = {}
  flat = traverse_util.flatten_dict(trainable[layers.TRAINABLE_COLLECTION], sep="/")
  for key in flat:
    path = key.rsplit("/", 1)[0]
    spec = rules.resolve(tuple(qmodel.mode.rules), path, "act" if path in acts else "weight")
    out[f"{layers.TRAINABLE_COLLECTION}/{key}"] = width_factor(spec.bits) if spec else 1.0
  return out


@functools.lru_cache(maxsize=4)
def _jit_apply(qmodel):
  return jax.jit(qmodel.apply)


def _view(split, idx: np.ndarray):
  """The examples ``idx`` of ``split`` (a ``fat.data.Split`` or ``fat.imagenet.StreamSplit``)."""
  if hasattr(split, "take"):
    return split.take(idx)
  return dataclasses.replace(split, positions=split.positions[idx])


def holdout_indices(n: int, calibration: int, k: int, seed: int) -> np.ndarray:
  """``k`` sorted indices of ``range(n)`` drawn by ``seed``, none below
  ``calibration`` (the calibration images are the first of the unlabeled subset)."""
  pool = np.arange(min(calibration, n), n)
  if k > len(pool):
    raise ValueError(f"config.fat.holdout_images {k} exceeds the {len(pool)} unlabeled images "
                     "outside the calibration images; lower it (0: score on the calibration "
                     "images) or raise config.fat.train_fraction.")
  return np.sort(np.random.default_rng(seed).choice(pool, k, replace=False))


@dataclasses.dataclass(frozen=True)
class Data:
  """FAT's images for one run: what it trains on (``train``, with the teacher
  rows ``rows`` of each of its images) and how it scores (``score``:
  variables -> distillation loss; ``scored_on``: which images)."""

  train: object
  rows: np.ndarray
  score: object
  scored_on: str


def fat_data(ctx: Context, recipe: Recipe) -> Data:
  """The training images and the score of ``recipe`` on ``ctx``."""
  n = len(ctx.unlabeled)
  if not recipe.holdout:
    return Data(ctx.unlabeled, np.arange(n), ctx.distill, "calibration")
  held = holdout_indices(n, len(ctx.calib), recipe.holdout, ctx.config.seed)
  rest = np.setdiff1d(np.arange(n), held)
  held_split, held_teacher = _view(ctx.unlabeled, held), ctx.teacher[held]
  apply = _jit_apply(ctx.qmodel)
  batch = min(ctx.config.eval_batch_size, len(held))
  loss = ctx.config.fat.loss

  def score(v):
    q = evaluate.logits(apply, v, held_split, batch)
    return float(steps.distillation_loss(q, held_teacher, loss))

  return Data(_view(ctx.unlabeled, rest), rest, score, f"held-out ({len(held)} images)")


def start(ctx: Context, score=None) -> str:
  """The PTQ result FAT starts from: the lowest distillation loss (``score``;
  default the calibration images')."""
  score = score or ctx.distill
  candidates = of_kind(ctx.results, PTQ)
  return min(candidates, key=lambda n: score(ctx.results[n]))


def run(ctx: Context) -> Result:
  recipe = resolve(ctx.config.fat)
  d = fat_data(ctx, recipe)
  init = start(ctx, d.score) if recipe.best_start else "ptq_minmax"
  out = train_thresholds(ctx, "fat", ctx.results[init], recipe, d)
  stats = {**out.stats, "init": init, "recipe": recipe.name,
           "loss_by_step": [[int(s), float(l)] for s, l in out.losses]}
  if recipe.keep_best:
    stats["scored_on"] = d.scored_on
  return Result(out.variables, stats, out.losses)


def train_thresholds(ctx: Context, name: str, init: dict, recipe: Recipe, d: Data,
                     factors: dict | None = None) -> loop.LoopResult:
  """``recipe``'s threshold training of ``init`` on ``d`` (``config.fat``'s
  schedule, batches and keep-best), logged and checkpointed as method ``name``.
  ``factors``: a learning-rate factor per trainable path
  (``"thresholds/<quantizer>/<alpha|beta>"``; None: 1 everywhere), multiplied
  by the per-width ones when ``recipe.lr_by_width``."""
  cfg = ctx.config.fat
  part = variables.partition(init, variables.FAT_TRAINABLE)
  if recipe.lr_by_width:
    sample = next(d.train.batches(1))[0]
    width = lr_factors(ctx.qmodel, part.trainable, sample)
    factors = {k: (factors or {}).get(k, 1.0) * f for k, f in width.items()}
  scales = tuple(sorted(factors.items())) if factors is not None else ()
  tx, step = _update(ctx.qmodel, cfg.learning_rate, cfg.reset_steps, cfg.lr_decay, cfg.loss,
                     recipe.project, scales)
  n = len(d.train)
  stream = ((x, ctx.teacher[d.rows[idx]]) for x, _, idx in d.train.batches(
      cfg.batch_size, seed=ctx.config.seed, epochs=cfg.epochs,
      drop_remainder=n >= cfg.batch_size, with_index=True))
  spec = loop.LoopSpec(name=name, tag=ctx.setting.name,
                       steps_per_epoch=max(1, n // cfg.batch_size), epochs=cfg.epochs,
                       train_images=n, knob="config.fat.learning_rate",
                       log_every=ctx.config.log_every,
                       score=d.score if recipe.keep_best else None,
                       select_every=cfg.select_every, patience=recipe.patience,
                       checkpoint_dir=ctx.method_checkpoints(name),
                       checkpoint_every=ctx.config.checkpoint_every)
  return loop.train(step, part, tx.init(part.trainable), stream, spec, ctx.writer)


def validate(config) -> None:
  fat = config.fat
  recipe = resolve(fat)  # ValueError naming config.fat.recipe
  for name in ("batch_size", "epochs", "reset_steps"):
    checks.positive_int(f"fat.{name}", fat[name])
  checks.learning_rate("fat.learning_rate", fat.learning_rate)
  if not (fat.lr_decay >= 0 and math.isfinite(fat.lr_decay)):
    raise ValueError(f"config.fat.lr_decay must be >= 0 and finite, got {fat.lr_decay}.")
  if fat.loss not in steps.LOSSES:
    raise ValueError(f"config.fat.loss must be one of {steps.LOSSES}, got {fat.loss!r}.")
  checks.nonnegative_int("fat.select_every", fat.select_every, "at each epoch end")
  checks.nonnegative_int("fat.patience", fat.patience, "no early stop")
  checks.nonnegative_int("fat.holdout_images", fat.get("holdout_images", 0),
                         "score on the calibration images")
  for name in ("keep_best", "project_thresholds", "lr_by_width"):
    checks.boolean(f"fat.{name}", fat.get(name, False))
  if recipe.name == "ours" and fat.patience and not fat.keep_best:
    raise ValueError("config.fat.patience needs config.fat.keep_best=True (early stopping "
                     "uses its scores); set patience=0 or keep_best=True.")


def check_data(config, train) -> None:
  """The held-out images fit in the unlabeled subset, outside the calibration images."""
  recipe = resolve(config.fat)
  if recipe.holdout:
    n = len(train.sample(config.fat.train_fraction, config.seed))
    holdout_indices(n, config.calibration_images, recipe.holdout, config.seed)
    if n - recipe.holdout < 1:
      raise ValueError(f"config.fat.holdout_images {recipe.holdout} leaves no unlabeled "
                       "image to train on; lower it or raise config.fat.train_fraction.")


register(Method(name="fat", kind=TRAINED, order=0, run=run, validate=validate,
                check_data=check_data,
                description="trained thresholds, distillation on unlabeled images"))
