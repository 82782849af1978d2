"""The bit-width ladder: its rungs as main-job settings (configs/fashion_mnist/ladder.py),
finished settings filed and reused (benchmarks/bits.py), the tables and plots
(benchmarks/bit_plots.py), and a killed sweep resuming at its first unfinished rung
(tiny_net, slow)."""

import json
import os
import sys
import types

import pytest

from benchmarks import bit_plots, bits
from configs.fashion_mnist import ladder


def test_rungs_become_named_settings():
  assert ladder.parse_rung("W4a8") == (4, 8) and ladder.parse_rung(" w16a2 ") == (16, 2)
  for bad in ("w4", "4a8", "wxa8", "w4a"):
    with pytest.raises(ValueError, match="w<weight bits>a<activation bits>"):
      ladder.parse_rung(bad)
  s = ladder.rung_settings(((8, 8), (4, 8)), ("per_tensor", "per_channel"), first_last_bits=8)
  assert [x.name for x in s] == ["w8a8_pc_fl8", "w4a8_pc_fl8", "w8a8_pt_fl8", "w4a8_pt_fl8"]
  assert [(x.weight_bits, x.act_bits, x.per_channel, x.first_last_bits) for x in s][1] == (
      4, 8, True, 8)
  assert len(ladder.get_config().settings) == 16 and len(ladder.QUICK) == 4
  with pytest.raises(ValueError, match="granularity must be among"):
    ladder.rung_settings(granularities=("per_row",))
  with pytest.raises(ValueError, match="first_last_bits must be 8 .* or 0"):
    ladder.rung_settings(first_last_bits=4)


def _config(ckpt="ckpt", rungs=((8, 8), (4, 8), (3, 8))):
  """A tiny ladder: 100 eval images, 32 calibration images, 3 FAT steps."""
  c = ladder.get_config("smoke")
  c.model_checkpoint = str(ckpt)
  c.methods = ("ptq_minmax", "fat")
  c.settings = ladder.rung_settings(rungs, ("per_channel",))
  c.eval_examples, c.eval_batch_size = 100, 100
  c.calibration_images, c.calibration_batch_size = 32, 32
  c.fat.train_fraction, c.fat.batch_size, c.fat.epochs = 0.0016, 32, 1
  return c


def _entry(name, w, a, top1):
  return {"name": name, "weight_bits": w, "act_bits": a, "per_channel": True,
          "weight_kind": "symmetric", "act_kind": "symmetric", "best_ptq": "ptq_minmax",
          "methods": {"ptq_minmax": {"top1_pct": top1 - 1, "agreement_pct": 90.0},
                      "fat": {"top1_pct": top1, "agreement_pct": 95.0}}}


def test_filed_rungs_are_reused_not_run(tmp_path, monkeypatch):
  """A rung filed for the same config (settings aside) is read back, also by a
  command with other rungs; one filed for another config is not."""
  config = _config()
  base = bits.base_key(config)
  for i, s in enumerate(config.settings):
    rec = {"base": base if i < 2 else {**base, "seed": 7}, "setting": bits._json(s),
           "entry": _entry(s.name, s.weight_bits, s.act_bits, 90.0 - i), "fp32": {"top1_pct": 92.0}}
    (tmp_path / "settings").mkdir(exist_ok=True)
    (tmp_path / "settings" / f"{s.name}.json").write_text(json.dumps(rec))
  fp32, entries = bits.finished(str(tmp_path), config)
  assert sorted(entries) == ["w4a8_pc", "w8a8_pc"] and fp32 == {"top1_pct": 92.0}
  job = types.ModuleType("experiments.train")  # the real one imports TensorFlow: seconds
  job.train_and_evaluate = lambda *a, **k: pytest.fail("ran a job")
  monkeypatch.setitem(sys.modules, "experiments.train", job)
  subset = _config(rungs=((4, 8),))
  assert list(bits.run(subset, str(tmp_path))[1]) == ["w4a8_pc"]
  table = bits.ladder_table(config, fp32, entries)
  assert [r["label"] for r in table["rungs"]] == ["W8A8", "W4A8"]
  assert table["missing"] == ["w3a8_pc"] and "at the rung's width" in table["first_last"]
  text = bits.ladder_markdown(table)
  assert "| W4A8 | per-channel | 88.00 / 90.00 | 89.00 / 95.00 |" in text
  assert "not finished: w3a8_pc" in text


