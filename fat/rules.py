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


def with_rounding(rules: tuple[QuantRule, ...], rounding: str,
                  pattern: str = ".*") -> tuple[QuantRule, ...]:
  """``rules`` with ``rounding`` ("nearest" or "learned") on the weight spec of
  every layer whose path matches ``pattern``: rules that set a weight get an
  override each, so that paths outside ``pattern`` keep what they had."""
  re.compile(pattern)
  out = []
  for rule in rules:
    if rule.weight is not None and rule.weight.rounding != rounding:
      changed = dataclasses.replace(rule.weight, rounding=rounding)
      both = f"(?=.*(?:{pattern}))(?:{rule.pattern})" if pattern != ".*" else rule.pattern
      out.append(QuantRule(pattern=both, weight=changed))
    out.append(rule)
  return tuple(out)


def relocate(rules: tuple[QuantRule, ...], prefix: str, paths) -> tuple[QuantRule, ...]:
  """Rules for a submodule at ``prefix`` applied on its own: for each of its
  layer ``paths`` (relative; "" is the submodule itself), one exact-path rule
  with the specs ``rules`` give ``prefix/path``. Submodules whose layers
  resolve alike get equal rules, so one compiled function serves them all."""
  out = []
  for rel in sorted(set(paths)):
    full = "/".join(p for p in (prefix, rel) if p)
    weight, act = resolve(tuple(rules), full, "weight"), resolve(tuple(rules), full, "act")
    if weight is not None or act is not None:
      out.append(QuantRule(pattern=exact(rel), weight=weight, act=act))
  return tuple(out)


def exact(path: str) -> str:
  """The pattern matching exactly the layer ``path``."""
  return f"^{re.escape(path)}$"
