"""Tests of the Keras and timm weight importers (fat/models/keras_mobilenet_v2.py,
fat/models/timm_safetensors.py, on fat/models/importers.py).

Keras: a real ``keras.applications.MobileNetV2`` (Keras 3, JAX backend) with
every weight randomized, saved in each file format, must give our logits.
timm: torch is not needed; a safetensors file with random tensors of exactly
the names and shapes of timm's state dicts (tests/data/timm_state_dict_shapes.json,
dumped from timm itself) must be consumed whole, and defects must be named.
The numerical timm check is tools/check_timm.py (needs torch and timm).
"""

import json
import os
import pathlib

os.environ["KERAS_BACKEND"] = "jax"  # before keras is first imported

import h5py
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from fat import models
from fat.models import MNASNet, MobileNetV2, keras_mobilenet_v2, pretrained, timm_safetensors

DATA = pathlib.Path(__file__).parent / "data" / "timm_state_dict_shapes.json"
TOL = 1e-4
# Keras 3.15's JAX backend converts arrays through a deprecated numpy path.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def flat(variables):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(variables)}


# --------------------------------------------------------------------------
# Keras.
# --------------------------------------------------------------------------


def random_keras_value(path, shape, rng):
  """He-scaled kernels, BN near identity (var > 0): logits stay O(1)."""
  var = path.split("/")[-1]
  if var == "kernel":
    depthwise = len(shape) == 4 and shape[-1] == 1  # (kh, kw, C, 1)
    fan_in = np.prod(shape[:2]) if depthwise else np.prod(shape[:-1])
    return rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
  return {"gamma": lambda: rng.uniform(0.5, 1.5, shape),
          "beta": lambda: rng.normal(0.0, 0.2, shape),
          "moving_mean": lambda: rng.normal(0.0, 0.2, shape),
          "moving_variance": lambda: rng.uniform(0.5, 2.0, shape),
          "bias": lambda: rng.normal(0.0, 0.2, shape)}[var]()


def random_keras_mobilenet_v2(keras, alpha, size, seed):
  """A Keras MobileNetV2 with every weight random.

  Built in a stateless scope without initializing: Keras' JAX initializers
  compile once per shape (about 20 s on a CPU), and all weights are assigned here.
  """
  with keras.StatelessScope(initialize_variables=False):
    model = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=alpha, weights=None, classifier_activation=None)
  rng = np.random.default_rng(seed)
  for w in model.weights:
    w.assign(random_keras_value(w.path, tuple(w.shape), rng).astype(np.float32))
  from keras.src.backend.common import global_state  # pylint: disable=import-outside-toplevel
  global_state.set_global_attribute("uninitialized_variables", [])
  return model


def save_keras2_weights(model, path, skip=()):
  """The Keras 2 weights-only HDF5 layout of the published ImageNet files.

  Root ``layer_names``; per layer ``weight_names`` such as 'Conv1/kernel:0'
  or 'block_1_depthwise/depthwise_kernel:0', each a dataset under the layer.
  """
  with h5py.File(path, "w") as f:
    layers = [l for l in model.layers if l.name not in skip]
    f.attrs["layer_names"] = [l.name.encode() for l in layers]
    f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.4.0"
    for layer in layers:
      g = f.create_group(layer.name)
      dw = type(layer).__name__ == "DepthwiseConv2D"
      names = [f"{layer.name}/{'depthwise_kernel' if dw and w.name == 'kernel' else w.name}:0"
               for w in layer.weights]
      g.attrs["weight_names"] = [n.encode() for n in names]
      for name, w in zip(names, layer.weights):
        g.create_dataset(name, data=np.asarray(w.value))


@pytest.fixture(scope="module", params=[(1.0, 224), (0.35, 96)], ids=["w1.0-224px", "w0.35-96px"])
def keras_case(request, tmp_path_factory):
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip("needs Keras on the JAX backend")
  alpha, size = request.param
  model = random_keras_mobilenet_v2(keras, alpha, size, seed=int(alpha * 100))
  d = tmp_path_factory.mktemp(f"keras_{alpha}")
  files = {"keras": d / "m.keras", "weights.h5": d / "m.weights.h5",
           "full.h5": d / "m.h5", "keras2.h5": d / "keras2.h5"}
  model.save(files["keras"])
  model.save_weights(files["weights.h5"])
  model.save(files["full.h5"])
  save_keras2_weights(model, files["keras2.h5"])
  x = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  logits = np.asarray(model.predict(x, verbose=0))
  ours = keras_mobilenet_v2.load_keras_mobilenet_v2(files["keras"])
  return dict(alpha=alpha, model=model, files=files, x=x, logits=logits, dir=d, ours=ours)


