"""Tests of the experiment report writer, the seed-spread and lr-sweep tables, and the
diagnostic plots."""

import copy
import json
import os

import numpy as np
import pytest

from fat import report as rp

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_report():
  ptq = lambda top1, agree: {"top1_pct": top1, "agreement_pct": agree}
  trained = lambda top1, agree, secs: {"top1_pct": top1, "agreement_pct": agree,
                                       "train_seconds": secs, "train_images": 12800, "epochs": 2,
                                       "steps": 250}
  return {
      "model": "mobilenet_v2", "width": 1.0, "dataset": "fashion_mnist", "eval_examples": 10000,
      "fp32": {"top1_pct": 93.5},
      "settings": [
          {"name": "w8a8_pc", "weight_bits": 8, "act_bits": 8, "per_channel": True,
           "weight_kind": "symmetric", "act_kind": "asymmetric", "best_ptq": "ptq_mse",
           "methods": {"ptq_minmax": {**ptq(92.35, 97.126), "vs_fat": {
                           "fat_only_correct": 12, "method_only_correct": 23,
                           "p_value": 0.0895}},
                       "ptq_percentile": ptq(92.9, 98.0),
                       "ptq_mse": ptq(93.01, 98.5), "fat": trained(93.27, 99.0, 41.5)}},
          {"name": "w4a8_pt", "weight_bits": 4, "act_bits": 8, "per_channel": False,
           "weight_kind": "symmetric", "act_kind": "asymmetric", "best_ptq": "ptq_minmax",
           "methods": {"ptq_minmax": ptq(10.0, 11.5), "fat": trained(88.4, 90.0, 120.25),
                       "qat": trained(89.123, 91.0, 300.0)}},
      ],
  }


def threshold_tree(c, seed):
  rng = np.random.default_rng(seed)
  return {
      "conv1": {"weight": {"alpha": rng.uniform(0.5, 1.5, c), "beta": rng.normal(size=c)},
                "act": {"alpha": np.float32(1.1), "beta": np.float32(0.0)}},
      "block_0": {"dw": {"weight": {"alpha": rng.uniform(0.5, 1.5, c), "beta": np.zeros(c)},
                         "act": {"alpha": np.float32(0.9), "beta": np.float32(0.1)}}},
  }


def params_tree():
  rng = np.random.default_rng(0)
  scale = np.logspace(-3, 1, 16)
  return {
      "conv1": {"kernel": rng.normal(size=(3, 3, 1, 16)) * scale, "bias": np.zeros(16)},
      "block_0": {"dw": {"kernel": rng.normal(size=(3, 3, 1, 16)), "bias": np.zeros(16)}},
      "head": {"kernel": np.zeros((16, 10)), "bias": np.zeros(10)},
  }


def test_report_json_round_trips(tmp_path):
  report = make_report()
  rp.write_report(str(tmp_path), report)
  with open(tmp_path / "report.json") as f:
    assert json.load(f) == report
  first = (tmp_path / "report.json").read_bytes()
  rp.write_report(str(tmp_path), copy.deepcopy(report))
  assert (tmp_path / "report.json").read_bytes() == first


def test_report_markdown_contents(tmp_path):
  report = make_report()
  rp.write_report(str(tmp_path), report)
  md = (tmp_path / "report.md").read_text()
  for setting in report["settings"]:
    assert setting["name"] in md
    for method in setting["methods"]:
      assert method in md
  for text in ("mobilenet_v2", "fashion_mnist", "10000", "93.50", "92.35", "97.13", "-1.15",
               "89.12", "41.50", "12800", "| 2 | 250 |", "**ptq_mse** (best other PTQ)",
               "**ptq_minmax** (best other PTQ)"):
    assert text in md, text
  rows = [l for l in md.splitlines() if l.startswith("| w")]
  assert len(rows) == 7
  umask = os.umask(0)
  os.umask(umask)
  for name in ("report.json", "report.md"):  # a normal file mode, not mkstemp's 0600
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
  # PTQ rows leave training columns blank; the last cell compares with FAT.
  assert rows[0].split(" | ")[-5:] == ["", "", "", "", "12 / 23, p = 0.089 |"]
  assert rows[1].endswith("|  |")  # no comparison recorded for this method


