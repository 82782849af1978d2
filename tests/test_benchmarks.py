"""The benchmark scripts import, and their shared timing helper times what it is given."""

import os
import subprocess
import sys

from benchmarks import timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each defines absl flags at import, some with the same names: one process each.
SCRIPTS = ("depthwise_speed", "fat_step_profile", "fat_vs_qat", "float_step_speed",
           "onnx_latency", "seed_spread", "step_speed")


def test_benchmarks_import():
  procs = [subprocess.run([sys.executable, "-c", f"import benchmarks.{name}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300) for name in SCRIPTS]
  for name, r in zip(SCRIPTS, procs):
    assert r.returncode == 0, (name, r.stderr[-2000:])


def test_timed_counts_calls_and_returns_median():
  calls = []
  first, median = timing.timed(lambda: calls.append(1), repeats=3, warmup=2)
  assert len(calls) == 1 + 2 + 3
  assert first >= 0.0 and median >= 0.0
