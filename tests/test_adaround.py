"""Learned rounding (fat/rounding.py, fat/reconstruction.py, fat/methods/adaround.py):
the rectified sigmoid and its regularizer against numpy, the soft weight's
gradient against an independent formula and finite differences, hardened
weights on their grid, and (slow) reconstruction on tiny_net with the
integer reference and ONNX Runtime agreeing after it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_integer_layers_match, tiny_net

from configs import default
from experiments import config_checks
from fat import methods, quant, rounding, rules

ZETA, GAMMA = 1.1, -0.1


def np_h(v):
  return np.clip(1.0 / (1.0 + np.exp(-np.asarray(v, np.float64))) * (ZETA - GAMMA) + GAMMA, 0, 1)


def test_rectified_sigmoid_and_its_inverse():
  v = np.linspace(-12, 12, 97)
  np.testing.assert_allclose(rounding.rectified_sigmoid(v), np_h(v), atol=1e-6)
  assert float(rounding.rectified_sigmoid(0.0)) == pytest.approx(0.5)
  assert float(rounding.rectified_sigmoid(-12.0)) == 0.0  # reaches 0 and 1 exactly
  assert float(rounding.rectified_sigmoid(12.0)) == 1.0
  h = np.linspace(0, 0.999, 50)
  np.testing.assert_allclose(rounding.rectified_sigmoid(rounding.inverse_rectified_sigmoid(h)),
                             h, atol=1e-5)


def test_regularizer_and_beta_schedule():
  v = np.random.default_rng(0).normal(0, 3, 200).astype(np.float32)
  for beta in (20.0, 7.5, 2.0):
    want = np.sum(1 - np.abs(2 * np_h(v) - 1) ** beta)
    assert float(rounding.regularizer(v, beta)) == pytest.approx(want, rel=1e-4)
  # 0 once every h is 0 or 1; one per weight at h = 1/2.
  assert float(rounding.regularizer(jnp.array([-20.0, 20.0]), 2.0)) == 0.0
  assert float(rounding.regularizer(jnp.zeros(5), 2.0)) == pytest.approx(5.0)
  assert rounding.annealed_beta(0, 100) == (20.0, 0.0)  # warm-up: regularizer off
  assert rounding.annealed_beta(19, 100)[1] == 0.0
  assert rounding.annealed_beta(20, 100) == (20.0, 1.0)
  assert rounding.annealed_beta(60, 100)[0] == pytest.approx(11.0)
  assert rounding.annealed_beta(100, 100)[0] == pytest.approx(2.0)


def _kernel(shape=(3, 3, 4, 6), seed=0):
  return np.random.default_rng(seed).normal(0, 0.3, shape).astype(np.float32)


SPEC = quant.QuantSpec(bits=4, per_channel=True)


def _qp(w, spec=SPEC, alpha=1.0):
  lo, hi = quant.observed_range(w, spec)
  return quant.params_from_range(lo, hi, spec, jnp.full(lo.shape, alpha, jnp.float32))


@pytest.mark.parametrize("alpha", [0.7])
def test_soft_weight_starts_at_w_and_its_gradient_matches_the_formula(alpha):
  w = _kernel()
  qp = _qp(w, alpha=alpha)
  v = rounding.init_v(w, qp, SPEC)
  s, _ = quant.scale_and_zero(qp, SPEC, w.ndim)
  s = np.asarray(s, np.float64)
  inside = np.abs(w * s) < SPEC.qmax - 1
  np.testing.assert_allclose(np.asarray(rounding.soft_quant(w, v, qp, SPEC))[inside], w[inside],
                             rtol=1e-5, atol=1e-6)
  # d w~ / d v = h'(v) / s where the grid does not clip and 0 < h < 1, else 0.
  g = np.random.default_rng(1).normal(size=w.shape)
  v = v + np.random.default_rng(2).normal(0, 1.5, w.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(rounding.soft_quant(w, v, qp, SPEC) * g))(v)
  sig = 1 / (1 + np.exp(-np.asarray(v, np.float64)))
  raw = sig * (ZETA - GAMMA) + GAMMA
  q = np.floor(w * s.astype(np.float32)) + np_h(v)  # the float32 product, as the code has it
  live = (raw > 0) & (raw < 1) & (q >= SPEC.qmin) & (q <= SPEC.qmax)
  want = np.where(live, g * sig * (1 - sig) * (ZETA - GAMMA) / s, 0.0)
  clear = np.minimum.reduce([np.abs(raw), np.abs(raw - 1), np.abs(q - SPEC.qmin),
                             np.abs(q - SPEC.qmax)]) > 1e-3  # float32 may differ at a kink
  np.testing.assert_allclose(np.asarray(grad)[clear], want[clear], rtol=1e-4, atol=1e-6)
  # And central differences, away from the kinks.
  smooth = live & (np.abs(raw - 0.5) < 0.4) & (np.abs(q) < SPEC.qmax - 1)
  eps = 1e-2
  f = lambda v: np.asarray(rounding.soft_quant(w, v, qp, SPEC), np.float64)
  fd = (f(v + eps) - f(v - eps)) / (2 * eps)
  np.testing.assert_allclose(fd[smooth], (want / g)[smooth], rtol=2e-2)


def _hardened(w, v, spec=SPEC, alpha=None):
  c = w.shape[-1] if spec.per_channel else ()
  alpha = np.full(c, 1.0, np.float32) if alpha is None else alpha
  variables = {"params": {"conv": {"kernel": w}},
               "thresholds": {"conv": {"alpha": alpha, "beta": np.zeros_like(alpha)}},
               rounding.COLLECTION: {"conv": {"v": v}}}
  r = rules.uniform_rules(weight=dataclasses.replace(spec, rounding="learned"), act=None)
  return rounding.harden(variables, r)


@pytest.mark.parametrize("per_channel, alpha, kind", [
    (True, 1.0, "symmetric"), (False, 0.8, "symmetric"),
    (True, 1.0, "asymmetric"), (True, 0.8, "asymmetric"), (False, 0.8, "asymmetric")])
def test_hardened_weights_lie_on_the_same_grid(per_channel, alpha, kind):
  spec = dataclasses.replace(SPEC, per_channel=per_channel, kind=kind)
  w = _kernel()
  a = np.full(w.shape[-1] if per_channel else (), alpha, np.float32)
  qp = _qp(w, spec, alpha)
  v = np.random.default_rng(3).normal(0, 2, w.shape).astype(np.float32)
  out, counts = _hardened(w, v, spec, a)
  new = np.asarray(out["params"]["conv"]["kernel"])
  assert rounding.COLLECTION not in out
  assert np.all(np.asarray(out["thresholds"]["conv"]["alpha"]) == 1.0)
  # Integer values: floor(w*s) + [v >= 0], clipped; on the original grid.
  s, z = quant.scale_and_zero(qp, spec, w.ndim)
  q = np.asarray(rounding.hard_ints(w, v, qp, spec))
  assert np.all(q == np.round(q)) and q.min() >= spec.qmin and q.max() <= spec.qmax
  np.testing.assert_allclose(new, (q + np.asarray(z)) / np.asarray(s, np.float64), rtol=3e-7,
                             atol=1e-7)
  # The stored weights' own range gives back that grid: fake quant keeps them
  # (to float32 rounding of the recomputed step) and their integers exactly.
  qp_new = _qp(new, spec)
  np.testing.assert_allclose(quant.fake_quant(new, qp_new, spec), new, rtol=1e-6, atol=0)
  np.testing.assert_array_equal(quant.quantize_int(new, qp_new, spec)[0], q)
  assert 0 < counts["flipped"] < counts["weights"] == w.size
  # With v at its start, hardening is round-to-nearest.
  near, counts = _hardened(w, np.asarray(rounding.init_v(w, qp, spec)), spec, a)
  np.testing.assert_allclose(near["params"]["conv"]["kernel"], quant.fake_quant(w, qp, spec),
                             rtol=1e-6, atol=1e-7)
  assert counts["flipped"] == 0


def test_hardening_refuses_a_grid_it_cannot_keep():
  """An asymmetric grid shifted off 0 is not what the hardened kernel's range gives."""
  spec = quant.QuantSpec(bits=4, kind="asymmetric", per_channel=True, beta_range=(-0.2, 0.4))
  w = np.abs(_kernel()) + 0.5  # all positive: t_min = 0, the grid starts at beta * R
  variables = {"params": {"conv": {"kernel": w}},
               "thresholds": {"conv": {"alpha": np.full(6, 0.6, np.float32),
                                       "beta": np.full(6, 0.3, np.float32)}},
               rounding.COLLECTION: {"conv": {"v": np.zeros_like(w)}}}
  r = rules.uniform_rules(weight=dataclasses.replace(spec, rounding="learned"), act=None)
  with pytest.raises(ValueError, match="learned rounding of 'conv'.*rounding='nearest'"):
    rounding.harden(variables, r)
  # The reconstruction's check before training refuses it the same way ...
  with pytest.raises(ValueError, match="learned rounding of 'conv'.*rounding='nearest'"):
    rounding.check_grids(variables, r)
  # ... and passes one with beta = 0 and 0 inside its range.
  w = _kernel()
  ok = {"params": {"conv": {"kernel": w}},
        "thresholds": {"conv": {"alpha": np.full(6, 0.8, np.float32),
                                "beta": np.zeros(6, np.float32)}}}
  rounding.check_grids(ok, r)


