"""Seeded, reproducible task streams built from in-memory splits.

Every constructor takes ``splits``: a mapping with ``"train"`` and ``"test"``
(optionally ``"val"``) :class:`~clx.data.types.ArraySplit` values, and returns a
:class:`~clx.data.types.Stream`. The same arguments always give the same
stream (NumPy ``RandomState`` seeds only; no global RNG is touched).

Constructors:
  class_incremental: disjoint classes per task ("class" or "task" scenario).
  permuted: one fixed pixel permutation per task ("domain" scenario).
  official_gpm_pmnist: the exact 10-task Permuted MNIST of the official GPM code.
  domain_sequence: one task per dataset over a shared label space.

:func:`get_stream` builds the named benchmark streams from the offline builtins.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from clx.data.types import ArraySplit, Stream, Task

GPM_MNIST_MEAN = 0.1307
GPM_MNIST_STD = 0.3081

Splits = Mapping[str, ArraySplit]


# ---------------------------------------------------------------- helpers


def _check_splits(splits: Splits, who: str) -> None:
  if not isinstance(splits, Mapping):
    raise TypeError(f"{who}: splits must be a mapping of split name -> ArraySplit, got {type(splits).__name__}")
  missing = [s for s in ("train", "test") if s not in splits]
  if missing:
    raise KeyError(f"{who}: splits need 'train' and 'test'; missing {missing}, got {sorted(splits)}")
  for split_name, split in splits.items():
    if not isinstance(split, ArraySplit):
      raise TypeError(f"{who}: splits[{split_name!r}] must be an ArraySplit, got {type(split).__name__}")
    y = np.asarray(split.y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"{who}: splits[{split_name!r}].y must be a 1-D integer array, got "
                       f"shape {y.shape} dtype {y.dtype}")
    if len(y) and y.min() < 0:
      raise ValueError(f"{who}: splits[{split_name!r}] has negative labels (min {int(y.min())})")


def _check_positive_int(value, what: str, who: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{who}: {what} must be a positive integer, got {value!r}")
  return int(value)


def to_float_inputs(split: ArraySplit, *, pixel_max: float = 255.0, flatten: bool = True,
                    mean: float | None = None, std: float | None = None) -> ArraySplit:
  """Pixels -> float32 ``x / pixel_max`` (then ``(x - mean) / std`` if given).

  Args:
    split: ``x`` of shape (n, H, W) or (n, H, W, C), any numeric dtype.
    pixel_max: value mapped to 1.0 (255 for MNIST, 16 for sklearn digits).
    flatten: ``(n, H*W*C)`` if True, else ``(n, H, W, C)`` (a channel axis
      is added to grayscale images).
    mean, std: optional normalisation after scaling, in float32 arithmetic.

  Returns:
    A new split with float32 ``x`` and int32 ``y``; other keys are kept.
  """
  if pixel_max <= 0:
    raise ValueError(f"pixel_max must be positive, got {pixel_max}")
  if (mean is None) != (std is None):
    raise ValueError("pass both mean and std, or neither")
  x = np.asarray(split.x)
  if x.ndim not in (3, 4):
    raise ValueError(f"expected images of shape (n, H, W) or (n, H, W, C), got {x.shape}")
  out = x.astype(np.float32) / np.float32(pixel_max)
  if mean is not None:
    if std <= 0:
      raise ValueError(f"std must be positive, got {std}")
    out = (out - np.float32(mean)) / np.float32(std)
  if x.ndim == 3:
    out = out[..., None]
  if flatten:
    out = out.reshape(len(out), -1)
  arrays = dict(split.arrays)
  arrays["x"] = out
  arrays["y"] = np.asarray(split.y, np.int32)
  return ArraySplit(arrays)


def sklearn_shuffle(array: np.ndarray, random_state: int) -> np.ndarray:
  """``sklearn.utils.shuffle(array, random_state=random_state)`` without sklearn.

  sklearn draws ``indices = arange(n)``, shuffles them in place with
  ``np.random.RandomState(random_state).shuffle`` and returns ``array[indices]``.
  """
  array = np.asarray(array)
  indices = np.arange(len(array))
  np.random.RandomState(random_state).shuffle(indices)
  return array[indices]


def _by_classes(split: ArraySplit, classes: Sequence[int], label_map: np.ndarray | None) -> ArraySplit:
  part = split.take(np.flatnonzero(np.isin(split.y, np.asarray(classes))))
  if label_map is None:
    return part
  arrays = dict(part.arrays)
  arrays["y"] = label_map[part.y].astype(np.int32)
  return ArraySplit(arrays)


# ---------------------------------------------------------------- constructors


def class_incremental(splits: Splits, num_tasks: int, classes_per_task: int | None = None,
                      class_order: Sequence[int] | str | None = None, seed: int = 0,
                      scenario: str = "class", name: str = "class_incremental",
                      remap_labels: bool = True) -> Stream:
  """Disjoint classes per task.

  Args:
    splits: ``{"train", "test"[, "val"]}`` ArraySplits with integer labels.
    num_tasks: number of tasks.
    classes_per_task: classes per task; default ``num_classes // num_tasks``
      (which must then divide exactly). With an explicit value only the first
      ``num_tasks * classes_per_task`` classes of the order are used.
    class_order: ``None`` (ascending, as InfLoRA's official configs),
      ``"seed"`` (the PyCIL/InfLoRA shuffle: ``RandomState(seed).permutation``
      of the ascending classes), or an explicit sequence of class ids.
    seed: seed for ``class_order="seed"``.
    scenario: ``"class"`` (no task id at test time) or ``"task"``.
    name: stream name.
    remap_labels: relabel class ``class_order[k]`` as ``k`` (PyCIL's
      convention), so task ``t`` holds labels ``[t*cpt, (t+1)*cpt)``. With
      False the original labels are kept.

  Returns:
    A Stream whose tasks keep each split's original example order.
  """
  who = f"class_incremental({name!r})"
  _check_splits(splits, who)
  if scenario not in ("class", "task"):
    raise ValueError(f"{who}: scenario must be 'class' or 'task', got {scenario!r}")
  num_tasks = _check_positive_int(num_tasks, "num_tasks", who)
  present = np.unique(splits["train"].y)
  if class_order is None:
    order = present
  elif isinstance(class_order, str):
    if class_order != "seed":
      raise ValueError(f"{who}: class_order must be None, 'seed' or a sequence of class ids, got {class_order!r}")
    order = present[np.random.RandomState(seed).permutation(len(present))]
  else:
    order = np.asarray(list(class_order))
    if order.ndim != 1 or not np.issubdtype(order.dtype, np.integer):
      raise ValueError(f"{who}: class_order must be a 1-D sequence of integer class ids, got {class_order!r}")
    if len(np.unique(order)) != len(order):
      raise ValueError(f"{who}: class_order repeats classes: {order.tolist()}")
    unknown = sorted(set(order.tolist()) - set(present.tolist()))
    if unknown:
      raise ValueError(f"{who}: class_order names classes {unknown} that have no training examples "
                       f"(present: {present.tolist()})")
  if classes_per_task is None:
    if len(order) % num_tasks:
      raise ValueError(f"{who}: {len(order)} classes do not divide into {num_tasks} tasks; "
                       f"pass classes_per_task or change num_tasks")
    classes_per_task = len(order) // num_tasks
  classes_per_task = _check_positive_int(classes_per_task, "classes_per_task", who)
  if num_tasks * classes_per_task > len(order):
    raise ValueError(f"{who}: {num_tasks} tasks x {classes_per_task} classes need "
                     f"{num_tasks * classes_per_task} classes, only {len(order)} available")
  order = order[:num_tasks * classes_per_task].astype(np.int64)
  label_map = None
  if remap_labels:
    max_label = max(int(np.max(s.y)) for s in splits.values() if len(s))
    label_map = np.full(max_label + 1, -1, np.int64)
    label_map[order] = np.arange(len(order))
    num_classes = len(order)
  else:
    num_classes = int(order.max()) + 1
  tasks = []
  for t in range(num_tasks):
    original = order[t * classes_per_task:(t + 1) * classes_per_task]
    classes = (tuple(range(t * classes_per_task, (t + 1) * classes_per_task)) if remap_labels
               else tuple(sorted(int(c) for c in original)))
    task_name = f"classes {sorted(int(c) for c in original)}"
    parts = {s: _by_classes(splits[s], original, label_map) for s in ("train", "test", "val")
             if s in splits}
    tasks.append(Task(name=task_name, train=parts["train"], test=parts["test"],
                      classes=classes, val=parts.get("val")))
  return Stream(name=name, tasks=tuple(tasks), scenario=scenario, num_classes=num_classes)


def _flat(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return x.reshape(len(x), -1)


def _split_head(split: ArraySplit, count: int) -> tuple[ArraySplit, ArraySplit]:
  head = ArraySplit({k: v[:count] for k, v in split.arrays.items()})
  tail = ArraySplit({k: v[count:] for k, v in split.arrays.items()})
  return head, tail


def _permuted_task(name: str, splits: Splits, permutation: np.ndarray, num_classes: int,
                   val_count: int, out_shape: tuple[int, ...] | None) -> Task:
  def permute(split: ArraySplit) -> ArraySplit:
    x = np.take(_flat(split.x), permutation, axis=1)
    if out_shape is not None:
      x = x.reshape((len(x),) + out_shape)
    arrays = dict(split.arrays)
    arrays["x"] = x
    arrays["y"] = np.asarray(split.y, np.int32)
    return ArraySplit(arrays)

  train = permute(splits["train"])
  val = permute(splits["val"]) if "val" in splits else None
  if val_count:
    val, train = _split_head(train, val_count)
  return Task(name=name, train=train, test=permute(splits["test"]),
              classes=tuple(range(num_classes)), val=val)


def _num_classes(splits: Splits) -> int:
  return max(int(np.max(s.y)) for s in splits.values() if len(s)) + 1


def permuted(splits: Splits, num_tasks: int, seed: int = 0, permute_first: bool = True,
             val_fraction: float = 0.0, name: str = "pmnist", flatten: bool = True) -> Stream:
  """Permuted inputs: one fixed permutation of the flattened input per task.

  Task ``t`` uses ``RandomState(seed).permutation(D)`` drawn in task order
  (task 0 is the identity when ``permute_first=False``); train, val and test
  of a task share it. Every task has all classes ("domain" scenario).

  Args:
    splits: ``{"train", "test"[, "val"]}``; ``x`` is (n, ...) of any dtype.
    num_tasks: number of permutations.
    seed: permutation seed.
    permute_first: permute task 0 too (as GPM does).
    val_fraction: move the FIRST ``int(val_fraction * n_train)`` training
      examples (unshuffled, as GPM) into ``val``.
    name: stream name.
    flatten: (n, D) inputs if True, else the input's original shape.
  """
  who = f"permuted({name!r})"
  _check_splits(splits, who)
  num_tasks = _check_positive_int(num_tasks, "num_tasks", who)
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"{who}: val_fraction must be in [0, 1), got {val_fraction}")
  if val_fraction and "val" in splits:
    raise ValueError(f"{who}: splits already have 'val'; do not also pass val_fraction")
  shape = tuple(np.shape(splits["train"].x)[1:])
  dim = int(np.prod(shape))
  rng = np.random.RandomState(seed)
  permutations = [rng.permutation(dim) for _ in range(num_tasks)]
  if not permute_first:
    permutations[0] = np.arange(dim)
  val_count = int(val_fraction * len(splits["train"]))
  num_classes = _num_classes(splits)
  out_shape = None if flatten else shape
  tasks = tuple(_permuted_task(f"perm {t}", splits, p, num_classes, val_count, out_shape)
                for t, p in enumerate(permutations))
  return Stream(name=name, tasks=tasks, scenario="domain", num_classes=num_classes)


def gpm_pmnist_task_order(seed: int = 2, num_tasks: int = 10) -> np.ndarray:
  """The official GPM task-seed order: ``sklearn.utils.shuffle(arange(10), random_state=seed)``."""
  return sklearn_shuffle(np.arange(num_tasks), random_state=seed)


def gpm_pmnist_permutation(task: int, order_entry: int, dim: int = 784) -> np.ndarray:
  """Official GPM permutation of task ``task`` whose order entry is ``order_entry``.

  GPM's loader does ``aux = shuffle(img.view(-1), random_state=r*100+i)`` for
  ``i, r in enumerate(seeds)``, i.e. permuted pixel ``j`` = original pixel ``perm[j]``.
  """
  return sklearn_shuffle(np.arange(dim), random_state=int(order_entry) * 100 + int(task))


def official_gpm_pmnist(splits: Splits, seed: int = 2, flatten: bool = True,
                        name: str = "pmnist") -> Stream:
  """The 10-task Permuted MNIST exactly as the official GPM code builds it.

  * Pixels: ``ToTensor`` (uint8 / 255) then ``Normalize((0.1307,), (0.3081,))``
    in float32.
  * Task order: ``order = shuffle(arange(10), random_state=seed)`` (seed 2 ->
    ``[4 1 5 0 7 2 3 6 9 8]``); task ``i`` permutes every image (task 0 too)
    with ``shuffle(pixels, random_state=order[i]*100 + i)``.
  * Validation: the FIRST 10% (6,000) training images, unshuffled; train =
    the remaining 54,000; test = the 10,000 test images.

  Args:
    splits: MNIST as uint8 images, e.g. ``load_builtin("clx_mnist")``: train
      60,000 in original order, test 10,000.
    seed: GPM's ``--seed`` (default 2, the official default).
    flatten: (n, 784) inputs if True, else (n, 28, 28, 1).
    name: stream name.
  """
  who = f"official_gpm_pmnist({name!r})"
  _check_splits(splits, who)
  for split_name in ("train", "test"):
    x = np.asarray(splits[split_name].x)
    if x.dtype != np.uint8 or x.shape[1:] not in ((28, 28), (28, 28, 1), (784,)):
      raise ValueError(f"{who}: expects uint8 MNIST pixels (n, 28, 28); {split_name} has "
                       f"{x.dtype} {x.shape}")
  if len(splits["train"]) != 60000 or len(splits["test"]) != 10000:
    raise ValueError(f"{who}: expects the full MNIST (60000 train / 10000 test), got "
                     f"{len(splits['train'])} / {len(splits['test'])}")
  normalized = {s: to_float_inputs(ArraySplit({"x": _flat(splits[s].x).reshape(-1, 28, 28),
                                               "y": splits[s].y}),
                                   pixel_max=255.0, mean=GPM_MNIST_MEAN, std=GPM_MNIST_STD)
                for s in ("train", "test")}
  order = gpm_pmnist_task_order(seed)
  val_count = int(0.1 * len(splits["train"]))
  out_shape = None if flatten else (28, 28, 1)
  tasks = tuple(
      _permuted_task(f"pmnist-{i} (seed {int(r)})", normalized, gpm_pmnist_permutation(i, r),
                     10, val_count, out_shape)
      for i, r in enumerate(order))
  return Stream(name=name, tasks=tasks, scenario="domain", num_classes=10)


GPM_CIFAR_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
GPM_CIFAR_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))


def official_gpm_cifar100(splits: Splits, num_tasks: int = 10, seed: int = 0,
                          pc_valid: float = 0.05, name: str = "gpm_cifar100") -> Stream:
  """10- (or 20-) split CIFAR-100 as the official GPM/BECAME ``dataloader/cifar100.py``.

  * Pixels: ``ToTensor`` (uint8 / 255) then per-channel ``Normalize`` with
    GPM's CIFAR mean/std, float32, NHWC (the official code is NCHW).
  * Task i: classes ``[i·k, (i+1)·k)``, k = 100 / num_tasks, in class order
    (``ids = arange(10)``); images in dataset order within a task.
  * Validation: per task, ``shuffle(arange(n_train), random_state=seed)``,
    the first ``int(pc_valid · n)`` indices (GPM/BECAME CIFAR: pc_valid 0.05).
  * Scenario: task-incremental (one head per task, the official multi-head
    setup); labels stay global here, the loop restricts each task's argmax.

  TFDS's prepared ``cifar100`` stores the images in another order than
  torchvision's pickles, so the same procedure selects other validation images
  than the official run; the split sizes are the same (train / validation per task:
  4,750 / 250 on the 10-split, 2,375 / 125 on the 20-split).

  Args:
    splits: ``train``/``test`` with uint8 images (n, 32, 32, 3) and fine labels
      0..99 (``catalog.load_catalog("cifar100")``).
    num_tasks: 10 or 20 (any divisor of 100).
    seed: the official ``--seed`` (the validation shuffle).
    pc_valid: validation fraction of each task's training images.
    name: stream name.
  """
  who = f"official_gpm_cifar100({name!r})"
  _check_splits(splits, who)
  num_tasks = _check_positive_int(num_tasks, "num_tasks", who)
  if 100 % num_tasks:
    raise ValueError(f"{who}: num_tasks must divide 100, got {num_tasks}")
  if not 0.0 <= pc_valid < 1.0:
    raise ValueError(f"{who}: pc_valid must lie in [0, 1), got {pc_valid}")
  for split_name in ("train", "test"):
    x, y = np.asarray(splits[split_name].x), np.asarray(splits[split_name].y)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"{who}: expects uint8 RGB images (n, H, W, 3); {split_name} has "
                       f"{x.dtype} {x.shape}")
    if y.min() < 0 or y.max() > 99:
      raise ValueError(f"{who}: {split_name} labels must be fine labels 0..99, got "
                       f"[{y.min()}, {y.max()}]")
  mean = np.asarray(GPM_CIFAR_MEAN, np.float32)
  std = np.asarray(GPM_CIFAR_STD, np.float32)

  def normalized(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / np.float32(255.0) - mean) / std

  k = 100 // num_tasks
  tasks = []
  for i in range(num_tasks):
    classes = tuple(range(i * k, (i + 1) * k))
    parts = {}
    for split_name in ("train", "test"):
      y = np.asarray(splits[split_name].y)
      idx = np.flatnonzero((y >= classes[0]) & (y <= classes[-1]))
      parts[split_name] = ArraySplit({"x": normalized(np.asarray(splits[split_name].x)[idx]),
                                      "y": y[idx].astype(np.int32)})
    order = sklearn_shuffle(np.arange(len(parts["train"])), random_state=seed)
    n_valid = int(pc_valid * len(order))
    tasks.append(Task(f"cifar100-{i}", parts["train"].take(order[n_valid:]), parts["test"],
                      classes, val=parts["train"].take(order[:n_valid]) if n_valid else None))
  return Stream(name=name, tasks=tuple(tasks), scenario="task", num_classes=100)


def domain_sequence(domains: Sequence[tuple[str, Splits]], name: str = "domains",
                    scenario: str = "domain") -> Stream:
  """One task per dataset, all sharing one label space (e.g. MNIST -> Animal-MNIST).

  Args:
    domains: ``[(domain_name, splits), ...]`` in training order; inputs must
      have equal shapes and dtypes across domains.
    name: stream name.
    scenario: ``"domain"`` (default) or ``"task"``.
  """
  who = f"domain_sequence({name!r})"
  if scenario not in ("domain", "task"):
    raise ValueError(f"{who}: scenario must be 'domain' or 'task', got {scenario!r}")
  if not domains:
    raise ValueError(f"{who}: needs at least one (name, splits) domain")
  shapes = {}
  for entry in domains:
    if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
      raise TypeError(f"{who}: each domain must be a (name, splits) tuple, got {entry!r:.80}")
    domain_name, splits = entry
    _check_splits(splits, f"{who}[{domain_name!r}]")
    shapes[domain_name] = (tuple(np.shape(splits["train"].x)[1:]), np.asarray(splits["train"].x).dtype)
  if len(set(shapes.values())) != 1:
    raise ValueError(f"{who}: domains disagree on input shape/dtype: {shapes}")
  num_classes = max(_num_classes(splits) for _, splits in domains)
  tasks = []
  for domain_name, splits in domains:
    classes = tuple(int(c) for c in np.unique(np.concatenate([splits["train"].y, splits["test"].y])))
    tasks.append(Task(name=domain_name, train=splits["train"], test=splits["test"],
                      classes=classes, val=splits.get("val")))
  return Stream(name=name, tasks=tuple(tasks), scenario=scenario, num_classes=num_classes)


# ---------------------------------------------------------------- registry


def _builtin(name: str, data_dir, asset_cache) -> Splits:
  from clx.data.builders import load_builtin  # pylint: disable=import-outside-toplevel
  return load_builtin(name, data_dir, asset_cache=asset_cache)


def _float_splits(splits: Splits, pixel_max: float, flatten: bool) -> dict[str, ArraySplit]:
  return {k: to_float_inputs(v, pixel_max=pixel_max, flatten=flatten) for k, v in splits.items()}


def _split_mnist(*, flatten=True, data_dir=None, asset_cache=None, **kwargs) -> Stream:
  splits = _float_splits(_builtin("clx_mnist", data_dir, asset_cache), 255.0, flatten)
  kwargs = {"num_tasks": 5, "classes_per_task": 2, "name": "split_mnist", **kwargs}
  return class_incremental(splits, **kwargs)


def _split_digits(*, flatten=True, data_dir=None, asset_cache=None, **kwargs) -> Stream:
  splits = _float_splits(_builtin("clx_digits", data_dir, asset_cache), 16.0, flatten)
  kwargs = {"num_tasks": 5, "classes_per_task": 2, "name": "split_digits", **kwargs}
  return class_incremental(splits, **kwargs)


def _pmnist(*, flatten=True, data_dir=None, asset_cache=None, seed=2, **kwargs) -> Stream:
  return official_gpm_pmnist(_builtin("clx_mnist", data_dir, asset_cache), seed=seed,
                             flatten=flatten, **kwargs)


def _permuted_digits(*, flatten=True, data_dir=None, asset_cache=None, **kwargs) -> Stream:
  splits = _float_splits(_builtin("clx_digits", data_dir, asset_cache), 16.0, flatten)
  kwargs = {"num_tasks": 5, "seed": 0, "name": "permuted_digits", "flatten": flatten, **kwargs}
  return permuted(splits, **kwargs)


def _permuted_mnist(*, flatten=True, data_dir=None, asset_cache=None, num_tasks=5, seed=0,
                    train_per_task=None, **kwargs) -> Stream:
  """MNIST in [0, 1], ``num_tasks`` random permutations, optionally a per-task
  training subset (the first ``train_per_task`` of a seeded shuffle) for quick runs."""
  splits = _float_splits(_builtin("clx_mnist", data_dir, asset_cache), 255.0, True)
  if train_per_task is not None:
    if int(train_per_task) > len(splits["train"]):  # a slice would silently keep them all
      raise ValueError(f"permuted_mnist: train_per_task={train_per_task} exceeds the "
                       f"{len(splits['train'])} training images")
    keep = np.sort(np.random.RandomState(seed).permutation(len(splits["train"]))[:int(train_per_task)])
    splits = {**splits, "train": splits["train"].take(keep)}
  return permuted(splits, num_tasks, seed=seed, flatten=flatten,
                  **{"name": "permuted_mnist", **kwargs})


def _gpm_cifar100(*, flatten=False, data_dir=None, asset_cache=None, seed=0, num_tasks=10,
                  pc_valid=0.05, **kwargs) -> Stream:
  """TFDS ``cifar100`` (prepared under ``data_dir``/$TFDS_DATA_DIR; never downloaded)."""
  del flatten, asset_cache  # images stay NHWC; the catalog has no asset wheel
  from clx.data import catalog  # pylint: disable=import-outside-toplevel
  raw = catalog.load_catalog("cifar100", data_dir, splits=("train", "test"),
                             x_key="image", y_key="label")
  return official_gpm_cifar100(raw, num_tasks, seed=seed, pc_valid=pc_valid, **kwargs)


def _mnist_animal_domains(*, flatten=True, data_dir=None, asset_cache=None, seed=None,
                          **kwargs) -> Stream:
  del seed  # accepted for a uniform interface; this stream has no randomness
  domains = [(label, _float_splits(_builtin(builtin, data_dir, asset_cache), 255.0, flatten))
             for label, builtin in (("mnist", "clx_mnist"), ("animal_mnist", "clx_animal_mnist"))]
  return domain_sequence(domains, **{"name": "mnist_animal_domains", **kwargs})


STREAMS: dict[str, Callable[..., Stream]] = {
    "split_mnist": _split_mnist,
    "split_digits": _split_digits,
    "pmnist": _pmnist,
    "permuted_digits": _permuted_digits,
    "permuted_mnist": _permuted_mnist,
    "mnist_animal_domains": _mnist_animal_domains,
    "gpm_cifar100": _gpm_cifar100,
}


def register_stream(name: str, factory: Callable[..., Stream], *, overwrite: bool = False) -> None:
  """Adds a named stream factory (``factory(**kwargs) -> Stream``) to :func:`get_stream`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"stream name must be a non-empty string, got {name!r}")
  if name in STREAMS and not overwrite:
    raise ValueError(f"stream {name!r} is already registered; pass overwrite=True to replace it")
  STREAMS[name] = factory


