"""Every entry point answers --help, the seed-spread and lr-sweep scripts reject bad flags and
their tables (benchmarks/tables.py) hold what the reports say, and the shared timing helper
times what it is given."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import tables, timing

from conftest import REPO, run_parallel


def entry_points():
  """{module: first line of its docstring} for every module of experiments/ and
  benchmarks/ with a ``__main__`` block."""
  found = {}
  for package in ("experiments", "benchmarks"):
    for path in sorted(glob.glob(os.path.join(REPO, package, "*.py"))):
      with open(path) as f:
        text = f.read()
      if 'if __name__ == "__main__":' in text:
        found[f"{package}.{os.path.basename(path)[:-3]}"] = text.split('"""')[1].splitlines()[0]
  return found


@pytest.mark.slow
def test_every_entry_point_answers_help():
  """--help (and, for one, --helpfull) prints the module's docstring and its flags and
  exits 0 without running anything (which also proves each module imports)."""
  modules = entry_points()
  assert len(modules) >= 14 and "benchmarks.depthwise_speed" in modules
  runs = [(m, "--help") for m in modules] + [("experiments.main", "--helpfull")]
  for (module, flag), r in zip(runs, run_parallel(runs)):
    assert r.returncode == 0 and modules[module] in r.stdout, (module, flag, r.stderr[-2000:])
    assert "backend:" not in r.stdout, (module, r.stdout[-2000:])  # the benchmark did not run
  assert "--verbosity" in r.stdout  # --helpfull: absl's own flags too


# (script, flag, message): each refused with exit 2 before anything runs.
BAD_FLAGS = [
    ("seed_spread", "--only=w8a8_per_channel,w2", "error: --only: unknown settings ['w2']"),
    ("seed_spread", "--seeds=0,x", "error: --seeds must be comma-separated integers"),
    ("lr_sweep", "--only=w8a8_per_channel,w2", "--only: unknown settings ['w2']"),
    ("lr_sweep", "--learning_rates=1e-3,x", "--learning_rates must be comma-separated numbers"),
    ("lr_sweep", "--learning_rates=0", "--learning_rates must be positive"),
    ("lr_sweep", "--seeds=0,x", "--seeds comma-separated integers"),
    ("lr_sweep", "--config.fat.keep_best=False", "set config.fat.keep_best=True"),
    ("fat_vs_qat", "--checkpoint=/nonexistent/ckpt", "error: no checkpoint at '/nonexistent/ckpt'"),
    ("fat_vs_qat", "--max_seconds=0", "error: --max_seconds must be positive"),
    ("host_memory", "--setting=w9", "error: --setting='w9' is not a setting of configs/default.py"),
    ("host_memory", "--calls=0", "error: --repeats and --calls must be >= 1"),
]
NO_WORKDIR = ("fat_vs_qat", "host_memory")


@pytest.mark.slow
def test_benchmarks_reject_bad_flags(tmp_path):
  """Each case of ``BAD_FLAGS`` exits 2 with its message and writes nothing (run in parallel)."""
  runs = [(f"benchmarks.{script}", flag) + ((f"--workdir={tmp_path / str(i)}",)
                                            if script not in NO_WORKDIR else ())
          for i, (script, flag, _) in enumerate(BAD_FLAGS)]
  for i, ((script, flag, message), r) in enumerate(zip(BAD_FLAGS, run_parallel(runs))):
    assert r.returncode == 2 and message in r.stderr, (script, flag, r.stderr[-2000:])
    assert not (tmp_path / str(i)).exists() or not os.listdir(tmp_path / str(i)), (script, flag)


