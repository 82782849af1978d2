"""Per-layer sensitivity: one quantizer at a time at a low width, the rest float.

    probe = sensitivity.Probe(qmodel, qvars, sample)   # qmodel: every quantizer on
    f = probe.logits(images, batch_size=500)           # nothing quantized: float
    rows = sensitivity.sweep(probe, images, f, labels=None, batch_size=500)
    sensitivity.ranked_markdown(rows)

``qmodel`` is a model in the "quant" stage whose rules quantize every tensor
(``fat.pipeline.setting_rules`` of a low-width setting) and ``qvars`` its
variables (calibrated ranges, and alpha/beta: 1 and 0 for min/max PTQ, or a
FAT checkpoint's trained ones). For each quantizer (a weight by its conv's
path, an activation by its quantizer's path) ``sweep`` measures, on the given
images, against the float logits:

* ``rmse``: the distillation loss (``fat.steps.distillation_loss``, "rmse"),
  and ``mse``, its square, the noise ``fat.allocation`` adds over layers;
* ``sqnr_db``: 10 log10(sum f^2 / sum (q - f)^2) of the logits;
* ``flip_pct``: images whose top-1 class changes (no labels needed);
* ``top1_delta_pt``: top-1 change in points, when labels are given.

**One compiled model.** ``Probe`` runs the folded (unquantized) network once
compiled, with each quantizer switched on or off by a boolean passed as an
input: kernels are fake-quantized where their switch is on before the folded
convs read them, and each activation quantizer's output is replaced by its
fake-quantized value where its switch is on (``flax.linen.intercept_methods``).
Each on-quantizer computes what the "quant" stage computes with the exact-path
rule of that one tensor (``reference_logits``, one compile per rule set, the
definition the tests check ``Probe`` against): weight thresholds from the
kernel's (per-channel) range, activation thresholds from the calibrated
range, both scaled by the variables' alpha/beta; with only one tensor
quantized no bias is rounded (that needs both the input's and the kernel's
grid).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from scipy import stats

from fat import allocation, calibrate, data, layers, pipeline, quant, rules

ROLES = rules.ROLES


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quantizer:
  """One quantizer of a network: its layer path, role, spec, and size (weights:
  parameters; activations: elements per image)."""

  path: str
  role: str
  spec: quant.QuantSpec
  size: int
  signed: bool = True


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def _is_call(ctx, kinds) -> bool:
  return isinstance(ctx.module, kinds) and ctx.method_name == "__call__"


def find_quantizers(qmodel: nn.Module, qvars: dict, sample) -> tuple[Quantizer, ...]:
  """Every quantizer the rules of ``qmodel`` switch on, in the order the forward pass
  meets them (no compile: shapes only)."""
  seen: dict[tuple[str, str], Quantizer] = {}
  mode, params = qmodel.mode, _flat(qvars["params"])

  def record(next_fun, args, kwargs, ctx):
    out = next_fun(*args, **kwargs)
    if _is_call(ctx, (layers.Conv, layers.Dense)):
      path = layers.layer_path(ctx.module)
      spec = rules.resolve(mode.rules, path, "weight")
      if spec is not None:
        kernel = params[f"{path}/kernel"]
        seen.setdefault((path, "weight"), Quantizer(
            path=path, role="weight", spec=dataclasses.replace(spec, axis=-1),
            size=int(np.prod(kernel.shape))))
    elif _is_call(ctx, layers.ActQuant):
      path = layers.layer_path(ctx.module)
      spec = rules.resolve(mode.rules, path, "act")
      if spec is not None:
        spec = layers.act_spec(dataclasses.replace(spec, per_channel=False), ctx.module.signed)
        seen.setdefault((path, "act"), Quantizer(
            path=path, role="act", spec=spec, size=int(np.prod(args[0].shape[1:])),
            signed=ctx.module.signed))
    return out

  fmodel = calibrate.quantized(qmodel, (), stage="folded")
  with nn.intercept_methods(record):
    jax.eval_shape(fmodel.apply, {"params": qvars["params"]}, jnp.asarray(sample[:1]))
  return tuple(seen.values())


def _alpha_beta(flats: Iterable[dict], path: str):
  """A quantizer's alpha and beta: trainable ones, or the frozen ones of the input."""
  for flat in flats:
    if f"{path}/alpha" in flat:
      return flat[f"{path}/alpha"], flat[f"{path}/beta"]
  raise ValueError(f"no alpha/beta of quantizer {path!r} in the variables: build them for a "
                   "model whose rules quantize every tensor.")


