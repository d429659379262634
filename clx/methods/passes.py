"""Host passes over data (evaluation, Fisher, representation and feature passes): one padding rule.

Every pass batches a split in order into fixed-shape batches so that one jit
compilation serves the whole split and the global batch divides the device
count. The last batch is short; it is **padded** with copies of a real
example, and the padding rows are **masked**:

- the 0/1 ``mask`` (b,) marks the real rows;
- the mask is handed to the model (``backbone.apply(..., mask=mask)``), so
  batch-statistic layers (:class:`clx.models.convnets.BatchStatNorm`, which
  normalise with the current batch's statistics also at test time) see the
  real rows only;
- sums over rows (correct counts, Fisher sums, Gram matrices) weight the
  padding rows by 0.

So each real example gets exactly the output of the official PyTorch loops,
which run the last batch alone at its own size (GPM/BECAME ``test``,
``compute_fisher_matrix_diag``). Models without batch statistics ignore the
mask, so passing it is always safe.

Linear algebra of a host pass (GPM/SGP/DualGPM memory updates, InfLoRA's design, the
RanPAC/PROTEUS ridge head's λ search and solve) runs
**once**, on one device: the loop keeps the method state replicated over the mesh, and a
jitted SVD or eigendecomposition of replicated arrays runs one copy per device (on 8
simulated CPU devices that is 8 SVDs fighting for the same cores). :func:`on_one_device`
moves the inputs to this process's first device, :func:`placed_like` puts the results back
with the placement of the values they replace.

A method's ``predict`` takes ``mask=`` (see :class:`clx.methods.base.ContinualMethod`);
:func:`predict_fn` adapts one that predates it and refuses it on a
batch-statistic backbone, where its outputs would depend on the padding.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def index_plan(n: int, batch_size: int, padded: int | None = None) -> np.ndarray:
  """Consecutive batches of ``range(n)`` as an index matrix, ``-1`` for padding rows.

  Args:
    n: number of examples (≥ 0).
    batch_size: real examples per batch (≥ 1); the last batch holds ``n mod batch_size``
      of them when that is not 0.
    padded: row count of every batch (≥ ``batch_size``; default ``batch_size``), e.g.
      ``batch_size`` rounded up to the device count.

  Returns:
    (ceil(n / batch_size), padded) int64 indices; ``-1`` marks padding.
  """
  padded = batch_size if padded is None else padded
  if batch_size < 1 or padded < batch_size:
    raise ValueError(f"need batch_size >= 1 and padded >= batch_size, got {batch_size}, {padded}")
  steps = math.ceil(n / batch_size)
  plan = np.full((steps, padded), -1, np.int64)
  for s in range(steps):
    rows = np.arange(s * batch_size, min((s + 1) * batch_size, n))
    plan[s, :len(rows)] = rows
  return plan


def gather(x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rows ``x[idx]`` with padding (``idx < 0``) filled by row 0, and the 0/1 float32 mask.

  Args:
    x: ``(N, …)`` host array.
    idx: ``(b,)`` int row indices, -1 for padding.

  Returns:
    ``(rows (b, …), mask (b,))``.
  """
  return x[np.where(idx < 0, 0, idx)], (idx >= 0).astype(np.float32)


def accepts_mask(fn: Callable) -> bool:
  """Whether ``fn`` takes a ``mask`` keyword (or ``**kwargs``).

  Args:
    fn: any callable.

  Returns:
    False also when its signature cannot be read.
  """
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == "mask" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def uses_batch_statistics(backbone: Any) -> bool:
  """Whether the backbone normalises with batch statistics (takes a row ``mask``).

  Args:
    backbone: a backbone (its ``train_kwargs``).

  Returns:
    True when ``"mask"`` is among its training keywords.
  """
  return "mask" in getattr(backbone, "train_kwargs", ())


