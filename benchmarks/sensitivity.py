"""Per-layer sensitivity: each quantizer alone at a low width, the rest float.

For every weight and activation quantizer of the network (by layer path), at
each width of --bits (weights) and --act_bits (activations) (--granularity weights,
min/max thresholds: PTQ min/max of that one tensor), on held-out unlabeled
images (the unlabeled training subset's images after the calibration ones),
against the float logits: the distillation loss (RMSE), SQNR, the share of
images whose top-1 class changes, and the top-1 change (with those images'
labels; not used for the ranking). Writes sensitivity.json, sensitivity.md
(ranked tables) and sensitivity.png (bars per layer) into --workdir.

  python -m benchmarks.sensitivity --workdir=runs/sensitivity --bits=4 --act_bits=4
  python -m benchmarks.sensitivity --workdir=runs/sensitivity --bits=2,3,4,5,6 --act_bits=4

With --fat_checkpoint (a main-job setting checkpoint, e.g. the ladder's
runs/ladder/checkpoints/w4a8_pc) it ranks again at that setting's widths with
FAT's trained thresholds, against min/max ones, and prints the Spearman
correlation of the two rankings (sensitivity_fat.png).

Every table comes from one compiled model per width (``fat.sensitivity.Probe``);
--reference=N also runs the first N quantizers as exact-path rule sets (one
compile each), records both times and checks that they agree.
"""

import os
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags
from tqdm import tqdm

from configs.fashion_mnist import ladder as ladder_config
from experiments import cli

FLAGS = flags.FLAGS
DEFAULT_CONFIG = "configs/default.py"
with cli.flag_errors(default_config=DEFAULT_CONFIG):
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Main-job config: float checkpoint, "
                                  "data, seed, calibration images, FAT clip ranges.")
flags.DEFINE_string("workdir", "runs/sensitivity", "Where the tables and plots go.")
flags.DEFINE_list("bits", ["4"], "Weight widths to try (empty: no weight rows).")
flags.DEFINE_list("act_bits", ["4"], "Activation widths to try (empty: no activation rows).")
flags.DEFINE_enum("granularity", "per_channel", ["per_channel", "per_tensor"], "Weight grids.")
flags.DEFINE_enum("net", "", ["", *ladder_config.NETWORKS],
                  "A shipped float checkpoint instead of the config's model_checkpoint.")
flags.DEFINE_integer("images", 1000, "Held-out unlabeled images to measure on.")
flags.DEFINE_integer("batch_size", 500, "Images per forward pass.")
flags.DEFINE_string("fat_checkpoint", "", "A main-job setting checkpoint: rank again with its "
                    "trained thresholds, at its widths, against min/max ones.")
flags.DEFINE_integer("reference", 0, "Also run the first N quantizers (weight and activation "
                     "alternately) as exact-path rule sets, timing one compile each.")
flags.DEFINE_integer("top", 20, "Rows of the printed ranking.")


def _widths() -> dict[int, tuple[str, ...]]:
  """{width: the roles measured at it}."""
  out = {}
  for name, role in (("bits", "weight"), ("act_bits", "act")):
    values = FLAGS[name].value
    if not all(b.isdigit() and 2 <= int(b) <= 16 for b in values):
      raise ValueError(f"--{name} must be comma-separated widths in 2..16, got {values}.")
    for b in values:
      out.setdefault(int(b), ())
      out[int(b)] += (role,)
  if not out and not FLAGS.fat_checkpoint:
    raise ValueError("--bits and --act_bits are both empty: nothing to measure.")
  for name in ("images", "batch_size"):
    if FLAGS[name].value < 1:
      raise ValueError(f"--{name} must be positive, got {FLAGS[name].value}.")
  if FLAGS.fat_checkpoint and not os.path.isdir(FLAGS.fat_checkpoint):
    raise ValueError(f"--fat_checkpoint: no checkpoint at {FLAGS.fat_checkpoint!r} (a "
                     "main-job workdir's checkpoints/<setting>).")
  return dict(sorted(out.items()))


def held_out(config, n: int):
  """(calibration images, held-out images, their labels) as the main job draws them."""
  from fat import data  # pylint: disable=import-outside-toplevel
  train = data.load(config.dataset, "train", config.data_dir or None)
  unlabeled = train.sample(config.fat.train_fraction, config.seed)
  c = config.calibration_images
  if len(unlabeled) < c + n:
    raise ValueError(f"--images={n}: only {len(unlabeled) - c} unlabeled images follow the "
                     f"{c} calibration images; lower --images or raise fat.train_fraction.")
  rest = unlabeled.take(np.arange(c, c + n))
  return unlabeled.head(c), rest, rest.labels


def _ranked_text(rows, widths, top=0):
  from fat import sensitivity  # pylint: disable=import-outside-toplevel
  parts = []
  for b in widths:
    part = [r for r in rows if r["bits"] == b]
    if part:
      parts.append(f"### {b} bits\n\n" + sensitivity.ranked_markdown(part, top=top))
  return "\n".join(parts)


