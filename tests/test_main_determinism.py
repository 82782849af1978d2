"""The main job's determinism across processes and its NaN guards (apart from
tests/test_main_smoke.py, so that the two test processes share the long runs)."""

import json

import numpy as np
import pytest

from configs.fashion_mnist import mobilenet_v2_qat
from experiments.train import train_and_evaluate
from tests.test_main_smoke import run_main


def test_same_seed_same_report_across_processes(float_ckpt, tmp_path):
  """One config (FAT and the full-QAT baseline) run here and in a separate
  process, with another hash seed, gives the same report apart from timings."""
  config = mobilenet_v2_qat.get_config("smoke")
  config.model_checkpoint = float_ckpt
  config.methods = ("ptq_minmax", "fat", "qat")
  config.eval_examples = 100
  a = train_and_evaluate(config, str(tmp_path / "a"))
  r = run_main("--config=configs/fashion_mnist/mobilenet_v2_qat.py:smoke",
               f"--config.model_checkpoint={float_ckpt}", "--config.methods=('ptq_minmax','fat','qat')",
               "--config.eval_examples=100", f"--workdir={tmp_path / 'b'}",
               env={"PYTHONHASHSEED": "12345"}, timeout=900)  # a whole job with QAT
  assert r.returncode == 0, r.stderr[-3000:]
  b = json.load(open(tmp_path / "b" / "report.json"))
  qat = a["settings"][0]["methods"]["qat"]
  assert qat["train_images"] == 240 and qat["epochs"] == 1 and qat["steps"] == 7
  assert 0.0 <= qat["top1_pct"] <= 100.0 and 0.0 <= qat["agreement_pct"] <= 100.0
  # Through JSON, as report.json holds it; train_seconds is a timing.
  strip = lambda rep: [{k: {kk: vv for kk, vv in m.items() if kk != "train_seconds"}
                        for k, m in s["methods"].items()}
                       for s in json.loads(json.dumps(rep))["settings"]]
  assert set(strip(a)[0]) == {"ptq_minmax", "fat", "qat"}
  assert strip(a) == strip(b)
  assert a["fp32"] == b["fp32"]
