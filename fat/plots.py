"""Diagnostic plots of a run (PNG): thresholds, weight ranges and loss curves per layer/setting.

Every file is written atomically (``fat.atomic``); an empty input is a
ValueError naming the plot, and writes nothing.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np

from fat import atomic

MAX_TICKS = 60


def pyplot():
  """``matplotlib.pyplot`` on the Agg backend, imported at the first plot
  (0.3 s: an entry point's ``--help`` does not pay it)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


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
    atomic.write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
  finally:
    pyplot().close(fig)


def plot_thresholds(path: str, thresholds: dict[str, dict]) -> None:
  """Mean (and min-max band) of alpha and beta per layer, one line per setting."""
  per_setting = {s: (_named(t, "alpha"), _named(t, "beta")) for s, t in (thresholds or {}).items()}
  if not any(a or b for a, b in per_setting.values()):
    raise ValueError("plot_thresholds: no 'alpha'/'beta' leaves in the thresholds trees")
  layers = list(dict.fromkeys(k for a, b in per_setting.values() for k in (*a, *b)))
  index = {k: i for i, k in enumerate(layers)}
  fig, axes = pyplot().subplots(2, 1, figsize=(min(40.0, max(8.0, 0.12 * len(layers))), 7), sharex=True)
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
  fig, ax = pyplot().subplots(figsize=(min(40.0, max(8.0, 0.12 * len(kernels))), 5))
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
  fig, ax = pyplot().subplots(figsize=(8, 5))
  for setting, values in curves.items():
    ax.plot(np.arange(len(values)), values, lw=0.8, label=setting)
  _style(ax, "training loss", log=True)
  ax.set(xlabel="step", title="Training loss")
  _save(fig, path)
