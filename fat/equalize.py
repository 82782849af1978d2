"""Mutual rescaling (cross-layer equalization) of folded parameters.

METHOD.md section 4 (the book chapter's depthwise -> pointwise rescaling); its
general form is DFQ's cross-layer equalization (Nagel et al. 2019). For two
consecutive convs ``y = W2 * f(W1 * x + b1) + b2`` joined by an activation
with ``f(x / s) = f(x) / s`` for ``s > 0`` (ReLU, or none), and any per-channel
``s_i > 0``:

    W1[..., i] /= s_i,  b1[i] /= s_i,  W2[..., i, :] *= s_i   (depthwise W2: W2[..., i] *= s_i)

leaves ``y`` unchanged. With ``r1_i`` the range (max |w|) of output channel i of
``W1`` and ``r2_i`` that of input channel i of ``W2``,

    s_i = sqrt(r1_i / r2_i)

makes both ranges ``sqrt(r1_i * r2_i)``: channels that per-tensor quantization
would crush get the range of their neighbours. A channel with a zero range
keeps ``s_i = 1``.

**Which pairs.** The pairs come from the model's dataflow, not from layer
names: ``pairs`` traces the folded model to a jaxpr with every ``ConvBNAct``
output and input tagged (``jax.ad_checkpoint.checkpoint_name``). ``(A, B)`` is
a pair when A's output is read by B and by nothing else (no residual add, no
pool) and A's activation is ReLU, ReLU6 or none. In an inverted residual that
is expand -> dw -> project; also the stem -> dw of a first block without
expansion, MNASNet's stem -> sep_dw -> sep_project, and a project -> the next
block's expand where that block has no residual. A layer in two pairs (the
depthwise of expand -> dw -> project: its output channel i is also its input
channel i) is handled as DFQ does: the pairs are swept in order until every
``s_i`` is within ``tol`` of 1 (at most ``iterations`` sweeps); each sweep
recomputes the ranges from the already rescaled kernels.

**ReLU6.** ``min(relu(x / s), 6) * s = min(relu(x), 6 s)``: the clip moves to
``6 s``, so rescaling across ReLU6 is exact only where the clip does not act.
We keep the standard block (one clip at 6 per layer; a per-channel clip
``6 s_i`` is not representable by ``ConvBNAct``, its export or an int8 ReLU6
kernel) and bound the scales by calibration data instead: with ``m_i`` the
largest pre-activation of channel i of A on the calibration images
(``channel_maxima``) and ``S_i`` its total scale (the product over sweeps),

* ``m_i >= 6`` (the clip acts on the data): channel i is locked, ``S_i = 1``
  (METHOD.md: "channels whose calibration output is already about 6 are
  locked");
* ``0 < m_i < 6``: ``S_i >= m_i / 6``, so the scaled channel stays at or below
  6 on the calibration images;
* ``m_i <= 0`` (never fires there): ``S_i >= 1``, it may only shrink, so an
  input that does fire it is clipped at ``6 S_i >= 6``, not lower.

The function is then exact on the calibration images. On other images a
channel with ``S_i != 1`` differs only where its pre-activation exceeds
``min(6, 6 S_i)`` but did not on the calibration set; ``headroom`` h > 1
bounds with ``h * m_i`` instead, exact up to h times the calibration max, at
the cost of less equalization. ReLU and linear pairs are exact on every input.
Measured on the shipped Fashion-MNIST MobileNet-v2 with 512 calibration
images and h = 1: the float logits move by 5e-7 (relative to their largest
magnitude) on the calibration images and by up to 2.7% on the 10,000 test
images, whose float argmax is unchanged on every image.

**Equalizing activations instead** (``target="activations"``, beyond DFQ and
the paper). With per-channel weights, the kernels need no equalizing, but a
per-tensor activation grid still has to span the channel with the largest
range, and a channel with a tenth of that range gets a tenth of the levels
(at 4 bits: one or two). Rescaling a pair whose second layer is depthwise
(expand -> dw, stem -> dw) to ``s_i = a_i / R`` (``a_i`` channel i's largest
output on the calibration images, ``R`` the largest of them) gives every
channel of the tensor between them the range ``R``, and moves neither
kernel's per-channel grid relative to its weights. For ReLU6, ``R <= 6``
keeps every scale at or above its floor, so the same bounds hold.

    new = equalize.equalize_images(model, folded, calib_images)   # one call
    # or, step by step:
    maxima = equalize.channel_maxima(model, folded, calib_images)
    new = equalize.equalize(model, folded, sample, channel_max=maxima)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax.ad_checkpoint import checkpoint_name

from fat import data
from fat.layers import Conv, QuantMode
from fat.models.blocks import ConvBNAct

RELU6_CAP = 6.0
HOMOGENEOUS = ("relu", "relu6", None)  # f(x / s) == f(x) / s for s > 0 (relu6: see above)
_OUT, _IN = "equalize_out:", "equalize_in:"


@dataclasses.dataclass(frozen=True)
class Pair:
  """Two ``ConvBNAct`` layers (paths): ``first``'s output is ``second``'s only input.

  ``act`` is ``first``'s activation; ``depthwise`` says whether ``second`` is a
  depthwise conv (its input channel i is its output channel i).
  """

  first: str
  second: str
  act: str | None
  depthwise: bool


def _folded(model: nn.Module) -> nn.Module:
  return model.clone(mode=QuantMode(stage="folded"))


def pairs(model: nn.Module, folded: dict, sample) -> tuple[Pair, ...]:
  """The rescalable pairs of ``model`` (any stage; traced folded), in call order.

  ``folded`` is ``{"params": ...}`` of ``fat.fold.fold_variables``; ``sample``
  one input batch (only its shape is used).
  """
  layers = {}  # path -> (act, depthwise)

  def tag(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__" or not isinstance(m, ConvBNAct) or not args:
      return next_fun(*args, **kwargs)
    path = "/".join(m.scope.path)
    layers[path] = (m.act, m.depthwise)
    y, step = next_fun(checkpoint_name(args[0], _IN + path), *args[1:], **kwargs)
    return checkpoint_name(y, _OUT + path), step

  def run(params, x):
    with nn.intercept_methods(tag):
      return _folded(model).apply({"params": params}, x)

  jaxpr = jax.make_jaxpr(run)(folded["params"], jnp.asarray(sample[:1])).jaxpr
  readers = {}  # var -> the equations reading it ("output" when the jaxpr returns it)
  for eqn in jaxpr.eqns:
    for v in {id(v): v for v in eqn.invars if isinstance(v, jax.extend.core.Var)}.values():
      readers.setdefault(v, []).append(eqn)
  for v in jaxpr.outvars:
    if isinstance(v, jax.extend.core.Var):
      readers.setdefault(v, []).append("output")
  found = []
  for eqn in jaxpr.eqns:
    name = eqn.params.get("name", "") if eqn.primitive.name == "name" else ""
    if not name.startswith(_OUT):
      continue
    first, read = name[len(_OUT):], readers.get(eqn.outvars[0], [])
    if len(read) != 1 or read[0] == "output" or read[0].primitive.name != "name":
      continue
    second = read[0].params["name"]
    if not second.startswith(_IN) or layers[first][0] not in HOMOGENEOUS:
      continue
    second = second[len(_IN):]
    found.append(Pair(first, second, layers[first][0], layers[second][1]))
  return tuple(found)


def channel_maxima(model: nn.Module, folded: dict, images, *,
                   batch_size: int = 128) -> dict[str, np.ndarray]:
  """``{ConvBNAct path: per-channel max of its pre-activation output}`` of the
  folded, unquantized model over ``images`` (a ``fat.data.Split`` or NHWC array)."""
  fmodel = _folded(model)

  @jax.jit
  def batch_max(params, x):
    _, state = fmodel.apply({"params": params}, x, capture_intermediates=lambda m, name: (
        name == "__call__" and isinstance(m, Conv)), mutable=["intermediates"])
    out = {}
    for key, (y,) in traverse_util.flatten_dict(state["intermediates"], sep="/").items():
      y = y.astype(jnp.promote_types(y.dtype, jnp.float32))  # float64 stays float64
      out[key.rsplit("/", 2)[0]] = jnp.max(y, axis=tuple(range(y.ndim - 1)))  # ".../conv/__call__"
    return out

  out = None
  batches, _ = data.image_batches(images, batch_size)
  for x in batches:
    m = jax.device_get(batch_max(folded["params"], jnp.asarray(x)))
    out = m if out is None else {k: np.maximum(out[k], v) for k, v in m.items()}
  if out is None:
    raise ValueError("channel_maxima got no images: give at least one calibration image.")
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _ranges(kernel: np.ndarray, axis: int) -> np.ndarray:
  """max |w| per index of ``axis``."""
  k = np.moveaxis(np.abs(kernel), axis, -1)
  return k.reshape(-1, k.shape[-1]).max(axis=0)


def relu6_bounds(channel_max: np.ndarray, headroom: float = 1.0):
  """``(floor, locked)`` of a ReLU6 layer's channels from their calibration
  maxima ``m``: the total scale must stay ``S >= floor``, and locked channels
  keep ``S = 1`` (module docstring). ``headroom`` h >= 1 leaves the clip out of
  reach up to ``h * m``: ``floor = h * m / 6``, locked where ``h * m >= 6``; a
  channel that never fires (``m <= 0``) gets ``floor = 1``, it is only shrunk."""
  m = np.asarray(channel_max, np.float64) * headroom
  return np.where(m > 0, m / RELU6_CAP, 1.0), m >= RELU6_CAP


def activation_scales(channel_max: np.ndarray, act: str, headroom: float = 1.0) -> np.ndarray:
  """``s`` of the ``"activations"`` target for a pair whose first layer has
  activation ``act`` ("relu" or "relu6") and calibration maxima ``m``
  (``channel_maxima``): every channel that fires is scaled to the largest
  channel's range ``R``, ``s_i = a_i / R`` with ``a_i`` channel i's largest
  output (``min(m_i, 6)`` for ReLU6). Then one per-tensor activation grid
  fits every channel of the output. For ReLU6, ``R <= 6 / headroom``, so
  ``s_i >= headroom * m_i / 6`` (``relu6_bounds``' floor) and the scaled
  channels stay below the clip on the calibration images; locked channels and
  channels that never fire keep ``s_i = 1``."""
  m = np.asarray(channel_max, np.float64)
  a = np.where(m > 0, np.minimum(m, RELU6_CAP) if act == "relu6" else m, 0.0)
  top = float(a.max(initial=0.0))
  if act == "relu6":
    top = min(top, RELU6_CAP / headroom)
  s = np.where(a > 0, a / top if top > 0 else 1.0, 1.0)
  if act == "relu6":
    floor, locked = relu6_bounds(m, headroom)
    s = np.where(locked, 1.0, np.maximum(s, floor))
  return s


TARGETS = ("weights", "activations")


def equalize(model: nn.Module, folded: dict, sample, *,
             channel_max: dict | None = None, headroom: float = 1.0, iterations: int = 100,
             tol: float = 1e-6, target: str = "weights") -> dict:
  """``folded`` with every pair of ``pairs(model, folded, sample)`` rescaled
  (module docstring); returns a new ``{"params": ...}`` (same dtypes).

  Args:
    model: the model (any stage).
    folded: ``{"params": ...}`` of ``fat.fold.fold_variables``.
    sample: one input batch (only its shape is used).
    channel_max: ``channel_maxima`` of the same model and ``folded`` on the
      calibration images; needed when a pair's first layer ends in ReLU6 (and,
      with the ``"activations"`` target, in ReLU).
    headroom: >= 1; ReLU6 channels stay exact on inputs whose pre-activation
      is up to ``headroom`` times its calibration max (``relu6_bounds``).
    iterations: the most sweeps over the pairs.
    tol: stop when every ``|s_i - 1|`` of a sweep is below this.
    target: ``"weights"`` (DFQ: balance the two kernels' ranges) or
      ``"activations"``: in one pass, every pair whose second layer is a
      depthwise conv and whose first ends in ReLU or ReLU6 gets
      ``activation_scales``, so every channel of the tensor between them has
      one range. With per-channel weights that is free: both kernels' channels
      are scaled whole, so their grids keep their place relative to the
      weights, and only the per-tensor activation grid between them changes.
      Pairs into a pointwise conv are left alone (scaling its input columns
      would crush the small ones on a per-channel 4-bit grid).
  """
  if target not in TARGETS:
    raise ValueError(f"equalize: target must be one of {TARGETS}, got {target!r}.")
  if not headroom >= 1.0:
    raise ValueError(f"equalize: headroom must be >= 1 (1: exact on the calibration images), "
                     f"got {headroom}.")
  if iterations < 1:
    raise ValueError(f"equalize: iterations must be >= 1, got {iterations}.")
  found = pairs(model, folded, sample)
  needs = ("relu", "relu6") if target == "activations" else ("relu6",)  # read channel_max
  missing = [p.first for p in found
             if p.act in needs and (channel_max is None or p.first not in channel_max)]
  if missing:
    raise ValueError(f"equalize needs the calibration maxima of the layers {missing}; "
                     "pass channel_max=fat.equalize.channel_maxima(model, folded, images) "
                     "(or call fat.equalize.equalize_images).")
  leaves = traverse_util.flatten_dict(folded["params"], sep="/")
  flat = {k: np.asarray(v, np.float64) for k, v in leaves.items()}
  bounds = {}  # ReLU6 layer -> (floor, locked), for the weights' sweeps
  for p in found:
    if p.act in needs:
      m = np.asarray(channel_max[p.first])
      if m.shape != flat[f"{p.first}/conv/bias"].shape:
        raise ValueError(f"channel_max[{p.first!r}] has shape {m.shape}, expected "
                         f"{flat[f'{p.first}/conv/bias'].shape}; measure it on the same model.")
      if target == "weights":
        bounds[p.first] = relu6_bounds(m, headroom)
  if target == "activations":
    for p in found:
      if p.depthwise and p.act in ("relu", "relu6"):
        s = activation_scales(channel_max[p.first], p.act, headroom)
        _rescale(flat, p, s)
    return _params(flat, leaves)
  total = {p.first: np.ones(flat[f"{p.first}/conv/bias"].shape) for p in found}
  for _ in range(iterations):
    change = 0.0
    for p in found:
      r1 = _ranges(flat[f"{p.first}/conv/kernel"], -1)
      r2 = _ranges(flat[f"{p.second}/conv/kernel"], -1 if p.depthwise else -2)
      ok = (r1 > 0) & (r2 > 0)
      s = np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)
      if p.first in bounds:
        floor, locked = bounds[p.first]
        s = np.where(locked, 1.0, np.maximum(s, floor / total[p.first]))
      total[p.first] = total[p.first] * s
      _rescale(flat, p, s)
      change = max(change, float(np.max(np.abs(s - 1.0), initial=0.0)))
    if change < tol:
      break
  return _params(flat, leaves)


def _rescale(flat: dict, p: Pair, s: np.ndarray) -> None:
  """Divide output channel i of ``p.first`` (kernel and bias) by ``s_i`` and
  multiply input channel i of ``p.second`` by it, in ``flat`` (float64 arrays)."""
  w1, b1, w2 = f"{p.first}/conv/kernel", f"{p.first}/conv/bias", f"{p.second}/conv/kernel"
  flat[w1], flat[b1] = flat[w1] / s, flat[b1] / s
  shape = [1] * flat[w2].ndim
  shape[-1 if p.depthwise else -2] = -1
  flat[w2] = flat[w2] * s.reshape(shape)


def _params(flat: dict, leaves: dict) -> dict:
  params = {k: jnp.asarray(v, np.asarray(leaves[k]).dtype) for k, v in flat.items()}
  return {"params": traverse_util.unflatten_dict(params, sep="/")}


def equalize_images(model: nn.Module, folded: dict, images, *, batch_size: int = 128,
                    headroom: float = 1.0, iterations: int = 100, tol: float = 1e-6,
                    target: str = "weights") -> dict:
  """``equalize`` with the ReLU6 maxima measured on ``images`` (the calibration
  images, a ``fat.data.Split`` or NHWC array): the one call of the main job."""
  maxima = channel_maxima(model, folded, images, batch_size=batch_size)
  sample = next(data.image_batches(images, 1)[0])
  return equalize(model, folded, sample, channel_max=maxima, headroom=headroom,
                  iterations=iterations, tol=tol, target=target)