def predict_fn(method: Any, info: Any) -> Callable:
  """``(state, base, x, mask) -> logits`` of ``method.predict`` for a static ``TaskInfo``.

  The mask is forwarded when ``predict`` accepts it. A ``predict`` without a
  ``mask`` keyword on a batch-statistic backbone is an error: its outputs for
  real rows would depend on the padding rows.

  Args:
    method: a :class:`clx.methods.base.ContinualMethod`.
    info: the :class:`clx.methods.base.TaskInfo` (last trained task, test task id).

  Returns:
    ``predict(state, base, x, mask) -> (n, C)`` logits.
  """
  predict = method.predict
  if accepts_mask(predict):
    return lambda state, base, x, mask: predict(state, base, x, info, mask=mask)
  if uses_batch_statistics(method.backbone):
    raise ValueError(
        f"method {method.name!r}: predict() takes no mask= but backbone {method.backbone.name!r} "
        "normalises with batch statistics, so padding rows of the last evaluation batch would "
        "change the real rows' predictions; add mask=None to predict and pass it to "
        "backbone.apply(..., mask=mask)")
  return lambda state, base, x, mask: predict(state, base, x, info)


def collect(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
  """Host-side feature pass: ``fn(x_b, mask_b) -> (b, ...)`` over padded batches, real rows only.

  Single-process helper for host arrays; inside the loop, ``ctx.batches`` yields
  the same padded, masked batches sharded over the mesh.

  Args:
    fn: (jitted) ``(x (batch_size, ...), mask (batch_size,)) -> (batch_size, ...)``; it
      must pass ``mask`` to the model (batch statistics over the real rows).
    x: (n, ...) host inputs, n ≥ 1.
    batch_size: rows per call (one compilation).

  Returns:
    (n, ...) host array, row i the output for ``x[i]`` as if its batch had run alone.
  """
  if len(x) < 1:
    raise ValueError("collect: no examples")
  out = []
  for idx in index_plan(len(x), batch_size):
    xb, mask = gather(x, idx)
    out.append(np.asarray(jax.device_get(fn(xb, mask)))[:int(mask.sum())])
  return np.concatenate(out)


def on_one_device(tree: Any) -> Any:
  """``tree`` with every ``jax.Array`` leaf on one device, this process's first local device.

  A replicated leaf gives up its local copy (no transfer); a sharded one is gathered (across
  processes when it spans several). Other leaves (NumPy, Python scalars) are left as they are.
  A jitted function of the result runs once, on that device, instead of once per device of
  the mesh the leaves were replicated over.

  Args:
    tree: a pytree of arrays.

  Returns:
    The same pytree, each ``jax.Array`` leaf committed to ``jax.local_devices()[0]``.
  """
  target = jax.local_devices()[0]

  def one(leaf):
    if not isinstance(leaf, jax.Array) or leaf.sharding.device_set == {target}:
      return leaf
    if leaf.is_fully_replicated:
      for shard in leaf.addressable_shards:
        if shard.device == target:
          return shard.data
      return jax.device_put(leaf.addressable_data(0), target)
    if leaf.is_fully_addressable:
      return jax.device_put(leaf, target)
    return jax.device_put(np.asarray(multihost_utils.process_allgather(leaf, tiled=True)), target)

  return jax.tree.map(one, tree)


def placed_like(tree: Any, reference: Any) -> Any:
  """``tree`` with each ``jax.Array`` leaf placed with the sharding of its ``reference`` leaf.

  The way back after :func:`on_one_device`: a result computed on one device replaces state
  that lives replicated (or sharded) on the mesh, and later jitted steps need every leaf on
  the same devices. Leaves whose reference is not a ``jax.Array`` are returned unchanged.
  Works across processes (every process holds the same value).

  Args:
    tree: results, a pytree with the structure of ``reference``.
    reference: the values they replace.

  Returns:
    ``tree`` placed like ``reference``.
  """

  def put(value, ref):
    if not isinstance(ref, jax.Array) or not isinstance(value, (jax.Array, np.ndarray)):
      return value
    if isinstance(value, jax.Array) and value.sharding == ref.sharding:
      return value
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, ref.sharding, lambda index: host[index])

  return jax.tree.map(put, tree, reference)
