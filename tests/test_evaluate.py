"""Accuracy, agreement and the paired significance test of ``fat.evaluate``."""

import math

import numpy as np
import pytest

from fat import evaluate


def test_top1_and_agreement():
  labels = np.array([0, 1, 2, 3])
  preds = np.array([0, 1, 0, 0])
  assert evaluate.top1_pct(preds, labels) == 50.0
  assert evaluate.agreement_pct(preds, np.array([0, 1, 0, 3])) == 75.0


def exact_two_sided(k: int, n: int) -> float:
  """Two-sided binomial(n, 1/2) p-value by summing the symmetric tails."""
  tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n
  return min(1.0, 2 * tail)


@pytest.mark.parametrize("a_only, b_only", [(0, 5), (3, 3), (2, 9), (12, 23), (0, 0)])
def test_mcnemar_counts_discordant_pairs(a_only, b_only):
  rng = np.random.default_rng(a_only * 100 + b_only)
  both, neither = 40, 7
  labels = rng.integers(0, 10, both + neither + a_only + b_only)
  wrong = (labels + 1) % 10
  a = np.concatenate([labels[:both], wrong[both:both + neither],
                      labels[both + neither:both + neither + a_only],
                      wrong[both + neither + a_only:]])
  b = np.concatenate([labels[:both], (labels[both:both + neither] + 2) % 10,
                      wrong[both + neither:both + neither + a_only],
                      labels[both + neither + a_only:]])
  order = rng.permutation(len(labels))
  got_a, got_b, p = evaluate.mcnemar(a[order], b[order], labels[order])
  assert (got_a, got_b) == (a_only, b_only)
  np.testing.assert_allclose(p, exact_two_sided(a_only, a_only + b_only), rtol=1e-9)
  assert evaluate.mcnemar(b, a, labels) == (b_only, a_only, pytest.approx(p))