def test_rules_select_learned_rounding_and_relocate():
  w4 = quant.QuantSpec(bits=4, per_channel=True)
  r = rules.uniform_rules(weight=w4, act=quant.QuantSpec(bits=8), overrides=(
      rules.QuantRule(pattern=r"^stem/", weight=quant.QuantSpec(bits=8)),))
  learned = rules.with_rounding(r, "learned", pattern="^block_")
  get = lambda p: rules.resolve(learned, p, "weight")
  assert get("block_1/expand/conv").rounding == "learned"
  assert get("head/conv").rounding == "nearest" and get("stem/conv").bits == 8
  moved = rules.relocate(learned, "block_1/expand", ["conv", "act_q"])
  assert rules.resolve(moved, "conv", "weight") == get("block_1/expand/conv")
  assert rules.resolve(moved, "act_q", "act").bits == 8
  # Two blocks alike get equal rules (one compiled step serves both).
  assert moved == rules.relocate(learned, "block_2/expand", ["conv", "act_q"])
  with pytest.raises(ValueError, match="QuantSpec.rounding must be one of"):
    quant.QuantSpec(rounding="stochastic")


def test_registry_runs_the_new_methods_in_order():
  names = methods.names()
  new = ("ptq_adaround", "fat_adaround", "fat_adaround_all", "fat_adaround_joint", "fat_qdrop",
         "lsq")
  for name in new:  # trained: training columns, and not a candidate for FAT's start
    assert methods.get(name).kind == methods.TRAINED
  assert methods.ordered(["lsq", "fat_qdrop", "fat_adaround_joint", "fat_adaround_all",
                          "fat_adaround", "qat", "fat", "ptq_adaround", "ptq_mse",
                          "ptq_minmax"]) == [
                              "ptq_minmax", "ptq_mse", "ptq_adaround", "fat", "fat_adaround",
                              "fat_adaround_all", "fat_adaround_joint", "fat_qdrop", "qat",
                              "lsq"]
  assert set(names) >= set(new)


