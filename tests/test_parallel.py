"""Data parallelism (fat/parallel.py): two devices train the same thresholds as one.

Runs in a subprocess with ``--xla_force_host_platform_device_count=2``: XLA
flags must be set before JAX starts. The two runs differ only in how XLA
partitions the batch, hence in float summation order: float training steps
agree to float64 rounding, and FAT steps give the same thresholds to float32
rounding (the quantizer's grid is float32). The network is three of
MobileNet-v2's blocks (``tiny_net`` in conftest.py): BatchNorm, depthwise and
residual layers, at a fraction of the whole network's compile time.

Both run in float64. In float32 the partitioned program may sum a conv in
another order; a last-bit difference can move a value across a rounding
boundary, where the straight-through gradient jumps by one grid step, and
training amplifies it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a subprocess with two devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
sys.path.insert(0, "tests")
from conftest import tiny_net
from fat import float_training, parallel, pipeline, quant, rules, steps, variables
from fat.layers import TRAINABLE_COLLECTION

assert len(jax.devices()) == 2, jax.devices()
model = tiny_net()
rng = np.random.default_rng(0)
x = rng.uniform(-1, 1, (48, 28, 28, 1)).astype(np.float32)
y = rng.integers(0, 10, 48)
v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
meshes = {1: parallel.data_mesh(jax.devices()[:1]), 2: parallel.data_mesh(jax.devices())}
out = {}

# Float training (BatchNorm statistics over the global batch): 3 SGD steps, in
# float64: a random-init BN network is ill-conditioned enough that float32
# summation order alone moves its gradients by ~1%.
jax.config.update("jax_enable_x64", True)
model64 = tiny_net(dtype=jnp.float64)
v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), v)
tx = optax.sgd(0.1)
step = float_training.make_train_step(model64, tx)
params = {}
for n, mesh in meshes.items():
  p, st = parallel.replicate((v64["params"], v64["batch_stats"]), mesh)
  o = tx.init(p)
  for i in range(3):
    sl = slice(16 * i, 16 * (i + 1))
    p, st, o, _ = step(p, st, o, parallel.shard_batch(x[sl].astype(np.float64), mesh),
                       parallel.shard_batch(y[sl], mesh))
  params[n] = (jax.tree.map(np.asarray, p), jax.tree.map(np.asarray, st))
  out["devices_%d" % n] = len(parallel.shard_batch(x[:16], mesh).sharding.device_set)
d = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params[1], params[2])
out["float_max_diff"] = max(jax.tree.leaves(d))  # params and BN statistics are O(1)
out["float_moved"] = max(jax.tree.leaves(jax.tree.map(
    lambda a, b: float(np.max(np.abs(a - np.asarray(b)))), params[1][0], v["params"])))

# FAT: 3 threshold-training steps, also in float64, so that both partitions
# compute bit-identical activations (the quantizer grid is float32: float32
# activations summed in another order would move some values across rounding
# boundaries, and the straight-through gradient jumps there). SGD, because
# Adam scales gradients that are zero up to summation order to full-size steps.
r = rules.uniform_rules(weight=quant.QuantSpec(bits=4, per_channel=True),
                        act=quant.QuantSpec(bits=8))
x64 = x.astype(np.float64)
prep = pipeline.prepare(model64, v64, r, x64, batch_size=len(x64))
qmodel, qvars = prep.qmodel, prep.variables
teacher = np.asarray(jax.jit(prep.fmodel.apply)(prep.folded, x64))
part = variables.partition(qvars)
fat_tx = optax.sgd(1.0)
fat_step = steps.make_fat_step(qmodel, fat_tx)
res = {}
for n, mesh in meshes.items():
  t, fz = parallel.replicate((part.trainable, part.frozen), mesh)
  o = parallel.replicate(fat_tx.init(t), mesh)
  losses = []
  for i in range(3):
    sl = slice(16 * i, 16 * (i + 1))
    t, o, m = fat_step(t, o, fz, parallel.shard_batch(x64[sl], mesh),
                       parallel.shard_batch(teacher[sl], mesh))
    losses.append(float(m["loss"]))
  res[n] = (losses, np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)]))
t0 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(qvars[TRAINABLE_COLLECTION])])
out["fat_losses"] = [res[1][0], res[2][0]]
out["fat_moved"] = float(np.max(np.abs(res[1][1] - t0)))
out["fat_max_diff"] = float(np.max(np.abs(res[1][1] - res[2][1])))
u1, u2 = res[1][1] - t0, res[2][1] - t0
out["fat_update_rel_diff"] = float(np.linalg.norm(u1 - u2) / np.linalg.norm(u1))
jax.config.update("jax_enable_x64", False)
print(json.dumps(out))
"""


def test_two_devices_match_one():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["devices_1"] == 1 and out["devices_2"] == 2  # the batch really was split
  # Float steps (BatchNorm over the global batch) agree to float rounding.
  assert out["float_moved"] > 1e-2
  assert out["float_max_diff"] < 1e-8, out
  # FAT: after 3 steps the thresholds agree to float32 rounding (alpha is
  # float32: a one-ulp difference, 1.2e-7, in a few entries), and they moved.
  np.testing.assert_allclose(out["fat_losses"][0], out["fat_losses"][1], rtol=1e-6)
  assert out["fat_moved"] > 1e-2, out
  assert out["fat_max_diff"] <= 5e-7, out
  assert out["fat_update_rel_diff"] < 1e-4, out


def test_batch_must_split_over_devices():
  import jax
  from fat import parallel
  mesh = parallel.data_mesh()
  n = len(jax.devices())
  x = np.zeros((n, 3), np.float32)
  assert parallel.shard_batch(x, mesh).shape == (n, 3)
  if n > 1:
    with pytest.raises(ValueError, match="divisible"):
      parallel.shard_batch(np.zeros((n + 1, 3)), mesh)