def test_keras_logits_match(keras_case):
  model, variables = keras_case["ours"]
  assert isinstance(model, MobileNetV2)
  assert (model.width, model.num_classes) == (keras_case["alpha"], 1000)
  assert (model.padding, model.bn_eps) == ("same", 1e-3)
  ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables,
                                                                          keras_case["x"]))
  ref = keras_case["logits"]
  assert 0.5 < np.abs(ref).max() < 100  # a meaningful comparison scale
  np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("fmt", ["weights.h5", "full.h5", "keras2.h5"])
def test_keras_formats_agree(keras_case, fmt):
  _, ref = keras_case["ours"]
  model, got = keras_mobilenet_v2.load_keras_mobilenet_v2(keras_case["files"][fmt])
  assert model.width == keras_case["alpha"]
  ref, got = flat(ref), flat(got)
  assert ref.keys() == got.keys()
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_keras_every_tensor_consumed(keras_case):
  tensors = keras_mobilenet_v2.read_keras_weights(keras_case["files"]["keras"])
  assert len(tensors) == len(keras_case["model"].weights)
  _, variables = keras_mobilenet_v2.import_keras_mobilenet_v2(tensors)
  assert sum(a.size for a in tensors.values()) == sum(a.size for a in flat(variables).values())


def test_keras_defects_are_named(keras_case):
  tensors = keras_mobilenet_v2.read_keras_weights(keras_case["files"]["keras"])
  bad = {k: v for k, v in tensors.items() if k != "block_7_depthwise_BN/moving_variance"}
  with pytest.raises(ValueError, match="(?s)missing.*block_7_depthwise_BN/moving_variance"):
    keras_mobilenet_v2.import_keras_mobilenet_v2(bad)
  bad = dict(tensors, **{"block_99_project/kernel": np.zeros((1, 1, 8, 8), np.float32)})
  with pytest.raises(ValueError, match="(?s)unexpected.*block_99_project/kernel"):
    keras_mobilenet_v2.import_keras_mobilenet_v2(bad)
  bad = dict(tensors, **{"block_3_expand/kernel": np.zeros((1, 1, 8, 7), np.float32)})
  with pytest.raises(ValueError, match=r"(?s)mis-shaped.*block_3_expand/kernel: \(1, 1, 8, 7\)"):
    keras_mobilenet_v2.import_keras_mobilenet_v2(bad)


def test_keras_without_classifier_is_refused(keras_case):
  path = keras_case["dir"] / "notop.h5"
  save_keras2_weights(keras_case["model"], path, skip=("predictions",))
  with pytest.raises(ValueError, match="(?s)no classifier.*include_top=False"):
    keras_mobilenet_v2.load_keras_mobilenet_v2(path)


# --------------------------------------------------------------------------
# timm.
# --------------------------------------------------------------------------


def timm_shapes(arch):
  return json.loads(DATA.read_text())["archs"][arch]