def main(argv):
  del argv
  start = time.time()
  with cli.exit_on_user_error():
    widths = _widths()
    with cli.quiet_native_import():
      from experiments.train import load_float  # pylint: disable=import-outside-toplevel
      from benchmarks import bit_plots  # pylint: disable=import-outside-toplevel
    # pylint: disable-next=import-outside-toplevel
    from fat import atomic, calibrate, evaluate, fold, models, pipeline
    config = FLAGS.config
    if FLAGS.net:
      config.model_checkpoint = ladder_config.NETWORKS[FLAGS.net]
    name, kwargs, float_vars, _ = load_float(config)
    model = models.create(name, **kwargs)
    folded = fold.fold_variables(float_vars, model.bn_eps)
    calib, images, labels = held_out(config, FLAGS.images)
    sample = pipeline.first_batch(calib)
    fmodel = calibrate.quantized(model, (), stage="folded")
    f_logits = evaluate.logits(jax.jit(fmodel.apply), folded, images, FLAGS.batch_size)
    shared = {}  # id(params) -> SharedRanges: one calibration pass per params

    def minmax(qmodel, params):
      """PTQ min/max variables of ``qmodel`` on the calibration images."""
      init = pipeline.quantize(model, {"params": params}, qmodel.mode.rules, sample)[1]
      ranges = shared.setdefault(id(params), calibrate.SharedRanges(
          params, calib, batch_size=config.calibration_batch_size))
      return calibrate.with_ranges(init, ranges(qmodel, "minmax"))

    measure = dict(images=images, f_logits=f_logits, labels=labels, sample=sample,
                   params=folded["params"])
    rows, timing = _minmax_rows(model, config, widths, minmax, measure)
    if FLAGS.reference and rows:
      timing.update(_reference(model, config, widths, minmax, measure))
    top1 = float(100 * np.mean(f_logits.argmax(-1) == labels))
    out = {"model": name, "checkpoint": config.model_checkpoint, "dataset": config.dataset,
           "granularity": FLAGS.granularity, "widths": {"weight": sorted(
               b for b, r in widths.items() if "weight" in r), "act": sorted(
               b for b, r in widths.items() if "act" in r)}, "thresholds": "minmax",
           "images": len(images), "held_out": "unlabeled train images after the calibration "
           "images (labels used only for top1_delta_pt)", "float_top1_pct": top1,
           "rows": rows, "timing": timing}
    text = (f"# Per-layer sensitivity: {name}\n\nOne quantizer at a time at the given width "
            f"(weights {FLAGS.granularity.replace('_', '-')}, min/max thresholds), the rest "
            f"float; {len(images)} held-out images, float top-1 there {top1:.2f}%.\n\n"
            + _ranked_text(rows, widths))
    if FLAGS.fat_checkpoint:
      out["fat"] = _fat_rows(model, (name, kwargs), minmax, measure)
      text += "\n" + out["fat"]["text"]
      bit_plots.plot_sensitivity(
          os.path.join(FLAGS.workdir, "sensitivity_fat.png"),
          [{**r, "series": s} for s, part in (("min/max", out["fat"]["minmax_rows"]),
                                               ("FAT", out["fat"]["rows"])) for r in part],
          f"{name}, {out['fat']['setting']}: each quantizer alone, min/max against FAT's "
          "trained thresholds")
    out["timing"]["wall_seconds"] = round(time.time() - start, 1)
    atomic.write_json(os.path.join(FLAGS.workdir, "sensitivity.json"), out)
    atomic.write_text(os.path.join(FLAGS.workdir, "sensitivity.md"), text)
    if rows:
      bit_plots.plot_sensitivity(os.path.join(FLAGS.workdir, "sensitivity.png"), rows,
                                 f"{name}: each quantizer alone ({FLAGS.granularity}, "
                                 f"min/max), {len(images)} held-out images")
  if rows:
    shown = max(widths, key=lambda b: (len(widths[b]), -b))  # both roles, else the lowest
    print("\n" + _ranked_text(rows, [shown], top=FLAGS.top))
  if "fat" in out:
    print(out["fat"]["summary"])
  wall = time.time() - start
  print(f"sensitivity: {os.path.join(FLAGS.workdir, 'sensitivity.json')}")
  print(f"timing: {out['timing']}")
  print(f"wall time {int(wall // 60)} min {wall % 60:.0f} s")


def _width_model(model, config, b: int):
  """``model`` with every tensor quantized at ``b`` bits (--granularity weights)."""
  from fat import calibrate, pipeline  # pylint: disable=import-outside-toplevel
  rules = pipeline.setting_rules(
      pipeline.Setting(name=f"w{b}a{b}", weight_bits=b, act_bits=b,
                       per_channel=FLAGS.granularity == "per_channel"),
      alpha_range=tuple(config.fat.alpha_range), beta_range=tuple(config.fat.beta_range))
  return calibrate.quantized(model, rules)


