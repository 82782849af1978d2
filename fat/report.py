"""Experiment reports: the ``report.json`` schema (``validate_report``), its markdown
table (``format_markdown``) and ``write_report``, which writes both.

``validate_report`` names the first missing or ill-typed field, e.g.
``settings[0].methods.fat.top1_pct``. Files are written atomically (``fat.atomic``).
Plots are in ``fat.plots``; the benchmark tables in ``benchmarks/tables.py``.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Mapping

import numpy as np

from fat import atomic
from fat.methods import registry

REQUIRED_METHODS = registry.REQUIRED
TRAIN_FIELDS = ("train_seconds", "train_images", "epochs", "steps")

_STR, _INT, _NUM, _BOOL = "a string", "an integer", "a number", "a boolean"
_DICT, _LIST, _PCT = "a dict", "a list", "a percentage"
# Every method's cost (fat.methods.cost): its run's wall time and the images it read.
COST_FIELDS = (("wall_seconds", _NUM), ("images", _INT))
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
      for key, kind in (f for f in COST_FIELDS if method.get(f[0]) is not None):
        _check(method, key, kind, f"{where}.methods.{name}")
      if method.get("vs_fat") is not None:
        test = _check(method, "vs_fat", _DICT, f"{where}.methods.{name}")
        for key in ("fat_only_correct", "method_only_correct"):
          _check(test, key, _INT, f"{where}.methods.{name}.vs_fat")
        _check(test, "p_value", _NUM, f"{where}.methods.{name}.vs_fat")
    if setting["best_ptq"] not in methods:
      raise ValueError(f"report: field '{where}.best_ptq' names {setting['best_ptq']!r},"
                       f" which is not among its methods {sorted(methods)}")


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
  cells += [_fmt(m.get(key)) for key, _ in COST_FIELDS]
  cells += [_fmt(m.get(key)) for key in TRAIN_FIELDS]
  t = m.get("vs_fat")
  cells.append(f"{t['fat_only_correct']} / {t['method_only_correct']}, p = {t['p_value']:.2g}"
               if t else "")
  return "| " + " | ".join(_cell(c) for c in cells) + " |"


def method_order(names: Mapping) -> list[str]:
  """The methods of a report entry in the registry's order (``fat.methods``),
  then any that are not registered."""
  return registry.ordered(names)


def format_markdown(report: dict) -> str:
  """``report`` as a markdown document: a summary, then one row per (setting, method)."""
  fp32 = report["fp32"]["top1_pct"]
  summary = (report["model"], f"{report['width']:.2f}", report["dataset"],
             report["eval_examples"], f"{fp32:.2f}")
  lines = [f"# Quantization report: {report['model']}", "",
           "| model | width | dataset | eval_examples | fp32 top-1 % |", "|---|---|---|---|---|",
           "| " + " | ".join(_cell(c) for c in summary) + " |", ""]
  header = ["setting", "W bits", "A bits", "per-channel", "weight kind", "act kind", "method",
            "top-1 %", "agreement %", "Δ vs fp32 (pt)", "wall seconds", "images",
            "train seconds", "train images", "epochs", "steps", "FAT vs method"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for setting in report["settings"]:
    lines += [_row(setting, name, fp32) for name in method_order(setting["methods"])]
  lines += ["", "**bold** marks the best PTQ method other than min/max in each setting"
            " (`best_ptq` in report.json), chosen by its top-1 on this eval split, so an"
            " optimistic baseline; FAT's start is chosen without labels. Wall seconds: the"
            " method's own run on this setting (evaluation excluded; a method that starts"
            " from another's result, like fat_adaround, excludes that one's); images: the"
            " images it read. Training columns are blank for methods without training. FAT"
            " vs method: eval images only FAT gets right / only the method gets right, and the exact McNemar p-value of the"
            " difference (small p: unlikely to be chance)."]
  return "\n".join(lines) + "\n"


def write_report(workdir: str, report: dict) -> None:
  """Validates ``report`` and writes ``workdir/report.json`` and ``workdir/report.md``."""
  validate_report(report)
  files = {"report.json": atomic.dumps(report), "report.md": format_markdown(report)}
  for name, text in files.items():
    atomic.write_text(os.path.join(workdir, name), text)


# Moved names, still read from here by experiments/train.py as committed; they go when
# it imports them from their modules. Resolved on use, so this module needs no matplotlib.

