"""Data containers shared by every task stream.

A *split* is a random-access collection of examples stored as a dict of NumPy
arrays with a common leading axis (``{"x": (n, ...), "y": (n,)}``). A *task* is
a named pair of splits plus the global class ids it contains. A *stream* is an
ordered tuple of tasks with the scenario and label-space size.

Everything here is host-side NumPy: the training loop turns splits into sharded
device batches (each process reading only its own shard on multi-host runs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Literal

import numpy as np

Scenario = Literal["task", "class", "domain"]
SCENARIOS: tuple[str, ...] = ("task", "class", "domain")


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """An in-memory split: ``arrays[key]`` all share the leading axis ``n``.

  ``x`` holds inputs (any shape/dtype), ``y`` holds int32 *global* labels.
  """

  arrays: Mapping[str, np.ndarray]

  def __post_init__(self):
    if "x" not in self.arrays or "y" not in self.arrays:
      raise ValueError(f"a split needs keys 'x' and 'y', got {sorted(self.arrays)}")
    lengths = {k: len(v) for k, v in self.arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"split arrays disagree on their leading axis: {lengths}")

  def __len__(self) -> int:
    return len(self.arrays["y"])

  @property
  def x(self) -> np.ndarray:
    return self.arrays["x"]

  @property
  def y(self) -> np.ndarray:
    return self.arrays["y"]

  def take(self, indices: np.ndarray) -> "ArraySplit":
    return ArraySplit({k: v[indices] for k, v in self.arrays.items()})

  def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
              drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Host-side batches (the last one may be short unless ``drop_remainder``)."""
    order = np.arange(len(self))
    if shuffle:
      order = np.random.default_rng(seed).permutation(len(self))
    stop = len(self) - (len(self) % batch_size if drop_remainder else 0)
    for i in range(0, stop, batch_size):
      idx = order[i:i + batch_size]
      yield {k: v[idx] for k, v in self.arrays.items()}


def concat_splits(splits: "list[ArraySplit]") -> ArraySplit:
  keys = splits[0].arrays.keys()
  return ArraySplit({k: np.concatenate([s.arrays[k] for s in splits]) for k in keys})


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of a stream.

  Attributes:
    name: human-readable name (e.g. ``"classes 0-1"`` or ``"perm 3"``).
    train, test: splits with global labels in ``y``.
    classes: sorted global class ids present in this task (the task's label set;
      in the domain scenario every task has all classes).
    val: optional held-out split (e.g. GPM's first 10% of the training set).
  """

  name: str
  train: ArraySplit
  test: ArraySplit
  classes: tuple[int, ...]
  val: ArraySplit | None = None


@dataclasses.dataclass(frozen=True)
class Stream:
  """An ordered task sequence.

  Attributes:
    name: e.g. ``"split_mnist"``.
    tasks: the tasks in training order.
    scenario: ``"task"`` (task id given at test time), ``"class"`` (no task id,
      disjoint classes) or ``"domain"`` (no task id, one shared label space).
    num_classes: size of the global label space.
    input_shape: shape of one example's ``x``.
  """

  name: str
  tasks: tuple[Task, ...]
  scenario: Scenario
  num_classes: int

  def __post_init__(self):
    if self.scenario not in SCENARIOS:
      raise ValueError(f"unknown scenario {self.scenario!r}; expected one of {SCENARIOS}")
    if not self.tasks:
      raise ValueError(f"stream {self.name!r} has no tasks")
    for t, task in enumerate(self.tasks):
      for split_name in ("train", "test"):
        split = getattr(task, split_name)
        if len(split) == 0:
          raise ValueError(f"stream {self.name!r}: task {t} ({task.name}) has an empty {split_name} split")
        y = split.y
        if y.min() < 0 or y.max() >= self.num_classes:
          raise ValueError(
              f"stream {self.name!r}: task {t} ({task.name}) {split_name} labels span "
              f"[{int(y.min())}, {int(y.max())}], outside [0, {self.num_classes})")
        extra = set(np.unique(y).tolist()) - set(task.classes)
        if extra:
          raise ValueError(
              f"stream {self.name!r}: task {t} ({task.name}) {split_name} has labels "
              f"{sorted(extra)[:10]} not in the task's classes {task.classes[:10]}")

  def __len__(self) -> int:
    return len(self.tasks)

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.tasks[0].train.x.shape[1:])
