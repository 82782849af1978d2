"""Quantized variables from folded float params, and min/max calibration.

    qmodel = quantized(model, rules)                        # same architecture, "quant" stage
    qvars  = init_quant_variables(qmodel, folded_params, x)  # params + quant_stats + thresholds
    qvars  = calibrate(qmodel, qvars, batches)               # activation ranges from data
    logits = qmodel.apply(qvars, x)
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm import tqdm

from fat.layers import ACT_COLLECTION, TRAINABLE_COLLECTION, QuantMode


def quantized(model: nn.Module, rules, stage: str = "quant") -> nn.Module:
  """``model`` in the given folded stage with quantizer ``rules``."""
  return model.clone(mode=QuantMode(stage=stage, rules=tuple(rules)))


def init_quant_variables(qmodel: nn.Module, folded_params, sample) -> dict:
  """Variables of ``qmodel``: the folded params, zero ranges, alpha=1, beta=0."""
  variables = jax.jit(qmodel.init)(jax.random.PRNGKey(0), jnp.asarray(sample[:1]))
  expected = jax.tree.map(jnp.shape, variables["params"])
  got = jax.tree.map(jnp.shape, folded_params)
  if expected != got:
    raise ValueError("folded params do not match the quantized model's parameter shapes; "
                     "fold the float variables of the same architecture first.")
  return {**variables, "params": folded_params}


def calibrate(qmodel: nn.Module, variables: dict, batches: Iterable, *,
              num_batches: int | None = None, progress: bool = True) -> dict:
  """Running min/max of every activation quantizer's input over ``batches``.

  The network runs folded and unquantized (standard min/max calibration).
  Returns ``variables`` with ``quant_stats`` replaced.
  """
  cmodel = qmodel.clone(mode=dataclasses.replace(qmodel.mode, stage="calibrate"))

  @jax.jit
  def step(params, stats, x):
    _, upd = cmodel.apply({"params": params, ACT_COLLECTION: stats}, x,
                          mutable=[ACT_COLLECTION])
    return upd[ACT_COLLECTION]

  stats = variables.get(ACT_COLLECTION, {})
  stats = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.zeros_like(v) if getattr(p[-1], "key", "") in ("x_min", "x_max") else v,
      stats)
  seen = 0
  for x in tqdm(batches, total=num_batches, desc="calibrate", disable=not progress,
                leave=False):
    stats = step(variables["params"], stats, jnp.asarray(x))
    seen += 1
  if seen == 0:
    raise ValueError("calibration set is empty: give at least one batch of images "
                     "(check calibration_images and the data split).")
  return {**variables, ACT_COLLECTION: stats}
