"""Checks of single config fields; each raises ValueError naming ``config.<field>``."""

from __future__ import annotations

import math


def positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"config.{name} must be a positive integer, got {value!r}.")


def nonnegative_int(name: str, value, zero_means: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"config.{name} must be an integer >= 0 (0: {zero_means}), got {value!r}.")


def number(name: str, value, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
  """A finite real number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and (value > lo if lo_open else value >= lo) and value <= hi)
  if not ok:
    where = f"{'(' if lo_open else '['}{lo}, {hi}{']' if math.isfinite(hi) else ')'}"
    raise ValueError(f"config.{name} must be a number in {where}, got {value!r}.")


def fraction(name: str, value) -> None:
  """A share in (0, 1]."""
  if not 0.0 < value <= 1.0:
    raise ValueError(f"config.{name} must be in (0, 1], got {value}.")


def learning_rate(name: str, value) -> None:
  if not (value > 0 and math.isfinite(value)):
    raise ValueError(f"config.{name} must be positive and finite, got {value}.")


def boolean(name: str, value) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"config.{name} must be True or False, got {value!r}.")