def random_state_dict(arch, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape, dtype in timm_shapes(arch):
    if dtype == "int64":
      out[name] = np.array(rng.integers(0, 1000), np.int64).reshape(shape)
    elif name.endswith("running_var"):
      out[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      out[name] = rng.normal(size=shape).astype(np.float32)
  return out


# (timm tensor, our variable, transpose) spot checks of the name mapping.
TIMM_SPOTS = {
    "mobilenetv2_100": [
        ("conv_stem.weight", "['params']['stem']['conv']['kernel']", (2, 3, 1, 0)),
        ("bn1.running_var", "['batch_stats']['stem']['bn']['var']", None),
        ("blocks.0.0.conv_dw.weight", "['params']['block_0']['dw']['conv']['kernel']", (2, 3, 1, 0)),
        ("blocks.0.0.bn2.weight", "['params']['block_0']['project']['bn']['scale']", None),
        ("blocks.1.0.conv_pw.weight", "['params']['block_1']['expand']['conv']['kernel']", (2, 3, 1, 0)),
        ("blocks.2.2.bn2.running_mean", "['batch_stats']['block_5']['dw']['bn']['mean']", None),
        ("blocks.6.0.conv_pwl.weight", "['params']['block_16']['project']['conv']['kernel']", (2, 3, 1, 0)),
        ("bn2.bias", "['params']['head']['bn']['bias']", None),
        ("classifier.weight", "['params']['classifier']['kernel']", (1, 0)),
    ],
    "mnasnet_100": [
        ("conv_stem.weight", "['params']['stem']['conv']['kernel']", (2, 3, 1, 0)),
        ("blocks.0.0.conv_dw.weight", "['params']['sep_dw']['conv']['kernel']", (2, 3, 1, 0)),
        ("blocks.0.0.bn2.running_var", "['batch_stats']['sep_project']['bn']['var']", None),
        ("blocks.1.0.conv_pw.weight", "['params']['block_0']['expand']['conv']['kernel']", (2, 3, 1, 0)),
        ("blocks.2.1.conv_dw.weight", "['params']['block_4']['dw']['conv']['kernel']", (2, 3, 1, 0)),
        ("blocks.5.3.bn3.weight", "['params']['block_14']['project']['bn']['scale']", None),
        ("blocks.6.0.conv_pwl.weight", "['params']['block_15']['project']['conv']['kernel']", (2, 3, 1, 0)),
        ("classifier.bias", "['params']['classifier']['bias']", None),
    ],
}


@pytest.mark.parametrize("arch", sorted(timm_safetensors.TIMM_ARCHS))
def test_timm_consumes_every_tensor(arch, tmp_path):
  sd = random_state_dict(arch)
  path = tmp_path / "model.safetensors"
  save_file(sd, str(path))
  model, variables = timm_safetensors.load_timm_safetensors(path, arch)
  assert isinstance(model, {"mobilenetv2_100": MobileNetV2, "mnasnet_100": MNASNet}[arch])
  assert (model.num_classes, model.padding, model.bn_eps) == (1000, "symmetric", 1e-5)
  ours = flat(variables)
  # Random values are distinct: each float tensor must reappear as exactly one
  # variable, with the same values (any layout), and no variable is left over.
  by_values = {}
  for key, v in ours.items():
    by_values.setdefault(np.sort(v, axis=None).tobytes(), []).append(key)
  floats = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  assert len(floats) == len(ours)
  for name, t in floats.items():
    keys = by_values.get(np.sort(t, axis=None).astype(np.float32).tobytes(), [])
    assert len(keys) == 1, name
  for name, key, perm in TIMM_SPOTS[arch]:
    want = sd[name] if perm is None else sd[name].transpose(perm)
    np.testing.assert_array_equal(ours[key], want, err_msg=name)


@pytest.mark.parametrize("arch", sorted(timm_safetensors.TIMM_ARCHS))
def test_pretrained_load_names_the_model_from_the_registry(arch, tmp_path):
  """``pretrained.load`` returns the ``fat.models.REGISTRY`` name, whose entry lists
  the format, and kwargs that rebuild the same variable tree."""
  path = tmp_path / "model.safetensors"
  save_file(random_state_dict(arch), str(path))
  name, kwargs, variables = pretrained.load("timm", str(path), arch)
  assert name == {"mobilenetv2_100": "mobilenet_v2", "mnasnet_100": "mnasnet"}[arch]
  assert "timm" in models.REGISTRY[name].pretrained
  model = models.create(name, **kwargs)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(np.shape, variables)


@pytest.mark.parametrize("arch", sorted(timm_safetensors.TIMM_ARCHS))
def test_timm_defects_are_named(arch, tmp_path):
  sd = random_state_dict(arch)
  cases = {
      "missing": ({k: v for k, v in sd.items() if k != "blocks.3.1.bn2.running_var"},
                  "(?s)missing.*blocks.3.1.bn2.running_var"),
      "unexpected": (dict(sd, **{"blocks.9.0.conv_pw.weight": np.zeros((4, 4, 1, 1), np.float32)}),
                     "(?s)unexpected.*blocks.9.0.conv_pw.weight"),
      "misshaped": (dict(sd, **{"conv_head.weight": np.zeros((1280, 320), np.float32)}),
                    r"(?s)mis-shaped.*conv_head.weight: \(1280, 320\), expected \(1280, 320, 1, 1\)"),
      "noclassifier": ({k: v for k, v in sd.items() if not k.startswith("classifier.")},
                       "no classifier"),
  }
  for kind, (tensors, pattern) in cases.items():
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=pattern):
      timm_safetensors.load_timm_safetensors(path, arch)
  # num_batches_tracked is optional.
  _, variables = timm_safetensors.import_timm(
      {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, arch)
  assert len(flat(variables)) == len([k for k in sd if not k.endswith("num_batches_tracked")])


def test_timm_unknown_arch():
  with pytest.raises(ValueError, match="mobilenetv2_100"):
    timm_safetensors.import_timm({}, "resnet50")
