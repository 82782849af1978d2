"""Experiment reports (``report.json`` + ``report.md``) and diagnostic plots (PNG).

``validate_report`` names the first missing or ill-typed field, e.g.
``settings[0].methods.fat.top1_pct``. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pathlib
import tempfile
from typing import Any, Callable, Iterator, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)
import numpy as np  # noqa: E402

REQUIRED_METHODS = ("ptq_minmax", "fat")
METHOD_ORDER = ("ptq_minmax", "ptq_percentile", "ptq_mse", "fat", "qat")
TRAIN_FIELDS = ("train_seconds", "train_images", "epochs", "steps")
MAX_TICKS = 60

_STR, _INT, _NUM, _BOOL = "a string", "an integer", "a number", "a boolean"
_DICT, _LIST, _PCT = "a dict", "a list", "a percentage"
_TOP_FIELDS = (("model", _STR), ("width", _NUM), ("dataset", _STR), ("eval_examples", _INT))
_SETTING_FIELDS = (("name", _STR), ("weight_bits", _INT), ("act_bits", _INT),
                   ("per_channel", _BOOL), ("weight_kind", _STR), ("act_kind", _STR),
                   ("best_ptq", _STR))
_TYPES = {_STR: str, _INT: numbers.Integral, _NUM: numbers.Real, _PCT: numbers.Real,
          _DICT: Mapping, _LIST: list}


def _check(obj: Mapping, key: str, kind: str, where: str) -> Any:
  """``obj[key]``, raising ValueError naming ``where.key`` if missing or ill-typed.

  Bools are neither integers nor numbers here; percentages must lie in [0, 100].
  """
  name = f"{where}.{key}" if where else key
  if not isinstance(obj, Mapping) or key not in obj:
    raise ValueError(f"report: missing required field {name!r}")
  value, is_bool = obj[key], isinstance(obj[key], (bool, np.bool_))
  if is_bool != (kind == _BOOL) or not (is_bool or isinstance(value, _TYPES[kind])):
    raise ValueError(f"report: field {name!r} must be {kind}, got {value!r}")
  if kind == _PCT and not 0.0 <= value <= 100.0:
    raise ValueError(f"report: field {name!r} must be in [0, 100], got {value!r}")
  return value


def validate_report(report: dict) -> None:
  """Raises ValueError naming the first missing or ill-typed required field."""
  _check({"report": report}, "report", _DICT, "")
  for key, kind in _TOP_FIELDS:
    _check(report, key, kind, "")
  _check(_check(report, "fp32", _DICT, ""), "top1_pct", _PCT, "fp32")
  for i, setting in enumerate(_check(report, "settings", _LIST, "")):
    where = f"settings[{i}]"
    _check({where: setting}, where, _DICT, "")
    for key, kind in _SETTING_FIELDS:
      _check(setting, key, kind, where)
    methods = _check(setting, "methods", _DICT, where)
    for name in REQUIRED_METHODS:
      _check(methods, name, _DICT, f"{where}.methods")
    for name, method in methods.items():
      _check(methods, name, _DICT, f"{where}.methods")
      for key in ("top1_pct", "agreement_pct"):
        _check(method, key, _PCT, f"{where}.methods.{name}")
      for key in (k for k in TRAIN_FIELDS if method.get(k) is not None):
        _check(method, key, _NUM, f"{where}.methods.{name}")
      if method.get("vs_fat") is not None:
        test = _check(method, "vs_fat", _DICT, f"{where}.methods.{name}")
        for key in ("fat_only_correct", "method_only_correct"):
          _check(test, key, _INT, f"{where}.methods.{name}.vs_fat")
        _check(test, "p_value", _NUM, f"{where}.methods.{name}.vs_fat")
    if setting["best_ptq"] not in methods:
      raise ValueError(f"report: field '{where}.best_ptq' names {setting['best_ptq']!r},"
                       f" which is not among its methods {sorted(methods)}")


def _umask() -> int:
  mask = os.umask(0)  # the only way to read it; set back at once
  os.umask(mask)
  return mask


# Read once, at import: reading it briefly sets it to 0, which must not race
# with files that other threads (orbax's writers) create later.
_FILE_MODE = 0o666 & ~_umask()


def _atomic(path: str, write: Callable[[str], None]) -> None:
  """``write(tmp)`` to a temp file beside ``path`` (dirs created), then renames it over ``path``.

  On any failure the temp file is removed and ``path`` is left as it was.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, _FILE_MODE)  # mkstemp's file is owner-only; give it the usual mode
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _json_default(value: Any) -> Any:
  """numpy scalars and arrays as plain Python values (others fail as in ``json``)."""
  if not isinstance(value, (np.generic, np.ndarray)):
    raise TypeError(f"report: {type(value).__name__} is not JSON serializable")
  return value.tolist()


