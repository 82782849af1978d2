"""The benchmarks' one timing rule: compile and warm up, then the median of timed calls."""

from __future__ import annotations

import time

import jax
import numpy as np


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
  """``(first-call seconds, median seconds)``: the first call of ``fn`` (compile
  included), ``warmup`` untimed calls, then the median of ``repeats`` calls,
  each waited for with ``jax.block_until_ready``."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return first, float(np.median(times))


def random_stats(variables, key):
  """``variables`` with random BN statistics in [0.5, 1.5], which make folding non-trivial."""
  leaves, tree = jax.tree.flatten(variables["batch_stats"])
  keys = jax.random.split(key, len(leaves))
  leaves = [jax.random.uniform(k, l.shape, minval=0.5, maxval=1.5) for k, l in zip(keys, leaves)]
  return {**variables, "batch_stats": jax.tree.unflatten(tree, leaves)}