def test_report_handles_missing_optional_fields(tmp_path):
  report = make_report()
  report["settings"][0]["methods"]["fat"] = {"top1_pct": 90, "agreement_pct": 95}
  report["extra"] = {"note": "kept"}
  rp.write_report(str(tmp_path), report)
  assert json.loads((tmp_path / "report.json").read_text())["extra"] == {"note": "kept"}
  assert "90.00" in (tmp_path / "report.md").read_text()


def test_atomic_write_leaves_no_temp_files(tmp_path):
  rp.write_report(str(tmp_path / "run"), make_report())
  rp.write_report(str(tmp_path / "run"), make_report())
  assert sorted(os.listdir(tmp_path / "run")) == ["report.json", "report.md"]


def test_invalid_report_is_not_written(tmp_path):
  bad = make_report()
  del bad["fp32"]
  with pytest.raises(ValueError):
    rp.write_report(str(tmp_path), bad)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.pop("fp32"), "fp32"),
    (lambda r: r["settings"][1]["methods"].pop("fat"), "settings[1].methods.fat"),
    (lambda r: r["settings"][0]["methods"]["ptq_mse"].update(top1_pct=150.0),
     "settings[0].methods.ptq_mse.top1_pct"),
    (lambda r: r["settings"][0].update(per_channel="yes"), "settings[0].per_channel"),
    (lambda r: r.update(eval_examples=True), "eval_examples"),
    (lambda r: r["settings"][0].update(best_ptq="ptq_nope"), "settings[0].best_ptq"),
    (lambda r: r["settings"][0]["methods"]["ptq_minmax"]["vs_fat"].pop("p_value"),
     "settings[0].methods.ptq_minmax.vs_fat.p_value"),
])
def test_validate_report_names_the_field(mutate, field):
  report = make_report()
  rp.validate_report(report)
  mutate(report)
  with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
    rp.validate_report(report)


def assert_png(path):
  data = path.read_bytes()
  assert len(data) > 1000 and data[:8] == PNG_SIGNATURE
  assert sorted(os.listdir(path.parent)) == [path.name]


def test_plot_thresholds(tmp_path):
  path = tmp_path / "plots" / "thresholds.png"
  rp.plot_thresholds(str(path), {"w8a8_pc": threshold_tree(16, 0),
                                 "w4a8_pc": threshold_tree(16, 1)})
  assert_png(path)


def test_plot_thresholds_many_layers(tmp_path):
  tree = {f"block_{i}": {"act": {"alpha": np.float32(1 + i / 150), "beta": np.float32(0)}}
          for i in range(150)}
  path = tmp_path / "many.png"
  rp.plot_thresholds(str(path), {"w8a8": tree})
  assert_png(path)


def test_plot_weight_ranges(tmp_path):
  path = tmp_path / "plots" / "ranges.png"
  rp.plot_weight_ranges(str(path), params_tree())
  assert_png(path)


def test_plot_losses(tmp_path):
  path = tmp_path / "plots" / "losses.png"
  rp.plot_losses(str(path), {"w8a8_pc": list(np.linspace(2.0, 0.3, 50)), "w4a8_pt": [2.5, 1.0]})
  assert_png(path)


@pytest.mark.parametrize("plot, empty", [
    (rp.plot_thresholds, {}), (rp.plot_thresholds, {"w8a8": {}}),
    (rp.plot_weight_ranges, {}), (rp.plot_weight_ranges, {"conv1": {"bias": np.zeros(3)}}),
    (rp.plot_losses, {}), (rp.plot_losses, {"w8a8": []}),
])
def test_plots_raise_on_empty_input(tmp_path, plot, empty):
  with pytest.raises(ValueError, match=plot.__name__):
    plot(str(tmp_path / "empty.png"), empty)
  assert os.listdir(tmp_path) == []


def seed_report(seed, top1, vs_best, fat_agreement=99.0, init=None):
  """A one-setting report; ``top1`` per method, ``vs_best`` the (FAT-only,
  method-only, p) of the method with the highest PTQ top-1, ``init`` FAT's start."""
  best = max((m for m in top1 if m.startswith("ptq_")), key=top1.get)
  methods = {}
  for name, t in top1.items():
    methods[name] = {"top1_pct": t, "agreement_pct": fat_agreement if name == "fat" else 99.0}
    if name == "fat" and init:
      methods[name]["init"] = init
    if name != "fat":
      f, m, p = vs_best if name == best else (1, 1, 1.0)
      methods[name]["vs_fat"] = {"fat_only_correct": f, "method_only_correct": m, "p_value": p}
  return {"model": "mobilenet_v2", "dataset": "fashion_mnist", "seed": seed,
          "fp32": {"top1_pct": 92.8}, "settings": [{"name": "w8", "methods": methods}]}