def _minmax_rows(model, config, widths, minmax, m) -> tuple[list, dict]:
  """The min/max rows at every width, one probe (one compile) per width, and timings."""
  from fat import sensitivity  # pylint: disable=import-outside-toplevel
  rows, timing = [], {}
  for b, roles in widths.items():
    qmodel = _width_model(model, config, b)
    qvars = minmax(qmodel, m["params"])
    t = time.time()
    probe = sensitivity.Probe(qmodel, qvars, m["sample"])
    probe.logits(m["images"].head(FLAGS.batch_size), FLAGS.batch_size)  # compiles
    timing.setdefault("probe_compile_seconds", round(time.time() - t, 1))
    t = time.time()
    total = sum(q.role in roles for q in probe.quantizers)
    with tqdm(total=total, desc=f"{b} bits", unit="quantizer", leave=False) as bar:
      part = sensitivity.sweep(probe, m["images"], m["f_logits"], batch_size=FLAGS.batch_size,
                               labels=m["labels"], roles=roles,
                               progress=lambda *_: bar.update(1))
    timing.setdefault("probe_seconds_per_quantizer", round((time.time() - t) / len(part), 2))
    rows += part
  return rows, timing


def _fat_rows(model, float_model, minmax, m) -> dict:
  """Rows at the --fat_checkpoint setting's widths with its trained thresholds and
  with min/max ones (same probe), and how far the two rankings agree."""
  # pylint: disable-next=import-outside-toplevel
  from fat import calibrate, checkpoints, pipeline, sensitivity
  variables, meta = checkpoints.load(FLAGS.fat_checkpoint)
  checkpoints.require(meta, ("model", "model_kwargs", "config", "fat", "setting"),
                      FLAGS.fat_checkpoint, "point --fat_checkpoint at a main-job setting")
  if (meta["model"], meta["model_kwargs"]) != tuple(float_model):
    raise ValueError(f"--fat_checkpoint is a {meta['model']} {meta['model_kwargs']}, the "
                     f"float checkpoint a {float_model}; pass --net or --config to match.")
  qmodel = calibrate.quantized(model, pipeline.config_rules(meta["config"], meta["fat"]))
  probe = sensitivity.Probe(qmodel, variables, m["sample"])
  sweep = lambda qvars: sensitivity.sweep(probe, m["images"], m["f_logits"],
                                          batch_size=FLAGS.batch_size, labels=m["labels"],
                                          qvars=qvars)
  return _compare_fat(meta, sweep(variables), sweep(minmax(qmodel, variables["params"])))


def _compare_fat(meta, fat_rows, ptq_rows) -> dict:
  """Do FAT's thresholds move the ranking? Spearman per role, top-10 overlap."""
  from fat import sensitivity  # pylint: disable=import-outside-toplevel
  corr, overlap = {}, {}
  for role in ("weight", "act"):
    a = [r for r in ptq_rows if r["role"] == role]
    b = [r for r in fat_rows if r["role"] == role]
    if len(a) >= 2:
      corr[role] = sensitivity.rank_correlation(a, b)
      top = lambda rows: {r["path"] for r in sensitivity.ranked(rows)[:10]}
      overlap[role] = len(top(a) & top(b))
  summary = (f"FAT thresholds ({meta['setting']}) against min/max: Spearman "
             + ", ".join(f"{k} {v:.3f}" for k, v in corr.items()) + "; shared top-10: "
             + ", ".join(f"{k} {v}/10" for k, v in overlap.items()))
  text = (f"## With FAT's trained thresholds ({meta['setting']})\n\n{summary}\n\n"
          "FAT:\n\n" + sensitivity.ranked_markdown(fat_rows, top=15)
          + "\nmin/max, same widths:\n\n" + sensitivity.ranked_markdown(ptq_rows, top=15))
  return {"setting": meta["setting"], "spearman": corr, "top10_overlap": overlap,
          "rows": fat_rows, "minmax_rows": ptq_rows, "summary": summary, "text": text}


def _reference(model, config, widths, minmax, m) -> dict:
  """The first --reference quantizers (weights and activations alternately) at the
  lowest width as exact-path rule sets: seconds per rule set (compile and run) and the
  largest logit difference from the probe."""
  from fat import sensitivity  # pylint: disable=import-outside-toplevel
  qmodel = _width_model(model, config, min(widths))
  probe = sensitivity.Probe(qmodel, minmax(qmodel, m["params"]), m["sample"])
  weights = [q for q in probe.quantizers if q.role == "weight"]
  acts = [q for q in probe.quantizers if q.role == "act"]
  chosen = [q for pair in zip(weights, acts) for q in pair][:FLAGS.reference]
  diff, seconds = 0.0, 0.0
  for q in chosen:
    t = time.time()
    ref = sensitivity.reference_logits(model, m["params"], probe.qvars, q, m["images"],
                                       FLAGS.batch_size)
    seconds += time.time() - t
    mine = probe.logits(m["images"], FLAGS.batch_size, probe.only(q.path, q.role))
    diff = max(diff, float(np.abs(ref - mine).max()))
  return {"reference_seconds_per_rule_set": round(seconds / len(chosen), 1),
          "reference_rule_sets": len(chosen), "reference_max_abs_logit_diff": diff}


if __name__ == "__main__":
  cli.run(main)