def _fmt(value: Any) -> str:
  """A count as is, another number to 2 decimals, '' for a missing value."""
  if value is None:
    return ""
  return str(int(value)) if isinstance(value, numbers.Integral) else f"{float(value):.2f}"


def _cell(value: Any) -> str:
  """Text safe inside a markdown table cell."""
  return str(value).replace("|", "\\|").replace("\n", " ")


def _row(setting: Mapping, name: str, fp32: float) -> str:
  """One markdown table row for ``setting``'s method ``name``."""
  m = setting["methods"][name]
  label = f"**{name}** (best other PTQ)" if name == setting.get("best_ptq") else name
  cells = [setting["name"], setting["weight_bits"], setting["act_bits"],
           "yes" if setting["per_channel"] else "no", setting["weight_kind"], setting["act_kind"],
           label, f"{m['top1_pct']:.2f}", f"{m['agreement_pct']:.2f}",
           f"{m['top1_pct'] - fp32:+.2f}"]
  cells += [_fmt(m.get(key)) for key in TRAIN_FIELDS]
  t = m.get("vs_fat")
  cells.append(f"{t['fat_only_correct']} / {t['method_only_correct']}, p = {t['p_value']:.2g}"
               if t else "")
  return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _method_order(methods: Mapping) -> list[str]:
  """The known methods in canonical order, then any others."""
  return ([m for m in METHOD_ORDER if m in methods]
          + [m for m in methods if m not in METHOD_ORDER])


