"""The setting policy and the fold -> quantize -> calibrate sequence (fat.pipeline)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import random_variables

from fat import calibrate, fold, models, pipeline, quant
from fat.pipeline import Setting, setting_rules
from fat.rules import resolve


def test_asymmetric_settings_keep_the_input_symmetric():
  """With asymmetric activations the fixed-range input stays symmetric: on [-1, 1]
  (keras preprocessing) an asymmetric grid puts all 256 pixel levels on rounding
  ties, the symmetric one none."""
  rules = setting_rules(Setting(name="asym", weight_bits=8, act_bits=8, per_channel=True,
                                weight_kind="asymmetric", act_kind="asymmetric"))
  assert resolve(rules, "input_q", "act").kind == "symmetric"
  assert resolve(rules, "block_3/expand/act_q", "act").kind == "asymmetric"
  assert resolve(rules, "stem/conv", "weight").kind == "asymmetric"
  sym = setting_rules(Setting(name="sym", weight_bits=8, act_bits=8, per_channel=True))
  assert resolve(sym, "input_q", "act") == resolve(sym, "block_3/expand/act_q", "act")
  x = jnp.arange(256.0) / 127.5 - 1.0

  def tie_fraction(spec):
    qp = quant.params_from_range(-1.0, 1.0, spec)
    s = 1.0 / np.asarray(quant.grid_step(qp, spec), np.float64)
    u = np.asarray(x, np.float64) * s
    return np.mean(np.abs(u - np.floor(u) - 0.5) < 1e-3)
  assert tie_fraction(quant.QuantSpec(bits=8, kind="asymmetric")) == 1.0
  assert tie_fraction(resolve(rules, "input_q", "act")) == 0.0


def test_setting_rules_first_last_override_and_config_forms_agree():
  s = Setting(name="w4a8", weight_bits=4, act_bits=8, per_channel=True, first_last_bits=8)
  rules = setting_rules(s, alpha_range=(0.6, 1.0))
  assert resolve(rules, "stem/conv", "weight").bits == 8
  assert resolve(rules, "classifier", "weight").bits == 8
  assert resolve(rules, "block_3/expand/conv", "weight").bits == 4
  assert resolve(rules, "block_3/expand/act_q", "act").alpha_range == (0.6, 1.0)
  fat = {"alpha_range": [0.6, 1.0], "beta_range": [-0.2, 0.4]}  # as meta.json stores it
  setting = {"name": "w4a8", "weight_bits": 4, "act_bits": 8, "per_channel": True,
             "weight_kind": "symmetric", "act_kind": "symmetric", "first_last_bits": 8}
  assert pipeline.config_rules(setting, fat) == rules
  assert pipeline.config_rules(ml_collections.ConfigDict(setting),
                               ml_collections.ConfigDict(fat)) == rules


def test_setting_rejects_unsigned_weights():
  with pytest.raises(ValueError, match="weight_kind cannot be 'unsigned'"):
    Setting(name="s", weight_bits=8, act_bits=8, per_channel=True, weight_kind="unsigned")


@pytest.mark.slow  # a whole MobileNet-v2 calibrated twice
def test_prepare_equals_the_sequence_it_names():
  """prepare = fold -> quantized model -> initial variables -> calibration,
  with a split or an array of images, in batches."""
  from fat import data
  model = models.MobileNetV2(num_classes=10, width=0.35, small_input=True)
  images = np.random.default_rng(1).integers(0, 256, (12, 16, 16, 1), dtype=np.uint8)
  x = data.normalize(images)
  variables = random_variables(model, x)
  stats = jax.tree.map(lambda a: a + 0.5, variables["batch_stats"])
  float_vars = {"params": variables["params"], "batch_stats": stats}
  rules = setting_rules(Setting(name="s", weight_bits=4, act_bits=8, per_channel=True))
  p = pipeline.prepare(model, float_vars, rules, x, batch_size=5)
  folded = fold.fold_variables(float_vars, model.bn_eps)
  qmodel = calibrate.quantized(model, rules)
  qvars = calibrate.init_quant_variables(qmodel, folded["params"], x[:1])
  qvars = calibrate.calibrate(qmodel, qvars, [x[:5], x[5:10], x[10:]], progress=False)
  assert p.qmodel == qmodel and p.fmodel.mode.stage == "folded"
  jax.tree.map(np.testing.assert_array_equal, p.variables, qvars)
  jax.tree.map(np.testing.assert_array_equal, p.folded, folded)
  assert float(qvars["quant_stats"]["stem"]["act_q"]["x_max"]) > 0  # calibrated
  # A split of the uint8 images gives the same as their normalized array.
  split = data.Split(images, np.zeros(12, np.int64))
  from_split = pipeline.prepare(model, float_vars, rules, split, batch_size=5)
  jax.tree.map(np.testing.assert_array_equal, from_split.variables, p.variables)
