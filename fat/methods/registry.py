"""The method registry: every quantization method the main job can run.

A method is a function ``run(ctx: Context) -> Result`` for one setting,
registered once with ``register(Method(...))``. The main job runs the methods
named in ``config.methods``; the config checks, the report's row order and
the loss plots read the registry, so a new method is one module (anywhere;
one inside ``fat/methods/`` is imported automatically) plus a config that
names it.

Kinds:

* ``"ptq"``: a post-training method; its variables are a starting point that
  trained methods can pick (FAT starts from the PTQ result with the lowest
  distillation loss on the calibration images). PTQ methods run first.
* ``"trained"``: a method that trains (FAT, QAT); it runs after every PTQ
  method, and its ``Result`` carries training stats and a loss curve.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import ml_collections
import numpy as np

from fat import data

PTQ, TRAINED = "ptq", "trained"
KINDS = (PTQ, TRAINED)
# Every report has these: PTQ min/max is the baseline of "best other PTQ",
# and every other method is compared with FAT (McNemar).
REQUIRED = ("ptq_minmax", "fat")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
  """What a method sees of one setting.

  Attributes:
    config: the main job's config (read-only).
    setting: the setting (``fat.pipeline.Setting``).
    qmodel: the model in the "quant" stage with the setting's rules.
    variables: its initial variables: folded params, zero activation ranges,
      alpha = 1, beta = 0.
    calib: the calibration images (the first images of ``unlabeled``).
    unlabeled: the unlabeled training subset (labels not to be used).
    train: the labeled train split (for methods that use labels, like QAT).
    teacher: float logits of ``unlabeled``, in its order.
    act_ranges: ``statistic -> {activation path: (lo, hi)}`` on the
      calibration images ("minmax" or "percentile"), shared between settings.
    distill: ``variables -> float``: the distillation loss on the calibration
      images (no labels).
    results: variables of the methods already run for this setting, by name.
    writer: a clu metric writer, or None.
    checkpoint_dir: a folder for the step checkpoints of trained methods
      (each in its own subfolder, ``method_checkpoints``), or None: none.
  """

  config: ml_collections.ConfigDict
  setting: Any
  qmodel: Any
  variables: dict
  calib: Any
  unlabeled: Any
  train: Any
  teacher: np.ndarray
  act_ranges: Callable[[str], dict]
  distill: Callable[[dict], float]
  results: dict
  writer: Any = None
  checkpoint_dir: str | None = None

  def method_checkpoints(self, method: str) -> str | None:
    """The step-checkpoint folder of ``method`` on this setting (None: none)."""
    return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, method)

  def calibration_batches(self):
    """``(batches, count)``: one pass over the calibration images."""
    return data.image_batches(self.calib, self.config.calibration_batch_size)


@dataclasses.dataclass(frozen=True)
class Result:
  """A method's variables, its report fields (training stats and the like)
  and its training-loss curve (``[(step, loss)]``, empty without training)."""

  variables: dict
  stats: dict = dataclasses.field(default_factory=dict)
  losses: list = dataclasses.field(default_factory=list)


def cost(ctx: Context, result: Result, seconds: float) -> dict:
  """The report's cost fields of one method run on one setting: ``wall_seconds``
  (its ``run``, evaluation excluded) and ``images`` (the images it read: its
  ``train_images`` stat when it trains, the calibration images otherwise)."""
  images = result.stats.get("train_images")
  return {"wall_seconds": float(seconds),
          "images": int(images if images is not None else len(ctx.calib))}


def _no_check(config, *args) -> None:
  del config, args


def batches_fit(section: str, what: str) -> Callable[[ml_collections.ConfigDict, Any], None]:
  """A ``Method.check_data`` for a method trained on ``config.<section>.train_fraction``
  of the train split in batches of ``config.<section>.batch_size`` (``what``: its
  name in the message): at least one batch must fit."""
  def check_data(config, train) -> None:
    cfg = config[section]
    n = len(train.sample(cfg.train_fraction, config.seed))
    if n < cfg.batch_size:
      raise ValueError(f"config.{section}.batch_size {cfg.batch_size} exceeds the {n} {what} "
                       f"train images; lower it or raise config.{section}.train_fraction.")
  return check_data


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
  """A registered method.

  Attributes:
    name: its key in ``config.methods`` and the report (``ptq_*`` for PTQ).
    run: ``Context -> Result``.
    kind: ``PTQ`` or ``TRAINED``.
    order: report and run order within its kind (lower first).
    validate: ``config -> None``, raising ValueError naming the bad field;
      called for selected methods before anything runs.
    check_data: ``(config, train split) -> None``, the same once the data is
      loaded, before anything is written.
    description: one line for ``--help``-like listings and the docs.
  """

  name: str
  run: Callable[[Context], Result]
  kind: str = PTQ
  order: float = 100.0
  validate: Callable[[ml_collections.ConfigDict], None] = _no_check
  check_data: Callable[[ml_collections.ConfigDict, Any], None] = _no_check
  description: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}.")


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds ``method``; a second method of the same name is an error."""
  if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
    raise ValueError(f"a method named {method.name!r} is already registered.")
  _REGISTRY[method.name] = method
  return method


def unregister(name: str) -> None:
  """Removes a method (for tests that register a toy one)."""
  _REGISTRY.pop(name, None)


def get(name: str) -> Method:
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; registered: {names()}.")
  return _REGISTRY[name]


def names() -> list[str]:
  """Every registered method, in run (and report) order."""
  return ordered(_REGISTRY)


def of_kind(selected, kind: str) -> list[str]:
  """The names among ``selected`` registered with ``kind`` (``PTQ`` or
  ``TRAINED``), in their given order; names that are not registered are left out."""
  return [n for n in selected if n in _REGISTRY and _REGISTRY[n].kind == kind]


def ordered(selected) -> list[str]:
  """``selected`` method names in run order: PTQ methods first, then by
  ``order``, then by registration; names that are not registered go last."""
  rank = {name: i for i, name in enumerate(_REGISTRY)}
  def key(name):
    m = _REGISTRY.get(name)
    if m is None:
      return (2, 0.0, len(rank), name)
    return (KINDS.index(m.kind), m.order, rank[name], name)
  return sorted(selected, key=key)


def validate(config: ml_collections.ConfigDict) -> None:
  """``config.methods``: known names, the required ones present, each
  selected method's own fields valid."""
  selected = tuple(config.methods)
  unknown = sorted(set(selected) - set(_REGISTRY))
  if unknown:
    raise ValueError(f"config.methods has unknown {unknown}; registered methods: {names()}.")
  missing = [m for m in REQUIRED if m not in selected]
  if missing:
    raise ValueError(f"config.methods must include {missing} (every report compares with "
                     "them); add them to config.methods.")
  if len(set(selected)) != len(selected):
    raise ValueError(f"config.methods names a method twice: {list(selected)}.")
  for name in selected:
    _REGISTRY[name].validate(config)
