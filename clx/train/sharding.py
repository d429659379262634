"""Data parallelism with ``jax.sharding.Mesh`` + ``NamedSharding`` (multi-host ready).

The mesh has a ``data`` axis over every device of every process, and a
``model`` axis too when tensor parallelism is asked for (:func:`make_mesh`
with ``model_parallel > 1``: shape ``(devices // model_parallel,
model_parallel)``). Batches are split on their batch axis over ``data``
(``P("data")``, or ``P(None, "data")`` for a chunk of stacked steps) and
repeated along ``model``.

Where the frozen backbone and the method state live is chosen by
``TrainConfig.param_sharding`` (:data:`PARAM_SHARDINGS`):

- ``"replicated"`` (default): every device holds the whole backbone and state.
- ``"fsdp"``: each backbone parameter with >= 1024 elements is split along its
  largest dimension divisible by the device count, over *all* mesh axes
  (:func:`clx.models.partitioning.fsdp_rules`; ZeRO-3 style: XLA gathers the
  shards where a layer uses them).
- ``"tensor"``: Megatron tensor parallelism on the ``model`` axis
  (:func:`clx.models.partitioning.transformer_rules`: heads, MLP hidden units
  and vocabularies of ViT, BERT and Llama split; other parameters and other
  models replicated); the ``data`` axis holds copies.
- ``"tensor_fsdp"``: the same, with the other dimension of each split matrix
  also split over ``data`` (2-D sharding: one copy of the weights in total).

Method state (per-task adapters, GPM memories, Fisher, prototypes) follows one
rule, :func:`state_shardings`: replicated under ``"replicated"``; otherwise
each array with at least :data:`STATE_SHARD_MIN_ELEMENTS` elements is split
along its largest dimension divisible by the device count (over all mesh
axes), and smaller arrays (heads, bases of small models, scalars) are
replicated. Trainable parameters and optimizer state stay replicated (they
are adapters, small next to the backbone). Placement never changes the
numbers beyond float reduction order.
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
MODEL_AXIS = "model"
PARAM_SHARDINGS = ("replicated", "fsdp", "tensor", "tensor_fsdp")
STATE_SHARD_MIN_ELEMENTS = 1 << 18
"""Method-state arrays of at least this many elements (1 MiB of float32) are sharded
(non-replicated modes)."""


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


def make_mesh(devices: Sequence[jax.Device] | int | None = None, *,
              model_parallel: int = 1) -> Mesh:
  """A ``data`` mesh over ``devices`` (default: all global devices).

  An int ``n`` takes the first ``n`` devices (used to compare 1 vs 4 devices).
  On multi-process runs the mesh must hold devices of every process, since
  each process feeds its own rows of every batch.

  Args:
    devices: the devices, their number, or ``None`` for all.
    model_parallel: > 1 gives a 2-D mesh ``("data", "model")`` of shape
      ``(n // model_parallel, model_parallel)`` (adjacent devices share a
      ``model`` group); 1 gives the 1-D ``("data",)`` mesh.
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
  if isinstance(model_parallel, bool) or not isinstance(model_parallel, (int, np.integer)) \
      or model_parallel < 1 or len(devices) % model_parallel:
    raise ValueError(f"model_parallel must be a positive integer dividing the {len(devices)} "
                     f"devices, got {model_parallel!r}")
  if model_parallel == 1:
    return Mesh(np.asarray(devices), (DATA_AXIS,))
  grid = np.asarray(devices).reshape(len(devices) // model_parallel, model_parallel)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def _check_mode(mode: str) -> None:
  if mode not in PARAM_SHARDINGS:
    raise ValueError(f"param_sharding must be one of {PARAM_SHARDINGS}, got {mode!r}")


def param_rules(mode: str, mesh: Mesh):
  """The :mod:`clx.models.partitioning` rule set of a ``param_sharding`` mode on ``mesh``.

  Raises:
    ValueError: unknown mode, or ``"tensor"``/``"tensor_fsdp"`` on a mesh
      without a ``model`` axis (build it with ``make_mesh(model_parallel=k)``).
  """
  from clx.models import partitioning  # local: keeps this module importable without Flax models
  _check_mode(mode)
  if mode == "replicated":
    return ((r".*", P()),)
  if mode == "fsdp":
    return partitioning.fsdp_rules(tuple(mesh.axis_names))
  if MODEL_AXIS not in mesh.axis_names:
    raise ValueError(f"param_sharding={mode!r} needs a mesh with a {MODEL_AXIS!r} axis; mesh "
                     f"axes are {tuple(mesh.axis_names)} (set model_parallel > 1)")
  return partitioning.transformer_rules(MODEL_AXIS, DATA_AXIS if mode == "tensor_fsdp" else None)


def base_shardings(params, mesh: Mesh, mode: str = "replicated"):
  """``NamedSharding`` tree for the frozen backbone ``params`` (arrays or ShapeDtypeStructs)."""
  from clx.models import partitioning
  return partitioning.param_shardings(params, mesh, param_rules(mode, mesh))


def place_base(params, mesh: Mesh, mode: str = "replicated"):
  """The backbone's ``params`` placed on ``mesh`` as ``mode`` says (see the module docstring)."""
  return jax.device_put(params, base_shardings(params, mesh, mode))


def state_shardings(state, mesh: Mesh, mode: str = "replicated",
                    min_elements: int = STATE_SHARD_MIN_ELEMENTS):
  """``NamedSharding`` per leaf of method ``state`` (the rule in the module docstring).

  Args:
    state: method state pytree (arrays, scalars, ShapeDtypeStructs).
    mesh: the device mesh.
    mode: a ``param_sharding`` mode; ``"replicated"`` replicates everything.
    min_elements: smallest array that is split in the other modes.

  Returns:
    A tree like ``state`` of shardings: ``P()`` or one dimension split over
    every mesh axis (the largest divisible by the device count, first on ties).
  """
  _check_mode(mode)
  rep = replicated(mesh)
  if mode == "replicated":
    return jax.tree.map(lambda _: rep, state)
  axes = tuple(mesh.axis_names)

  def one(v):
    shape = tuple(np.shape(v))
    if not shape or int(np.prod(shape)) < min_elements:
      return rep
    dims = [d for d in range(len(shape)) if shape[d] % mesh.size == 0]
    if not dims:
      return rep
    dim = max(dims, key=lambda d: (shape[d], -d))
    return NamedSharding(mesh, P(*([None] * dim + [axes])))

  return jax.tree.map(one, state)


def place_state(state, mesh: Mesh, mode: str = "replicated"):
  """Method ``state`` placed on ``mesh`` by :func:`state_shardings`."""
  return jax.device_put(state, state_shardings(state, mesh, mode))


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

