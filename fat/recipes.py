"""FAT's recipe: what ``config.fat.recipe`` means, with the fields of ``config.fat``.

    recipe = recipes.resolve(config.fat)   # or a checkpoint's meta["fat"]
    recipe.keep_best, recipe.holdout, recipe.unsigned_relu, ...

* ``"ours"`` (the default): the fields as set (projection, keep_best scored on
  ``holdout_images`` held-out images, the start from the best PTQ result).
* ``"paper"``: the paper's exact recipe: start from min/max calibration with
  alpha = 1, no projection, no keep_best, no held-out images, and the unsigned
  quantizer without beta on ReLU outputs (as the authors' TF code; it differs
  from "ours" only in asymmetric settings, where ours gives ReLU outputs the
  asymmetric quantizer with beta in [0, hi]).
* ``"paper+<addition>[+<addition>...]"``: the paper's recipe with some of our
  additions switched back on (ablations): ``projection``, ``keep_best``,
  ``best_start``, ``relu_beta``, ``lr_by_width``.

Pure Python: ``fat.pipeline`` reads ``unsigned_relu`` for the quantizer rules,
``fat.methods.fat_training`` the rest.
"""

from __future__ import annotations

import dataclasses

RECIPES = ("ours", "paper")
# What "paper+<addition>" switches back on: the Recipe field it sets to True.
ADDITIONS = {"projection": "project", "keep_best": "keep_best", "best_start": "best_start",
             "relu_beta": "relu_beta", "lr_by_width": "lr_by_width"}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What ``config.fat.recipe`` (with the fields of ``config.fat``) means for one run.

  Attributes:
    name: ``config.fat.recipe``.
    best_start: start from the PTQ result with the lowest score (False: from
      ``ptq_minmax``, alpha = 1).
    project: clip alpha/beta into their ranges after each update.
    keep_best: return the best-scored thresholds, not the last.
    patience: early stop after this many scores without a new best (0: never).
    holdout: unlabeled images withheld from training and scored (0: none;
      then scores use the calibration images).
    relu_beta: in asymmetric settings, ReLU outputs keep the asymmetric
      quantizer with beta in [0, hi] (False: the unsigned one, no beta).
    lr_by_width: each quantizer's learning rate is ``learning_rate`` times
      ``fat.methods.fat_training.width_factor`` of its bit width (False: one
      rate for all).
  """

  name: str
  best_start: bool
  project: bool
  keep_best: bool
  patience: int
  holdout: int
  relu_beta: bool
  lr_by_width: bool = False

  @property
  def unsigned_relu(self) -> bool:
    return not self.relu_beta


def _parse(recipe) -> tuple[str, tuple[str, ...]]:
  """``(base, additions)`` of a recipe string; ValueError naming the field."""
  if not isinstance(recipe, str):
    raise ValueError(f"config.fat.recipe must be a string, got {recipe!r}.")
  base, *adds = recipe.split("+")
  if base not in RECIPES:
    raise ValueError(f"config.fat.recipe must be one of {RECIPES} (or 'paper+<addition>', "
                     f"additions {tuple(ADDITIONS)}), got {recipe!r}.")
  unknown = [a for a in adds if a not in ADDITIONS]
  if adds and base != "paper":
    raise ValueError(f"config.fat.recipe {recipe!r}: additions go with 'paper' only "
                     "('ours' has them all); use e.g. 'paper+projection'.")
  if unknown or len(set(adds)) != len(adds):
    raise ValueError(f"config.fat.recipe {recipe!r}: each addition once, from "
                     f"{tuple(ADDITIONS)}.")
  return base, tuple(adds)


def resolve(fat) -> Recipe:
  """The ``Recipe`` of a FAT section (a ConfigDict or the dict a checkpoint's
  meta.json records; a section from before ``recipe`` existed is "ours").
  Raises ValueError naming ``config.fat.recipe`` if it is not a recipe."""
  name = fat.get("recipe", "ours")
  base, adds = _parse(name)
  holdout, patience = int(fat.get("holdout_images", 0)), int(fat.get("patience", 0))
  if base == "ours":
    return Recipe(name=name, best_start=True, project=bool(fat.get("project_thresholds", True)),
                  keep_best=bool(fat.get("keep_best", True)), patience=patience,
                  holdout=holdout, relu_beta=True,
                  lr_by_width=bool(fat.get("lr_by_width", False)))
  recipe = Recipe(name=name, best_start=False, project=False, keep_best=False, patience=0,
                  holdout=0, relu_beta=False)
  recipe = dataclasses.replace(recipe, **{ADDITIONS[a]: True for a in adds})
  if recipe.keep_best:  # as ours keeps the best: scored on the held-out images, with patience
    recipe = dataclasses.replace(recipe, patience=patience, holdout=holdout)
  return recipe