@pytest.mark.parametrize("change, message", [
    (dict(methods=("ptq_minmax", "fat", "fat_adaround")), "add 'ptq_adaround'"),
    (dict(methods=("ptq_minmax", "fat", "ptq_adaround"), adaround_start="ptq_mse"),
     "config.adaround.start must be"),
    (dict(adaround_start="fat"), "config.adaround.start must be"),
    (dict(adaround_granularity="net"), "config.adaround.granularity must be one of"),
    (dict(asym=True, beta_range=(0.1, 0.4)),
     r"asymmetric weights \(settings \['w8a8_per_channel'\]\) with beta = 0, so "
     r"config.fat.beta_range must contain 0.0, got \(0.1, 0.4\)"),
    (dict(quantize_output=None), "config.adaround.quantize_output must be True or False"),
    (dict(drop_prob=1.5), r"config.adaround.drop_prob must be a number in \[0.0, 1.0\]"),
])
def test_adaround_config_checks(change, message):
  c = default.get_config()
  c.methods = change.get("methods", ("ptq_minmax", "ptq_mse", "fat", "ptq_adaround",
                                     "fat_adaround"))
  if "adaround_start" in change:
    c.adaround.start = change["adaround_start"]
  if "adaround_granularity" in change:
    c.adaround.granularity = change["adaround_granularity"]
  if "quantize_output" in change:
    c.adaround.quantize_output = change["quantize_output"]
  if "drop_prob" in change:
    c.adaround.drop_prob = change["drop_prob"]
  if change.get("asym"):
    c.settings[0].weight_kind = "asymmetric"
  if "beta_range" in change:
    c.fat.beta_range = change["beta_range"]
  with pytest.raises(ValueError, match=message):
    config_checks.validate(c)


