"""Synthetic task streams with a config's real shapes, generated per batch (rehearsals).

A rehearsal (:mod:`clx.rehearse`) runs a pod config at its real shapes without
its data: :func:`synthetic_stream` builds a :class:`~clx.data.types.Stream`
whose splits hold :class:`SyntheticArray` inputs — lazy arrays that generate
the rows asked for (random uint8 pixels, converted to the float32 the model
reads, or random token ids) when the loop gathers a batch. Nothing holds a
float32 copy of a split; a row is the same every time it is read (its RNG is
keyed by ``(seed, task, split, row)``).

What a stream looks like (class count, task split, per-task sizes, example
shape, pixel normalisation) is a :class:`SyntheticSpec`, built from the
config's stream arguments by a function registered per stream name
(:func:`register_spec`; the builtin ``gpm_cifar100`` here, the experiments
register theirs next to their streams). Labels cycle through each task's
classes, so every class occurs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from clx.data.types import ArraySplit, Stream, Task

KINDS = ("image", "tokens")
_SPLIT_CODES = {"train": 1, "test": 2, "val": 3}
_TAG = 0x5E7A  # keeps synthetic row RNGs apart from every other seeded stream in clx


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """The shape of a config's stream, without its data.

  Attributes:
    name: stream name (for messages and the rehearsal report).
    scenario: ``"task"``, ``"class"`` or ``"domain"``.
    num_classes: size of the global label space.
    task_classes: the global classes of each task, in training order.
    example_shape: shape of one input, e.g. ``(224, 224, 3)`` or ``(256,)``.
    kind: ``"image"`` (uint8 pixels → float32 ``(u / 255 − mean) / std``) or
      ``"tokens"`` (int32 ids in ``[0, vocab_size)``).
    train_per_task, test_per_task: the real per-task split sizes (the
      rehearsal uses fewer rows and reports these for projections).
    val_per_task: real validation sizes, or ``None`` when the stream has none.
    mean, std: per-channel pixel normalisation (images).
    vocab_size: token id range (tokens).
    source_shape: when set (images), pixels are generated at this ``(h, w, 3)``
      size and the named transforms of :mod:`clx.data.transforms` produce
      ``example_shape`` (the official crop/resize/flip cost, per row).
    train_transform, test_transform: transform names for the train and the
      test/validation rows (both needed with ``source_shape``).
    source: where the sizes come from (shown in the report).
  """

  name: str
  scenario: str
  num_classes: int
  task_classes: tuple[tuple[int, ...], ...]
  example_shape: tuple[int, ...]
  kind: str = "image"
  train_per_task: tuple[int, ...] = ()
  test_per_task: tuple[int, ...] = ()
  val_per_task: tuple[int, ...] | None = None
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)
  vocab_size: int = 0
  source_shape: tuple[int, ...] | None = None
  train_transform: str | None = None
  test_transform: str | None = None
  source: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"SyntheticSpec.kind must be one of {KINDS}, got {self.kind!r}")
    num_tasks = len(self.task_classes)
    if num_tasks == 0:
      raise ValueError(f"synthetic stream {self.name!r} has no tasks")
    for field in ("train_per_task", "test_per_task"):
      sizes = getattr(self, field)
      if len(sizes) != num_tasks or min(sizes) < 1:
        raise ValueError(f"synthetic stream {self.name!r}: {field} needs {num_tasks} positive "
                         f"sizes, got {sizes}")
    if self.val_per_task is not None and len(self.val_per_task) != num_tasks:
      raise ValueError(f"synthetic stream {self.name!r}: val_per_task needs {num_tasks} sizes, "
                       f"got {self.val_per_task}")
    for t, classes in enumerate(self.task_classes):
      if not classes or min(classes) < 0 or max(classes) >= self.num_classes:
        raise ValueError(f"synthetic stream {self.name!r}: task {t} classes {classes} are not "
                         f"within [0, {self.num_classes})")
    if self.source_shape is not None:
      from clx.data.transforms import get_transform  # pylint: disable=import-outside-toplevel
      if self.kind != "image" or len(self.source_shape) != 3 or self.source_shape[-1] != 3:
        raise ValueError(f"synthetic stream {self.name!r}: source_shape needs RGB images "
                         f"(h, w, 3), got {self.source_shape} for kind {self.kind!r}")
      for which in ("train_transform", "test_transform"):
        name = getattr(self, which)
        if name is None:
          raise ValueError(f"synthetic stream {self.name!r}: source_shape needs {which}")
        size = get_transform(name).size
        if (size, size, 3) != tuple(self.example_shape):
          raise ValueError(f"synthetic stream {self.name!r}: {which} {name!r} makes "
                           f"({size}, {size}, 3) images, example_shape is {self.example_shape}")
    if self.kind == "tokens" and self.vocab_size < 1:
      raise ValueError(f"synthetic token stream {self.name!r} needs vocab_size >= 1")

  @property
  def num_tasks(self) -> int:
    return len(self.task_classes)


class SyntheticArray:
  """A lazy ``(n, *example_shape)`` input array: rows are generated when indexed.

  Row ``i`` comes from ``np.random.default_rng([TAG, seed, task, split, i])``:
  uint8 pixels (at ``spec.source_shape`` through the split's transform, when
  set; the same crop every epoch) converted to float32 ``(u / 255 − mean) / std``, or int32 token
  ids. Indexing (an int, a slice or an integer array of any shape) returns a
  NumPy array; ``np.asarray`` materialises every row (only the rehearsal's few).

  ``nbytes`` is the size of the *real* split (``nominal_rows`` rows), so the
  loop decides device residency as it would on the real data.
  """

  def __init__(self, rows: int, spec: SyntheticSpec, *, seed: int, task: int, split: str,
               nominal_rows: int | None = None):
    self._rows, self._spec = int(rows), spec
    self._key = (_TAG, int(seed), int(task), _SPLIT_CODES[split])
    self._nominal = int(nominal_rows if nominal_rows is not None else rows)
    self._transform = None
    if spec.source_shape is not None:
      from clx.data.transforms import get_transform  # pylint: disable=import-outside-toplevel
      self._transform = get_transform(spec.train_transform if split == "train"
                                      else spec.test_transform)
    if spec.kind == "image":
      channels = spec.example_shape[-1]
      self._mean = np.broadcast_to(np.asarray(spec.mean, np.float32), (channels,))
      self._std = np.broadcast_to(np.asarray(spec.std, np.float32), (channels,))

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.float32 if self._spec.kind == "image" else np.int32)

  @property
  def shape(self) -> tuple[int, ...]:
    return (self._rows, *self._spec.example_shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return self._nominal * math.prod(self._spec.example_shape) * self.dtype.itemsize

  def __len__(self) -> int:
    return self._rows

  def row(self, i: int) -> np.ndarray:
    """Example ``i``: float32 pixels or int32 token ids of ``example_shape``."""
    if not 0 <= i < self._rows:
      raise IndexError(f"row {i} out of range for {self._rows} synthetic rows")
    rng = np.random.default_rng([*self._key, int(i)])
    if self._spec.kind == "tokens":
      return rng.integers(0, self._spec.vocab_size, self._spec.example_shape, dtype=np.int32)
    if self._transform is None:
      pixels = rng.integers(0, 256, self._spec.example_shape, dtype=np.uint8)
    else:  # the official crop / resize / flip of a source-sized image
      from PIL import Image  # pylint: disable=import-outside-toplevel
      source = rng.integers(0, 256, self._spec.source_shape, dtype=np.uint8)
      pixels = self._transform(Image.fromarray(source), rng)
    return (pixels.astype(np.float32) / np.float32(255.0) - self._mean) / self._std

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, (int, np.integer)):
      return self.row(int(index) + (self._rows if index < 0 else 0))
    if isinstance(index, slice):
      index = np.arange(self._rows)[index]
    index = np.asarray(index)
    if index.dtype == bool:
      index = np.flatnonzero(index)
    if not np.issubdtype(index.dtype, np.integer):
      raise TypeError(f"SyntheticArray takes integer indices, got dtype {index.dtype}")
    flat = np.where(index < 0, index + self._rows, index).reshape(-1)
    out = np.empty((len(flat), *self._spec.example_shape), self.dtype)
    for k, i in enumerate(flat):
      out[k] = self.row(int(i))
    return out.reshape(*index.shape, *self._spec.example_shape)

  def __array__(self, dtype=None, copy=None):  # noqa: ARG002  (numpy protocol)
    out = self[np.arange(self._rows)]
    return out if dtype is None else out.astype(dtype)


def _labels(rows: int, classes: Sequence[int]) -> np.ndarray:
  return np.asarray(classes, np.int32)[np.arange(rows) % len(classes)]


def synthetic_stream(spec: SyntheticSpec, *, train_rows: int, test_rows: int,
                     val_rows: int | None = None, num_tasks: int | None = None,
                     seed: int = 0, resident_bytes: float = 0) -> Stream:
  """A stream with ``spec``'s classes, tasks and shapes on lazily generated inputs.

  Args:
    spec: the stream's shape (:func:`spec_for_config`).
    train_rows, test_rows: rows per task (capped at the real per-task sizes).
    val_rows: validation rows per task when the real stream has a validation
      split (default: ``test_rows``).
    num_tasks: the first ``num_tasks`` tasks only (default: all).
    seed: generation seed.
    resident_bytes: a training split whose *real* size (inputs + labels) is at
      most this is generated up front as a NumPy array (the rehearsal's rows
      only), because the loop then places the whole split on the devices
      (``TrainConfig.device_data_mb``) as it would the real one.

  Returns:
    A :class:`~clx.data.types.Stream`; its splits' ``x`` are :class:`SyntheticArray`
    (or NumPy arrays for resident training splits).
  """
  for what, value in (("train_rows", train_rows), ("test_rows", test_rows)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{what} must be a positive integer, got {value!r}")
  total = spec.num_tasks
  count = total if num_tasks is None else int(num_tasks)
  if not 1 <= count <= total:
    raise ValueError(f"num_tasks must lie in [1, {total}] for {spec.name!r}, got {num_tasks!r}")
  tasks = []
  for t in range(count):
    classes = tuple(spec.task_classes[t])

    def split(name: str, rows: int, nominal: int, t=t, classes=classes) -> ArraySplit:
      rows = min(rows, nominal)
      x = SyntheticArray(rows, spec, seed=seed, task=t, split=name, nominal_rows=nominal)
      if name == "train" and x.nbytes + 4 * nominal <= resident_bytes:
        x = np.asarray(x)
      return ArraySplit({"x": x, "y": _labels(rows, classes)})

    val = None
    if spec.val_per_task is not None:
      val = split("val", val_rows or test_rows, spec.val_per_task[t])
    tasks.append(Task(f"synthetic task {t} ({len(classes)} classes)",
                      split("train", train_rows, spec.train_per_task[t]),
                      split("test", test_rows, spec.test_per_task[t]), tuple(sorted(classes)),
                      val))
  return Stream(f"synthetic_{spec.name}", tuple(tasks), spec.scenario, spec.num_classes)


# ----------------------------------------------------------------------------
# Specs by stream name.

SpecFactory = Callable[[Mapping[str, Any]], SyntheticSpec]
SPECS: dict[str, SpecFactory] = {}


def register_spec(stream_name: str, factory: SpecFactory) -> None:
  """Register ``factory(stream_args) -> SyntheticSpec`` for a stream name (latest wins)."""
  SPECS[stream_name] = factory


def spec_for_config(config: Mapping[str, Any]) -> SyntheticSpec:
  """The :class:`SyntheticSpec` of an experiment config's stream.

  Raises:
    KeyError: no spec is registered for the stream, naming the known ones.
  """
  name = config["stream"].get("name")
  if name not in SPECS:
    raise KeyError(f"no synthetic spec for stream {name!r} (rehearsal needs one; known: "
                   f"{sorted(SPECS)}); register one with clx.data.synthetic.register_spec")
  args = {k: v for k, v in config["stream"].items() if k != "name"}
  return SPECS[name](args)


def equal_class_split(num_classes: int, num_tasks: int) -> tuple[tuple[int, ...], ...]:
  """Classes in ascending order, ``num_classes / num_tasks`` per task (must divide)."""
  if num_tasks < 1 or num_classes % num_tasks:
    raise ValueError(f"{num_classes} classes do not split into {num_tasks} equal tasks")
  per = num_classes // num_tasks
  return tuple(tuple(range(t * per, (t + 1) * per)) for t in range(num_tasks))


def class_incremental_spec(name: str, *, num_classes: int, num_tasks: int, train_total: int,
                           test_total: int, example_shape: Sequence[int], scenario: str = "class",
                           val_fraction: float = 0.0, mean=(0.0,), std=(1.0,),
                           source: str = "", **spec_fields) -> SyntheticSpec:
  """A spec for classes split equally over tasks, sizes proportional to the classes.

  Per task: ``train_total / num_tasks`` rows of which ``val_fraction`` are held
  out for validation (``None`` when 0), ``test_total / num_tasks`` test rows.
  ``spec_fields``: other :class:`SyntheticSpec` fields (``source_shape``, transforms).
  """
  classes = equal_class_split(num_classes, num_tasks)
  train = train_total // num_tasks
  val = int(round(val_fraction * train)) if val_fraction > 0 else None
  return SyntheticSpec(
      name=name, scenario=scenario, num_classes=num_classes, task_classes=classes,
      example_shape=tuple(int(s) for s in example_shape), kind="image",
      train_per_task=(train - (val or 0),) * num_tasks,
      test_per_task=(test_total // num_tasks,) * num_tasks,
      val_per_task=(val,) * num_tasks if val else None, mean=tuple(mean), std=tuple(std),
      source=source, **spec_fields)


def _gpm_cifar100_spec(args: Mapping[str, Any]) -> SyntheticSpec:
  from clx.data.streams import (  # pylint: disable=import-outside-toplevel
      GPM_CIFAR_MEAN, GPM_CIFAR_STD)
  return class_incremental_spec(
      "gpm_cifar100", num_classes=100, num_tasks=int(args.get("num_tasks", 10)),
      train_total=50000, test_total=10000, example_shape=(32, 32, 3), scenario="task",
      val_fraction=float(args.get("pc_valid", 0.05)), mean=GPM_CIFAR_MEAN, std=GPM_CIFAR_STD,
      source="CIFAR-100: 500 train / 100 test images per class; GPM's pc_valid held out")


register_spec("gpm_cifar100", _gpm_cifar100_spec)
