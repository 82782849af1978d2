"""Quantized variables from folded float params, and activation-range calibration.

    qmodel = quantized(model, rules)                        # same architecture, "quant" stage
    qvars  = init_quant_variables(qmodel, folded_params, x)  # params + quant_stats + thresholds
    qvars  = calibrate(qmodel, qvars, batches)               # activation ranges from data
    logits = qmodel.apply(qvars, x)

Ranges include 0 (as int8 runtimes require): min/max calibration takes the
running min/max over all batches; percentile calibration averages the
per-batch (100-p, p) percentiles.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from fat import data
from fat.layers import (ACT_COLLECTION, CALIB_COLLECTION, GRID_COLLECTION, INITIAL,
                        TRAINABLE_COLLECTION, QuantMode)

METHODS = ("minmax", "percentile")


def quantized(model: nn.Module, rules, stage: str = "quant") -> nn.Module:
  """``model`` in the given folded stage with quantizer ``rules``."""
  return model.clone(mode=QuantMode(stage=stage, rules=tuple(rules)))


def init_quant_variables(qmodel: nn.Module, folded_params, sample) -> dict:
  """Variables of ``qmodel``: the folded params, zero ranges, alpha=1, beta=0.

  Only shapes come from the model (``jax.eval_shape``, no compile); the
  quantizer variables start at the constants of ``layers.INITIAL``.
  """
  shapes = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), jnp.asarray(sample[:1]))
  expected = jax.tree.map(jnp.shape, shapes["params"])
  got = jax.tree.map(jnp.shape, folded_params)
  if expected != got:
    raise ValueError("folded params do not match the quantized model's parameter shapes; "
                     "fold the float variables of the same architecture first.")

  def initial(path, leaf):
    name = path[-1].key
    if name not in INITIAL:
      raise ValueError(f"quantizer variable {jax.tree_util.keystr(path)} has no starting "
                       f"value; add {name!r} to fat.layers.INITIAL.")
    return jnp.full(leaf.shape, INITIAL[name], leaf.dtype)

  # Sown records are outputs of one apply, not variables.
  skip = ("params", GRID_COLLECTION, "intermediates", CALIB_COLLECTION)
  variables = {k: jax.tree_util.tree_map_with_path(initial, v)
               for k, v in shapes.items() if k not in skip}
  return {**variables, "params": folded_params}


def observe(qmodel: nn.Module, variables: dict, batches: Iterable, *, calibration: str,
            percentile: float = 99.99, mse_shift: bool = False,
            num_batches: int | None = None, progress: bool = True) -> list[dict]:
  """Per batch, ``{activation module path: statistic}`` from a calibration pass."""
  mode = dataclasses.replace(qmodel.mode, stage="calibrate", calibration=calibration,
                             percentile=percentile, mse_shift=mse_shift)
  cmodel = qmodel.clone(mode=mode)

  @jax.jit
  def step(variables, x):
    _, col = cmodel.apply(variables, x, mutable=[CALIB_COLLECTION])
    flat = traverse_util.flatten_dict(col.get(CALIB_COLLECTION, {}), sep="/")
    return {k.rsplit("/", 1)[0]: v[0] for k, v in flat.items()}

  out = [step(variables, jnp.asarray(x))
         for x in tqdm(batches, total=num_batches, desc=f"calibrate ({calibration})",
                       disable=not progress, leave=False)]
  if not out:
    raise ValueError("calibration set is empty: give at least one batch of images "
                     "(check calibration_images and the data split).")
  return out


def activation_ranges(qmodel: nn.Module, params, batches: Iterable, *,
                      method: str = "minmax", percentile: float = 99.99,
                      num_batches: int | None = None, progress: bool = True) -> dict:
  """``{activation quantizer path: (lo, hi)}`` over ``batches``, from the folded,
  unquantized network.

  "percentile" averages the per-batch percentiles, weighted by batch size.
  The ranges depend on the data, ``method`` and which activations the rules
  quantize, not on the quantizer specs: settings that quantize the same
  activations can share them (see ``observed_key``).
  """
  if method not in METHODS:
    raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}.")
  sizes = []  # images per batch: percentiles are averaged with these weights

  def counted():
    for x in batches:
      sizes.append(len(x))
      yield x

  stats = observe(qmodel, {"params": params}, counted(), calibration=method,
                  percentile=percentile, num_batches=num_batches, progress=progress)
  stacked = {k: np.stack([np.asarray(s[k]) for s in stats]) for k in stats[0]}
  if method == "minmax":
    return {k: (float(v[:, 0].min()), float(v[:, 1].max())) for k, v in stacked.items()}
  return {k: (float(np.average(v[:, 0], weights=sizes)),
              float(np.average(v[:, 1], weights=sizes))) for k, v in stacked.items()}


def observed_key(rules) -> tuple:
  """What ``activation_ranges`` depends on in ``rules``: the patterns of the
  rules that quantize activations."""
  return tuple(r.pattern for r in rules if r.act is not None)


def with_ranges(variables: dict, ranges: dict) -> dict:
  """``variables`` with the activation ranges (widened to include 0) written in."""
  if not ranges:  # no activation quantizers: nothing to calibrate
    return variables
  flat = traverse_util.flatten_dict(variables[ACT_COLLECTION], sep="/")
  for path, (lo, hi) in ranges.items():
    for name, value in (("x_min", min(lo, 0.0)), ("x_max", max(hi, 0.0))):
      key = f"{path}/{name}"
      if key not in flat:
        raise ValueError(f"no {key} in quant_stats: variables and model disagree.")
      flat[key] = jnp.asarray(value, jnp.float32)
  return {**variables, ACT_COLLECTION: traverse_util.unflatten_dict(flat, sep="/")}


def calibrate(qmodel: nn.Module, variables: dict, batches: Iterable, *,
              method: str = "minmax", percentile: float = 99.99,
              num_batches: int | None = None, progress: bool = True) -> dict:
  """``variables`` with activation ranges (``x_min``/``x_max``) from ``batches``.

  The network runs folded and unquantized. ``method`` is "minmax" or
  "percentile". alpha/beta are left as they are.
  """
  ranges = activation_ranges(qmodel, variables["params"], batches, method=method,
                             percentile=percentile, num_batches=num_batches, progress=progress)
  return with_ranges(variables, ranges)


def mse_search(qmodel: nn.Module, variables: dict, batches: Iterable, *,
               shift: bool = False, num_batches: int | None = None,
               progress: bool = True) -> dict:
  """The MSE PTQ baseline: per quantizer, the threshold on a grid with least error.

  Activation errors are summed over ``batches``; weights are searched per
  channel when their spec is per-channel. Ranges come from ``variables``
  (calibrate first); the untrained input quantizer keeps its alpha. The search
  moves alpha (``fat.mse.alpha_sweep``), and with ``shift`` also beta on
  shifted grids (``fat.mse.shift_sweep``).
  """
  sweeps = observe(qmodel, variables, batches, calibration="mse", mse_shift=shift,
                   num_batches=num_batches, progress=progress)
  flat = traverse_util.flatten_dict(variables[TRAINABLE_COLLECTION], sep="/")
  for path, sweep in sweeps[0].items():
    errors = sum(np.asarray(s[path][-1], np.float64) for s in sweeps)
    best = np.argmin(errors, axis=0)
    if not np.all(np.isfinite(np.min(errors, axis=0))):
      raise ValueError(f"{path}: no threshold on the MSE search's grid keeps 0 on the "
                       "integer grid; let config.fat.beta_range contain 0.")
    chosen = {"alpha": np.asarray(sweep[0])[best]}
    if len(sweep) == 3:  # (alphas, betas, errors): beta per candidate (and channel)
      betas = np.asarray(sweep[1])
      chosen["beta"] = (betas[best, np.arange(betas.shape[1])] if betas.ndim == 2
                        else betas[best])
    for name, value in chosen.items():
      key = f"{path}/{name}"
      if key not in flat:
        raise ValueError(f"no {key} in thresholds: variables and model disagree.")
      flat[key] = jnp.asarray(value, jnp.float32).reshape(flat[key].shape)
  return {**variables, TRAINABLE_COLLECTION: traverse_util.unflatten_dict(flat, sep="/")}


class SharedRanges:
  """Activation ranges on one set of calibration images, computed once per
  (statistic, quantized activations) and shared by every setting that
  quantizes the same activations (``observed_key``).

      ranges = SharedRanges(folded_params, calib_split, batch_size=128)
      ranges(qmodel, "minmax")
  """

  def __init__(self, params, images, *, batch_size: int, percentile: float = 99.99):
    self.params, self.images, self.batch_size = params, images, batch_size
    self.percentile, self.cache = percentile, {}

  def __call__(self, qmodel: nn.Module, method: str) -> dict:
    key = (method, observed_key(qmodel.mode.rules))
    if key not in self.cache:
      batches, num = data.image_batches(self.images, self.batch_size)
      self.cache[key] = activation_ranges(qmodel, self.params, batches, method=method,
                                          percentile=self.percentile, num_batches=num)
    return self.cache[key]