def test_adaround_takes_asymmetric_weights():
  """The config checks let learned rounding take asymmetric weights (their
  hardening is tested above and in the reconstruction fixture)."""
  c = default.get_config()
  c.methods = ("ptq_minmax", "ptq_mse", "fat", "ptq_adaround", "fat_adaround")
  for s in c.settings:
    s.weight_kind = "asymmetric"
  config_checks.validate(c)


def test_qdrop_input_takes_float_elements_at_its_rate():
  from fat import reconstruction  # pylint: disable=import-outside-toplevel
  x_q = jnp.zeros((8, 50, 50, 10), jnp.float32)
  x_f = np.ones(x_q.shape, np.float64)
  for p in (0.0, 0.3, 1.0):
    mixed = reconstruction.mixed_input(x_q, x_f, jax.random.PRNGKey(0), p)
    assert mixed.dtype == jnp.float32
    assert float(jnp.mean(mixed)) == pytest.approx(p, abs=0.005)  # 200,000 draws
  a, b = (reconstruction.mixed_input(x_q, x_f, jax.random.PRNGKey(k), 0.5) for k in (0, 1))
  assert bool(jnp.any(a != b))  # a new mask for each key (each step)
  with pytest.raises(ValueError, match="drop_prob must be in"):
    reconstruction.ReconSpec(input="qdrop", drop_prob=-0.1)
  with pytest.raises(ValueError, match="input must be one of"):
    reconstruction.ReconSpec(input="drop")


def test_trace_follows_tiny_net_as_a_chain():
  """Top-level modules in call order, the pool as glue, each block's layers,
  and the quantizer making each unit's output (dropped from the loss by default)."""
  from fat import calibrate, pipeline, reconstruction  # pylint: disable=import-outside-toplevel
  s = pipeline.Setting(name="w4a8", weight_bits=4, act_bits=8, per_channel=True)
  qmodel = calibrate.quantized(tiny_net(), pipeline.setting_rules(s))
  x = np.zeros((1, 16, 16, 1), np.float32)
  shapes = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), x)
  variables = {**shapes, "params": jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                                shapes["params"])}
  calls = reconstruction.trace(qmodel, variables, x)
  assert [(c.path, c.glue, c.output_quantizer) for c in calls] == [
      ("input_q", "", None), ("stem", "", "act_q"), ("block_0", "", "project/act_q"),
      ("block_1", "", "project/act_q"), ("block_2", "", "add_q"), ("head", "", "act_q"),
      ("pool_q", "mean", None), ("classifier", "", None), ("logits_q", "", None)]
  assert [k.path for k in calls[3].children] == ["block_1/expand", "block_1/dw",
                                                 "block_1/project"]
  assert calls[1].args == (("const", False), "step") and calls[7].args == ("step",)
  unit = reconstruction.standalone(calls[4], variables, qmodel.mode.rules, "quant", False)
  assert rules.resolve(unit.mode.rules, "add_q", "act") is None
  assert rules.resolve(unit.mode.rules, "project/act_q", "act").bits == 8


