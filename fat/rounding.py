"""Learned rounding (AdaRound, Nagel et al. 2020): pure JAX numerics, and the
variables-level start (``init_rounding``) and end (``harden``).

A weight on the grid of scale ``s`` and zero point ``z`` (``fat.quant``) rounds
down or up; AdaRound learns which, per weight, with a rounding variable ``v``:

  h(v)  = clip(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)     zeta = 1.1, gamma = -0.1
  w~    = (clip(floor(w * s) - z + h(v), qmin, qmax) + z) / s  (soft weight)
  f_reg = sum(1 - |2 h(v) - 1|^beta)                           (rounding regularizer)

``v`` starts where ``h(v) = frac(w * s)``, so ``w~ = w`` inside the grid's range.
The reconstruction loss plus ``lambda * f_reg``, with beta annealed from 20 to 2
after a warm-up without the regularizer (``annealed_beta``), drives every
``h`` to 0 or 1. ``harden`` then rounds ``h`` (``v >= 0`` rounds up) and writes
the kernel as ``(q + z) / s``: exactly on the same grid, so the layers, the
ONNX export and the integer reference take it as they take any kernel.

The grid of a weight comes from its own range (``fat.layers``), so hardening
keeps each channel's extremes at their nearest rounding (they sit at the
grid's ends) and sets the weight's alpha to 1 (beta to 0): the hardened
kernel's range then gives back the same ``s`` and ``z``, which ``harden``
checks (and ``check_grids`` before any training, for asymmetric grids).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fat import quant, rules as rules_lib

ZETA, GAMMA = 1.1, -0.1
COLLECTION = "rounding"   # the variables collection of the rounding variables ``v``
TRAINABLE = "thresholds"  # the collection of alpha and beta (fat.layers.TRAINABLE_COLLECTION)


def rectified_sigmoid(v: jax.Array) -> jax.Array:
  """h(v) = clip(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: jax.Array) -> jax.Array:
  """The ``v`` with ``h(v) = h`` for ``h`` in [0, 1]: logit((h - gamma) / (zeta - gamma))."""
  p = (jnp.asarray(h, jnp.float32) - GAMMA) / (ZETA - GAMMA)
  return jnp.log(p) - jnp.log1p(-p)


def regularizer(v: jax.Array, beta) -> jax.Array:
  """f_reg = sum(1 - |2 h(v) - 1|^beta): 0 where every h is 0 or 1."""
  return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


def annealed_beta(step: int, total: int, warmup: float = 0.2, start: float = 20.0,
                  end: float = 2.0) -> tuple[float, float]:
  """``(beta, on)`` at ``step`` of ``total`` (host floats): the regularizer is off
  (``on`` = 0) for the first ``warmup`` share of the steps, then beta falls
  linearly from ``start`` to ``end`` (Nagel et al. 2020; BRECQ's LinearTempDecay)."""
  first = warmup * total
  rel = (step - first) / max(total - first, 1.0)
  beta = end + (start - end) * min(max(1.0 - rel, 0.0), 1.0)
  return float(beta), float(step >= first)


def _grid(w, qp: quant.QuantParams, spec: quant.QuantSpec):
  s, z = quant.scale_and_zero(qp, spec, jnp.ndim(w))
  return jax.lax.stop_gradient(s), jax.lax.stop_gradient(z)


def soft_quant(w: jax.Array, v: jax.Array, qp: quant.QuantParams,
               spec: quant.QuantSpec) -> jax.Array:
  """w~ = (clip(floor(w*s) - z + h(v), qmin, qmax) + z) / s; only ``v`` gets a
  gradient (the grid and ``w`` are constants here)."""
  w = jax.lax.stop_gradient(jnp.asarray(w, jnp.float32))
  s, z = _grid(w, qp, spec)
  q = jnp.clip(jnp.floor(w * s) - z + rectified_sigmoid(v), spec.qmin, spec.qmax)
  return (q + z) * (1.0 / s)


@functools.partial(jax.jit, static_argnums=(2,))
def init_v(w: jax.Array, qp: quant.QuantParams, spec: quant.QuantSpec) -> jax.Array:
  """``v`` with h(v) = frac(w * s): the soft weight starts at ``w``."""
  w = jnp.asarray(w, jnp.float32)
  s, _ = _grid(w, qp, spec)
  u = w * s
  return inverse_rectified_sigmoid(u - jnp.floor(u))