# The builtin factories forward their **kwargs to these constructors: together
# they define the arguments a builtin stream accepts (checked before loading).
_FORWARDS_TO = {
    _split_mnist: class_incremental, _split_digits: class_incremental,
    _pmnist: official_gpm_pmnist, _permuted_digits: permuted, _permuted_mnist: permuted,
    _mnist_animal_domains: domain_sequence, _gpm_cifar100: official_gpm_cifar100,
}


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_stream_args(name: str, **kwargs) -> None:
  """Checks a named stream's arguments without loading any data.

  :func:`get_stream` runs it first, so a bad value fails in milliseconds
  instead of after the data loads (or, worse, silently: ``train_per_task=-5``
  was a Python slice). Checked by name, for every stream: ``num_tasks`` a
  positive int; ``classes_per_task`` and ``train_per_task`` None or positive
  ints; ``seed`` None or an int in [0, 2**32) (NumPy's seed range);
  ``val_fraction`` and ``pc_valid`` in [0, 1); ``flatten`` a bool;
  ``scenario`` one of ``class``/``task``/``domain``. For the builtin streams
  an argument that neither the factory nor its constructor takes is an error.

  Args:
    name: one of :func:`list_streams`.
    **kwargs: the arguments :func:`get_stream` would receive.

  Raises:
    KeyError: unknown stream name.
    TypeError: an argument the builtin stream does not take.
    ValueError: a value out of range, naming the stream and argument.
  """
  if name not in STREAMS:
    raise KeyError(f"unknown stream {name!r}; known streams: {list_streams()}")
  factory = STREAMS[name]
  who = f"stream {name!r}"
  if factory in _FORWARDS_TO:
    accepted = set()
    for fn in (factory, _FORWARDS_TO[factory]):
      accepted |= {p.name for p in inspect.signature(fn).parameters.values()
                   if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    accepted -= {"splits", "domains"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
      raise TypeError(f"{who}: unknown argument(s) {unknown}; accepted: {sorted(accepted)}")
  for key in ("num_tasks", "classes_per_task", "train_per_task"):
    value = kwargs.get(key)
    if (value is not None or key == "num_tasks") and key in kwargs:
      if not _is_int(value) or value <= 0:
        raise ValueError(f"{who}: {key} must be a positive integer, got {value!r}")
  seed = kwargs.get("seed")
  if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):
    raise ValueError(f"{who}: seed must be an integer in [0, 2**32), got {seed!r}")
  for key in ("val_fraction", "pc_valid"):
    if key in kwargs:
      value = kwargs[key]
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{who}: {key} must lie in [0, 1), got {value!r}")
  if "flatten" in kwargs and not isinstance(kwargs["flatten"], bool):
    raise ValueError(f"{who}: flatten must be True or False, got {kwargs['flatten']!r}")
  if "scenario" in kwargs and kwargs["scenario"] not in ("class", "task", "domain"):
    raise ValueError(f"{who}: scenario must be 'class', 'task' or 'domain', got "
                     f"{kwargs['scenario']!r}")


def list_streams() -> list[str]:
  """Names accepted by :func:`get_stream`."""
  return sorted(STREAMS)


def get_stream(name: str, *, flatten: bool = True, data_dir: str | os.PathLike | None = None,
               asset_cache: str | os.PathLike | None = None, **kwargs) -> Stream:
  """A named benchmark stream built from the offline builtins.

  Known names:
    split_mnist: MNIST, 5 tasks x 2 classes (class scenario), inputs in [0, 1].
    split_digits: sklearn digits, 5 x 2 (class scenario), inputs ``x / 16``.
    pmnist: :func:`official_gpm_pmnist` (10 tasks, GPM normalisation, seed 2).
    permuted_digits: sklearn digits, 5 permutations (domain scenario).
    permuted_mnist: MNIST in [0, 1], ``num_tasks`` permutations (domain
      scenario), optional ``train_per_task`` subset.
    mnist_animal_domains: MNIST -> Animal-MNIST (domain scenario, 10-way).
    gpm_cifar100: :func:`official_gpm_cifar100` from a prepared TFDS
      ``cifar100`` (pods; fails at once with how to prepare it when absent).

  Args:
    name: one of :func:`list_streams`.
    flatten: (n, D) inputs if True, else (n, H, W, 1).
    data_dir: TFDS dir for the builtins (default ``<cache>/tfds``).
    asset_cache: asset cache root (default ``$CLX_CACHE_DIR`` or ``~/.cache/clx``).
    **kwargs: forwarded to the constructor (e.g. ``scenario="task"``,
      ``class_order="seed"``, ``seed=...``).
  """
  check_stream_args(name, flatten=flatten, **kwargs)  # before any data loads
  return STREAMS[name](flatten=flatten, data_dir=data_dir, asset_cache=asset_cache, **kwargs)


__all__ = [
    "GPM_CIFAR_MEAN", "GPM_CIFAR_STD", "GPM_MNIST_MEAN", "GPM_MNIST_STD", "STREAMS",
    "check_stream_args", "class_incremental", "official_gpm_cifar100",
    "domain_sequence", "get_stream", "gpm_pmnist_permutation", "gpm_pmnist_task_order",
    "list_streams", "official_gpm_pmnist", "permuted", "register_stream", "sklearn_shuffle",
    "to_float_inputs",
]


# ---------------------------------------------------------------- text streams (clx.data.text)


def _text_stream(name: str) -> Callable[..., Stream]:
  def factory(**kwargs) -> Stream:
    from clx.data import text  # pylint: disable=import-outside-toplevel
    return text.STREAM_FACTORIES[name](**kwargs)
  factory.__name__ = factory.__qualname__ = f"_{name}"
  factory.__doc__ = f"``{name}`` of :mod:`clx.data.text` (token ids of a text tokenizer)."
  return factory


for _name in ("wordnet_supersense", "rotten_tomatoes", "text_tasks", "wordnet_living"):
  register_stream(_name, _text_stream(_name))
del _name
