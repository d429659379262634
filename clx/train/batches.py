"""Batches: global index plans → per-process rows → host arrays (the sharded device arrays
are made by :class:`clx.train.fit.Fitter`). Every device count sees the same global batches."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from clx.data.types import ArraySplit
from clx.methods import passes
from clx.train import sharding


def check_finite_batch(arrays: dict[str, np.ndarray], where: str) -> None:
  x = arrays["x"]
  if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
    bad = int(np.sum(~np.isfinite(x)))
    raise ValueError(f"{where}: inputs contain {bad} NaN/Inf values")


def _epoch_order(n: int, shuffle: bool, seed_words: tuple[int, ...]) -> np.ndarray:
  if not shuffle:
    return np.arange(n)
  return np.random.default_rng(list(seed_words)).permutation(n)


def _step_index_plan(order: np.ndarray, batch_size: int, padded: int) -> np.ndarray:
  """(steps, padded) example indices, -1 for padding rows (:func:`clx.methods.passes.index_plan`
  over ``order``; the padding rows are masked out of the model's batch statistics)."""
  plan = passes.index_plan(len(order), batch_size, padded)
  return np.where(plan < 0, -1, np.asarray(order, np.int64)[np.maximum(plan, 0)])


def _gather(split: ArraySplit, idx: np.ndarray) -> dict[str, np.ndarray]:
  safe = np.where(idx < 0, 0, idx)
  out = {"x": split.x[safe], "y": split.y[safe].astype(np.int32),
         "mask": (idx >= 0).astype(np.float32)}
  return out


# ----------------------------------------------------------------------------
# Streaming splits (clx.data.pipeline.StreamingSplit): images decoded per batch, never held.


def is_streaming(split) -> bool:
  """Whether ``split`` is streamed per batch (a ``StreamingSplit``) rather than held in memory."""
  return hasattr(split, "step_batches")


def example_nbytes(split) -> int:
  """Bytes of one example as the step sees it (float32 on device for a streaming split)."""
  return split.example_nbytes if is_streaming(split) else split.x[0].nbytes


def normalize_on_device(x: jax.Array, pixel_range: str = "0,1",
                        mean: tuple[float, ...] | None = None,
                        std: tuple[float, ...] | None = None) -> jax.Array:
  """uint8 pixels -> float32 model inputs, on the device (jit-able, elementwise).

  The same equation as :func:`clx.data.transforms.normalize_batch` on the host:
  ``"0,1"``: ``x / 255``; ``"-1,1"``: ``x / 127.5 − 1``; with ``mean``/``std``
  (per channel, [0, 1] units): ``(x / 255 − mean) / std``.

  Args:
    x: (..., H, W, C) uint8.
    pixel_range, mean, std: as ``normalize_batch`` (static).

  Returns:
    (..., H, W, C) float32, sharded as ``x``.
  """
  xf = x.astype(jnp.float32)
  if mean is not None:
    return (xf / jnp.float32(255.0) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  if pixel_range == "0,1":
    return xf / jnp.float32(255.0)
  return xf / jnp.float32(127.5) - jnp.float32(1.0)


def input_normalization(split) -> tuple | None:
  """How a step turns ``split``'s raw device batches into model inputs (hashable, static).

  Returns:
    ``(pixel_range, mean, std)`` for a streaming split (its batches reach the device as
    uint8 pixels: :func:`streamed_device_batches` with ``raw=True``), ``None`` for an
    in-memory split (its ``x`` already is the model input).
  """
  if not is_streaming(split):
    return None
  return (split.pixel_range, split.mean, split.std)


def normalize_inputs(batch: dict[str, jax.Array], normalization: tuple | None
                     ) -> dict[str, jax.Array]:
  """``batch`` with ``x`` normalised as :func:`input_normalization` says (jit-able).

  Called inside the jitted train / validation / evaluation steps, so uint8 pixels are
  converted where they are used (no separate float32 copy of the batch on the device).

  Args:
    batch: ``{"x": (..., H, W, C) uint8 or model inputs, ...}``.
    normalization: :func:`input_normalization` of the batch's split (static).

  Returns:
    The batch, ``x`` float32 by :func:`normalize_on_device` (unchanged for ``None``).
  """
  if normalization is None:
    return batch
  pixel_range, mean, std = normalization
  return {**batch, "x": normalize_on_device(batch["x"], pixel_range, mean, std)}


@functools.lru_cache(maxsize=None)
def _normalizer(pixel_range: str, mean, std):
  return jax.jit(functools.partial(normalize_on_device, pixel_range=pixel_range, mean=mean, std=std))


def streamed_device_batches(split, plan: np.ndarray, mesh, key: tuple[int, ...],
                            chunk: int | None = None, raw: bool = False):
  """Sharded device batches of a streaming split for an index plan.

  This process decodes only its rows of every global batch
  (:func:`clx.train.sharding.process_rows`), in grain threads ahead of the
  consumer; the pixels cross to the devices as uint8 and are normalised there.

  Args:
    split: a ``clx.data.pipeline.StreamingSplit``.
    plan: (steps, B) global rows, ``-1`` = padding (:meth:`clx.train.fit.Fitter.plan`).
    mesh: the device mesh (batch on its ``data`` axis).
    key: the pass's augmentation key (e.g. ``(seed, task, phase, epoch)``).
    chunk: None for single steps, else ``(chunk, B)`` stacks (the last one
      padded with fully masked steps).
    raw: leave ``x`` as uint8 pixels for a step that normalises inside
      (:func:`normalize_inputs`); else normalised here by a jitted call (host passes).

  Yields:
    ``(arrays, steps, examples)`` as :meth:`clx.train.fit.Fitter.device_batches`:
    ``x`` float32 (normalised on device; uint8 with ``raw``), ``y`` int32, ``mask`` float32.
  """
  rows = sharding.process_rows(plan.shape[1], mesh)
  local = plan[:, rows]
  normalize = (lambda x: x) if raw else _normalizer(split.pixel_range, split.mean, split.std)
  host = split.step_batches(local, key)

  def to_device(arrays: dict[str, np.ndarray], axis: int) -> dict[str, jax.Array]:
    out = sharding.shard_arrays(arrays, mesh, axis, plan.shape[1])
    out["x"] = normalize(out["x"])
    return out

  if chunk is None:
    for s, batch in enumerate(host):
      yield to_device(batch, 0), 1, int((plan[s] >= 0).sum())
    return
  for c in range(0, plan.shape[0], chunk):
    block = [next(host) for _ in range(min(chunk, plan.shape[0] - c))]
    steps = len(block)
    while len(block) < chunk:  # fully masked steps: same shape for every call
      block.append({k: np.zeros_like(v) for k, v in block[0].items()})
    stacked = {k: np.stack([b[k] for b in block]) for k in block[0]}
    yield to_device(stacked, 1), steps, int((plan[c:c + steps] >= 0).sum())