@pytest.mark.slow
def test_onnx_latency_names_a_missing_or_unreadable_export(tmp_path):
  cmd = [sys.executable, "-m", "benchmarks.onnx_latency", f"--workdir={tmp_path}",
         "--setting=w8"]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "error: no " in r.stderr and "experiments.export" in r.stderr, \
      r.stderr[-2000:]
  folder = tmp_path / "export" / "w8"
  folder.mkdir(parents=True)
  for name in ("model_int8.onnx", "model_fp32.onnx"):
    (folder / name).write_bytes(b"not an onnx file")
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "error: cannot load" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_seed_spread_reuse_reads_finished_runs(tmp_path):
  """With --reuse a seed whose folder holds a finished run of the same config is read,
  not run (a run would fail here: the config names no float checkpoint)."""

  from configs import default
  from fat import atomic
  config = default.get_config("smoke")
  config.model_checkpoint = "/nonexistent/ckpt"
  ptq = {"top1_pct": 90.0, "agreement_pct": 95.0,
         "vs_fat": {"fat_only_correct": 3, "method_only_correct": 1, "p_value": 0.62}}
  for k in (0, 1):
    config.seed = k
    folder = tmp_path / f"seed_{k}"
    folder.mkdir()
    atomic.write_json(str(folder / "config.json"), json.loads(config.to_json_best_effort()))
    atomic.write_json(str(folder / "report.json"), {
        "model": "mobilenet_v2", "dataset": "fashion_mnist", "seed": k,
        "fp32": {"top1_pct": 91.0},
        "settings": [{"name": "w8", "methods": {
            "ptq_minmax": ptq, "fat": {"top1_pct": 90.5 + k / 10, "agreement_pct": 96.0,
                                       "init": "ptq_minmax"}}}]})
  cmd = [sys.executable, "-m", "benchmarks.seed_spread", "--config=configs/default.py:smoke",
         "--config.model_checkpoint=/nonexistent/ckpt", f"--workdir={tmp_path}", "--seeds=0,1"]
  r = subprocess.run(cmd + ["--reuse"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"seed 1: the finished run in {tmp_path / 'seed_1'}" in r.stdout
  assert "| w8 | fat | 90.55 | 0.07 | 90.50 | 90.60 | 96.00 |" in r.stdout
  assert "| w8 | +0.55 (+0.50, +0.60) | 2/2 seeds | 0/2 seeds | +0.55 (+0.50, +0.60); 2/2 seeds |" \
      in r.stdout
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "no checkpoint at '/nonexistent/ckpt'" in r.stderr  # it ran


def test_fat_convergence_tables_from_finished_runs(tmp_path):
  """--plot_only gathers every <workdir>/<label>/report.json into the per-setting table,
  the label-by-setting table (an ablation's), convergence.json and the plot."""

  from fat import atomic

  def fat(top1, kept, steps, scores, recipe="ours", scored_on="held-out (5 images)"):
    return {"top1_pct": top1, "agreement_pct": 95.0, "init": "ptq_mse", "recipe": recipe,
            "train_seconds": 12.0, "steps": steps, "kept_step": kept, "scored_on": scored_on,
            "loss_by_step": [[1, 1.0], [2, 0.9]], "calibration_loss_by_step": scores}
  runs = {"exact": {"w4a4": fat(80.0, None, 4, [], "paper", None)},
          "ours": {"w4a4": fat(85.5, 2, 4, [[0, 1.5], [2, 1.25], [4, 1.3]]),
                   "w8a8": fat(92.0, 0, 4, [[0, 0.1], [2, 0.2]])}}
  for label, settings in runs.items():
    (tmp_path / label).mkdir()
    atomic.write_json(str(tmp_path / label / "report.json"), {
        "fp32": {"top1_pct": 92.5}, "settings": [
            {"name": n, "best_ptq": "ptq_mse", "methods": {"fat": f, "ptq_mse": {"top1_pct": 70.0}}}
            for n, f in settings.items()]})
  r = subprocess.run([sys.executable, "-m", "benchmarks.fat_convergence", "--plot_only",
                      f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert ("| w4a4 | ours | ours | held-out (5 images) | 1.5000 | 1.2500 | 2 / 4 | 85.50 | -7.00 "
          "| 70.00 (ptq_mse) | 12 |") in r.stdout
  assert "| w4a4 | exact | paper | — |  |  | last / 4 | 80.00 | -12.50 |" in r.stdout
  assert "| exact | paper | 80.00 (-12.50), kept last / 4 | – |" in r.stdout
  assert "| ours | ours | 85.50 (-7.00), kept 2 / 4 | 92.00 (-0.50), kept 0 / 4 |" in r.stdout
  assert (tmp_path / "convergence.md").read_text() in r.stdout
  assert json.loads((tmp_path / "convergence.json").read_text())["ours"]["w8a8"]["kept_step"] == 0
  assert (tmp_path / "convergence.png").stat().st_size > 0


def test_timed_counts_calls_and_returns_median(monkeypatch):
  """On a fake clock each call takes the next of ``durations``: the first call, two
  warm-up calls (not timed), then three timed calls whose median is returned."""
  durations = [5.0, 9.0, 9.0, 3.0, 1.0, 2.0]
  now, calls = [0.0], []

  def call():
    now[0] += durations[len(calls)]
    calls.append(1)
  monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
  first, median = timing.timed(call, repeats=3, warmup=2)
  assert len(calls) == 1 + 2 + 3
  assert (first, median) == (5.0, 2.0)


def test_threshold_stats_counts_alphas_by_role_and_place():
  from benchmarks.threshold_stats import alpha_counts
  scalar = lambda v: {"alpha": np.array(v, np.float32), "beta": np.array(0.0, np.float32)}
  t = {"block_0": {"dw": {"conv": {"alpha": np.array([0.5, 0.7, 1.0, 1.2], np.float32),
                                   "beta": np.zeros(4, np.float32)},
                          "act_q": scalar(0.4)},
                   "add_q": scalar(1.0)},
       "classifier": scalar(0.9), "logits_q": scalar(0.8)}
  params = {"block_0": {"dw": {"conv": {"kernel": np.zeros((3, 3, 1, 4)), "bias": 0}}},
            "classifier": {"kernel": np.zeros((4, 2)), "bias": 0}}
  c = alpha_counts(t, params, (0.5, 1.0))
  # The conv's and the classifier's alphas are weights': their modules hold kernels.
  assert c["weight"] == {"n": 5, "below": 0, "at_lo": 1, "inside": 2, "at_hi": 1, "above": 1}
  assert c["activation"] == {"n": 3, "below": 1, "at_lo": 0, "inside": 1, "at_hi": 1,
                             "above": 0}


PTQ_METHODS = ("ptq_minmax", "ptq_percentile", "ptq_mse")


def seed_report(seed, top1, vs_best, fat_agreement=99.0, init=None):
  """A one-setting report; ``top1`` per method, ``vs_best`` the (FAT-only,
  method-only, p) of the method with the highest PTQ top-1, ``init`` FAT's start."""
  best = max((m for m in top1 if m in PTQ_METHODS), key=top1.get)
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
  lines = tables.seed_spread_markdown(reports).splitlines()
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
  # AdaRound is a trained peer, not a PTQ start: above FAT, it is not the best PTQ.
  with_peer = [seed_report(0, {"ptq_minmax": 92.0, "ptq_adaround": 92.6, "fat": 92.4},
                           (20, 10, 0.1), init="ptq_minmax")]
  assert tables.seed_spread_markdown(with_peer).splitlines()[-1] == (
      "| w8 | +0.40 (+0.40, +0.40) | 1/1 seeds | 0/1 seeds | +0.40 (+0.40, +0.40); 1/1 seeds |")
  no_init = [seed_report(0, {"ptq_minmax": 92.6, "fat": 92.7}, (1, 1, 1.0))]
  assert tables.seed_spread_markdown(no_init).splitlines()[-1].endswith("| – |")
  with pytest.raises(ValueError, match="different settings"):
    tables.seed_spread_markdown([reports[0], {**reports[1], "settings": [{"name": "w4"}]}])
  with pytest.raises(ValueError, match="no reports"):
    tables.seed_spread_markdown([])


def _sweep_report(kept_losses, top1):
  """A report with one setting per (calibration scores, top-1) pair."""
  return {"settings": [
      {"name": f"s{i}", "methods": {"fat": {
          "calibration_loss_by_step": [(0, 1.0), (20, loss), (40, 1.0)],
          "top1_pct": t, "agreement_pct": 99.0}}}
      for i, (loss, t) in enumerate(zip(kept_losses, top1))]}


def test_lr_sweep_chooses_the_lowest_calibration_loss_not_top1():
  # s0: lr 1e-3 has the lower mean kept loss but the lower top-1; s1: 1e-4 wins.
  table = tables.lr_sweep_markdown({1e-4: [_sweep_report([0.5, 0.2], [93.0, 90.0]),
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
    tables.lr_sweep_markdown({1e-3: [r]})


def _peer_setting(name, wbits, abits, correct, walls):
  """A report entry and its predictions: ``correct[m]`` of 100 images right."""
  labels = np.zeros(100, np.int16)
  preds = {"labels": labels, "fp32": labels.copy()}
  methods = {}
  for m, k in correct.items():
    preds[m] = np.where(np.arange(100) < k, 0, 1).astype(np.int16)
    methods[m] = {"top1_pct": float(k), "agreement_pct": float(k),
                  "wall_seconds": walls.get(m, 1.0), "images": 64}
  return {"name": name, "weight_bits": wbits, "act_bits": abits, "per_channel": True,
          "methods": methods}, preds


def _write_peers_run(root, settings, **harness):
  rep = {"model": "m", "width": 1.0, "dataset": "d", "eval_examples": 100,
         "calibration_images": 64, "seed": 0, "fp32": {"top1_pct": 100.0},
         "settings": [s for s, _ in settings], **harness}
  (root / "predictions").mkdir(parents=True, exist_ok=True)
  (root / "report.json").write_text(json.dumps(rep))
  for s, p in settings:
    np.savez(root / "predictions" / f"{s['name']}.npz",
             **{(k if k in ("labels", "fp32") else f"method/{k}"): v for k, v in p.items()})
  return str(root)


def test_peers_joins_the_methods_of_another_run_of_the_same_harness(tmp_path):
  """--join: a method from another run is tested against this run's, image by
  image; this run's own entries win; another harness is refused."""
  from benchmarks import peers
  mine = _write_peers_run(tmp_path / "a", [_peer_setting(
      "w4a4_per_channel", 4, 4, {"ptq_minmax": 50, "fat": 90, "fat_qdrop": 99},
      {"fat": 100.0, "fat_qdrop": 150.0})])
  theirs = _write_peers_run(tmp_path / "b", [
      _peer_setting("w4a4_per_channel", 4, 4,
                    {"fat": 10, "ptq_adaround": 70, "fat_adaround": 70},
                    {"fat": 10.0, "ptq_adaround": 20.0, "fat_adaround": 5.0}),
      _peer_setting("w8a8_per_channel", 8, 8, {"fat": 100}, {})])
  rep, preds = peers.read(mine)
  peers.join(rep, preds, *peers.read(theirs), theirs)
  (s,) = rep["settings"]
  assert set(s["methods"]) == {"ptq_minmax", "fat", "fat_qdrop", "ptq_adaround", "fat_adaround"}
  assert s["methods"]["fat"]["top1_pct"] == 90.0  # this run's own FAT
  got = {(n, t): (v, ok) for n, t, v, ok in peers.targets(rep, preds)}
  above = got[("w4a4_per_channel", "fat_qdrop above ptq_adaround, p < 0.05")]
  assert above[0].startswith("+29.00 pt; 29 / 0, p = ") and above[1]
  # Each cost against the FAT of its own run: 150 / 100 here, (20 + 5) / 10 there.
  cost = lambda m: got[("w4a4_per_channel", f"{m} wall ≤ 3× fat's")][0]
  assert cost("fat_qdrop").startswith("1.50× (150 s against 100 s;")
  assert cost("ptq_adaround + fat_adaround").startswith(
      f"2.50× (25 s against 10 s, both in {theirs};")
  row = f"| w4a4_per_channel | ptq_adaround ({theirs}) | 70.00 |"
  assert row in peers.methods_markdown(rep, preds)
  other = _write_peers_run(tmp_path / "c", [_peer_setting("w4a4_per_channel", 4, 4, {}, {})],
                           seed=1)
  with pytest.raises(ValueError, match="ran another harness or float model"):
    peers.join(rep, preds, *peers.read(other), other)
  labels = tmp_path / "d"
  setting, p = _peer_setting("w4a4_per_channel", 4, 4, {}, {})
  p["fp32"] = np.ones(100, np.int16)
  with pytest.raises(ValueError, match="other test labels or float predictions"):
    peers.join(rep, preds, *peers.read(_write_peers_run(labels, [(setting, p)])), "d")


def test_compare_runs_tests_each_method_of_both_runs(tmp_path):
  """benchmarks.compare_runs: one row per setting and method both runs have,
  with McNemar on the images one of them gets right; another harness, other
  labels or nothing in common are refused."""
  from benchmarks import compare_runs, peers
  base = _write_peers_run(tmp_path / "a", [
      _peer_setting("w4a4_per_channel", 4, 4, {"ptq_minmax": 50, "fat": 90, "lsq": 80}, {}),
      _peer_setting("w8a8_per_channel", 8, 8, {"fat": 100}, {})])
  variant = _write_peers_run(tmp_path / "b", [
      _peer_setting("w4a4_per_channel", 4, 4, {"ptq_minmax": 70, "fat": 90, "qat": 1}, {})])
  rows = compare_runs.rows(peers.read(base), peers.read(variant), variant)
  assert rows[0][:5] == ["w4a4_per_channel", "ptq_minmax", "50.00", "70.00", "+20.00"]
  assert rows[0][5].startswith("0 / 20, p = 1.9e-06")
  assert rows[1] == ["w4a4_per_channel", "fat", "90.00", "90.00", "+0.00", "0 / 0, p = 1"]
  assert len(rows) == 2   # lsq and qat are in one run only, w8a8 in the baseline only
  assert tables.markdown(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
  other = _write_peers_run(tmp_path / "c", [_peer_setting("w4a4_per_channel", 4, 4, {}, {})],
                           seed=1)
  with pytest.raises(ValueError, match="ran another harness or float model"):
    compare_runs.rows(peers.read(base), peers.read(other), other)
  setting, p = _peer_setting("w4a4_per_channel", 4, 4, {"fat": 90}, {})
  p["labels"] = np.ones(100, np.int16)
  with pytest.raises(ValueError, match="other test labels or float predictions"):
    compare_runs.rows(peers.read(base), peers.read(_write_peers_run(tmp_path / "d", [
        (setting, p)])), "d")
  lone = _write_peers_run(tmp_path / "e", [_peer_setting("w3a8_per_channel", 3, 8,
                                                         {"fat": 9}, {})])
  with pytest.raises(ValueError, match="no setting and method in common"):
    compare_runs.rows(peers.read(base), peers.read(lone), lone)
  with pytest.raises(ValueError, match="no report.json in .*: give the workdir of a finished"):
    compare_runs.read(str(tmp_path / "missing"))


def test_peer_targets_from_a_finished_job(tmp_path):
  """benchmarks.peers reads report.json and predictions/<setting>.npz and checks each
  target on the numbers it was given: met, not met, and McNemar between any two methods."""
  from benchmarks import peers
  settings = [
      _peer_setting("w8a8_per_channel", 8, 8, {"ptq_minmax": 90, "fat": 100}, {}),
      _peer_setting("w4a8_per_channel", 4, 8,
                    {"ptq_minmax": 80, "ptq_adaround": 98, "fat": 99, "fat_adaround": 99},
                    {"ptq_adaround": 20.0, "fat_adaround": 10.0, "fat": 10.0}),
      _peer_setting("w4a4_per_channel", 4, 4,
                    {"ptq_minmax": 50, "ptq_adaround": 70, "fat": 90, "fat_adaround": 99},
                    {"ptq_adaround": 10.0, "fat_adaround": 10.0, "fat": 10.0})]
  _write_peers_run(tmp_path, settings)
  got = {(s, t): (v, ok) for s, t, v, ok in peers.targets(*peers.read(str(tmp_path)))}
  w8 = got[("w8a8_per_channel", "no method significantly below float (p < 0.05)")]
  assert w8[0].startswith("ptq_minmax (p = 0.002") and not w8[1]
  share = got[("w4a8_per_channel", "AdaRound closes ≥ 90% of the min/max-to-float gap")]
  assert share == ("90% (80.00 → 98.00, float 100.00)", True)
  assert got[("w4a8_per_channel", "fat_adaround ≥ float − 0.2 pt")] == ("-1.00 pt", False)
  assert got[("w4a4_per_channel", "fat_adaround ≥ float − 1 pt")] == ("-1.00 pt", True)
  above = got[("w4a4_per_channel", "fat_adaround above ptq_adaround, p < 0.05")]
  assert above[0].startswith("+29.00 pt; 29 / 0, p = ") and above[1]
  cost = got[("w4a8_per_channel", "ptq_adaround + fat_adaround wall ≤ 3× fat's")]
  assert cost == ("3.00× (30 s against 10 s; images 64 against 64)", True)
  text = peers.methods_markdown(*peers.read(str(tmp_path)))
  assert "| w4a4_per_channel | ptq_adaround | 70.00 | 70.00 | -30.00 | 10 | 64 | 20 / 0" in text
  os.remove(tmp_path / "predictions" / "w4a4_per_channel.npz")
  with pytest.raises(ValueError, match="kept no per-image predictions"):
    peers.read(str(tmp_path))


def test_peer_targets_follow_the_bits_not_the_name(tmp_path):
  """A per-channel setting with another name (W4A4 with 8-bit first and last layers)
  is checked against its width's targets under its own name; per tensor has none."""
  from benchmarks import peers
  fl8, fl8_preds = _peer_setting("w4a4_per_channel_fl8", 4, 4,
                                 {"ptq_adaround": 97, "fat": 90, "fat_qdrop": 99}, {})
  pt, pt_preds = _peer_setting("w4a4_per_tensor", 4, 4,
                               {"ptq_adaround": 97, "fat": 90, "fat_qdrop": 99}, {})
  pt["per_channel"] = False
  _write_peers_run(tmp_path, [(fl8, fl8_preds), (pt, pt_preds)])
  got = {(s, t): (v, ok) for s, t, v, ok in peers.targets(*peers.read(str(tmp_path)))}
  assert got[("w4a4_per_channel_fl8", "fat_qdrop ≥ float − 1 pt")] == ("-1.00 pt", True)
  above = got[("w4a4_per_channel_fl8", "fat_qdrop above ptq_adaround, p < 0.05")]
  assert above[0].startswith("+2.00 pt; 2 / 0, p = ") and not above[1]
  assert not [t for s, t in got if s == "w4a4_per_tensor" and "float −" in t]
