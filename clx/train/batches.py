"""Batches: global index plans → per-process rows → host arrays (the sharded device arrays
are made by :class:`clx.train.fit.Fitter`). Every device count sees the same global batches."""

from __future__ import annotations

import numpy as np

from clx.data.types import ArraySplit
from clx.methods import passes


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
