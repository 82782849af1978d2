"""An eval batch and a FAT step with glibc's huge-page tunable off and on, side by side.

  python -m benchmarks.host_memory [--setting=w4a4_per_channel --repeats=2]

Each measurement is a fresh process (the tunable is read at process start;
``experiments/huge_pages.py``) with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0``
or ``=1``, alternating, ``--repeats`` of each. A process builds the main job's
quantized model of ``--setting`` on the shipped MobileNet-v2 and the embedded
Fashion-MNIST (``configs/default.py``), then times ``--calls`` eval batches of
500 test images and ``--calls`` FAT steps of 100 unlabeled images, after one
call of each (compile). Per call it reports the wall milliseconds and the
page faults, user and system CPU milliseconds of the whole process; the
table gives the median over the processes of each kind and the ratio of the
two medians.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from absl import flags

from configs import default
from experiments import cli, huge_pages

flags.DEFINE_string("setting", "w4a4_per_channel", "A setting of configs/default.py.")
flags.DEFINE_integer("repeats", 2, "Processes per tunable value.")
flags.DEFINE_integer("calls", 8, "Timed calls of the eval batch and of the FAT step.")
flags.DEFINE_bool("child", False, "Measure in this process and print one JSON line "
                  "(what the parent starts).")
FLAGS = flags.FLAGS
ROWS = (("eval", "eval batch of 500"), ("step", "FAT step of 100"))


def _usage():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return np.array([time.perf_counter(), r.ru_minflt + r.ru_majflt, r.ru_utime, r.ru_stime])


def _per_call(fn, calls: int) -> dict:
  """Wall ms, page faults, user and system ms per call of ``fn``, after one untimed call."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn())
  start = _usage()
  for _ in range(calls):
    jax.block_until_ready(fn())
  wall, faults, user, system = (_usage() - start) / calls
  return {"wall_ms": 1e3 * wall, "faults": faults, "user_ms": 1e3 * user,
          "system_ms": 1e3 * system}


def measure(setting: str, calls: int) -> dict:
  """This process's eval-batch and FAT-step costs on ``setting`` of the main job."""
  # pylint: disable=import-outside-toplevel
  import optax
  from experiments import train
  from fat import evaluate, steps, variables
  config = default.get_config()
  inputs = train.load_inputs(config)
  shared = train.shared_float(config, inputs)
  ctx = train.setting_context(next(s for s in config.settings if s.name == setting), config,
                              shared, inputs.splits)
  predict = evaluate.make_predict(ctx.qmodel.apply)
  x_eval = next(inputs.splits["test"].batches(500))[0]
  tx = optax.adam(config.fat.learning_rate)
  step = steps.make_fat_step(ctx.qmodel, tx)
  part = variables.partition(ctx.variables)  # thresholds | the rest, as FAT trains them
  opt_state = tx.init(part.trainable)
  x_train = next(inputs.splits["unlabeled"].batches(100))[0]
  teacher = shared.teacher[:len(x_train)]
  return {"eval": _per_call(lambda: predict(ctx.variables, x_eval), calls),
          "step": _per_call(lambda: step(part.trainable, opt_state, part.frozen, x_train,
                                         teacher), calls)}


def main(argv):
  del argv
  if FLAGS.repeats < 1 or FLAGS.calls < 1:
    cli.fail("--repeats and --calls must be >= 1.")
  names = [s.name for s in default.get_config().settings]
  if FLAGS.setting not in names:
    cli.fail(f"--setting={FLAGS.setting!r} is not a setting of configs/default.py; one of "
             f"{names}.")
  if FLAGS.child:
    print(json.dumps(measure(FLAGS.setting, FLAGS.calls)))
    return
  if not huge_pages.supported():
    cli.fail("this system has no glibc >= 2.35 with transparent huge pages: nothing to compare.")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  runs = {0: [], 1: []}
  for _ in range(FLAGS.repeats):
    for value in runs:
      r = subprocess.run(
          [sys.executable, "-m", "benchmarks.host_memory", "--child",
           f"--setting={FLAGS.setting}", f"--calls={FLAGS.calls}"],
          env={**env, "GLIBC_TUNABLES": f"{huge_pages.TUNABLE}={value}"},
          capture_output=True, text=True, check=False)
      if r.returncode:
        sys.stderr.write(r.stderr[-3000:])
        sys.exit(r.returncode)
      runs[value].append(json.loads(r.stdout.strip().splitlines()[-1]))
  print(f"{FLAGS.setting}, median of {FLAGS.repeats} processes per value, "
        f"{FLAGS.calls} calls each\n")
  print("| call | hugetlb | wall ms | page faults | user ms | system ms |")
  print("|---|---|---|---|---|---|")
  for key, label in ROWS:
    med = {v: {m: float(np.median([r[key][m] for r in runs[v]])) for m in runs[v][0][key]}
           for v in runs}
    for v in runs:
      print(f"| {label} | {v} | {med[v]['wall_ms']:.0f} | {med[v]['faults']:.0f} | "
            f"{med[v]['user_ms']:.0f} | {med[v]['system_ms']:.0f} |")
    print(f"| {label} | 1 / 0 | {med[1]['wall_ms'] / med[0]['wall_ms']:.2f} | | "
          f"{med[1]['user_ms'] / med[0]['user_ms']:.2f} | "
          f"{med[1]['system_ms'] / med[0]['system_ms']:.2f} |")


if __name__ == "__main__":
  cli.run(main)
