"""Mixed-precision allocation (fat.allocation) and the setting that carries its rules
(fat.pipeline.Setting.overrides): pure Python, no network."""

import json
import re

import ml_collections
import numpy as np
import pytest

from experiments import config_checks
from configs.fashion_mnist import ladder
from fat import allocation, pipeline, quant, rules
from fat.allocation import Layer


def _layers(n=12, seed=0, widths=(2, 3, 4, 6, 8), jitter=True):
  """Layers of random sizes whose noise falls about 4x per bit, with measurement
  noise (so some costs are not monotone in the width)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    scale = rng.lognormal(0.0, 1.5)
    noise = {b: scale * 4.0 ** (4 - b) * (rng.uniform(0.5, 1.5) if jitter else 1.0)
             for b in widths}
    out.append(Layer(path=f"block_{i}/conv", size=int(rng.integers(10, 5000)), noise=noise))
  return tuple(out)


def test_never_over_budget_and_uses_it():
  layers = _layers()
  total = allocation.total_size(layers)
  for budget in np.linspace(2 * total, 8.5 * total, 57):
    a = allocation.allocate(layers, budget)
    assert a.size_bits <= budget
    assert a.size_bits == sum(l.size * b for l, (_, b) in zip(layers, a.bits))
    # No single step up still fits: the fill pass used what it could.
    widths = allocation.DEFAULT_CHOICES
    for l, (_, b) in zip(layers, a.bits):
      if b < widths[-1]:
        up = widths[widths.index(b) + 1]
        assert a.size_bits + l.size * (up - b) > budget


def test_a_budget_of_all_8_gives_all_8_even_with_noisy_costs():
  layers = _layers() + (Layer(path="odd", size=7, noise={6: 1.0, 8: 2.0}),)  # 8 "worse"
  total = allocation.total_size(layers)
  a = allocation.allocate(layers, 8 * total)
  assert set(a.as_dict().values()) == {8} and a.size_bits == 8 * total
  assert allocation.allocate(layers, 8 * total + 5).as_dict() == a.as_dict()


def test_deterministic_and_ties_go_to_the_earlier_layer():
  layers = _layers(seed=3)
  total = allocation.total_size(layers)
  runs = [allocation.allocate(layers, 4 * total) for _ in range(3)]
  assert runs[0] == runs[1] == runs[2]
  twins = tuple(Layer(path=f"l{i}", size=100, noise={4: 1.0, 8: 0.0}) for i in range(3))
  a = allocation.allocate(twins, 100 * (8 + 8 + 4), choices=(4, 8))
  assert a.as_dict() == {"l0": 4, "l1": 8, "l2": 8}


def test_more_budget_never_costs_more():
  layers = _layers(seed=5)
  total = allocation.total_size(layers)
  allocs = [allocation.allocate(layers, b * total) for b in np.linspace(2, 8, 49)]
  noise = [a.predicted_noise for a in allocs]
  size = [a.size_bits for a in allocs]
  assert all(x >= y - 1e-12 for x, y in zip(noise, noise[1:]))
  assert all(x <= y for x, y in zip(size, size[1:]))
  assert allocs[0].predicted_noise > 100 * allocs[-1].predicted_noise


def test_sensitive_small_layers_keep_their_bits():
  """The allocation spends bits where they buy the most: a small, sensitive layer
  stays wide while big, robust ones go narrow."""
  layers = (Layer(path="stem", size=300, noise={4: 10.0}),
            Layer(path="big", size=100_000, noise={4: 0.01}),
            Layer(path="mid", size=20_000, noise={4: 0.1}))
  a = allocation.allocate(layers, 4 * allocation.total_size(layers)).as_dict()
  assert a["stem"] == 8 and a["big"] <= 4 and a["big"] <= a["mid"]


def test_unmeasured_widths_follow_the_noise_model():
  layer = Layer(path="x", size=1, noise={4: 1.0, 6: 0.5})
  assert layer.cost(4) == 1.0 and layer.cost(3) == 4.0 and layer.cost(2) == 16.0
  assert layer.cost(8) == 0.5 / 16 and layer.cost(5) == pytest.approx(0.5 ** 0.5)


def test_bad_input_is_named():
  layers = _layers(n=3)
  total = allocation.total_size(layers)
  with pytest.raises(ValueError, match="below .* every layer at 2 bits"):
    allocation.allocate(layers, 2 * total - 1)
  with pytest.raises(ValueError, match="given twice"):
    allocation.allocate(layers + layers[:1], 8 * total)
  with pytest.raises(ValueError, match="bits must be in 2..16"):
    allocation.allocate(layers, 8 * total, choices=(1, 8))
  with pytest.raises(ValueError, match="size must be a positive integer"):
    Layer(path="x", size=0, noise={4: 1.0})
  with pytest.raises(ValueError, match="finite and >= 0"):
    Layer(path="x", size=1, noise={4: float("nan")})
  with pytest.raises(ValueError, match="no act rows"):
    allocation.layers_from_rows([{"path": "a", "role": "weight", "size": 1, "bits": 4,
                                  "mse": 1.0}], role="act")


def test_rows_become_layers_and_exact_rules():
  rows = [{"path": p, "role": role, "size": n, "bits": b, "mse": m}
          for p, role, n, b, m in (("block_1/dw/conv", "weight", 72, 4, 0.1),
                                   ("block_1/dw/conv", "weight", 72, 2, 2.0),
                                   ("block_11/dw/conv", "weight", 90, 4, 0.001),
                                   ("block_1/dw/act_q", "act", 900, 4, 0.3))]
  layers = allocation.layers_from_rows(rows)
  assert [(l.path, l.size, l.noise) for l in layers] == [
      ("block_1/dw/conv", 72, {2: 2.0, 4: 0.1}), ("block_11/dw/conv", 90, {4: 0.001})]
  a = allocation.allocate(layers, 72 * 8 + 90 * 2, choices=(2, 8))
  spec = quant.QuantSpec(bits=8, per_channel=True)
  got = a.rules(spec)
  assert rules.resolve(got, "block_1/dw/conv", "weight").bits == 8
  assert rules.resolve(got, "block_11/dw/conv", "weight").bits == 2
  assert rules.resolve(got, "block_1/dw/conv_x", "weight") is None
  assert rules.resolve(got, "a/block_1/dw/conv", "weight") is None
  assert re.fullmatch(allocation.exact_pattern("a.b(c)"), "a.b(c)")
  assert not re.search(allocation.exact_pattern("a.b"), "axb")


def test_a_setting_carries_the_allocation_through_config_and_json():
  layers = (Layer(path="stem/conv", size=288, noise={4: 1.0}),
            Layer(path="block_3/expand/conv", size=4000, noise={4: 0.001}))
  a = allocation.allocate(layers, 4 * allocation.total_size(layers), choices=(2, 4, 8))
  setting = ladder.mixed_setting("mixed", a.overrides(), act_bits=8)
  config = ladder.get_config("smoke")
  config.settings = [setting]
  config_checks.validate(config)
  as_json = json.loads(config.to_json_best_effort())["settings"][0]  # as meta.json keeps it
  for form in (setting, as_json):
    r = pipeline.config_rules(form, config.fat)
    for path, bits in a.bits:
      assert rules.resolve(r, path, "weight").bits == bits
      assert rules.resolve(r, path, "weight").per_channel
    assert rules.resolve(r, "head/conv", "weight").bits == 8    # the setting's own width
    assert rules.resolve(r, "stem/act_q", "act").bits == 8
  w = pipeline.Setting(name="w", weight_bits=4, act_bits=8, per_channel=True,
                       act_kind="asymmetric", overrides=[["^input_q$", 0, 6]])
  assert rules.resolve(pipeline.setting_rules(w), "input_q", "act") == quant.QuantSpec(
      bits=6, kind="symmetric")  # the input stays symmetric, at its own width


@pytest.mark.parametrize("bad, message", [
    ((("^stem", 1, 0),), "weight_bits must be 0 .* or an integer in 2..16, got 1"),
    ((("^stem", 4),), r"must be \(pattern, weight_bits, act_bits\)"),
    ((("^stem", 0, 0),), "sets neither"),
    ((("(", 4, 0),), "not a valid regex"),
])
def test_bad_overrides_are_named_by_the_config_checks(bad, message):
  config = ladder.get_config("smoke")
  config.settings = [ladder.mixed_setting("m", bad)]
  with pytest.raises(ValueError, match=r"config.settings\['m'\].overrides: .*" + message):
    config_checks.validate(config)
  assert isinstance(config.settings[0], ml_collections.ConfigDict)
