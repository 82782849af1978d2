"""Mixed precision: per-layer weight widths from the sensitivity table, against uniform ones.

From a sensitivity table (benchmarks/sensitivity.py, weights at several
widths) ``fat.allocation`` picks per-layer weight widths for each --budgets
value (mean bits per weight: the size of uniform W<b>); each allocation is a
main-job setting (exact-path overrides, activations at --act_bits), run with
every method of the config beside the uniform W<b>A<act_bits> points of
--uniform, on the same images. Writes mixed_precision.json (per point: size,
top-1 and agreement per method, the widths per layer), mixed_precision.md and
mixed_precision.png (top-1 against size: the uniform points and the mixed
allocations' Pareto front), and prints the targets' comparisons.

  python -m benchmarks.sensitivity --workdir=runs/sensitivity --bits=2,3,4,5,6 --act_bits=4
  python -m benchmarks.mixed_precision --sensitivity=runs/sensitivity/sensitivity.json \\
      --workdir=runs/mixed --budgets=3,4 --uniform=8,6,4,3

Points are filed and resumed like the ladder's rungs (benchmarks/bits.py): a
--workdir shared with the ladder reuses its finished uniform rungs. --choices=4,8
allocates only widths ONNX export represents (int8/int4 weights, 8-bit
activations). --act_budget (mean bits per activation element) also allocates
activation widths (--act_choices) from the table's activation rows.
"""

import json
import os
import time

from absl import flags
from ml_collections import config_flags

from benchmarks import bits
from configs.fashion_mnist import ladder as ladder_config
from experiments import cli

FLAGS = flags.FLAGS
DEFAULT_CONFIG = "configs/fashion_mnist/ladder.py"
with cli.flag_errors(default_config=DEFAULT_CONFIG):
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Main-job config (its settings "
                                  "are replaced by the points).")
flags.DEFINE_string("workdir", "runs/mixed", "Where the points, the JSON and the plot go.")
flags.DEFINE_string("sensitivity", "runs/sensitivity/sensitivity.json",
                    "benchmarks/sensitivity.py's JSON (weights at several widths).")
flags.DEFINE_list("budgets", ["3", "4"], "Mean bits per weight of each mixed allocation.")
flags.DEFINE_list("uniform", ["8", "6", "4", "3"], "Uniform weight widths to compare with.")
flags.DEFINE_list("choices", ["2", "3", "4", "5", "6", "8"], "Widths a layer may get.")
flags.DEFINE_integer("act_bits", 8, "Activation width of every point.")
flags.DEFINE_float("act_budget", 0.0, "Mean bits per activation element of the mixed points "
                   "(0: every activation at --act_bits).")
flags.DEFINE_list("act_choices", ["4", "6", "8"], "Widths an activation may get.")
flags.DEFINE_enum("net", "", ["", *ladder_config.NETWORKS],
                  "A shipped float checkpoint instead of the config's model_checkpoint.")
flags.DEFINE_list("plot_methods", ["fat", "ptq_minmax"], "Methods drawn in the plot.")
flags.DEFINE_bool("reuse", False, "Draw from the points already finished; run nothing.")
flags.DEFINE_bool("fresh", False, "Run every point again.")


def _numbers(name, kind=int, lo=2, hi=16):
  try:
    values = [kind(v) for v in FLAGS[name].value]
  except ValueError:
    values = []
  if not values or not all(lo <= v <= hi for v in values):
    raise ValueError(f"--{name} must be comma-separated numbers in {lo}..{hi}, got "
                     f"{FLAGS[name].value}.")
  return values


def point_name(budget: float, act: str, per_channel: bool = True) -> str:
  return f"mixed_w{budget:g}{act}_{'pc' if per_channel else 'pt'}".replace(".", "p")


def plan(table: dict):
  """The uniform and mixed settings, and each mixed point's allocation."""
  from fat import allocation  # pylint: disable=import-outside-toplevel
  choices = _numbers("choices")
  per_channel = table["granularity"] == "per_channel"
  layers = allocation.layers_from_rows(table["rows"], "weight")
  widths = sorted({r["bits"] for r in table["rows"] if r["role"] == "weight"})
  if len(widths) < 2:
    print(f"note: the table has weights at {widths} bits only; other widths are "
          "extrapolated (4x noise per bit)")
  total = allocation.total_size(layers)
  settings, allocs = [], {}
  for b in _numbers("uniform"):
    settings.append(ladder_config.default.setting(
        ladder_config.setting_name(b, FLAGS.act_bits, per_channel), b, FLAGS.act_bits,
        per_channel))
  act_alloc, act = None, f"a{FLAGS.act_bits}"
  if FLAGS.act_budget:
    acts = allocation.layers_from_rows(table["rows"], "act")
    act_alloc = allocation.allocate(acts, FLAGS.act_budget * allocation.total_size(acts),
                                    choices=_numbers("act_choices"), role="act")
    act = f"a{FLAGS.act_budget:g}"
  for budget in _numbers("budgets", float, 2, 16):
    w = allocation.allocate(layers, budget * total, choices=choices)
    name = point_name(budget, act, per_channel)
    overrides = allocation.merge_overrides(w, *([act_alloc] if act_alloc else []))
    settings.append(ladder_config.mixed_setting(name, overrides, FLAGS.act_bits, per_channel,
                                                weight_bits=max(choices)))
    allocs[name] = {"budget_mean_bits": budget, "size_bits": w.size_bits,
                    "weights": w.as_dict(),
                    "predicted_noise": w.predicted_noise,
                    "acts": act_alloc.as_dict() if act_alloc else None}
  return settings, allocs, total