def format_markdown(report: dict) -> str:
  """``report`` as a markdown document: a summary, then one row per (setting, method)."""
  fp32 = report["fp32"]["top1_pct"]
  summary = (report["model"], f"{report['width']:.2f}", report["dataset"],
             report["eval_examples"], f"{fp32:.2f}")
  lines = [f"# Quantization report: {report['model']}", "",
           "| model | width | dataset | eval_examples | fp32 top-1 % |", "|---|---|---|---|---|",
           "| " + " | ".join(_cell(c) for c in summary) + " |", ""]
  header = ["setting", "W bits", "A bits", "per-channel", "weight kind", "act kind", "method",
            "top-1 %", "agreement %", "Δ vs fp32 (pt)", "train seconds", "train images", "epochs",
            "steps", "FAT vs method"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for setting in report["settings"]:
    lines += [_row(setting, name, fp32) for name in _method_order(setting["methods"])]
  lines += ["", "**bold** marks the best PTQ method other than min/max in each setting"
            " (`best_ptq` in report.json), chosen by its top-1 on this eval split, so an"
            " optimistic baseline; FAT's start is chosen without labels. Training columns are"
            " blank for methods without training. FAT vs method: eval images only FAT gets"
            " right / only the method gets right, and the exact McNemar p-value of the"
            " difference (small p: unlikely to be chance)."]
  return "\n".join(lines) + "\n"


def seed_spread_markdown(reports: list[dict]) -> str:
  """Markdown tables of several reports of one config that differ only in seed.

  First, per setting and method: top-1 mean, sample standard deviation and range
  over the seeds, and the mean agreement with the float argmax. Then, per
  setting, FAT against the best PTQ method of the same seed (the highest top-1
  of all ``ptq_*`` methods, min/max included, so chosen on the eval labels): the
  gap in points, in how many seeds FAT reaches it, and in how many it is below
  with McNemar p < 0.05. The last column compares FAT with the PTQ method chosen
  without labels, FAT's own start (``init``: the lowest distillation loss on the
  calibration images), over the reports that record it.
  """
  if not reports:
    raise ValueError("seed_spread_markdown: no reports given.")
  names = [s["name"] for s in reports[0]["settings"]]
  if any([s["name"] for s in r["settings"]] != names for r in reports):
    raise ValueError("seed_spread_markdown: the reports have different settings.")
  n = len(reports)
  top = [f"{reports[0]['model']} on {reports[0]['dataset']}, {n} seeds "
         f"({', '.join(str(r['seed']) for r in reports)}), float top-1 "
         f"{reports[0]['fp32']['top1_pct']:.2f}", "",
         "| setting | method | top-1 mean | sd | min | max | agreement mean |",
         "|---|---|---|---|---|---|---|"]
  gap = ["", "| setting | FAT − best PTQ, mean (min, max) | FAT ≥ best PTQ | "
         "FAT below it, p < 0.05 | FAT − its start (PTQ chosen without labels), mean "
         "(min, max); FAT ≥ it |", "|---|---|---|---|---|"]
  for i, name in enumerate(names):
    runs = [r["settings"][i] for r in reports]
    for m in _method_order(runs[0]["methods"]):
      top1 = np.array([s["methods"][m]["top1_pct"] for s in runs])
      sd = float(np.std(top1, ddof=1)) if n > 1 else 0.0
      agree = np.mean([s["methods"][m]["agreement_pct"] for s in runs])
      top.append(f"| {name} | {m} | {top1.mean():.2f} | {sd:.2f} | {top1.min():.2f} | "
                 f"{top1.max():.2f} | {agree:.2f} |")
    gaps, below, vs_start = [], 0, []
    for s in runs:
      init = s["methods"]["fat"].get("init")
      if init is not None:
        vs_start.append(s["methods"]["fat"]["top1_pct"] - s["methods"][init]["top1_pct"])
      best = max((m for m in s["methods"] if m.startswith("ptq_")),
                 key=lambda m: s["methods"][m]["top1_pct"])
      gaps.append(s["methods"]["fat"]["top1_pct"] - s["methods"][best]["top1_pct"])
      t = s["methods"][best]["vs_fat"]
      below += int(t["p_value"] < 0.05 and t["method_only_correct"] > t["fat_only_correct"])
    start = f"{_spread(vs_start)}; {_reached(vs_start)}" if vs_start else "–"
    gap.append(f"| {name} | {_spread(gaps)} | {_reached(gaps)} | {below}/{n} seeds | {start} |")
  return "\n".join(top + gap) + "\n"


def _spread(gaps: list[float]) -> str:
  """``mean (min, max)`` of top-1 differences in points, signed."""
  return f"{np.mean(gaps):+.2f} ({min(gaps):+.2f}, {max(gaps):+.2f})"


def _reached(gaps: list[float]) -> str:
  """In how many seeds FAT is at least the other method: ``k/n seeds``."""
  return f"{sum(g >= 0 for g in gaps)}/{len(gaps)} seeds"


def _kept_loss(fat: dict) -> tuple[float, float, int]:
  """(loss before training, lowest scored loss, its step) of one FAT entry."""
  scores = fat["calibration_loss_by_step"]
  step, loss = min(scores, key=lambda p: p[1])
  return scores[0][1], loss, step


def lr_sweep_markdown(runs: dict[float, list[dict]]) -> str:
  """A markdown table of ``{learning rate: [report per seed]}``, one row per
  setting and rate; "chosen" marks each setting's rate with the lowest mean
  kept calibration loss."""
  if not runs or any(not reports for reports in runs.values()):
    raise ValueError("lr_sweep_markdown: every learning rate needs at least one report.")
  for reports in runs.values():
    for r in reports:
      for s in r["settings"]:
        if "calibration_loss_by_step" not in s["methods"]["fat"]:
          raise ValueError(f"lr_sweep_markdown: setting {s['name']} has no calibration "
                           "scores; run with config.fat.keep_best = True.")
  first = next(iter(runs.values()))[0]
  names = [s["name"] for s in first["settings"]]
  lines = ["| setting | FAT lr | calibration loss at start | kept calibration loss | "
           "kept step | top-1 % (not used) | agreement % (not used) | |",
           "|---|---|---|---|---|---|---|---|"]
  for i, name in enumerate(names):
    rows = []
    for lr, reports in sorted(runs.items()):
      fats = [r["settings"][i]["methods"]["fat"] for r in reports]
      start, kept, step = zip(*map(_kept_loss, fats))
      rows.append((lr, np.mean(start), np.mean(kept), step,
                   np.mean([f["top1_pct"] for f in fats]),
                   np.mean([f["agreement_pct"] for f in fats])))
    chosen = min(rows, key=lambda r: r[2])[0]
    for lr, start, kept, step, top1, agree in rows:
      lines.append(f"| {name} | {lr:g} | {start:.4f} | {kept:.4f} | "
                   f"{', '.join(map(str, step))} | {top1:.2f} | {agree:.2f} | "
                   f"{'chosen' if lr == chosen else ''} |")
  return "\n".join(lines) + "\n"


def write_report(workdir: str, report: dict) -> None:
  """Validates ``report`` and writes ``workdir/report.json`` and ``workdir/report.md``."""
  validate_report(report)
  files = {"report.json": json.dumps(report, indent=2, sort_keys=False,
                                     default=_json_default) + "\n",
           "report.md": format_markdown(report)}
  for name, text in files.items():
    write_text(os.path.join(workdir, name), text)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically: a reader sees the old file or the new one."""
  _atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text, "utf-8"))


def write_json(path: str, obj: Any) -> None:
  """``obj`` as indented JSON (numpy values as plain ones), written atomically."""
  write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _leaves(tree: Mapping, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  """(key path, leaf) pairs of a nested mapping, in insertion order."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaves(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),), value


def _named(tree: Mapping, name: str) -> dict[str, np.ndarray]:
  """Layer path -> leaf for every leaf called ``name``, in network order."""
  return {"/".join(p[:-1]): np.asarray(v, np.float64) for p, v in _leaves(tree) if p[-1] == name}


def _label_axis(ax, labels: list[str]) -> None:
  """Layer-path x ticks, every Nth so that about MAX_TICKS remain."""
  step = max(1, math.ceil(len(labels) / MAX_TICKS))
  ticks = list(range(0, len(labels), step))
  ax.set_xticks(ticks)
  ax.set_xticklabels([labels[i] for i in ticks], rotation=90, fontsize=5)
  ax.set_xlim(-0.5, len(labels) - 0.5)


def _style(ax, ylabel: str, log: bool) -> None:
  """Label, grid and (outside) legend of ``ax``; log y if ``log``."""
  ax.set_yscale("log" if log else "linear")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, which="both")
  if ax.has_data():
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _save(fig, path: str) -> None:
  """Saves ``fig`` as PNG at ``path`` (atomically), closing it in any case."""
  try:
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
  finally:
    plt.close(fig)


