"""Per-layer quantizer choice by regex rules on the layer path (qwix style).

A layer path is the Flax module path joined by "/", for example
``block_3/expand/conv`` (a weight) or ``block_3/expand/act_q`` (an
activation). For each role ("weight" or "act") the first rule whose pattern
matches (``re.search``) and that sets that role decides; a role no rule sets
stays in float. "First and last layer at 8 bits, the rest at 4" is::

    rules = (QuantRule(pattern=r"^(stem|classifier)(/|$)", weight=w8),
             QuantRule(pattern=r".*", weight=w4, act=a8))
"""

from __future__ import annotations

import dataclasses
import functools
import re

from fat.quant import QuantSpec

ROLES = ("weight", "act")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
  """Quantizer specs for the layers whose path matches ``pattern``.

  ``weight`` and ``act`` are the specs for that role; None means this rule
  says nothing about the role and later rules are consulted.
  """

  pattern: str = ".*"
  weight: QuantSpec | None = None
  act: QuantSpec | None = None

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"QuantRule.pattern {self.pattern!r} is not a valid regex: {e}") from e
    if self.weight is not None and self.weight.kind == "unsigned":
      raise ValueError("QuantRule.weight cannot be 'unsigned': weights are signed; "
                       "use 'symmetric' or 'asymmetric'.")


@functools.lru_cache(maxsize=4096)
def resolve(rules: tuple[QuantRule, ...], path: str, role: str) -> QuantSpec | None:
  """The spec of the first rule matching ``path`` that sets ``role``."""
  if role not in ROLES:
    raise ValueError(f"role must be one of {ROLES}, got {role!r}.")
  for rule in rules:
    spec = getattr(rule, role)
    if spec is not None and re.search(rule.pattern, path):
      return spec
  return None


def uniform_rules(*, weight: QuantSpec | None, act: QuantSpec | None,
                  overrides: tuple[QuantRule, ...] = ()) -> tuple[QuantRule, ...]:
  """``overrides`` first, then one catch-all rule with ``weight`` and ``act``."""
  return tuple(overrides) + (QuantRule(pattern=".*", weight=weight, act=act),)
