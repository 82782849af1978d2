"""Tests of the experiment report writer (fat/report.py), the atomic file writer
(fat/atomic.py) and the diagnostic plots (fat/plots.py). The seed-spread and lr-sweep
tables are tested in test_benchmarks.py."""

import copy
import json
import os

import numpy as np
import pytest

from fat import atomic, plots
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


def test_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / "out.json"
  atomic.write_json(str(path), {"a": np.float32(0.5), "b": np.arange(3)})
  assert path.read_text() == '{\n  "a": 0.5,\n  "b": [\n    0,\n    1,\n    2\n  ]\n}\n'

  def fail(tmp):
    with open(tmp, "w") as f:
      f.write("half")
    raise OSError("disk full")
  with pytest.raises(OSError, match="disk full"):
    atomic.write_file(str(path), fail)
  with pytest.raises(TypeError, match="object is not JSON serializable"):
    atomic.write_json(str(path), {"a": object()})
  assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2]}
  assert os.listdir(tmp_path) == ["out.json"]


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
  plots.plot_thresholds(str(path), {"w8a8_pc": threshold_tree(16, 0),
                                 "w4a8_pc": threshold_tree(16, 1)})
  assert_png(path)


def test_plot_thresholds_many_layers(tmp_path):
  tree = {f"block_{i}": {"act": {"alpha": np.float32(1 + i / 150), "beta": np.float32(0)}}
          for i in range(150)}
  path = tmp_path / "many.png"
  plots.plot_thresholds(str(path), {"w8a8": tree})
  assert_png(path)


def test_plot_weight_ranges(tmp_path):
  path = tmp_path / "plots" / "ranges.png"
  plots.plot_weight_ranges(str(path), params_tree())
  assert_png(path)


def test_plot_losses(tmp_path):
  path = tmp_path / "plots" / "losses.png"
  plots.plot_losses(str(path), {"w8a8_pc": list(np.linspace(2.0, 0.3, 50)),
                                "w4a8_pt": [2.5, 1.0]})
  assert_png(path)


@pytest.mark.parametrize("plot, empty", [
    (plots.plot_thresholds, {}), (plots.plot_thresholds, {"w8a8": {}}),
    (plots.plot_weight_ranges, {}),
    (plots.plot_weight_ranges, {"conv1": {"bias": np.zeros(3)}}),
    (plots.plot_losses, {}), (plots.plot_losses, {"w8a8": []}),
])
def test_plots_raise_on_empty_input(tmp_path, plot, empty):
  with pytest.raises(ValueError, match=plot.__name__):
    plot(str(tmp_path / "empty.png"), empty)
  assert os.listdir(tmp_path) == []
