"""Tests of per-layer quantizer rules (fat/rules.py) and their use in a model.

The model-level test runs the rule documented in fat/rules.py, "first and last
layer at 8 bits, the rest at 4", and counts the distinct levels of each sown
``kernel_q`` per output channel: an n-bit symmetric quantizer has at most
2^n - 1 levels (15 at 4 bits, 255 at 8 bits).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_net

from fat.calibrate import quantized
from fat.layers import QuantMode
from fat.quant import QuantSpec
from fat.rules import QuantRule, resolve, uniform_rules

W8 = QuantSpec(bits=8, kind="symmetric", per_channel=True)
W4 = QuantSpec(bits=4, kind="symmetric", per_channel=True)
A8 = QuantSpec(bits=8, kind="symmetric")

# Verbatim from the fat/rules.py docstring.
FIRST_LAST_8BIT = (QuantRule(pattern=r"^(stem|classifier)(/|$)", weight=W8),
                   QuantRule(pattern=r".*", weight=W4, act=A8))


# --------------------------------------------------------------------------
# resolve() unit tests.
# --------------------------------------------------------------------------


def test_first_match_wins():
  a = QuantSpec(bits=8)
  b = QuantSpec(bits=4)
  rules = (QuantRule(pattern="block", weight=a), QuantRule(pattern="block_1", weight=b))
  assert resolve(rules, "block_1/expand/conv", "weight") is a
  assert resolve(rules[::-1], "block_1/expand/conv", "weight") is b
  assert resolve(rules[::-1], "block_2/expand/conv", "weight") is a


def test_none_means_no_opinion():
  a8, w6 = QuantSpec(bits=8), QuantSpec(bits=6)
  rules = (QuantRule(pattern="^stem/", act=a8),        # says nothing about weights
           QuantRule(pattern=".*", weight=w6))         # says nothing about acts
  assert resolve(rules, "stem/conv", "weight") is w6
  assert resolve(rules, "stem/act_q", "act") is a8
  # No rule sets the role: the layer stays in float.
  assert resolve(rules, "head/act_q", "act") is None
  assert resolve((), "stem/conv", "weight") is None
  assert resolve((QuantRule(pattern=".*"),), "stem/conv", "weight") is None


def test_pattern_is_searched_not_anchored():
  w = QuantSpec(bits=5)
  assert resolve((QuantRule(pattern="expand/conv$", weight=w),), "block_3/expand/conv",
                 "weight") is w
  assert resolve((QuantRule(pattern="^conv", weight=w),), "block_3/expand/conv",
                 "weight") is None
  # block_1 must not match block_12 when anchored by the separator.
  assert resolve((QuantRule(pattern=r"^block_1/", weight=w),), "block_12/dw/conv",
                 "weight") is None


@pytest.mark.parametrize("role", ["bias", "Weight", "activation", ""])
def test_role_validation(role):
  with pytest.raises(ValueError, match="role"):
    resolve((QuantRule(pattern=".*", weight=W8),), "stem/conv", role)


@pytest.mark.parametrize("pattern", ["block_(", "[", "*conv", "(?P<x"])
def test_invalid_regex_raises(pattern):
  with pytest.raises(ValueError, match="regex"):
    QuantRule(pattern=pattern, weight=W8)


def test_unsigned_weight_spec_raises():
  with pytest.raises(ValueError, match="unsigned"):
    QuantRule(pattern=".*", weight=QuantSpec(bits=8, kind="unsigned"))
  # Unsigned is fine for activations, asymmetric for weights.
  QuantRule(pattern=".*", act=QuantSpec(bits=8, kind="unsigned"))
  QuantRule(pattern=".*", weight=QuantSpec(bits=8, kind="asymmetric"))


def test_rule_is_frozen_and_keyword_only():
  with pytest.raises(TypeError):
    QuantRule(".*")  # pylint: disable=too-many-function-args
  rule = QuantRule(pattern=".*", weight=W8)
  with pytest.raises(dataclasses.FrozenInstanceError):
    rule.weight = W4


def test_uniform_rules_overrides_first():
  override = QuantRule(pattern="^stem/", weight=W8)
  rules = uniform_rules(weight=W4, act=A8, overrides=(override,))
  assert rules[0] is override and len(rules) == 2
  assert resolve(rules, "stem/conv", "weight") is W8
  assert resolve(rules, "block_2/dw/conv", "weight") is W4
  assert resolve(rules, "stem/act_q", "act") is A8
  assert resolve(uniform_rules(weight=None, act=None), "stem/conv", "weight") is None


def test_quant_mode_keeps_rules_as_tuple():
  mode = QuantMode(stage="quant", rules=[QuantRule(pattern=".*", weight=W8)])
  assert isinstance(mode.rules, tuple)
  with pytest.raises(ValueError):
    QuantMode(stage="int8")


def test_first_last_rule_resolves_stem_and_inner_layers():
  assert resolve(FIRST_LAST_8BIT, "stem/conv", "weight") is W8
  for inner in ("block_0/dw/conv", "block_3/expand/conv", "head/conv"):
    assert resolve(FIRST_LAST_8BIT, inner, "weight") is W4
  # The first rule sets no activation spec: every activation gets A8.
  for point in ("input_q", "stem/act_q", "block_2/add_q", "pool_q", "logits_q"):
    assert resolve(FIRST_LAST_8BIT, point, "act") is A8


def test_first_last_rule_resolves_classifier():
  """The classifier is a Dense at the top level: its layer path is "classifier"
  (no trailing "/"), so the documented pattern must match it."""
  assert resolve(FIRST_LAST_8BIT, "classifier", "weight") is W8


def test_anchored_alternative_matches_classifier():
  rules = (QuantRule(pattern=r"^(stem|classifier)(/|$)", weight=W8),) + FIRST_LAST_8BIT[1:]
  assert resolve(rules, "classifier", "weight") is W8
  assert resolve(rules, "stem/conv", "weight") is W8
  assert resolve(rules, "classifier_head/conv", "weight") is W4


# --------------------------------------------------------------------------
# The rule in a model: levels of the sown quantized kernels.
# --------------------------------------------------------------------------


def levels_per_channel(kq):
  """Distinct values of each output channel (last axis) of a kernel."""
  k = np.asarray(kq).reshape(-1, kq.shape[-1])
  return np.array([len(np.unique(k[:, c])) for c in range(k.shape[1])])


@pytest.fixture(scope="module")
def first_last():
  """Sown kernel_q of tiny_net (MobileNet-v2's layer names, three blocks) on RGB
  inputs under FIRST_LAST_8BIT."""
  qmodel = quantized(tiny_net(dw_impl="conv"), FIRST_LAST_8BIT)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  shapes = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(1)

  def leaf(path, s):
    name = path[-1].key
    if name in ("kernel", "bias"):
      return rng.normal(0.0, 0.3, s.shape).astype(np.float32)
    if name == "x_min":
      return jnp.full(s.shape, -6.0)
    if name == "x_max":
      return jnp.full(s.shape, 6.0)
    if name == "alpha":
      return jnp.ones(s.shape)
    return jnp.zeros(s.shape)  # beta

  variables = jax.tree_util.tree_map_with_path(leaf, shapes)
  _, state = jax.jit(lambda v, x: qmodel.apply(v, x, mutable=["intermediates"]))(variables, x)
  kernels = {}
  for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
    keys = [getattr(k, "key", None) for k in path]
    assert keys[-2] == "kernel_q"
    kernels["/".join(keys[:-2])] = np.asarray(value)
  return shapes, kernels


def test_first_last_rule_quantizes_every_layer(first_last):
  shapes, kernels = first_last
  assert len(kernels) == 11  # 10 convs + classifier
  assert "stem/conv" in kernels and "classifier" in kernels
  # Activations are quantized too (their alphas exist), the stem's included.
  assert set(shapes["thresholds"]["stem"]) == {"conv", "act_q"}
  assert "logits_q" in shapes["thresholds"]


def test_first_last_rule_stem_is_8bit(first_last):
  _, kernels = first_last
  lv = levels_per_channel(kernels["stem/conv"])  # 27 weights per channel
  assert lv.min() > 16 and lv.max() <= 255, lv


def test_first_last_rule_classifier_is_8bit(first_last):
  _, kernels = first_last
  lv = levels_per_channel(kernels["classifier"])  # 32 weights per channel
  assert lv.min() > 16 and lv.max() <= 255, lv


def test_first_last_rule_inner_layers_are_4bit(first_last):
  _, kernels = first_last
  inner = {k: v for k, v in kernels.items() if k not in ("stem/conv", "classifier")}
  assert len(inner) == 9
  for layer, kq in inner.items():
    assert levels_per_channel(kq).max() <= 15, layer
  # Really 4 bits, not fewer (3 bits has at most 7 levels): a 1x1 conv with
  # many inputs (96) uses all 15 levels in some channels and most in the typical one.
  lv = levels_per_channel(inner["block_2/project/conv"])
  assert lv.max() == 15 and np.median(lv) >= 12, lv