def _extremes(w: jax.Array, spec: quant.QuantSpec) -> jax.Array:
  """True at each channel's (or the tensor's) smallest and largest element."""
  flat = w.reshape(-1, w.shape[-1]) if spec.per_channel else w.reshape(-1, 1)
  rows = jnp.arange(flat.shape[1])
  mask = jnp.zeros(flat.shape, bool)
  mask = mask.at[jnp.argmin(flat, axis=0), rows].set(True)
  mask = mask.at[jnp.argmax(flat, axis=0), rows].set(True)
  return mask.reshape(w.shape)


@functools.partial(jax.jit, static_argnums=(3,))
def hard_ints(w: jax.Array, v: jax.Array, qp: quant.QuantParams,
              spec: quant.QuantSpec) -> jax.Array:
  """Integer grid values of the hardened weights: ``clip(floor(w*s) - z + [v >= 0])``,
  with each channel's extremes at their nearest rounding (the grid's ends)."""
  w = jnp.asarray(w, jnp.float32)
  s, z = _grid(w, qp, spec)
  up = (jnp.asarray(v) >= 0).astype(jnp.float32)
  learned = jnp.clip(jnp.floor(w * s) - z + up, spec.qmin, spec.qmax)
  nearest = jnp.clip(jnp.round(w * s) - z, spec.qmin, spec.qmax)
  return jnp.where(_extremes(w, spec), nearest, learned)


# --------------------------------------------------------------------------
# Variables level: which kernels learn their rounding, their start, hardening.
# --------------------------------------------------------------------------


def weight_spec(quant_rules, module_path: str) -> quant.QuantSpec | None:
  """The weight spec of the layer at ``module_path``, as ``fat.layers`` resolves it."""
  spec = rules_lib.resolve(tuple(quant_rules), module_path, "weight")
  return None if spec is None else dataclasses.replace(spec, axis=-1)


def weight_params(kernel, thresholds: dict, spec: quant.QuantSpec) -> quant.QuantParams:
  """The kernel's quantizer parameters as ``fat.layers`` computes them: its own
  (per-channel) range, scaled by the layer's alpha and beta."""
  w_min, w_max = quant.observed_range(kernel, spec)
  return quant.params_from_range(w_min, w_max, spec, thresholds["alpha"], thresholds["beta"])


def _join(path: str, name: str) -> str:
  return f"{path}/{name}" if path else name


def parent(key: str) -> str:
  """The module path of a flattened variable key ("" for a root variable)."""
  return key.rsplit("/", 1)[0] if "/" in key else ""


def learned_layers(variables: dict, quant_rules) -> dict[str, quant.QuantSpec]:
  """``{module path: weight spec}`` of the kernels whose spec says ``rounding="learned"``."""
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  out = {}
  for key in flat:
    if key == "kernel" or key.endswith("/kernel"):
      path = parent(key)
      spec = weight_spec(quant_rules, path)
      if spec is not None and spec.rounding == "learned":
        out[path] = spec
  return out


def _module(tree: dict, path: str) -> dict:
  for name in path.split("/") if path else ():
    tree = tree[name]
  return tree


@functools.partial(jax.jit, static_argnums=(3,))
def _init_layer(kernel, alpha, beta, spec: quant.QuantSpec):
  return init_v(kernel, weight_params(kernel, {"alpha": alpha, "beta": beta}, spec), spec)


def init_rounding(variables: dict, quant_rules) -> dict:
  """``variables`` plus a ``rounding`` collection: ``v`` (the kernel's shape) for
  every layer whose weight spec in ``quant_rules`` is ``rounding="learned"``,
  starting at h(v) = frac(w * s) on the grid the variables give."""
  flat = {}
  for path, spec in learned_layers(variables, quant_rules).items():
    th = _module(variables[TRAINABLE], path)
    flat[_join(path, "v")] = _init_layer(_module(variables["params"], path)["kernel"],
                                         th["alpha"], th["beta"], spec)
  if not flat:
    raise ValueError("no layer learns its rounding: give the weight specs rounding='learned' "
                     "(e.g. fat.rules.with_rounding).")
  return {**variables, COLLECTION: traverse_util.unflatten_dict(flat, sep="/")}


