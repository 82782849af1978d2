"""Per-layer sensitivity (fat.sensitivity): the metrics and ranking on hand-made logits,
and on tiny_net the one-compile probe against the exact-path rule definition and
a deliberately damaged layer ranked first."""

import numpy as np
import pytest

from fat import sensitivity

from conftest import tiny_net


def test_metrics_against_hand_computed_values():
  f = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
  q = f + np.array([[0.0, 2.5, 0.0], [0.0, 0.0, 0.0]])     # flips image 0 to class 1
  m = sensitivity.compare(q, f, labels=np.array([0, 2]))
  assert m["mse"] == pytest.approx(6.25 / 6) and m["rmse"] == pytest.approx((6.25 / 6) ** 0.5)
  assert m["sqnr_db"] == pytest.approx(10 * np.log10(15.0 / 6.25))
  assert m["flip_pct"] == 50.0 and m["top1_delta_pt"] == -50.0
  assert sensitivity.compare(f, f)["sqnr_db"] == float("inf")
  assert "top1_delta_pt" not in sensitivity.compare(q, f)


def test_ranking_and_its_correlation():
  rows = [{"path": p, "role": "weight", "bits": 4, "size": 10, "rmse": r, "sqnr_db": 1.0,
           "flip_pct": 0.0} for p, r in (("a", 0.1), ("b", 0.3), ("c", 0.3), ("d", 0.0))]
  assert [r["path"] for r in sensitivity.ranked(rows)] == ["b", "c", "a", "d"]
  text = sensitivity.ranked_markdown(rows, top=2)
  assert text.splitlines()[2].startswith("| 1 | `b` | weight | 4 | 10 | 0.3000 |")
  assert len(text.splitlines()) == 4
  flipped = [{**r, "rmse": -r["rmse"]} for r in rows]
  assert sensitivity.rank_correlation(rows, rows) == pytest.approx(1.0)
  assert sensitivity.rank_correlation(rows, flipped) == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def damaged():
  """tiny_net at W4A4 per tensor (min/max), with one output channel of
  ``block_1/expand``'s kernel 50x the rest: at 4 bits per tensor every other
  channel of that layer rounds to zero."""
  import jax
  from fat import pipeline
  model = tiny_net()
  x = np.random.default_rng(0).uniform(-1, 1, (64, 16, 16, 1)).astype(np.float32)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
  params = jax.tree_util.tree_map(np.asarray, v["params"])
  kernel = params["block_1"]["expand"]["conv"]["kernel"]
  params["block_1"]["expand"]["conv"]["kernel"] = kernel * np.where(
      np.arange(kernel.shape[-1]) == 0, 50.0, 1.0).astype(np.float32)
  stats = jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.1, v["batch_stats"])
  rules = pipeline.setting_rules(pipeline.Setting(name="w4a4", weight_bits=4, act_bits=4,
                                                  per_channel=False))
  p = pipeline.prepare(model, {"params": params, "batch_stats": stats}, rules, x)
  return model, p, x


@pytest.mark.slow  # tiny_net compiled four times
def test_the_probe_is_the_exact_rule_definition(damaged):
  """One compiled probe gives, per quantizer, the logits of the "quant" stage with only
  that tensor's exact-path rule (one compile per rule set); all off is the float model."""
  model, p, x = damaged
  probe = sensitivity.Probe(p.qmodel, p.variables, x)
  kinds = {(q.path, q.role) for q in probe.quantizers}
  assert len(kinds) == 25 and ("block_2/add_q", "act") in kinds and ("classifier", "weight") in kinds
  f = probe.logits(x, 32)
  np.testing.assert_allclose(f, p.fmodel.apply(p.folded, x), atol=1e-5)
  for path, role in (("block_1/dw/conv", "weight"), ("input_q", "act")):
    q = next(q for q in probe.quantizers if (q.path, q.role) == (path, role))
    ref = sensitivity.reference_logits(model, p.folded["params"], p.variables, q, x, 32)
    got = probe.logits(x, 32, probe.only(path, role))
    assert np.abs(got - f).max() > 1e-4, path                     # it does quantize
    np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=path)
  with pytest.raises(ValueError, match="no weight quantizer 'nope'"):
    probe.only("nope", "weight")


@pytest.mark.slow
def test_a_damaged_layer_ranks_first(damaged):
  _, p, x = damaged
  probe = sensitivity.Probe(p.qmodel, p.variables, x)
  f = probe.logits(x, 64)
  rows = sensitivity.sweep(probe, x, f, batch_size=64)
  assert len(rows) == 25
  top = sensitivity.ranked(rows)
  assert (top[0]["path"], top[0]["role"]) == ("block_1/expand/conv", "weight"), top[:3]
  assert top[0]["rmse"] > 3 * top[1]["rmse"] and top[0]["sqnr_db"] < top[1]["sqnr_db"]
  weights = sensitivity.sweep(probe, x, f, batch_size=64, roles=("weight",))
  assert [r["path"] for r in weights] == [r["path"] for r in rows if r["role"] == "weight"]
  assert weights == [r for r in rows if r["role"] == "weight"]     # same numbers again
