"""The paper's MNASNet release files (fat/models/tf_mnasnet.py, release naming).

The TF-hosted ``mnasnet_<w>_<size>_09_07_2018.tgz`` holds a frozen graph
(``*_frozen.pb``, the weights as ``Const`` nodes) and a checkpoint, under the
names the authors' extraction script reads (``mnasnet/stem/conv/tf_layer/kernel``,
``mnasnet/<cell>/op_0/expand_0/tf_layer/kernel``, ...). No copy of those files
is at hand: these tests synthesize them, at 1.0/224 and 0.5/224, as a TF graph
that computes MNASNet-B1 from those Consts (with the ``/read`` Identities,
epsilons and reduction indices a real frozen graph has too). Every tensor must
land in its place, each way of naming the file must give the same variables,
and our float logits must match the graph's own.
"""

import re
import tarfile

import jax
import numpy as np
import pytest
import tensorflow as tf

from fat import models
from fat.models import pretrained, tf_mnasnet

P = "mnasnet/"
# tensorflow/tpu mnasnet_b1 after its first block, written out independently of
# fat/models/mnasnet.py: (repeats, kernel, first stride, expansion, out channels).
STAGES = ((3, 3, 2, 3, 24), (3, 5, 2, 3, 40), (3, 5, 2, 6, 80), (2, 3, 1, 6, 96),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
BN = ("gamma", "beta", "moving_mean", "moving_variance")
SIZE = 64  # the logits check's image size


def round_filters(f, mult):
  """tensorflow/tpu's round_filters (depth divisor 8)."""
  new = max(8, int(f * mult + 4) // 8 * 8)
  return new + 8 if new < 0.9 * f * mult else new


def cells(width):
  """(scope, in, expanded, out channels, kernel, stride, residual) of cells 1..16; a stage's
  first cell is a ``lead_cell``."""
  out, cin, i = [], round_filters(16, width), 1
  for repeats, k, stride, e, c in STAGES:
    for rep in range(repeats):
      cout = round_filters(c, width)
      out.append((f"{'' if rep else 'lead_'}cell_{i}", cin, cin * e, cout, k,
                  1 if rep else stride, rep > 0))
      cin, i = cout, i + 1
  return out


def release_tensors(width, classes, seed=0):
  """Every weight of a release MNASNet-B1, by name: He-scaled kernels, BN near identity."""
  rng = np.random.default_rng(seed)
  t = {}

  def kernel(name, shape, depthwise=False):
    fan_in = shape[0] * shape[1] * (1 if depthwise else shape[2])
    t[P + name] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

  def norm(scope, c):
    for field, value in zip(BN, (rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                                 rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c))):
      t[f"{P}{scope}/tf_layer/{field}"] = value.astype(np.float32)

  c0, c16 = round_filters(32, width), round_filters(16, width)
  kernel("stem/conv/tf_layer/kernel", (3, 3, 3, c0))
  norm("stem/bn", c0)
  kernel("lead_cell_0/op_0/depthwise_0/depthwise_kernel", (3, 3, c0, 1), depthwise=True)
  norm("lead_cell_0/op_0/bn1_0", c0)
  kernel("lead_cell_0/op_0/project_0/tf_layer/kernel", (1, 1, c0, c16))
  norm("lead_cell_0/op_0/bn2_0", c16)
  for scope, cin, cexp, cout, k, _, _ in cells(width):
    op = f"{scope}/op_0"
    kernel(f"{op}/expand_0/tf_layer/kernel", (1, 1, cin, cexp))
    norm(f"{op}/bn0_0", cexp)
    kernel(f"{op}/depthwise_0/depthwise_kernel", (k, k, cexp, 1), depthwise=True)
    norm(f"{op}/bn1_0", cexp)
    kernel(f"{op}/project_0/tf_layer/kernel", (1, 1, cexp, cout))
    norm(f"{op}/bn2_0", cout)
  kernel("lead_cell_17/op_0/conv2d_0/tf_layer/kernel", (1, 1, round_filters(320, width), 1280))
  norm("lead_cell_17/op_0/bn_0", 1280)
  t[P + "output/fc/tf_layer/kernel"] = rng.normal(0, 1280 ** -0.5, (1280, classes)).astype(
      np.float32)
  t[P + "output/fc/tf_layer/bias"] = rng.normal(0, 0.2, classes).astype(np.float32)
  return t


def forward(w, x, width):
  """MNASNet-B1 in TF ops on the release's weights ``w(name)``, TF "same" padding, BN eps 1e-3."""
  def bn(h, scope):
    return tf.nn.batch_normalization(h, *(w(f"{P}{scope}/tf_layer/{f}") for f in
                                          ("moving_mean", "moving_variance", "beta", "gamma")),
                                     variance_epsilon=1e-3)

  def conv(h, name, stride=1):
    return tf.nn.conv2d(h, w(P + name), stride, "SAME")

  def dw(h, name, stride=1):
    return tf.nn.depthwise_conv2d(h, w(P + name), (1, stride, stride, 1), "SAME")

  h = tf.nn.relu(bn(conv(x, "stem/conv/tf_layer/kernel", 2), "stem/bn"))
  op = "lead_cell_0/op_0"
  h = tf.nn.relu(bn(dw(h, f"{op}/depthwise_0/depthwise_kernel"), f"{op}/bn1_0"))
  h = bn(conv(h, f"{op}/project_0/tf_layer/kernel"), f"{op}/bn2_0")
  for scope, _, _, _, _, stride, residual in cells(width):
    op, inputs = f"{scope}/op_0", h
    h = tf.nn.relu(bn(conv(h, f"{op}/expand_0/tf_layer/kernel"), f"{op}/bn0_0"))
    h = tf.nn.relu(bn(dw(h, f"{op}/depthwise_0/depthwise_kernel", stride), f"{op}/bn1_0"))
    h = bn(conv(h, f"{op}/project_0/tf_layer/kernel"), f"{op}/bn2_0")
    h = h + inputs if residual else h
  op = "lead_cell_17/op_0"
  h = tf.nn.relu(bn(conv(h, f"{op}/conv2d_0/tf_layer/kernel"), f"{op}/bn_0"))
  h = tf.reduce_mean(h, axis=(1, 2))
  return tf.matmul(h, w(P + "output/fc/tf_layer/kernel")) + w(P + "output/fc/tf_layer/bias")


def frozen_graph(tensors, width, compute=True):
  """A frozen tf.Graph: each weight a ``Const`` (read through ``<name>/read``) and, with
  ``compute``, the network from ``input`` to ``logits``."""
  graph = tf.Graph()
  with graph.as_default():
    def w(name):
      return tf.identity(tf.constant(tensors[name], name=name), name=name + "/read")
    if compute:
      x = tf.compat.v1.placeholder(tf.float32, (None, None, None, 3), name="input")
      tf.identity(forward(w, x, width), name="logits")
    else:
      for name in tensors:
        w(name)
  consts = {n.name for n in graph.as_graph_def().node if n.op == "Const"}
  assert set(tensors) <= consts, sorted(set(tensors) - consts)[:5]  # the names are exact
  return graph


def write_pb(graph, path):
  with open(path, "wb") as f:
    f.write(graph.as_graph_def().SerializeToString())
  return str(path)


def save_tf_checkpoint(prefix, tensors):
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tensors[n] for n in names])
  return str(prefix)


