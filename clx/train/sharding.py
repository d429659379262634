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
    missing = [k for k in ("CLX_NUM_PROCESSES", "CLX_PROCESS_ID") if not os.environ.get(k)]
    if missing:
      raise ValueError(f"CLX_COORDINATOR={coord} needs {' and '.join(missing)} too (every "
                       "process gets the same CLX_NUM_PROCESSES and its own CLX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address=coord,
                               num_processes=int(os.environ["CLX_NUM_PROCESSES"]),
                               process_id=int(os.environ["CLX_PROCESS_ID"]))
  elif os.environ.get("CLX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def make_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
  """A 1-D ``data`` mesh over ``devices`` (default: all global devices).

  An int ``n`` takes the first ``n`` devices (used to compare 1 vs 4 devices).
  On multi-process runs the mesh must hold devices of every process, since
  each process feeds its own rows of every batch.
  """
  if devices is None:
    devices = jax.devices()
  elif isinstance(devices, int):
    if not 1 <= devices <= jax.device_count():
      raise ValueError(f"asked for {devices} devices, {jax.device_count()} available")
    devices = jax.devices()[:devices]
  absent = sorted(set(range(jax.process_count())) - {d.process_index for d in devices})
  if absent:
    raise ValueError(f"the mesh's {len(devices)} devices leave out processes {absent} of "
                     f"{jax.process_count()}; every process must own devices of the mesh")
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


def process_rows(global_batch: int, mesh: Mesh) -> slice | np.ndarray:
  """The rows of a global batch that this process supplies, in increasing order.

  They are the rows that :func:`data_sharding` places on this process's
  devices of ``mesh``: ``jax.make_array_from_process_local_data`` puts the
  local rows, in order, at exactly those positions, so the global batch on the
  devices is the global batch of the index plan whatever the device order.
  A slice when the rows are contiguous (always with one process; with several,
  when each process's devices are adjacent in the mesh), else an index array.
  """
  if jax.process_count() == 1:
    return slice(0, global_batch)
  shards = num_data_shards(mesh)
  if global_batch % shards:
    raise ValueError(f"global batch {global_batch} not divisible by the mesh's {shards} devices")
  per = global_batch // shards
  index_map = data_sharding(mesh).addressable_devices_indices_map((global_batch,))
  starts = sorted({idx[0].start or 0 for idx in index_map.values()})
  if not starts:
    raise ValueError(f"process {jax.process_index()} owns no device of the mesh")
  rows = np.concatenate([np.arange(s, s + per) for s in starts])
  if rows[-1] - rows[0] + 1 == len(rows):
    return slice(int(rows[0]), int(rows[-1]) + 1)
  return rows


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