def test_plots_are_written(tmp_path):
  table = {"model": "m", "first_last": "x", "fp32": {"top1_pct": 92.0},
           "rungs": [{**_entry("a", 8, 8, 92.0), "label": "W8A8"},
                     {**_entry("b", 4, 8, 90.0), "label": "W4A8", "per_channel": False}]}
  bit_plots.plot_ladder(str(tmp_path / "ladder.png"), table)
  rows = [{"path": p, "role": r, "bits": b, "rmse": v, "size": 1}
          for p, r, b, v in (("a", "weight", 4, 0.1), ("a", "weight", 2, 1.0),
                             ("b", "act", 4, 0.0))]
  bit_plots.plot_sensitivity(str(tmp_path / "s.png"), rows, "title")
  points = [{"kind": k, "size_mbit": s, "label": k, "methods": {"fat": {"top1_pct": t}}}
            for k, s, t in (("uniform", 8.0, 92.0), ("uniform", 4.0, 90.0), ("mixed", 4.0, 91.0),
                            ("mixed", 3.0, 91.5), ("mixed", 5.0, 91.2))]
  front = bit_plots.pareto([{**p, "t": p["methods"]["fat"]["top1_pct"]} for p in points[2:]],
                           "t")
  assert [p["size_mbit"] for p in front] == [3.0]
  bit_plots.plot_size_accuracy(str(tmp_path / "m.png"), {
      "model": "m", "act_bits": 8, "fp32": {"top1_pct": 92.0}, "points": points}, ["fat"])
  for name in ("ladder.png", "s.png", "m.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="no finished rung"):
    bit_plots.plot_ladder(str(tmp_path / "x.png"), {**table, "rungs": []})


@pytest.mark.slow
def test_a_killed_ladder_restarts_at_its_first_unfinished_rung(tmp_path, tiny_ckpt,
                                                               monkeypatch):
  """Interrupted (Ctrl-C) as its second rung starts, the ladder run again with the
  same command runs only that rung; a later command with a subset runs nothing."""
  from experiments import train
  calls, kill = [], {"at": "w4a8_pc"}
  rungs = ((8, 8), (4, 8))
  real = train.run_setting

  def spy(s, *args, **kwargs):
    calls.append(s.name)
    if s.name == kill["at"]:
      raise KeyboardInterrupt
    return real(s, *args, **kwargs)

  monkeypatch.setattr(train, "run_setting", spy)
  work = str(tmp_path / "ladder")
  with pytest.raises(KeyboardInterrupt):
    bits.run(_config(tiny_ckpt, rungs), work)
  assert calls == ["w8a8_pc", "w4a8_pc"]
  assert bits.finished(work, _config(tiny_ckpt, rungs))[1] == {}
  partial = bits.finished(work, _config(tiny_ckpt, rungs), include_partial=True)[1]
  assert list(partial) == ["w8a8_pc"]                         # what --reuse draws
  kill["at"], calls[:] = None, []
  fp32, entries = bits.run(_config(tiny_ckpt, rungs), work)
  assert calls == ["w4a8_pc"] and list(entries) == ["w8a8_pc", "w4a8_pc"]
  assert entries["w8a8_pc"] == partial["w8a8_pc"] and 0 <= fp32["top1_pct"] <= 100
  assert sorted(os.listdir(os.path.join(work, bits.CHECKPOINTS))) == ["w4a8_pc", "w8a8_pc"]
  assert bits.run(_config(tiny_ckpt, rungs=((8, 8),)), work)[1] == {
      "w8a8_pc": entries["w8a8_pc"]} and calls == ["w4a8_pc"]