@pytest.mark.parametrize("granularity", [pytest.param("layer", marks=pytest.mark.slow), "block"])
def test_every_unit_reconstructs_the_float_models_own_output(monkeypatch, granularity):
  """The targets stay the float model's outputs after the units before are
  hardened (4-bit weights and activations, where hardened weights in the
  float chain once drove every later target off the float model's)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from fat import pipeline, reconstruction  # pylint: disable=import-outside-toplevel
  model, x = tiny_net(), _images(32, 1)
  v = jax.jit(model.init)(jax.random.PRNGKey(1), x[:1])
  s = pipeline.Setting(name="w4a4", weight_bits=4, act_bits=4, per_channel=True)
  p = pipeline.prepare(model, v, pipeline.setting_rules(s), x, batch_size=32)
  targets, learn = {}, reconstruction._learn  # pylint: disable=protected-access

  def spy(unit, variables, module, output_module, xs, step, target, *rest):
    targets[unit.path] = np.asarray(target)
    return learn(unit, variables, module, output_module, xs, step, target, *rest)

  monkeypatch.setattr(reconstruction, "_learn", spy)
  spec = reconstruction.ReconSpec(granularity=granularity, iterations=3, learning_rate=0.5)
  out, stats, _ = reconstruction.reconstruct(p.qmodel, p.variables, x, spec, batch_size=16)
  float_out = {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      float_out["/".join(context.module.scope.path)] = np.asarray(
          y[0] if isinstance(y, tuple) else y)
    return y

  with nn.intercept_methods(record):
    p.fmodel.apply(p.folded, x)
  units = (["stem", "block_0/dw", "block_0/project", "block_1/expand", "block_1/dw",
            "block_1/project", "block_2/expand", "block_2/dw", "block_2/project"]
           if granularity == "layer" else ["stem", "block_0", "block_1", "block_2"])
  assert list(targets) == units + ["head", "classifier"]
  assert stats["flipped_pct"] > 0  # later units ran after earlier kernels changed
  for path, target in targets.items():
    np.testing.assert_allclose(target, float_out[path], rtol=1e-5, atol=1e-5, err_msg=path)


@pytest.mark.slow
def test_joint_training_moves_activation_thresholds_inside_their_bounds():
  """act_thresholds: each unit's activation alphas train with its rounding,
  stay inside their specs' range, and nothing else of the thresholds changes
  but the hardened weights' alpha = 1; without it they stay as calibrated."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from fat import pipeline, reconstruction  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="set quantize_output=True"):
    reconstruction.ReconSpec(act_thresholds=True)
  model, x = tiny_net(), _images(32, 2)
  v = jax.jit(model.init)(jax.random.PRNGKey(2), x[:1])
  s = pipeline.Setting(name="w4a4", weight_bits=4, act_bits=4, per_channel=True)
  p = pipeline.prepare(model, v, pipeline.setting_rules(s), x, batch_size=32)
  flat = lambda tree: traverse_util.flatten_dict(tree["thresholds"], sep="/")
  before = flat(p.variables)
  acts = set(reconstruction.act_thresholds(p.variables))
  # tiny_net's activation quantizers are the modules named *_q.
  assert acts == {k for k in before if k.rsplit("/", 2)[-2].endswith("_q")}
  runs = {}
  for joint in (False, True):
    spec = reconstruction.ReconSpec(granularity="block", iterations=20, learning_rate=0.1,
                                    quantize_output=True, act_thresholds=joint,
                                    threshold_learning_rate=0.05)
    runs[joint] = flat(reconstruction.reconstruct(p.qmodel, p.variables, x, spec,
                                                  batch_size=16)[0])
  lo, hi = 0.5, 1.0  # fat.pipeline.setting_rules' alpha_range
  moved = [k for k in acts if k.endswith("alpha") and runs[True][k] != before[k]]
  assert moved
  for k in acts:
    assert runs[False][k] == before[k], k
    if k.endswith("alpha"):
      assert lo - 1e-6 <= float(runs[True][k]) <= hi + 1e-6, (k, runs[True][k])
  for k in set(before) - acts:  # weight thresholds: hardened to alpha 1, beta 0
    assert np.all(np.asarray(runs[True][k]) == (1.0 if k.endswith("alpha") else 0.0)), k


