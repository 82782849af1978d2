"""The trainable/frozen split of quantized variables (fat.variables)."""

import jax
import jax.numpy as jnp
import pytest

from fat import variables


def qvars():
  return {"params": {"conv": {"kernel": jnp.ones(2)}},
          "quant_stats": {"act_q": {"x_max": jnp.array(3.0)}},
          "thresholds": {"act_q": {"alpha": jnp.array(1.0)}}}


def test_fat_and_qat_partitions():
  p = variables.partition(qvars())
  assert set(p.trainable) == {"thresholds"} and set(p.frozen) == {"params", "quant_stats"}
  q = variables.partition(qvars(), variables.QAT_TRAINABLE)
  assert set(q.trainable) == {"params", "thresholds"} and set(q.frozen) == {"quant_stats"}
  assert jax.tree.map(lambda a: a.tolist(), p.merged()) == jax.tree.map(lambda a: a.tolist(), qvars())


def test_partition_is_a_pytree_and_replaces_trainable():
  p = variables.partition(qvars())
  doubled = jax.tree.map(lambda a: 2 * a, p)
  assert float(doubled.frozen["quant_stats"]["act_q"]["x_max"]) == 6.0
  new = p.with_trainable({"thresholds": {"act_q": {"alpha": jnp.array(0.5)}}})
  assert float(new.merged()["thresholds"]["act_q"]["alpha"]) == 0.5
  assert float(p.merged()["thresholds"]["act_q"]["alpha"]) == 1.0  # unchanged


def test_missing_collection_is_named():
  with pytest.raises(ValueError, match=r"no collection \['thresholds'\]"):
    variables.partition({"params": {}})
