"""Data parallelism with ``jax.sharding.Mesh`` + ``NamedSharding`` (multi-host ready).

The mesh has one ``data`` axis over every device of every process. Parameters
and method state are replicated (``P()``); batches are split on their batch
axis (``P("data")``, or ``P(None, "data")`` for a chunk of stacked steps).
On multi-host runs each process passes only its own rows: arrays are assembled
with ``jax.make_array_from_process_local_data``, so no process ever holds the
global batch. Start multi-host runs with ``jax.distributed.initialize()`` (see
:func:`maybe_initialize_distributed`) before building the mesh.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
  """Call ``jax.distributed.initialize()`` when a multi-process launch is detected.

  Detection: ``CLX_COORDINATOR`` (``host:port``) with ``CLX_NUM_PROCESSES`` and
  ``CLX_PROCESS_ID``, or the cluster environments JAX auto-detects (TPU pods,
  SLURM, …) when ``CLX_DISTRIBUTED=1``. Single-process runs do nothing.
  """
  if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
    return
  coord = os.environ.get("CLX_COORDINATOR")
  if coord:
    jax.distributed.initialize(coordinator_address=coord,
                               num_processes=int(os.environ["CLX_NUM_PROCESSES"]),
                               process_id=int(os.environ["CLX_PROCESS_ID"]))
  elif os.environ.get("CLX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def make_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
  """A 1-D ``data`` mesh over ``devices`` (default: all global devices).

  An int ``n`` takes the first ``n`` devices (used to compare 1 vs 4 devices).
  """
  if devices is None:
    devices = jax.devices()
  elif isinstance(devices, int):
    if not 1 <= devices <= jax.device_count():
      raise ValueError(f"asked for {devices} devices, {jax.device_count()} available")
    devices = jax.devices()[:devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  spec = [None] * batch_axis + [DATA_AXIS]
  return NamedSharding(mesh, P(*spec))


def replicate(tree, mesh: Mesh):
  """Place a pytree replicated on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def num_data_shards(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]


def process_rows(global_batch: int, mesh: Mesh) -> slice:
  """The rows of a global batch this process supplies (contiguous block).

  With P processes each owning D/P of the mesh's devices, process ``p`` feeds
  rows ``[p·B/P, (p+1)·B/P)``, matching the device order of the mesh.
  """
  nproc = jax.process_count()
  if global_batch % nproc:
    raise ValueError(f"global batch {global_batch} not divisible by {nproc} processes")
  per = global_batch // nproc
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def shard_arrays(local: dict[str, np.ndarray], mesh: Mesh, batch_axis: int, global_batch: int):
  """Assemble globally sharded arrays from this process's rows."""
  sharding = data_sharding(mesh, batch_axis)
  out = {}
  for k, v in local.items():
    shape = list(v.shape)
    shape[batch_axis] = global_batch
    out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(shape))
  return out


def pad_to_multiple(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
