"""Top-1 accuracy and argmax agreement over a split, jitted once per shape."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fat import data


def make_predict(apply_fn: Callable) -> Callable:
  """A jitted ``(variables, x) -> argmax`` to reuse across calls of ``predict``."""
  return jax.jit(lambda v, x: jnp.argmax(apply_fn(v, x), axis=-1))


def predict(fn: Callable, variables, split, batch_size: int, *,
            desc: str = "eval", progress: bool = True) -> np.ndarray:
  """Argmax predictions of ``fn`` (from ``make_predict``) over ``split`` (a
  ``fat.data.Split`` or ``fat.imagenet.StreamSplit``).

  The last partial batch is padded to ``batch_size`` so that one compiled
  function serves the whole split.
  """
  preds = []
  total = data.num_batches(len(split), batch_size)
  for x, _ in tqdm(split.batches(batch_size), total=total, desc=desc,
                   disable=not progress, leave=False):
    n = len(x)
    if n < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    preds.append(np.asarray(fn(variables, x))[:n])
  return np.concatenate(preds)


def top1_pct(preds: np.ndarray, labels: np.ndarray) -> float:
  return float(100.0 * np.mean(preds == labels))


def agreement_pct(preds: np.ndarray, reference: np.ndarray) -> float:
  """Share of examples whose argmax equals the reference (float) argmax."""
  return float(100.0 * np.mean(preds == reference))


def mcnemar(preds_a: np.ndarray, preds_b: np.ndarray,
            labels: np.ndarray) -> tuple[int, int, float]:
  """Exact McNemar test of two classifiers scored on the same examples.

  Counts the examples only ``a`` gets right and those only ``b`` gets right;
  under the null hypothesis of equal accuracy each of these discordant
  examples is a fair coin, so the two-sided p-value is the binomial test's.
  Returns ``(a_only_correct, b_only_correct, p_value)``.
  """
  a_ok, b_ok = preds_a == labels, preds_b == labels
  a_only, b_only = int(np.sum(a_ok & ~b_ok)), int(np.sum(b_ok & ~a_ok))
  n = a_only + b_only
  from scipy import stats  # pylint: disable=import-outside-toplevel  (0.5 s at import)
  p = stats.binomtest(a_only, n, 0.5).pvalue if n else 1.0
  return a_only, b_only, float(p)


def logits(fn: Callable, variables, split, batch_size: int) -> np.ndarray:
  """Logits of the jitted ``fn(variables, x)`` over ``split``, in its order."""
  return np.concatenate([np.asarray(fn(variables, x)) for x, _ in split.batches(batch_size)])


class Evaluator:
  """Top-1 on an eval split and, once ``reference`` (the float model's
  predictions) is set, agreement with it."""

  def __init__(self, split, batch_size: int):
    self.split, self.batch_size, self.reference = split, batch_size, None

  def __call__(self, predict_fn: Callable, variables, desc: str) -> tuple[dict, np.ndarray]:
    """``({"top1_pct", "agreement_pct"}, predictions)`` of ``predict_fn``
    (from ``make_predict``) with ``variables``."""
    preds = predict(predict_fn, variables, self.split, self.batch_size, desc=desc)
    out = {"top1_pct": top1_pct(preds, self.split.labels)}
    if self.reference is not None:
      out["agreement_pct"] = agreement_pct(preds, self.reference)
    return out, preds