@functools.partial(jax.jit, static_argnums=(4,))
def _harden_layer(kernel, v, alpha, beta, spec: quant.QuantSpec):
  """``(hardened kernel, whether it reproduces its grid, weights moved off nearest)``."""
  qp = weight_params(kernel, {"alpha": alpha, "beta": beta}, spec)
  q = hard_ints(kernel, v, qp, spec)
  s, z = quant.scale_and_zero(qp, spec, kernel.ndim)
  new = ((q + z) * (1.0 / s)).astype(kernel.dtype)
  again = weight_params(new, {"alpha": jnp.ones_like(alpha), "beta": jnp.zeros_like(beta)}, spec)
  ok = jnp.all(quant.quantize_int(new, again, spec)[0] == q)
  nearest = jnp.clip(jnp.round(kernel.astype(jnp.float32) * s) - z, spec.qmin, spec.qmax)
  return new, ok, jnp.sum(q != nearest)


class GridLostError(ValueError):
  """A learned layer's hardened kernel would not give back its grid."""


def _grid_lost(path: str) -> GridLostError:
  return GridLostError(
      f"learned rounding of {path or 'the layer'!r}: the hardened kernel's own range does not "
      "give back its grid (its grid must contain 0 and both ends must hold a weight); quantize "
      "this layer's weights with rounding='nearest'.")


def check_grids(variables: dict, quant_rules) -> None:
  """Raises ``harden``'s ``GridLostError`` before any training, naming the first learned
  layer whose grid a hardened kernel cannot give back even at nearest rounding.

  Symmetric grids always come back: each channel's largest magnitude sits on
  or past the grid's end. An asymmetric grid comes back when it contains 0
  and each end holds a weight or is 0. Min/max weight thresholds (alpha = 1)
  always do, and so do the grids of the MSE search over alpha and beta
  (``config.mse_shift``): they keep 0, and an end inside the range clips
  weights. The MSE search over alpha alone can cut a channel's range short of
  0, and such a layer is refused here rather than after the reconstruction.
  """
  for path, spec in learned_layers(variables, quant_rules).items():
    if spec.kind != "asymmetric":
      continue
    kernel = _module(variables["params"], path)["kernel"]
    th = _module(variables[TRAINABLE], path)
    v = _init_layer(kernel, th["alpha"], th["beta"], spec)
    if not bool(_harden_layer(kernel, v, th["alpha"], th["beta"], spec)[1]):
      raise _grid_lost(path)


def harden(variables: dict, quant_rules) -> tuple[dict, dict]:
  """``(variables, stats)``: each learned layer's kernel replaced by its hardened
  grid values ``(q + z) / s``, its alpha set to 1 and beta to 0 (the hardened
  range gives the same grid), and the ``rounding`` collection dropped.

  ``stats``: ``flipped`` (weights rounded away from nearest) and ``weights``.
  Raises ``GridLostError`` (a ValueError) naming a layer whose grid the hardened
  kernel would not reproduce (e.g. an asymmetric grid that does not contain 0).
  """
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  alphas = traverse_util.flatten_dict(variables[TRAINABLE], sep="/")
  vs = traverse_util.flatten_dict(variables[COLLECTION], sep="/")
  flipped = total = 0
  for key, v in vs.items():
    path = parent(key)
    spec = weight_spec(quant_rules, path)
    kk, ka, kb = (_join(path, n) for n in ("kernel", "alpha", "beta"))
    new, ok, moved = _harden_layer(params[kk], v, alphas[ka], alphas[kb], spec)
    if not bool(ok):
      raise _grid_lost(path)
    flipped += int(moved)
    total += int(np.size(new))
    params[kk] = new
    alphas[ka], alphas[kb] = jnp.ones_like(alphas[ka]), jnp.zeros_like(alphas[kb])
  out = {k: v for k, v in variables.items() if k != COLLECTION}
  out["params"] = traverse_util.unflatten_dict(params, sep="/")
  out[TRAINABLE] = traverse_util.unflatten_dict(alphas, sep="/")
  return out, {"flipped": flipped, "weights": total}