def place(name, width):
  """Our variable's path and the source's transpose for a release tensor, written out."""
  index = {scope: i for i, (scope, *_) in enumerate(cells(width), start=1)}
  scope, *middle, leaf = name.removeprefix(P).split("/")
  if scope == "output":
    return ("params", "classifier", leaf), None
  op = "/".join(middle)
  part = next((p for key, p in (("expand_0", "expand"), ("bn0_0", "expand"),
                                ("depthwise_0", "dw"), ("bn1_0", "dw"),
                                ("project_0", "project"), ("bn2_0", "project")) if key in op),
              None)
  if scope in ("stem", "lead_cell_17"):
    unit = ("stem",) if scope == "stem" else ("head",)
  elif scope == "lead_cell_0":
    unit = ("sep_dw",) if part == "dw" else ("sep_project",)
  else:
    unit = (f"block_{index[scope] - 1}", part)
  if leaf in ("kernel", "depthwise_kernel"):
    return ("params", *unit, "conv", "kernel"), (0, 1, 3, 2) if leaf == "depthwise_kernel" else None
  col, var = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
              "moving_mean": ("batch_stats", "mean"),
              "moving_variance": ("batch_stats", "var")}[leaf]
  return (col, *unit, "bn", var), None


def flat(variables):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(variables)}


@pytest.fixture(scope="module", params=[1.0, 0.5], ids=["1.0-224", "0.5-224"])
def release(request, tmp_path_factory):
  """The files of ``mnasnet_<w>_224_09_07_2018.tgz`` as synthesized here, and the graph's
  logits on ``SIZE``-px images."""
  width = request.param
  tensors = release_tensors(width, 1001, seed=int(width * 10))
  graph = frozen_graph(tensors, width)
  root = tmp_path_factory.mktemp(f"release_{width}")
  folder = root / f"mnasnet_{width}_224"
  folder.mkdir()
  pb = write_pb(graph, folder / f"mnasnet_{width}_224_frozen.pb")
  ckpt = save_tf_checkpoint(folder / f"mnasnet_{width}_224.ckpt", tensors)
  tgz = str(root / f"mnasnet_{width}_224_09_07_2018.tgz")
  with tarfile.open(tgz, "w:gz", compresslevel=1) as tar:
    tar.add(folder, arcname=f"mnasnet_{width}_224")
  x = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  with tf.compat.v1.Session(graph=graph) as sess:
    logits = sess.run("logits:0", {"input:0": x})
  return dict(width=width, tensors=tensors, pb=pb, folder=str(folder), ckpt=ckpt, tgz=tgz, x=x,
              logits=logits, loaded=pretrained.load("tf_mnasnet", pb))