# --------------------------------------------------------------------------
# Slow: reconstruction on tiny_net, then export.
# --------------------------------------------------------------------------


def _images(n, seed):
  rng = np.random.default_rng(seed)
  base = rng.uniform(-1, 1, (n, 4, 4, 1))
  return np.clip(np.kron(base, np.ones((1, 4, 4, 1))) + 0.1 * rng.normal(size=(n, 16, 16, 1)),
                 -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def reconstructed():
  from fat import pipeline, reconstruction  # pylint: disable=import-outside-toplevel
  model = tiny_net()
  x = _images(64, 0)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
  rng = np.random.default_rng(0)
  v = {**v, "batch_stats": jax.tree.map(lambda a: np.asarray(a) + rng.uniform(0, 0.2, a.shape),
                                        v["batch_stats"])}
  # Asymmetric weights (uint4 with zero points in ONNX); symmetric ones reach
  # ONNX Runtime in test_onnx_benchmark_runs_the_main_jobs_method.
  s = pipeline.Setting(name="w4a8", weight_bits=4, act_bits=8, per_channel=True,
                       weight_kind="asymmetric")
  p = pipeline.prepare(model, v, pipeline.setting_rules(s), x, batch_size=64)
  spec = reconstruction.ReconSpec(granularity="block", iterations=60, batch_size=16,
                                  learning_rate=3e-2)
  out, stats, losses = reconstruction.reconstruct(p.qmodel, p.variables, x, spec, batch_size=32)
  return p, x, out, stats, losses


@pytest.mark.slow
def test_reconstruction_lowers_the_error_and_keeps_the_grid(reconstructed):
  from fat import graph, integer  # pylint: disable=import-outside-toplevel
  p, x, out, stats, losses = reconstructed
  assert stats["units"] == 6 and stats["steps"] == 6 * 60 and stats["train_images"] == 64
  assert stats["recon_error_learned"] < 0.9 * stats["recon_error_nearest"]
  assert 0 < stats["flipped_pct"] < 50 and losses and set(out) == set(p.variables)
  # Same structure, same activation thresholds; every kernel on its grid.
  assert jax.tree.structure(out) == jax.tree.structure(p.variables)
  nodes, acts = graph.trace(p.qmodel, out, x, return_activations=True)
  layers = [n for n in nodes if n.op in ("conv", "dense")]
  for n in layers:
    g = n.attrs["w_grid"]
    np.testing.assert_allclose(n.attrs["weight"], (n.attrs["q_weight"] - g.zero_point) * g.scale,
                               rtol=1e-6, atol=1e-9)
  # The weight grids are asymmetric: [0, 15] with a zero point per channel.
  assert all(n.attrs["w_grid"].qmin == 0 and n.attrs["w_grid"].qmax == 15
             and np.any(n.attrs["w_grid"].zero_point != 0) for n in layers)
  assert_integer_layers_match(nodes, acts, x)
  sim = np.asarray(jax.jit(p.qmodel.apply)(out, x))
  assert np.mean(integer.logits(nodes, x).argmax(-1) == sim.argmax(-1)) >= 0.95


@pytest.mark.slow
def test_adarounded_weights_export_and_run_in_ort(reconstructed, tmp_path):
  import onnx  # pylint: disable=import-outside-toplevel
  from fat import export_onnx, graph, runtime  # pylint: disable=import-outside-toplevel
  p, x, out, _, _ = reconstructed
  nodes = graph.trace(p.qmodel, out, x)
  path = str(tmp_path / "adaround.onnx")
  onnx.save(export_onnx.to_qdq(nodes, (None,) + x.shape[1:]), path)
  sess, _ = runtime.session_and_ops(path)
  sim = np.asarray(jax.jit(p.qmodel.apply)(out, x))
  assert np.mean(runtime.logits(sess, x).argmax(-1) == sim.argmax(-1)) >= 0.95
  # The benchmark's deployment step, with the integer reference switched off (0 images).
  from benchmarks import adaround_onnx  # pylint: disable=import-outside-toplevel
  pred = sim.argmax(-1)
  d = adaround_onnx._deploy(p.qmodel, out, x, pred, pred, 0)  # pylint: disable=protected-access
  assert d["integer_examples"] == 0 and "integer_agreement_pct" not in d
  assert d["ort_agreement_pct"] >= 95.0


def test_onnx_benchmark_refuses_a_negative_integer_count():
  from benchmarks import adaround_onnx  # pylint: disable=import-outside-toplevel
  from configs.fashion_mnist import peers  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="--integer_examples must be >= 0"):
    adaround_onnx.run(peers.get_config("smoke"), "w4a8_per_channel", integer_examples=-1)