class Probe:
  """The folded network with a switch per quantizer, compiled once (see the module doc)."""

  def __init__(self, qmodel: nn.Module, qvars: dict, sample):
    self.quantizers = find_quantizers(qmodel, qvars, sample)
    self.fmodel = calibrate.quantized(qmodel, (), stage="folded")
    self.qvars = qvars
    self._apply = jax.jit(self._forward)

  def off(self) -> dict:
    """Every switch off: ``{role: {path: False}}``."""
    return {role: {q.path: False for q in self.quantizers if q.role == role} for role in ROLES}

  def only(self, path: str, role: str) -> dict:
    """The switches with only ``(path, role)`` on."""
    switches = self.off()
    if path not in switches[role]:
      raise ValueError(f"no {role} quantizer {path!r}; known: {sorted(switches[role])}.")
    switches[role][path] = True
    return switches

  def _forward(self, qvars, switches, x):
    params = _flat(qvars["params"])
    ranges = _flat(qvars.get(layers.ACT_COLLECTION, {}))
    flats = (_flat(qvars.get(layers.TRAINABLE_COLLECTION, {})), ranges)
    acts = {}
    for q in self.quantizers:
      alpha, beta = _alpha_beta(flats, q.path)
      if q.role == "weight":
        key = f"{q.path}/kernel"
        k = params[key]
        qp = quant.params_from_range(*quant.observed_range(k, q.spec), q.spec, alpha, beta)
        params[key] = jnp.where(switches["weight"][q.path], quant.fake_quant(k, qp, q.spec), k)
      else:
        acts[q.path] = (q.spec, quant.params_from_range(
            ranges[f"{q.path}/x_min"], ranges[f"{q.path}/x_max"], q.spec, alpha, beta))

    def act_switch(next_fun, args, kwargs, ctx):
      out = next_fun(*args, **kwargs)
      if not _is_call(ctx, layers.ActQuant):
        return out
      path = layers.layer_path(ctx.module)
      if path not in acts:
        return out
      y, _ = out
      spec, qp = acts[path]
      return jnp.where(switches["act"][path], quant.fake_quant(y, qp, spec), y), None

    with nn.intercept_methods(act_switch):
      return self.fmodel.apply({"params": traverse_util.unflatten_dict(params, sep="/")}, x)

  def logits(self, images, batch_size: int, switches: Mapping | None = None,
             qvars: dict | None = None) -> np.ndarray:
    """Logits over ``images`` (a split or an array) with ``switches`` (default all off)."""
    switches = self.off() if switches is None else switches
    qvars = self.qvars if qvars is None else qvars
    batches, _ = data.image_batches(images, batch_size)
    return np.concatenate([np.asarray(self._apply(qvars, switches, jnp.asarray(x)))
                           for x in batches])


def reference_logits(model: nn.Module, folded_params, qvars: dict, q: Quantizer, images,
                     batch_size: int) -> np.ndarray:
  """The definition ``Probe`` computes: the "quant" stage with the one exact-path rule of
  ``q`` (every other tensor float), its variables taken from ``qvars``; one compile."""
  rule = allocation.exact_rule(q.path, q.role, q.spec)
  qmodel, init = pipeline.quantize(model, {"params": folded_params}, (rule,),
                                   pipeline.first_batch(images))
  src = {col: _flat(v) for col, v in qvars.items()}
  variables = {col: traverse_util.unflatten_dict(
      {k: src[col][k] for k in _flat(tree)}, sep="/") if col != "params" else tree
      for col, tree in init.items()}
  apply = jax.jit(qmodel.apply)
  batches, _ = data.image_batches(images, batch_size)
  return np.concatenate([np.asarray(apply(variables, jnp.asarray(x))) for x in batches])