@pytest.mark.slow
def test_every_release_tensor_lands_in_its_place(release):
  name, kwargs, variables = release["loaded"]
  assert name == "mnasnet" and "tf_mnasnet" in models.REGISTRY[name].pretrained
  assert kwargs["width"] == release["width"] and kwargs["num_classes"] == 1000
  assert (kwargs["padding"], kwargs["bn_eps"]) == ("same", 1e-3)
  ours = flat(variables)
  assert len(ours) == len(release["tensors"])  # one variable per tensor, none left over
  for src, value in release["tensors"].items():
    path, perm = place(src, release["width"])
    want = value if perm is None else value.transpose(perm)
    if path[1] == "classifier":  # class 0, "background", is dropped
      want = want[..., 1:]
    key = "".join(f"[{k!r}]" for k in path)
    np.testing.assert_array_equal(ours[key], want, err_msg=src)


@pytest.mark.slow
def test_every_path_to_the_release_imports_the_same(release):
  ref = flat(release["loaded"][2])
  index = release["ckpt"] + ".index"
  for path in (release["folder"], release["tgz"], release["ckpt"], index):
    _, kwargs, variables = pretrained.load("tf_mnasnet", path)
    assert kwargs == release["loaded"][1], path
    got = flat(variables)
    assert got.keys() == ref.keys(), path
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{path}: {k}")


@pytest.mark.slow
@pytest.mark.parametrize("release", [0.5], indirect=True, ids=["0.5-224"])
def test_release_logits_match_the_frozen_graph(release):
  """One forward (the 1.0 graph's variables are checked tensor by tensor above)."""
  name, kwargs, variables = release["loaded"]
  model = models.create(name, **kwargs)
  ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables,
                                                                          release["x"]))
  ref = release["logits"][:, 1:]
  assert 1 < np.abs(ref).max() < 1e3  # a meaningful comparison scale
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_plain_bn_scopes_are_accepted():
  """BN fields directly in their scope (``.../bn0_0/gamma``), no ``tf_layer``."""
  tensors = release_tensors(0.5, 10)
  plain = {re.sub(r"/tf_layer/(gamma|beta|moving_mean|moving_variance)$", r"/\1", n): v
           for n, v in tensors.items()}
  assert "mnasnet/cell_2/op_0/bn1_0/gamma" in plain
  ref = flat(tf_mnasnet.import_tf_mnasnet(tensors)[1])
  got = flat(tf_mnasnet.import_tf_mnasnet(plain)[1])
  assert got.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_a_missing_release_tensor_is_named(tmp_path):
  tensors = release_tensors(0.5, 10)
  gone = "mnasnet/cell_11/op_0/bn1_0/tf_layer/moving_mean"  # cell_11 must not be lead_cell_1's
  del tensors[gone]
  path = write_pb(frozen_graph(tensors, 0.5, compute=False), tmp_path / "m_frozen.pb")
  with pytest.raises(ValueError) as e:
    pretrained.load("tf_mnasnet", str(tmp_path))
  msg = str(e.value)
  assert gone in msg and "missing (1)" in msg and "unexpected" not in msg
  assert f"frozen graph {path}" in msg and "release naming" in msg


def test_a_graph_that_is_not_mnasnet_is_explained(tmp_path):
  graph = frozen_graph({"resnet/conv1/kernel": np.zeros((7, 7, 3, 64), np.float32)}, 1.0,
                       compute=False)
  path = write_pb(graph, tmp_path / "resnet_frozen.pb")
  with pytest.raises(ValueError, match="(?s)no MNASNet stem kernel.*stem/conv/tf_layer/kernel"
                                       ".*resnet/conv1/kernel"):
    pretrained.load("tf_mnasnet", path)
  junk = tmp_path / "junk_frozen.pb"
  junk.write_bytes(b"\xff" * 64)
  with pytest.raises(ValueError, match="not a binary TF GraphDef"):
    pretrained.load("tf_mnasnet", str(junk))
  with pytest.raises(ValueError, match="several frozen graphs.*set pretrained.path"):
    pretrained.load("tf_mnasnet", str(tmp_path))