@pytest.mark.slow
def test_onnx_benchmark_runs_the_main_jobs_method(tiny_ckpt):
  """benchmarks/adaround_onnx.py on tiny_net: the PTQ starts and ``ptq_adaround``
  come from the main job's inputs and registry, and ONNX Runtime and the integer
  reference agree with fake quant."""
  from benchmarks import adaround_onnx  # pylint: disable=import-outside-toplevel
  from configs.fashion_mnist import peers  # pylint: disable=import-outside-toplevel
  c = peers.get_config("smoke")
  c.model_checkpoint = tiny_ckpt
  c.methods = ("ptq_minmax", "ptq_percentile", "ptq_adaround", "fat")
  c.eval_examples, c.calibration_images, c.calibration_batch_size = 200, 32, 32
  c.fat.train_fraction, c.fat.holdout_images = 0.001, 0  # 60 unlabeled images
  out = adaround_onnx.run(c, "w4a8_per_channel", integer_examples=50)
  assert out["method"] == "ptq_adaround" and out["init"] in ("ptq_minmax", "ptq_percentile")
  assert out["adaround_images"] == 32 and out["steps"] == out["units"] * 5
  assert out["eval_examples"] == 200 and out["integer_examples"] == 50
  assert out["ort_agreement_pct"] >= 95.0 and out["integer_agreement_pct"] >= 95.0
  assert out["onnx_bytes"] > 0 and 0.0 <= out["fake_quant_top1_pct"] <= 100.0


@pytest.mark.slow
def test_qdrop_reads_the_float_inputs_it_is_given():
  """input="qdrop" at drop_prob 1 learns what input="float" learns (every
  element dropped to float); at 0.5 it learns something else."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from fat import pipeline, reconstruction  # pylint: disable=import-outside-toplevel
  model, x = tiny_net(), _images(32, 3)
  v = jax.jit(model.init)(jax.random.PRNGKey(3), x[:1])
  s = pipeline.Setting(name="w4a4", weight_bits=4, act_bits=4, per_channel=True)
  p = pipeline.prepare(model, v, pipeline.setting_rules(s), x, batch_size=32)

  def kernels(inp, drop=0.5):
    spec = reconstruction.ReconSpec(granularity="block", iterations=12, learning_rate=0.5,
                                    input=inp, drop_prob=drop)
    out = reconstruction.reconstruct(p.qmodel, p.variables, x, spec, batch_size=16)[0]
    return {k: np.asarray(a) for k, a in traverse_util.flatten_dict(out["params"],
                                                                    sep="/").items()}

  same = lambda a, b: all(np.array_equal(a[k], b[k]) for k in a)
  floats = kernels("float")
  assert same(kernels("qdrop", 1.0), floats)
  assert not same(kernels("qdrop", 0.5), floats)