def test_seed_spread_table():
  reports = [
      seed_report(0, {"ptq_minmax": 92.89, "ptq_mse": 92.81, "fat": 92.78}, (24, 35, 0.19), 99.6,
                  init="ptq_mse"),
      seed_report(1, {"ptq_minmax": 92.70, "ptq_mse": 92.75, "fat": 92.80}, (30, 25, 0.59),
                  init="ptq_minmax"),
      seed_report(2, {"ptq_minmax": 92.60, "ptq_mse": 92.90, "fat": 92.50}, (10, 50, 1e-7),
                  init="ptq_minmax"),
  ]
  lines = rp.seed_spread_markdown(reports).splitlines()
  assert lines[0] == "mobilenet_v2 on fashion_mnist, 3 seeds (0, 1, 2), float top-1 92.80"
  rows = {tuple(c.strip() for c in l.strip("|").split("|")[:2]): l for l in lines if
          l.startswith("| w8 |")}
  fat = np.array([92.78, 92.80, 92.50])
  assert rows[("w8", "fat")] == (f"| w8 | fat | {fat.mean():.2f} | {np.std(fat, ddof=1):.2f} "
                                 "| 92.50 | 92.80 | 99.20 |")  # agreement: (99.6 + 2 * 99) / 3
  assert rows[("w8", "ptq_minmax")].endswith("| 92.60 | 92.89 | 99.00 |")
  # Gaps to each seed's best PTQ: 92.78-92.89, 92.80-92.75, 92.50-92.90.
  gap = [l for l in lines if l.startswith("| w8 | ") and "seeds" in l]
  # Gaps to FAT's start: 92.78-92.81, 92.80-92.70, 92.50-92.60.
  assert gap == ["| w8 | -0.15 (-0.40, +0.05) | 1/3 seeds | 1/3 seeds | "
                 "-0.01 (-0.10, +0.10); 1/3 seeds |"]
  no_init = [seed_report(0, {"ptq_minmax": 92.6, "fat": 92.7}, (1, 1, 1.0))]
  assert rp.seed_spread_markdown(no_init).splitlines()[-1].endswith("| – |")
  with pytest.raises(ValueError, match="different settings"):
    rp.seed_spread_markdown([reports[0], {**reports[1], "settings": [{"name": "w4"}]}])
  with pytest.raises(ValueError, match="no reports"):
    rp.seed_spread_markdown([])


def _sweep_report(kept_losses, top1):
  """A report with one setting per (calibration scores, top-1) pair."""
  return {"settings": [
      {"name": f"s{i}", "methods": {"fat": {
          "calibration_loss_by_step": [(0, 1.0), (20, loss), (40, 1.0)],
          "top1_pct": t, "agreement_pct": 99.0}}}
      for i, (loss, t) in enumerate(zip(kept_losses, top1))]}


def test_lr_sweep_chooses_the_lowest_calibration_loss_not_top1():
  # s0: lr 1e-3 has the lower mean kept loss but the lower top-1; s1: 1e-4 wins.
  table = rp.lr_sweep_markdown({1e-4: [_sweep_report([0.5, 0.2], [93.0, 90.0]),
                                       _sweep_report([0.5, 0.2], [93.0, 90.0])],
                                1e-3: [_sweep_report([0.3, 0.3], [91.0, 92.0]),
                                       _sweep_report([0.4, 0.3], [91.0, 92.0])]})
  rows = {tuple(c.strip() for c in line.split("|")[1:3]): line
          for line in table.splitlines()[2:]}
  assert rows[("s0", "0.001")].endswith("| chosen |")
  assert "| 0.3500 | 20, 20 | 91.00 |" in rows[("s0", "0.001")]
  assert not rows[("s0", "0.0001")].endswith("| chosen |")
  assert rows[("s1", "0.0001")].endswith("| chosen |")
  assert not rows[("s1", "0.001")].endswith("| chosen |")


def test_lr_sweep_needs_calibration_scores():
  r = _sweep_report([0.5], [90.0])
  del r["settings"][0]["methods"]["fat"]["calibration_loss_by_step"]
  with pytest.raises(ValueError, match="config.fat.keep_best = True"):
    rp.lr_sweep_markdown({1e-3: [r]})
