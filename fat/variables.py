"""Quantized variables split into what a method trains and what stays frozen.

    part = variables.partition(qvars)                  # FAT: thresholds only
    part = variables.partition(qvars, QAT_TRAINABLE)   # QAT: params and thresholds
    step(part.trainable, opt_state, part.frozen, x, target)
    qvars = part.merged()

Collections are named as in ``fat.layers``: ``params`` (folded weights),
``quant_stats`` (calibrated ranges, constants) and ``thresholds`` (alpha, beta).
"""

from __future__ import annotations

from typing import Iterable

from flax import struct

from fat.layers import TRAINABLE_COLLECTION

FAT_TRAINABLE = (TRAINABLE_COLLECTION,)
QAT_TRAINABLE = ("params", TRAINABLE_COLLECTION)


@struct.dataclass
class Partition:
  """Variables as two dicts of collections; a pytree (jit, device_put, tree.map)."""

  trainable: dict
  frozen: dict

  def merged(self) -> dict:
    """All collections again, as one variables dict for ``model.apply``."""
    return {**self.frozen, **self.trainable}

  def with_trainable(self, trainable: dict) -> "Partition":
    return self.replace(trainable=trainable)


def partition(variables: dict, trainable: Iterable[str] = FAT_TRAINABLE) -> Partition:
  """Splits ``variables`` by collection name; every ``trainable`` one must exist."""
  trainable = tuple(trainable)
  missing = [k for k in trainable if k not in variables]
  if missing:
    raise ValueError(f"variables have no collection {missing}; they have {sorted(variables)} "
                     "(build them with fat.pipeline.quantize or prepare).")
  return Partition(trainable={k: variables[k] for k in trainable},
                   frozen={k: v for k, v in variables.items() if k not in trainable})