def compare(q_logits: np.ndarray, f_logits: np.ndarray, labels=None) -> dict:
  """The row metrics of ``q_logits`` against the float ``f_logits`` (module doc)."""
  q = np.asarray(q_logits, np.float64)
  f = np.asarray(f_logits, np.float64)
  err = float(np.sum((q - f) ** 2))
  mse = err / f.size
  out = {"rmse": float(np.sqrt(mse)), "mse": mse,
         "sqnr_db": float(10 * np.log10(np.sum(f ** 2) / err)) if err > 0 else float("inf"),
         "flip_pct": float(100.0 * np.mean(q.argmax(-1) != f.argmax(-1)))}
  if labels is not None:
    labels = np.asarray(labels)
    out["top1_delta_pt"] = float(100.0 * (np.mean(q.argmax(-1) == labels)
                                          - np.mean(f.argmax(-1) == labels)))
  return out


def sweep(probe: Probe, images, f_logits: np.ndarray, *, batch_size: int, labels=None,
          roles: Iterable[str] = ROLES, qvars: dict | None = None,
          progress=None) -> list[dict]:
  """One row per quantizer of ``roles`` (network order): path, role, size, bits and the
  ``compare`` metrics of that quantizer alone. ``qvars``: other variables for the
  probe's model (default its own); ``progress``: an optional ``(done, total, path)``
  callback."""
  roles = tuple(roles)
  bad = sorted(set(roles) - set(ROLES))
  if bad:
    raise ValueError(f"roles must be among {ROLES}, got {bad}.")
  todo = [q for q in probe.quantizers if q.role in roles]
  rows = []
  for i, q in enumerate(todo):
    logits = probe.logits(images, batch_size, probe.only(q.path, q.role), qvars)
    rows.append({"path": q.path, "role": q.role, "size": q.size, "bits": q.spec.bits,
                 **compare(logits, f_logits, labels)})
    if progress is not None:
      progress(i + 1, len(todo), q.path)
  return rows


def ranked(rows: Iterable[Mapping], metric: str = "rmse") -> list[Mapping]:
  """``rows`` most sensitive first (highest ``metric``; ties in the given order)."""
  rows = list(rows)
  order = sorted(range(len(rows)), key=lambda i: (-rows[i][metric], i))
  return [rows[i] for i in order]


def rank_correlation(a: Iterable[Mapping], b: Iterable[Mapping], metric: str = "rmse") -> float:
  """Spearman correlation of two tables' ``metric`` over their shared (path, role, bits)."""
  key = lambda r: (r["path"], r["role"], r["bits"])
  da, db = {key(r): r[metric] for r in a}, {key(r): r[metric] for r in b}
  shared = [k for k in da if k in db]
  if len(shared) < 2:
    raise ValueError("rank_correlation: the tables share fewer than 2 rows.")
  return float(stats.spearmanr([da[k] for k in shared], [db[k] for k in shared])[0])


def ranked_markdown(rows: Iterable[Mapping], metric: str = "rmse", top: int = 0) -> str:
  """A markdown table of ``rows``, most sensitive first (``top`` > 0: only that many)."""
  rows = ranked(rows, metric)
  rows = rows[:top] if top else rows
  has_top1 = any("top1_delta_pt" in r for r in rows)
  head = ["rank", "quantizer", "role", "bits", "size", "distillation loss (RMSE)",
          "SQNR dB", "top-1 flips %"] + (["top-1 Δ pt"] if has_top1 else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for i, r in enumerate(rows, 1):
    cells = [str(i), f"`{r['path']}`", r["role"], str(r["bits"]), f"{r['size']:,}",
             f"{r['rmse']:.4f}", f"{r['sqnr_db']:.1f}", f"{r['flip_pct']:.2f}"]
    if has_top1:
      cells.append(f"{r.get('top1_delta_pt', float('nan')):+.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
