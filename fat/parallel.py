"""Data parallelism over every device of every host, with ``jax.sharding``.

    mesh = parallel.data_mesh()               # 1-D mesh over jax.devices(), axis "data"
    state = parallel.replicate(state, mesh)   # params, thresholds, optimizer state
    x = parallel.shard_batch(x, mesh)         # the global batch, split on axis 0

The jitted steps are unchanged: given a sharded batch and replicated state,
XLA partitions the computation and turns the batch means of the loss and
gradients into all-reduces. On one device this is a no-op.

Multi-host: launch one process per host with the usual ``jax.distributed``
environment (coordinator address, process count and id, or a cluster JAX
detects) and call ``initialize_distributed()`` first. Every process then
draws the same global batches and ``shard_batch`` keeps its own rows.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when launched as a multi-process job.

  Detected from ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``) or a cluster environment JAX recognizes (SLURM, ...).
  Single-process runs skip it.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()


def data_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree, mesh: Mesh):
  """``tree`` on every device of ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def unreplicate(tree):
  """A replicated ``tree`` as plain arrays on the default device: functions
  jitted for unreplicated inputs (evaluation) are then reused, not recompiled."""
  return jax.tree.map(jnp.asarray, jax.device_get(tree))


def shard_batch(x, mesh: Mesh):
  """The global batch ``x`` as one array split over ``mesh`` on axis 0.

  Every process passes the same global batch (the loops draw it from the same
  seed); each contributes its contiguous slice, the rows its devices hold. So
  a step sees the configured batch however many processes run it.
  """
  n = mesh.devices.size
  x = np.asarray(x)
  if x.shape[0] % n:
    raise ValueError(f"a batch of {x.shape[0]} does not split over {n} devices; "
                     f"use a batch size divisible by {n}.")
  rows = x.shape[0] // jax.process_count()
  local = x[jax.process_index() * rows:(jax.process_index() + 1) * rows]
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  return jax.make_array_from_process_local_data(sharding, local, x.shape)
