"""Mixed-precision bit allocation from a per-layer sensitivity table, pure Python.

    layers = allocation.layers_from_rows(table["rows"], role="weight")
    alloc = allocation.allocate(layers, budget_bits=4 * allocation.total_size(layers))
    setting = dict(..., overrides=alloc.overrides())   # a main-job setting

Each layer has a size (weights: parameters; activations: elements per image)
and a cost per width: the noise that quantizing it alone at that width adds
to the logits (mean squared logit error, ``fat.sensitivity``). The cost of a
whole allocation is taken as the sum over layers (independent noise adds).
Widths that were not measured are interpolated geometrically between measured
ones, or extrapolated from the nearest one by the usual 4x-per-bit noise
model; each layer's cost is then made non-increasing in the width.

``allocate`` is greedy: from every layer at its widest choice, it takes one
step down at a time, always the step with the least added cost per bit saved,
until the allocation fits ``budget_bits`` (sum of size * bits); then, while
some step up still fits, it takes the one with the most cost removed per bit.
The downward sequence does not depend on the budget, so a larger budget never
gives a layer fewer bits before the final fill; a budget of every layer at the
widest choice gives exactly that. The result never exceeds the budget, and the
same inputs give the same result (ties go to the earlier layer).

Rules are exact: ``^<re.escape(path)>$`` on the layer path ``fat.rules`` sees
(``block_3/expand/conv`` for a weight, ``block_3/expand/act_q`` for an
activation).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping

from fat import quant, rules

ROLES = rules.ROLES
DEFAULT_CHOICES = (2, 3, 4, 5, 6, 8)
# Quantization noise power falls about 4x per extra bit (step halves).
NOISE_PER_BIT = 4.0


def exact_pattern(path: str) -> str:
  """The regex that matches layer path ``path`` and nothing else."""
  return f"^{re.escape(path)}$"


def exact_rule(path: str, role: str, spec: quant.QuantSpec) -> rules.QuantRule:
  """A ``QuantRule`` that gives ``spec`` to ``role`` of layer ``path`` only."""
  if role not in ROLES:
    raise ValueError(f"role must be one of {ROLES}, got {role!r}.")
  return rules.QuantRule(pattern=exact_pattern(path), **{role: spec})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layer:
  """One quantizer to allocate: its layer path, size and measured costs.

  ``noise`` maps widths to the cost of quantizing this layer alone at that
  width (any non-negative number that adds over layers: mean squared logit
  error in ``fat.sensitivity``'s table).
  """

  path: str
  size: int
  noise: Mapping[int, float]

  def __post_init__(self):
    if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
      raise ValueError(f"layer {self.path!r}: size must be a positive integer, got "
                       f"{self.size!r}.")
    if not self.noise:
      raise ValueError(f"layer {self.path!r}: no measured width in noise.")
    noise = {}
    for bits, value in sorted(self.noise.items()):
      quant.QuantSpec(bits=int(bits))  # 2..16, or a one-line error
      value = float(value)
      if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"layer {self.path!r}: noise at {bits} bits must be finite and "
                         f">= 0, got {value}.")
      noise[int(bits)] = value
    object.__setattr__(self, "noise", noise)

  def cost(self, bits: int) -> float:
    """The measured cost at ``bits``; between two measured widths, geometric
    interpolation; outside them, 4x per bit from the nearest one."""
    if bits in self.noise:
      return self.noise[bits]
    lower = [b for b in self.noise if b < bits]
    upper = [b for b in self.noise if b > bits]
    if lower and upper:
      lo, hi = max(lower), min(upper)
      t = (bits - lo) / (hi - lo)
      a, b = self.noise[lo], self.noise[hi]
      return a ** (1 - t) * b ** t if a > 0 and b > 0 else a + t * (b - a)
    near = max(lower) if lower else min(upper)
    return self.noise[near] * NOISE_PER_BIT ** (near - bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Allocation:
  """Widths per layer, in layer order, with the size and predicted cost."""

  role: str
  bits: tuple[tuple[str, int], ...]
  size_bits: int
  budget_bits: int
  predicted_noise: float

  def as_dict(self) -> dict[str, int]:
    return dict(self.bits)

  def mean_bits(self, layers: Iterable[Layer]) -> float:
    """Size-weighted mean width."""
    return self.size_bits / total_size(layers)

  def overrides(self) -> tuple[tuple[str, int, int], ...]:
    """``(pattern, weight_bits, act_bits)`` triples for ``fat.pipeline.Setting.overrides``."""
    return tuple((exact_pattern(p), b, 0) if self.role == "weight" else (exact_pattern(p), 0, b)
                 for p, b in self.bits)

  def rules(self, spec: quant.QuantSpec) -> tuple[rules.QuantRule, ...]:
    """Exact-path ``QuantRule`` overrides: ``spec`` at each layer's width."""
    return tuple(exact_rule(p, self.role, dataclasses.replace(spec, bits=b))
                 for p, b in self.bits)


def total_size(layers: Iterable[Layer]) -> int:
  return sum(l.size for l in layers)


def _costs(layer: Layer, choices: tuple[int, ...]) -> list[float]:
  """Cost at each of ``choices`` (ascending), made non-increasing in the width."""
  costs = [layer.cost(b) for b in choices]
  for i in range(len(costs) - 2, -1, -1):
    costs[i] = max(costs[i], costs[i + 1])
  return costs


def allocate(layers: Iterable[Layer], budget_bits: float, *,
             choices: Iterable[int] = DEFAULT_CHOICES, role: str = "weight") -> Allocation:
  """The greedy allocation of ``choices`` widths to ``layers`` within ``budget_bits``."""
  layers = tuple(layers)
  choices = tuple(sorted({int(b) for b in choices}))
  if not layers:
    raise ValueError("allocate: no layers given.")
  if not choices:
    raise ValueError("allocate: no width choices given.")
  for b in choices:
    quant.QuantSpec(bits=b)
  paths = [l.path for l in layers]
  if len(set(paths)) != len(paths):
    raise ValueError(f"allocate: a layer path is given twice: {paths}.")
  floor = sum(l.size for l in layers) * choices[0]
  if budget_bits < floor:
    raise ValueError(f"allocate: budget {budget_bits:.0f} bits is below {floor} bits, every "
                     f"layer at {choices[0]} bits; raise the budget or add a lower width.")
  costs = [_costs(l, choices) for l in layers]
  at = [len(choices) - 1] * len(layers)   # index into choices, per layer
  size = sum(l.size * choices[-1] for l in layers)

  def step(i: int, up: bool) -> tuple[float, int] | None:
    """(cost change per bit, bits) of layer ``i`` one choice up or down."""
    j = at[i] + (1 if up else -1)
    if not 0 <= j < len(choices):
      return None
    bits = layers[i].size * abs(choices[j] - choices[at[i]])
    return (costs[i][j] - costs[i][at[i]]) / bits, bits

  while size > budget_bits:  # cheapest added cost per bit saved first
    _, i = min((s[0], i) for i in range(len(layers)) if (s := step(i, up=False)))
    size -= step(i, up=False)[1]
    at[i] -= 1
  while True:  # then the most removed cost per bit among the steps up that fit
    fits = [(s[0], i) for i in range(len(layers))
            if (s := step(i, up=True)) and size + s[1] <= budget_bits]
    if not fits:
      break
    _, i = min(fits)
    size += step(i, up=True)[1]
    at[i] += 1
  assert size <= budget_bits
  return Allocation(role=role, bits=tuple((l.path, choices[j]) for l, j in zip(layers, at)),
                    size_bits=int(size), budget_bits=int(budget_bits),
                    predicted_noise=float(sum(c[j] for c, j in zip(costs, at))))


def layers_from_rows(rows: Iterable[Mapping], role: str = "weight",
                     metric: str = "mse") -> tuple[Layer, ...]:
  """The ``Layer``s of one role from a sensitivity table's rows (``fat.sensitivity``:
  ``path``, ``role``, ``size``, ``bits`` and ``metric`` per row), in row order."""
  if role not in ROLES:
    raise ValueError(f"role must be one of {ROLES}, got {role!r}.")
  noise: dict[str, dict[int, float]] = {}
  size: dict[str, int] = {}
  for r in rows:
    if r["role"] == role:
      noise.setdefault(r["path"], {})[int(r["bits"])] = float(r[metric])
      size[r["path"]] = int(r["size"])
  if not noise:
    raise ValueError(f"the sensitivity table has no {role} rows.")
  return tuple(Layer(path=p, size=size[p], noise=n) for p, n in noise.items())


def merge_overrides(*allocations: Allocation) -> tuple[tuple[str, int, int], ...]:
  """One override list from a weight and an activation allocation: a layer path in
  both (never the case in these networks) keeps both widths in one triple."""
  merged: dict[str, list[int]] = {}
  for a in allocations:
    for pattern, wb, ab in a.overrides():
      cur = merged.setdefault(pattern, [0, 0])
      cur[0], cur[1] = wb or cur[0], ab or cur[1]
  return tuple((p, wb, ab) for p, (wb, ab) in merged.items())