def points(config, entries, allocs, total) -> list[dict]:
  rows = bits.method_rows(entries, [s.name for s in config.settings])
  sizes = {s.name: allocs[s.name]["size_bits"] if s.name in allocs else total * s.weight_bits
           for s in config.settings}
  for r in rows:
    mixed = r["name"] in allocs
    r.update(kind="mixed" if mixed else "uniform", size_mbit=sizes[r["name"]] / 1e6,
             mean_bits=sizes[r["name"]] / total,
             label=(f"mixed {allocs[r['name']]['budget_mean_bits']:g}" if mixed
                    else f"W{r['weight_bits']}A{r['act_bits']}"))
    if mixed:
      r["allocation"] = allocs[r["name"]]
  return rows


def targets(rows, fp32) -> list[str]:
  """The issue's comparisons, for FAT, at the sizes of uniform W4 and W3."""
  by = {(r["kind"], round(r["mean_bits"], 3)): r for r in rows}
  out = []
  for b, need in ((4, "≥ +0.30 pt, or within 0.10 pt of float"), (3, "≥ +1.00 pt")):
    uni, mix = by.get(("uniform", b)), next(
        (r for r in rows if r["kind"] == "mixed" and r["allocation"]["budget_mean_bits"] == b),
        None)
    if uni and mix and "fat" in uni["methods"] and "fat" in mix["methods"]:
      u, m = uni["methods"]["fat"]["top1_pct"], mix["methods"]["fat"]["top1_pct"]
      out.append(f"size of uniform W{b}: mixed FAT {m:.2f} (mean {mix['mean_bits']:.3f} bits) "
                 f"vs uniform FAT {u:.2f}: {m - u:+.2f} pt; float {fp32['top1_pct']:.2f} "
                 f"({m - fp32['top1_pct']:+.2f}); target {need}")
  return out


def markdown(out) -> str:
  methods = list(dict.fromkeys(m for r in out["points"] for m in r["methods"]))
  lines = [f"{out['model']}, float top-1 {out['fp32']['top1_pct']:.2f}; activations "
           f"{out['act']}; cells: top-1 % / agreement %", "",
           "| point | mean weight bits | size Mbit | " + " | ".join(methods) + " |",
           "|" + "---|" * (3 + len(methods))]
  for r in sorted(out["points"], key=lambda r: r["size_mbit"]):
    cells = [r["label"], f"{r['mean_bits']:.3f}", f"{r['size_mbit']:.3f}"]
    cells += [f"{r['methods'][m]['top1_pct']:.2f} / {r['methods'][m]['agreement_pct']:.2f}"
              if m in r["methods"] else "" for m in methods]
    lines.append("| " + " | ".join(cells) + " |")
  for r in out["points"]:
    if r["kind"] == "mixed":
      counts = {}
      for b in r["allocation"]["weights"].values():
        counts[b] = counts.get(b, 0) + 1
      lines.append(f"\n{r['label']}: layers per width "
                   + ", ".join(f"{b} bits: {n}" for b, n in sorted(counts.items())))
  return "\n".join(lines + [""] + out["targets"]) + "\n"


def main(argv):
  del argv
  start = time.time()
  with cli.quiet_native_import():
    from benchmarks import bit_plots  # pylint: disable=import-outside-toplevel
  from fat import atomic  # pylint: disable=import-outside-toplevel
  with cli.exit_on_user_error():
    try:
      with open(FLAGS.sensitivity) as f:
        table = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"--sensitivity: cannot read {FLAGS.sensitivity!r} ({e}); make it with "
                       "python -m benchmarks.sensitivity --bits=2,3,4,5,6") from e
    config = FLAGS.config
    if FLAGS.net:
      config.model_checkpoint = ladder_config.NETWORKS[FLAGS.net]
    if table.get("checkpoint") != config.model_checkpoint:
      raise ValueError(f"--sensitivity was measured on {table.get('checkpoint')!r}, the "
                       f"config uses {config.model_checkpoint!r}; pass the matching --net.")
    config.settings, allocs, total = plan(table)
    if FLAGS.reuse:
      fp32, entries = bits.finished(FLAGS.workdir, config, include_partial=True)
      if not entries:
        raise ValueError(f"--reuse: no finished point in {FLAGS.workdir!r}; run without it.")
    else:
      fp32, entries = bits.run(config, FLAGS.workdir, fresh=FLAGS.fresh)
    rows = points(config, entries, allocs, total)
    out = {"model": table["model"], "checkpoint": config.model_checkpoint,
           "granularity": table["granularity"], "act_bits": FLAGS.act_bits,
           "act": (f"{FLAGS.act_bits} bits" if not FLAGS.act_budget else
                   f"mixed, mean {FLAGS.act_budget:g} bits"),
           "sensitivity": FLAGS.sensitivity, "weight_params": total, "fp32": fp32,
           "points": rows, "targets": targets(rows, fp32) if fp32 else [],
           "missing": [s.name for s in config.settings if s.name not in entries]}
    out["wall_seconds"] = round(time.time() - start, 1)
    atomic.write_json(os.path.join(FLAGS.workdir, "mixed_precision.json"), out)
    text = markdown(out)
    atomic.write_text(os.path.join(FLAGS.workdir, "mixed_precision.md"), text)
    bit_plots.plot_size_accuracy(os.path.join(FLAGS.workdir, "mixed_precision.png"), out,
                                 FLAGS.plot_methods)
  wall = time.time() - start
  print("\n" + text)
  print(f"mixed precision: {os.path.join(FLAGS.workdir, 'mixed_precision.json')}, "
        f"{os.path.join(FLAGS.workdir, 'mixed_precision.png')}")
  print(f"wall time {int(wall // 60)} min {wall % 60:.0f} s")


if __name__ == "__main__":
  cli.run(main, interrupted="interrupted; run the same command to resume.")
