"""One training loop for every trained method (FAT, QAT, and whatever comes next).

    out = loop.train(step, part, opt_state, batches, spec, writer=writer)
    out.variables, out.losses, out.stats

``step(trainable, opt_state, frozen, x, target) -> (trainable, opt_state,
metrics)`` is a jitted step from ``fat.steps`` (metrics: ``loss`` and
``finite``); ``part`` is a ``fat.variables.Partition``. The loop owns what
every method needs around its step:

* sharding: state replicated and each batch split over ``jax.devices()``
  (``fat.parallel``), the same code on one CPU or many accelerators;
* the NaN guard's bookkeeping: the step reverts single bad updates; an epoch
  in which every step was reverted is an error naming ``spec.knob``;
* keep-best and patience: with ``spec.score`` (variables -> a loss, lower is
  better), the variables are scored at the start, every ``spec.select_every``
  steps (0: at each epoch end) and at the end; the best ones are returned,
  and with ``spec.patience`` > 0 training stops after that many scores in a
  row without a new best;
* logging: the loss every ``spec.log_every`` steps (and at scores and the
  end) to the metric writer and the returned curve, with a progress bar;
* step checkpoints: with ``spec.checkpoint_dir``, the whole loop state
  (variables, optimizer state, keep-best state, logged losses, counters) is
  saved there every ``spec.checkpoint_every`` steps through orbax's
  ``CheckpointManager``; a loop started again on that folder restores the
  latest one and skips the batches already trained on, so it ends where an
  uninterrupted run ends, bit for bit (the batches must be the same stream).

The failed-step count lives on the device and is read once per epoch, so the
loop does not wait on the device at every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from fat import parallel
from fat.errors import CheckpointError
from fat.variables import Partition


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopSpec:
  """How long and how one method trains.

  Attributes:
    name: the method, for the progress bar and metric names (``<tag>/<name>_loss``).
    tag: the setting, prefix of the metric names.
    steps_per_epoch: steps in one pass over the training images.
    epochs: passes to run (fewer with early stopping).
    train_images: images per epoch, for the stats.
    knob: the config field to name when an epoch is all non-finite steps.
    log_every: log the loss every this many steps.
    score: ``variables -> float`` for keep-best (None: return the last variables).
    select_every: score every this many steps (0: at each epoch end).
    patience: stop after this many scores without a new best (0: never).
    checkpoint_dir: folder for step checkpoints (None: none); a loop started
      on a folder that has one resumes from it.
    checkpoint_every: save every this many steps (and after the last).
  """

  name: str
  tag: str
  steps_per_epoch: int
  epochs: int
  train_images: int
  knob: str
  log_every: int = 20
  score: Callable[[dict], float] | None = None
  select_every: int = 0
  patience: int = 0
  checkpoint_dir: str | None = None
  checkpoint_every: int = 20

  def __post_init__(self):
    for field in ("steps_per_epoch", "epochs", "log_every", "checkpoint_every"):
      if getattr(self, field) < 1:
        raise ValueError(f"LoopSpec.{field} must be >= 1, got {getattr(self, field)}.")
    if self.patience and self.score is None:
      raise ValueError("LoopSpec.patience needs a score (early stopping compares scores).")


@dataclasses.dataclass(frozen=True)
class LoopResult:
  variables: dict                     # all collections, trained ones updated
  losses: list[tuple[int, float]]     # (step, training loss)
  stats: dict                         # for the report (see ``train``)


def check_finite_epoch(skipped: int, steps: int, what: str, epoch: int, knob: str) -> int:
  """The NaN guard reverts single bad steps; an epoch of only bad steps is an error."""
  if skipped == steps:
    raise FloatingPointError(
        f"{what}: every step of epoch {epoch + 1} gave a non-finite loss, variables or "
        f"optimizer state, so nothing was trained; lower {knob} or check the float "
        "checkpoint.")
  return skipped


class StepCheckpoints:
  """A training loop's state (a tree of arrays, plus JSON counters), saved every
  ``every`` steps through orbax's ``CheckpointManager`` (the latest one kept)
  and restored by a later loop on the same folder (``directory`` None: off)."""

  def __init__(self, directory: str | None, every: int):
    self.every = every
    self.manager = None if directory is None else ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False))

  def restore(self, arrays: dict) -> tuple[dict, dict] | None:
    """(arrays shaped like ``arrays``, counters) of the latest save, or None."""
    if self.manager is None or self.manager.latest_step() is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, arrays)
    try:
      out = self.manager.restore(self.manager.latest_step(), args=ocp.args.Composite(
          arrays=ocp.args.StandardRestore(abstract), counters=ocp.args.JsonRestore()))
    except ValueError as e:  # orbax: a tree that differs from this run's
      raise self._mismatch(str(e).strip().splitlines()[0] if str(e).strip() else "") from e
    # orbax returns the saved shapes whatever the target's: compare them here.
    for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                                 jax.tree.leaves(out.arrays)):
      if (np.shape(got), np.dtype(got.dtype)) != (want.shape, np.dtype(want.dtype)):
        raise self._mismatch(f"{jax.tree_util.keystr(path)} is {np.shape(got)} "
                             f"{got.dtype}, this run has {want.shape} {want.dtype}")
    return out.arrays, out.counters

  def _mismatch(self, detail: str) -> CheckpointError:
    return CheckpointError(
        f"the step checkpoint in {self.manager.directory} does not match this run's "
        f"training state ({detail}); it was saved by other code or another config. Start "
        "over with --fresh, or delete that folder.")

  def due(self, step: int, last: bool) -> bool:
    return self.manager is not None and (last or step % self.every == 0)

  def save(self, step: int, arrays: dict, counters: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays), counters=ocp.args.JsonSave(counters)), force=True)

  def close(self) -> None:
    if self.manager is not None:
      self.manager.close()


def train(step, part: Partition, opt_state, batches: Iterable[tuple[np.ndarray, np.ndarray]],
          spec: LoopSpec, writer=None) -> LoopResult:
  """Runs ``step`` over ``batches`` (``(x, target)`` pairs, ``spec.epochs`` passes).

  Returns the trained variables, the logged losses, and stats:
  ``train_seconds``, ``train_images``, ``epochs`` (run, to 2 decimals),
  ``steps``, ``nonfinite_steps``; with a score also
  ``calibration_loss_by_step`` ([step, score], step 0 before training) and
  ``kept_step``.
  """
  mesh = parallel.data_mesh()
  spe, total = spec.steps_per_epoch, spec.steps_per_epoch * spec.epochs
  what = f"{spec.name.upper()} {spec.tag}"
  select, every = spec.score is not None, spec.select_every or spec.steps_per_epoch
  saver = StepCheckpoints(spec.checkpoint_dir, spec.checkpoint_every)
  arrays = {"trainable": part.trainable, "opt_state": opt_state, "best": part.trainable,
            "skipped": np.zeros((), np.int32)}
  counters = {"step": 0, "since_best": 0, "nonfinite": 0, "losses": [], "scores": None,
              "stopped": False}
  restored = saver.restore(jax.tree.map(np.asarray, arrays))
  if restored is not None:
    arrays, counters = restored
  elif select:
    counters["scores"] = [(0, spec.score(part.merged()))]
  trainable, frozen = parallel.replicate((arrays["trainable"], part.frozen), mesh)
  opt_state = parallel.replicate(arrays["opt_state"], mesh)
  best, since_best = arrays["best"], counters["since_best"]  # best: unreplicated
  scores = [tuple(p) for p in counters["scores"] or []]
  losses = [tuple(p) for p in counters["losses"]]
  nonfinite, i, t0 = counters["nonfinite"], counters["step"], time.time()
  skipped = jnp.asarray(arrays["skipped"], jnp.int32)  # stays on device: no sync per step
  stopped = counters["stopped"] or i == total

  def state():
    return ({"trainable": parallel.unreplicate(trainable),
             "opt_state": parallel.unreplicate(opt_state), "best": best, "skipped": skipped},
            {"step": i, "since_best": since_best, "nonfinite": nonfinite, "losses": losses,
             "scores": scores if select else None, "stopped": stopped})

  todo = itertools.islice(batches, i, None) if not stopped else iter(())
  bar = tqdm(todo, total=total, initial=i, desc=what, leave=False)
  with contextlib.closing(saver):
    for i, (x, target) in enumerate(bar, i + 1):
      trainable, opt_state, m = step(trainable, opt_state, frozen, parallel.shard_batch(x, mesh),
                                     parallel.shard_batch(target, mesh))
      skipped = skipped + (~m["finite"]).astype(jnp.int32)
      scoring = select and (i % every == 0 or i == total)
      if i % spec.log_every == 0 or i == total or scoring:
        losses.append((i, float(m["loss"])))
        if writer is not None:
          writer.write_scalars(i, {f"{spec.tag}/{spec.name}_loss": losses[-1][1]})
      if i % spe == 0:
        nonfinite += check_finite_epoch(int(skipped), spe, what, i // spe - 1, spec.knob)
        skipped = jnp.zeros((), jnp.int32)
      if scoring:
        current = parallel.unreplicate(trainable)
        scores.append((i, spec.score(part.with_trainable(current).merged())))
        improved = scores[-1][1] < min(s for _, s in scores[:-1])
        best, since_best = (current, 0) if improved else (best, since_best + 1)
        stopped = bool(spec.patience) and since_best >= spec.patience
      stopped = stopped or i == total
      if saver.due(i, stopped):
        saver.save(i, *state())
      if stopped:
        break
    jax.block_until_ready(trainable)
  nonfinite += int(skipped)  # steps of an epoch cut short by early stopping
  stats = {"train_seconds": time.time() - t0, "train_images": spec.train_images,
           "epochs": round(i / spe, 2), "steps": i, "nonfinite_steps": nonfinite}
  if select:
    stats["calibration_loss_by_step"] = scores
    stats["kept_step"] = min(scores, key=lambda p: p[1])[0]
  kept = best if select else parallel.unreplicate(trainable)
  return LoopResult(part.with_trainable(kept).merged(), losses, stats)