def plot_thresholds(path: str, thresholds: dict[str, dict]) -> None:
  """Mean (and min-max band) of alpha and beta per layer, one line per setting."""
  per_setting = {s: (_named(t, "alpha"), _named(t, "beta")) for s, t in (thresholds or {}).items()}
  if not any(a or b for a, b in per_setting.values()):
    raise ValueError("plot_thresholds: no 'alpha'/'beta' leaves in the thresholds trees")
  layers = list(dict.fromkeys(k for a, b in per_setting.values() for k in (*a, *b)))
  index = {k: i for i, k in enumerate(layers)}
  fig, axes = plt.subplots(2, 1, figsize=(min(40.0, max(8.0, 0.12 * len(layers))), 7), sharex=True)
  for row, (ax, leaf) in enumerate(zip(axes, ("alpha", "beta"))):
    for setting, trees in per_setting.items():
      values = trees[row]
      if values:
        x = [index[k] for k in values]
        stats = np.array([(v.mean(), v.min(), v.max()) for v in values.values()])
        (line,) = ax.plot(x, stats[:, 0], ".-", lw=0.8, ms=3, label=setting)
        ax.fill_between(x, stats[:, 1], stats[:, 2], color=line.get_color(), alpha=0.2, lw=0)
    _style(ax, f"{leaf} (mean, min-max)", log=False)
  _label_axis(axes[-1], layers)
  axes[0].set_title("Trained thresholds per layer")
  _save(fig, path)


def plot_weight_ranges(path: str, params: dict) -> None:
  """Min, median and max over output channels of max|w| per layer, log scale.

  All-zero (dead) channels are drawn at 1e-8, the floor of the log axis.
  """
  kernels = _named(params or {}, "kernel")
  if not kernels:
    raise ValueError("plot_weight_ranges: no 'kernel' leaves in the params tree")
  ranges = [np.abs(k.reshape(-1, k.shape[-1] if k.ndim else 1)).max(axis=0)
            for k in kernels.values()]
  stats = np.maximum(np.array([(r.min(), np.median(r), r.max()) for r in ranges]), 1e-8)
  x = np.arange(len(kernels))
  fig, ax = plt.subplots(figsize=(min(40.0, max(8.0, 0.12 * len(kernels))), 5))
  ax.fill_between(x, stats[:, 0], stats[:, 2], alpha=0.2, lw=0, label="min-max over channels")
  for col, style, label in ((2, "v-", "max"), (1, "o-", "median"), (0, "^-", "min")):
    ax.plot(x, stats[:, col], style, lw=0.7, ms=3, label=label)
  _style(ax, "per-output-channel max|w|", log=True)
  ax.set_title("Per-channel weight ranges (spread = per-tensor quantization difficulty)")
  _label_axis(ax, list(kernels))
  _save(fig, path)


def plot_losses(path: str, losses: dict[str, list[float]]) -> None:
  """Training loss against step, one curve per setting, log y."""
  curves = {s: np.asarray(v, np.float64) for s, v in (losses or {}).items() if len(v)}
  if not curves:
    raise ValueError("plot_losses: no loss values to plot (empty dict or empty curves)")
  fig, ax = plt.subplots(figsize=(8, 5))
  for setting, values in curves.items():
    ax.plot(np.arange(len(values)), values, lw=0.8, label=setting)
  _style(ax, "training loss", log=True)
  ax.set(xlabel="step", title="Training loss")
  _save(fig, path)
