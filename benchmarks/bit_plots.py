"""The plots of the ladder, sensitivity and mixed-precision benchmarks (PNG, matplotlib).

Each takes the JSON its benchmark writes (or its rows) and writes one PNG
atomically (``fat.atomic``). Defines no flags, so tests can import it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)
import numpy as np  # noqa: E402

from fat import atomic  # noqa: E402

LINESTYLE = {True: "-", False: "--"}   # per-channel solid, per-tensor dashed
MARKERS = "osD^vP*X"


def _save(fig, path: str) -> None:
  try:
    fig.tight_layout()
    atomic.write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
  finally:
    plt.close(fig)


def _colors(methods: Sequence[str]) -> dict:
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  return {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}


def plot_ladder(path: str, table: Mapping) -> None:
  """Top-1 and agreement with float against the rung, one line per method and
  granularity (per-channel solid, per-tensor dashed), float as a grey line."""
  rungs = table["rungs"]
  if not rungs:
    raise ValueError("plot_ladder: no finished rung to draw.")
  labels = list(dict.fromkeys(r["label"] for r in rungs))
  methods = list(dict.fromkeys(m for r in rungs for m in r["methods"]))
  color = _colors(methods)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key, ylabel in zip(axes, ("top1_pct", "agreement_pct"),
                             ("top-1 %", "agreement with float %")):
    for per_channel in (True, False):
      group = [r for r in rungs if r["per_channel"] == per_channel]
      for k, m in enumerate(methods):
        pts = [(labels.index(r["label"]), r["methods"][m][key]) for r in group if m in r["methods"]]
        if pts:
          x, y = zip(*pts)
          ax.plot(x, y, LINESTYLE[per_channel], marker=MARKERS[k % len(MARKERS)], ms=4, lw=1.2,
                  color=color[m], label=f"{m} ({'pc' if per_channel else 'pt'})")
    fp32 = (table.get("fp32") or {}).get("top1_pct")
    ref = fp32 if key == "top1_pct" else 100.0
    if ref is not None:
      ax.axhline(ref, color="grey", lw=1, ls=":", label="float")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.suptitle(f"{table['model']}: bit-width ladder ({table['first_last']})", fontsize=10)
  _save(fig, path)


def plot_sensitivity(path: str, rows: Sequence[Mapping], title: str,
                     metric: str = "rmse") -> None:
  """Per quantizer, in network order, the ``metric`` of that tensor alone: one bar
  per width (or per ``series`` field of the rows), one panel for weights and one
  for activations (log y)."""
  roles = [r for r in ("weight", "act") if any(row["role"] == r for row in rows)]
  if not roles:
    raise ValueError("plot_sensitivity: no rows to draw.")
  fig, axes = plt.subplots(len(roles), 1, figsize=(12, 3.6 * len(roles)), squeeze=False)
  for ax, role in zip(axes[:, 0], roles):
    part = [r for r in rows if r["role"] == role]
    paths = list(dict.fromkeys(r["path"] for r in part))
    label = lambda r: r.get("series") or f"{r['bits']} bits"
    series = list(dict.fromkeys(label(r) for r in sorted(part, key=lambda r: r["bits"])))
    bar = 0.8 / len(series)
    for k, name in enumerate(series):
      vals = {r["path"]: r[metric] for r in part if label(r) == name}
      x = [i + (k - (len(series) - 1) / 2) * bar for i, p in enumerate(paths) if p in vals]
      ax.bar(x, [max(vals[p], 1e-9) for p in paths if p in vals], width=bar, label=name)
    ax.set_yscale("log")
    ax.set_ylabel(f"{metric} vs float logits")
    ax.set_title(f"{'weights' if role == 'weight' else 'activations'}: one quantizer at a "
                 "time, the rest float", fontsize=9)
    step = max(1, math.ceil(len(paths) / 70))
    ax.set_xticks(range(0, len(paths), step))
    ax.set_xticklabels(paths[::step], rotation=90, fontsize=5)
    ax.set_xlim(-0.6, len(paths) - 0.4)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  _save(fig, path)


def pareto(points: Sequence[Mapping], key: str) -> list[Mapping]:
  """The points no other point beats in both size (smaller) and ``key`` (larger)."""
  best, front = -np.inf, []
  for p in sorted(points, key=lambda p: (p["size_mbit"], -p[key])):
    if p[key] > best:
      front.append(p)
      best = p[key]
  return front


def plot_size_accuracy(path: str, table: Mapping, methods: Sequence[str]) -> None:
  """Top-1 against weight size: per method, the uniform points and the mixed
  allocations' Pareto front; float as a grey line."""
  points = table["points"]
  if not points:
    raise ValueError("plot_size_accuracy: no finished point to draw.")
  color = _colors(list(methods))
  fig, ax = plt.subplots(figsize=(8, 5))
  for m in methods:
    key = f"{m}_top1"
    pts = [{**p, key: p["methods"][m]["top1_pct"]} for p in points if m in p["methods"]]
    uni = sorted((p for p in pts if p["kind"] == "uniform"), key=lambda p: p["size_mbit"])
    mix = [p for p in pts if p["kind"] == "mixed"]
    if uni:
      ax.plot([p["size_mbit"] for p in uni], [p[key] for p in uni], "s:", color=color[m],
              ms=6, lw=0.8, label=f"{m}: uniform")
      for p in uni if m == methods[0] else ():
        ax.annotate(p["label"], (p["size_mbit"], p[key]), fontsize=6,
                    textcoords="offset points", xytext=(3, -9))
    if mix:
      front = pareto(mix, key)
      ax.plot([p["size_mbit"] for p in mix], [p[key] for p in mix], "o", color=color[m],
              ms=4, alpha=0.5)
      ax.plot([p["size_mbit"] for p in front], [p[key] for p in front], "o-", color=color[m],
              ms=5, lw=1.5, label=f"{m}: mixed (Pareto front)")
  fp32 = (table.get("fp32") or {}).get("top1_pct")
  if fp32 is not None:
    ax.axhline(fp32, color="grey", ls=":", lw=1, label="float")
  ax.set_xlabel("weight size (Mbit, kernels only)")
  ax.set_ylabel("top-1 %")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(f"{table['model']}: mixed precision against uniform widths "
               f"(activations {table['act_bits']} bits)", fontsize=10)
  _save(fig, path)
