"""Per-process image batches for one task split: decode, transform and batch per step, with grain.

:func:`image_batches` is the interface the training loop adopts: for one
task's split, one pass (``epoch``) and this process, it yields dicts

  ``{"x": (b, H, W, 3) float32 (or uint8), "y": (b,) int32,
     "index": (b,) int64 (row in the split; -1 for padding), "mask": (b,) bool}``

where ``b = batch_size // process_count`` rows of every *global* batch are
this process's contiguous slice (the layout ``jax.make_array_from_process_local_data``
expects). The global batches are the same whatever the number of processes:
global batch ``k`` is ``order[k·B:(k+1)·B]`` of one permutation
``order = default_rng([SHUFFLE_TAG, seed, task, epoch]).permutation(n)``, and
example ``i`` is augmented with its own RNG ``example_rng(seed, task, epoch, i)``;
so same ``(seed, task, epoch)`` -> same batches, bit for bit, including after
a resume at a task boundary, with any number of processes or worker threads.

Memory stays bounded: the split is a list of file paths (or of TFDS record
indices, :class:`~clx.data.images.TfdsImageSplit`); each image is read,
decoded (PIL), cropped/resized and flipped when its batch is assembled, in
grain's prefetch threads (PIL releases the GIL while decoding and resampling),
and only ``prefetch`` batches are buffered. Nothing holds a float copy of the
split.

The last global batch, when short, is padded to ``B`` rows (``mask`` False,
``index`` -1, image zeros) unless ``drop_remainder``: every step has the same
shape on every process (no recompilation), and the step averages over
``mask`` to get the official mean over the short batch (torch DataLoader,
``drop_last=False``).

:class:`ImageStream` / :func:`class_incremental_images` split ``ImageSplit``s
into class-incremental tasks (PyCIL's relabelling, as ``clx.data.streams``)
without touching pixels.

The training loop streams them: :func:`streaming_stream` turns an
ImageStream into a ``clx.data.types.Stream`` of :class:`StreamingSplit` s
(files + labels + the named train / test / pass transforms), and
``clx.train`` reads the rows its index plans give each process through
:meth:`StreamingSplit.step_batches` (grain threads, prefetch), moves uint8
to the devices and normalises there. A training epoch is keyed
``(seed, task, phase, epoch)``, a host pass (``ctx.batches``) ``(seed, task,
7919, seed_arg, pass number)``; :class:`UnloadedImages` stands in for ``x``
and refuses to be read, so no float32 copy of a split can appear.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from clx.data.images import ImageSplit
from clx.data.transforms import (SHUFFLE_TAG, ImageTransform, get_transform, keyed_rng,
                                 normalize_batch)


def _nonneg(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
  return int(value)


def epoch_order(n: int, *, seed: int, task: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The global example order of one pass: a permutation keyed by ``(seed, task, epoch)``."""
  if not shuffle:
    return np.arange(n, dtype=np.int64)
  key = [SHUFFLE_TAG, _nonneg(seed, "seed"), _nonneg(task, "task"), _nonneg(epoch, "epoch")]
  return np.random.default_rng(key).permutation(n).astype(np.int64)


def batch_plan(n: int, batch_size: int, *, seed: int, task: int, epoch: int, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1,
               drop_remainder: bool = False) -> np.ndarray:
  """This process's rows of every global batch: int64 (steps, batch_size // process_count).

  Global batch ``k`` is ``order[k·B:(k+1)·B]`` (see :func:`epoch_order`),
  padded with -1 to ``B`` when short (or dropped with ``drop_remainder``);
  process ``p`` gets columns ``[p·b, (p+1)·b)`` with ``b = B / process_count``.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got process_index={process_index}, "
                     f"process_count={process_count}")
  if batch_size % process_count:
    raise ValueError(f"the global batch_size {batch_size} must divide evenly over "
                     f"{process_count} processes")
  order = epoch_order(n, seed=seed, task=task, epoch=epoch, shuffle=shuffle)
  steps = n // batch_size if drop_remainder else -(-n // batch_size)
  padded = np.full(steps * batch_size, -1, np.int64)
  used = min(n, steps * batch_size)
  padded[:used] = order[:used]
  per = batch_size // process_count
  return padded.reshape(steps, batch_size)[:, process_index * per:(process_index + 1) * per]


class _Rows:
  """Random-access source over this process's planned rows (flattened plan)."""

  def __init__(self, rows: np.ndarray):
    self._rows = rows

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i):
    return int(self._rows[i])


def _default_process() -> tuple[int, int]:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index(), jax.process_count()


@dataclasses.dataclass(frozen=True)
class _Example:
  """Row -> one decoded, transformed example; ``key`` names the pass (:func:`keyed_rng`)."""

  split: ImageSplit
  transform: ImageTransform
  key: tuple[int, ...]

  def __call__(self, row: int) -> dict:
    size = self.transform.size
    if row < 0:  # padding of a short last batch
      return {"x": np.zeros((size, size, 3), np.uint8), "y": np.int32(0), "index": np.int64(-1),
              "mask": np.bool_(False)}
    rng = keyed_rng(self.key, row) if self.transform.random else None
    image = self.transform(self.split.load_image(row), rng)
    if image.shape != (size, size, 3):
      raise ValueError(f"transform {self.transform.name!r} gives {image.shape} for example {row}; "
                       f"batching needs ({size}, {size}, 3)")
    return {"x": image, "y": self.split.labels[row], "index": np.int64(row), "mask": np.bool_(True)}


def image_batches(split: ImageSplit, batch_size: int, *, transform: str | ImageTransform,
                  seed: int, task: int = 0, epoch: int = 0, shuffle: bool = True,
                  process_index: int | None = None, process_count: int | None = None,
                  drop_remainder: bool = False, pixel_range: str = "0,1",
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  dtype: str = "float32", num_threads: int = 4, prefetch: int = 2,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Batches of one pass over ``split`` for this process, decoded and augmented per batch.

  Args:
    split: the task's images: an ImageSplit (files) or TfdsImageSplit (a prepared
      TFDS split), anything with ``len``, ``labels`` and ``load_image(i)``.
    batch_size: GLOBAL batch size ``B`` (divisible by ``process_count``).
    transform: a name in ``clx.data.transforms.TRANSFORMS`` or an ImageTransform
      (train: ``"rrc224_flip"``; test: ``"resize256_center224"`` ...).
    seed, task, epoch: the keys of the order and of every example's augmentation.
    shuffle: permute the split (training passes); False keeps the split order.
    process_index, process_count: this process (default ``jax.process_index()``
      / ``jax.process_count()``).
    drop_remainder: drop the last short global batch instead of padding it.
    pixel_range, mean, std: float normalisation (:func:`~clx.data.transforms.normalize_batch`).
    dtype: ``"float32"`` (normalised on the host, per batch) or ``"uint8"``
      (raw pixels; normalise on device to move 4x fewer bytes).
    num_threads: grain prefetch threads decoding images (0: decode in the
      consumer's thread, no prefetch).
    prefetch: decoded images buffered ahead, in batches (memory bound:
      ``prefetch · b · H·W·3`` bytes of uint8 in flight).
    start_step: skip the first batches of the pass (a mid-epoch resume): the
      batches from ``start_step`` on are those of an uninterrupted pass.

  Returns:
    An iterator of dicts ``x``, ``y``, ``index``, ``mask`` with leading axis
    ``b = batch_size // process_count`` (module docstring).
  """
  if dtype not in ("float32", "uint8"):
    raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
  if not hasattr(split, "load_image") or not hasattr(split, "labels"):
    raise TypeError(f"split must be an ImageSplit or TfdsImageSplit, got {type(split).__name__}")
  if len(split) == 0:
    raise ValueError("split is empty")
  transform = get_transform(transform)
  if num_threads < 0 or prefetch < 0:
    raise ValueError(f"num_threads and prefetch must be >= 0, got {num_threads}, {prefetch}")
  normalize_batch(np.zeros((1, 1, 1, 3), np.uint8), pixel_range, mean, std)  # validate early
  if process_index is None or process_count is None:
    default_index, default_count = _default_process()
    process_index = default_index if process_index is None else process_index
    process_count = default_count if process_count is None else process_count
  plan = batch_plan(len(split), batch_size, seed=seed, task=task, epoch=epoch, shuffle=shuffle,
                    process_index=process_index, process_count=process_count,
                    drop_remainder=drop_remainder)
  if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) or not (
      0 <= start_step <= len(plan)):
    raise ValueError(f"start_step must be in [0, {len(plan)}] (steps in this pass), got {start_step!r}")
  plan = plan[start_step:]
  per = plan.shape[1]
  # keyed_rng((seed, task, epoch), i) is example_rng(seed, task, epoch, i)
  example = _Example(split, transform, (_nonneg(seed, "seed"), _nonneg(task, "task"),
                                        _nonneg(epoch, "epoch")))
  return _iterate(plan.reshape(-1), per, example, num_threads, prefetch, dtype, pixel_range, mean, std)


def _iterate(rows, per, example, num_threads, prefetch, dtype, pixel_range, mean, std):
  import grain  # pylint: disable=import-outside-toplevel

  def finish(batch):
    if dtype == "float32":
      batch["x"] = normalize_batch(batch["x"], pixel_range, mean, std)
    return batch

  if len(rows) == 0:
    return iter(())
  dataset = grain.MapDataset.source(_Rows(rows)).map(example)
  if num_threads > 0:
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, prefetch) * per)
    iterable = dataset.to_iter_dataset(options).batch(per).map(finish)
    return iter(iterable)
  # Sequential: iterating a grain MapDataset directly would call to_iter_dataset()
  # with grain's defaults (16 threads, 500 elements = 500 *batches* prefetched).
  batched = dataset.batch(per)
  return (finish(batched[k]) for k in range(len(batched)))


# ------------------------------------------------------------------ tasks


@dataclasses.dataclass(frozen=True)
class ImageTask:
  """One task over images on disk (the pipeline's counterpart of ``clx.data.types.Task``)."""

  name: str
  train: ImageSplit
  test: ImageSplit
  classes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ImageStream:
  """An ordered task sequence over images on disk, with the transforms its config names.

  Attributes:
    name, tasks, scenario, num_classes: as ``clx.data.types.Stream``.
    train_transform, test_transform: names in ``TRANSFORMS`` (the official ones).
    gram_transform: the transform of representation passes (InfLoRA: the train one).
    pixel_range: ``"0,1"`` (InfLoRA) or ``"-1,1"``.
  """

  name: str
  tasks: tuple[ImageTask, ...]
  scenario: str
  num_classes: int
  train_transform: str
  test_transform: str
  gram_transform: str
  pixel_range: str = "0,1"

  def __len__(self) -> int:
    return len(self.tasks)

  @property
  def input_shape(self) -> tuple[int, ...]:
    size = get_transform(self.test_transform).size
    return (size, size, 3)


def class_incremental_images(splits: dict[str, ImageSplit], increments: Sequence[int], *,
                             class_order: Sequence[int] | None = None, name: str = "images",
                             scenario: str = "class", train_transform: str = "rrc224_flip",
                             test_transform: str = "resize256_center224",
                             gram_transform: str | None = None,
                             pixel_range: str = "0,1") -> ImageStream:
  """Class-incremental tasks over image splits (PyCIL/InfLoRA ``DataManager``).

  Class ``class_order[k]`` is relabelled ``k`` (``_map_new_class_index``) and
  task ``t`` holds labels ``[sum(increments[:t]), sum(increments[:t+1]))``; the
  files keep their split order.

  Args:
    splits: ``{"train", "test"}`` ImageSplits with global labels.
    increments: classes per task (InfLoRA: ``init_cls`` then ``increment``s).
    class_order: default ascending (InfLoRA's ``shuffle: false`` configs).
    name, scenario: stream name; ``"class"`` or ``"task"``.
    train_transform, test_transform, gram_transform: transform names
      (``gram_transform`` defaults to the train one, as InfLoRA).
    pixel_range: normalisation of the model inputs.
  """
  for key in ("train", "test"):
    if key not in splits:
      raise KeyError(f"class_incremental_images: splits need 'train' and 'test', got {sorted(splits)}")
  for t in (train_transform, test_transform, gram_transform or train_transform):
    get_transform(t)
  if scenario not in ("class", "task"):
    raise ValueError(f"scenario must be 'class' or 'task', got {scenario!r}")
  present = np.unique(splits["train"].labels)
  order = present if class_order is None else np.asarray(list(class_order), np.int64)
  increments = [int(k) for k in increments]
  if not increments or min(increments) <= 0:
    raise ValueError(f"increments must be positive class counts, got {increments}")
  if sum(increments) > len(order):
    raise ValueError(f"increments {increments} need {sum(increments)} classes, "
                     f"only {len(order)} in the class order")
  max_label = max(int(s.labels.max()) for s in splits.values() if len(s))
  label_map = np.full(max(max_label, int(order.max())) + 1, -1, np.int64)
  label_map[order] = np.arange(len(order))
  tasks, start = [], 0
  for t, k in enumerate(increments):
    original = order[start:start + k]
    parts = {}
    for key in ("train", "test"):
      split = splits[key]
      part = split.take(np.flatnonzero(np.isin(split.labels, original))).relabel(label_map)
      if len(part) == 0:
        raise ValueError(f"{name}: task {t} has no {key} images (classes {original[:5].tolist()}...)")
      parts[key] = part
    tasks.append(ImageTask(f"classes {start}-{start + k - 1}", parts["train"], parts["test"],
                           tuple(range(start, start + k))))
    start += k
  return ImageStream(name, tuple(tasks), scenario, sum(increments), train_transform, test_transform,
                     gram_transform or train_transform, pixel_range)


def inflora_increments(num_classes: int, init_cls: int, increment: int) -> list[int]:
  """InfLoRA ``DataManager`` task sizes: ``init_cls``, then ``increment`` while classes remain,
  then the remainder."""
  if init_cls <= 0 or increment <= 0 or init_cls > num_classes:
    raise ValueError(f"need 0 < init_cls <= num_classes and increment > 0, got {init_cls}, "
                     f"{increment}, {num_classes}")
  sizes = [init_cls]
  while sum(sizes) + increment < num_classes:
    sizes.append(increment)
  if num_classes - sum(sizes) > 0:
    sizes.append(num_classes - sum(sizes))
  return sizes


def materialize(stream: ImageStream, *, transform: str | None = None, batch_size: int = 256,
                num_threads: int = 4):
  """An in-memory ``clx.data.types.Stream`` (float32 pixels) of an ImageStream.

  Every image goes through ``transform`` (default: the stream's test
  transform, no augmentation) and the stream's pixel range. This holds the
  float32 split in host RAM (``H·W·3·4`` bytes per image: 602 kB at 224²) —
  the copy :func:`streaming_stream` avoids; for small streams and for
  comparisons (the loop gives the same numbers on both for deterministic
  transforms, ``tests/train/test_streaming.py``).
  """
  from clx.data.types import ArraySplit, Stream, Task  # pylint: disable=import-outside-toplevel
  transform = transform or stream.test_transform

  def load(split: ImageSplit) -> ArraySplit:
    xs, ys = [], []
    for batch in image_batches(split, batch_size, transform=transform, seed=0, shuffle=False,
                               process_index=0, process_count=1, pixel_range=stream.pixel_range,
                               num_threads=num_threads):
      keep = batch["mask"]
      xs.append(batch["x"][keep])
      ys.append(batch["y"][keep])
    return ArraySplit({"x": np.concatenate(xs), "y": np.concatenate(ys).astype(np.int32)})

  tasks = tuple(Task(t.name, load(t.train), load(t.test), t.classes) for t in stream.tasks)
  return Stream(stream.name, tasks, stream.scenario, stream.num_classes)


def official_image_stream(dataset: str, *, root=None, data_dir=None, list_dir=None,
                          num_tasks: int = 10, seed: int = 0, split: str | None = None,
                          check: bool = True, train_transform: str | None = None,
                          test_transform: str | None = None, gram_transform: str | None = None,
                          pixel_range: str = "0,1") -> ImageStream:
  """An InfLoRA benchmark as an ImageStream: the official split, transforms and task sizes.

  Classes in ascending order (the official configs' ``shuffle: false``),
  ``init_cls = increment = num_classes // num_tasks`` (InfLoRA's
  ``DataManager``), train/test/Gram transforms from ``OFFICIAL_TRANSFORMS``,
  pixels in [0, 1] (``ToTensor``, ``Normalize(0, 1)``).

  Args:
    dataset: ``cifar100`` (prepared TFDS), ``imagenet_r`` (``root`` folder, or
      prepared TFDS when ``root`` is None), ``imagenet_a``, ``cub``, ``domainnet``.
    root: the dataset folder (see ``clx.data.images``).
    data_dir: TFDS data dir (``cifar100``; ``imagenet_r`` without ``root``).
    list_dir: split-list folder (``domainnet``; ``imagenet_r`` with ``split="coda"``).
    num_tasks: number of tasks (5/10/20 for ImageNet-R, 10 for CIFAR-100, 5 for DomainNet).
    seed: the torch seed of ImageNet-R's ``random_split`` (0 in the official runs).
    split: ``imagenet_r`` only: ``"inflora"`` or ``"coda"``.
    check: stat every image file first.
    train_transform, test_transform, gram_transform: transform names instead of
      InfLoRA's (``OFFICIAL_TRANSFORMS``; the Gram transform defaults to the
      train one, as InfLoRA's passes iterate its training loader), e.g. the
      PROTEUS authors' ``rrc224_s005_flip`` / ``resize256bicubic_center224``.
    pixel_range: ``"0,1"`` (InfLoRA, PROTEUS: ``ToTensor`` only) or ``"-1,1"``.
  """
  from clx.data import images  # pylint: disable=import-outside-toplevel
  from clx.data.transforms import OFFICIAL_TRANSFORMS  # pylint: disable=import-outside-toplevel
  num_classes = {"cifar100": 100, **images.NUM_CLASSES}
  if dataset not in num_classes:
    raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(num_classes)}")
  if dataset == "cifar100":
    splits = {s: images.tfds_image_split("cifar100", s, data_dir) for s in ("train", "test")}
  elif dataset == "imagenet_r" and root is None and split in (None, "inflora"):
    splits = images.imagenet_r_tfds(data_dir, seed=seed)
  else:
    if root is None:
      raise ValueError(f"{dataset}: pass root, the dataset folder")
    splits = images.load_image_dataset(dataset, root, split=split, seed=seed, list_dir=list_dir,
                                       check=check)
  total = num_classes[dataset]
  if num_tasks <= 0 or total // num_tasks == 0:
    raise ValueError(f"num_tasks must be in [1, {total}], got {num_tasks}")
  per = total // num_tasks
  train, test = OFFICIAL_TRANSFORMS[dataset]
  return class_incremental_images(splits, inflora_increments(total, per, per),
                                  class_order=range(total), name=dataset,
                                  train_transform=train_transform or train,
                                  test_transform=test_transform or test,
                                  gram_transform=gram_transform, pixel_range=pixel_range)


# ------------------------------------------------------------------ streaming splits in the loop


class MaterializationError(RuntimeError):
  """Something asked a :class:`StreamingSplit` for all of its pixels at once."""


@dataclasses.dataclass(frozen=True)
class UnloadedImages:
  """The ``x`` of a :class:`StreamingSplit`: shape and dtype of the model inputs, no pixels.

  Code that only inspects a split (``x.shape``, ``x.dtype``, ``len(x)``) works;
  indexing or converting it to an array raises :class:`MaterializationError`,
  so nothing can hold a float32 copy of the split by accident.

  Attributes:
    shape: ``(n, H, W, 3)``: the split's size and one transformed example.
    what: a description for the error message.
  """

  shape: tuple[int, ...]
  what: str = "a streaming image split"

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.float32)  # what the model receives, after normalisation on device

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def _refuse(self, *_args, **_kwargs):
    raise MaterializationError(
        f"{self.what} streams its images per batch (clx.data.pipeline.StreamingSplit); its "
        f"pixels {self.shape} are never held in host memory. Use the loop's batches "
        "(ctx.batches / ctx.sample) or clx.data.pipeline.materialize for a small stream.")

  __getitem__ = _refuse
  __array__ = _refuse
  __iter__ = _refuse


@dataclasses.dataclass(frozen=True)
class StreamingSplit:
  """A split the training loop streams: image files (or TFDS records) + labels + named transforms.

  The loop (``clx.train``) recognises it and, instead of indexing host
  arrays, reads the planned rows of every step through grain: each process
  reads only its own rows, images are decoded and transformed in
  ``num_threads`` prefetch threads with ``prefetch`` batches buffered, batches
  cross to the device as uint8 and are normalised there, inside the jitted train /
  validation / evaluation steps (:func:`clx.train.batches.normalize_inputs`; host passes
  get them normalised by :func:`clx.train.batches.normalize_on_device`). Example ``i`` of a pass
  keyed ``key`` is augmented with :func:`~clx.data.transforms.keyed_rng`
  ``(key, i)``.

  Attributes:
    images: an ``ImageSplit`` or ``TfdsImageSplit`` (``len``, ``labels``,
      ``take``, ``load_image``).
    transform: the transform of the loop's training epochs (train split) or of
      evaluation (test split).
    pass_transform: the transform of host passes over this split (Gram,
      features, Fisher, signatures: ``ctx.batches`` / ``ctx.sample``);
      ``None``: ``transform``. InfLoRA's passes iterate its training loader,
      so its train split passes with the train transform.
    pixel_range, mean, std: normalisation (:func:`~clx.data.transforms.normalize_batch`).
    num_threads, prefetch: grain decoding threads and batches decoded ahead
      (speed and memory only; never the numbers).
  """

  images: Any
  transform: str | ImageTransform
  pass_transform: str | ImageTransform | None = None
  pixel_range: str = "0,1"
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  num_threads: int = dataclasses.field(default=4, compare=False)
  prefetch: int = dataclasses.field(default=2, compare=False)

  def __post_init__(self):
    if not hasattr(self.images, "load_image") or not hasattr(self.images, "labels"):
      raise TypeError(f"StreamingSplit.images must be an ImageSplit or TfdsImageSplit, got "
                      f"{type(self.images).__name__}")
    size = get_transform(self.transform).size
    if self.pass_transform is not None and get_transform(self.pass_transform).size != size:
      raise ValueError(f"pass_transform {get_transform(self.pass_transform).name!r} gives "
                       f"{get_transform(self.pass_transform).size}² images, transform "
                       f"{get_transform(self.transform).name!r} {size}²: the model takes one size")
    normalize_batch(np.zeros((1, 1, 1, 3), np.uint8), self.pixel_range, self.mean, self.std)
    if isinstance(self.num_threads, bool) or self.num_threads < 0 or self.prefetch < 0:
      raise ValueError(f"num_threads and prefetch must be >= 0, got {self.num_threads}, "
                       f"{self.prefetch}")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def y(self) -> np.ndarray:
    """(n,) int32 labels (cheap: no image is read)."""
    return np.asarray(self.images.labels, np.int32)

  @property
  def example_shape(self) -> tuple[int, int, int]:
    size = get_transform(self.transform).size
    return (size, size, 3)

  @property
  def x(self) -> UnloadedImages:
    return UnloadedImages((len(self), *self.example_shape))

  @property
  def example_nbytes(self) -> int:
    """Bytes of one example as the model sees it (float32 on device)."""
    return int(np.prod(self.example_shape)) * 4

  def for_passes(self) -> "StreamingSplit":
    """This split with the transform of host passes (``pass_transform``)."""
    if self.pass_transform is None:
      return self
    return dataclasses.replace(self, transform=self.pass_transform)

  def take(self, indices) -> "StreamingSplit":
    return dataclasses.replace(self, images=self.images.take(indices))

  def concat(self, others: Sequence["StreamingSplit"]) -> "StreamingSplit":
    """This split followed by ``others`` (:func:`concat_streaming`)."""
    return concat_streaming([self, *others])

  def step_batches(self, rows: np.ndarray, key: Sequence[int]) -> Iterator[dict[str, np.ndarray]]:
    """Host batches of planned rows, decoded ahead in grain threads.

    Args:
      rows: (steps, b) int64 rows of this split; ``-1`` marks padding rows.
      key: non-negative ints naming the pass (the augmentation key).

    Returns:
      An iterator of ``steps`` dicts: ``x`` (b, H, W, 3) uint8, ``y`` (b,)
      int32, ``mask`` (b,) float32 (0 on padding rows, whose pixels are 0).
    """
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 2:
      raise ValueError(f"rows must be (steps, batch), got shape {rows.shape}")
    if rows.size and rows.max() >= len(self):
      raise ValueError(f"row {int(rows.max())} is out of range for a split of {len(self)}")
    example = _Example(self.images, get_transform(self.transform),
                       tuple(_nonneg(k, "key word") for k in key))
    for batch in _iterate(rows.reshape(-1), rows.shape[1], example, self.num_threads,
                          self.prefetch, "uint8", self.pixel_range, self.mean, self.std):
      yield {"x": batch["x"], "y": batch["y"].astype(np.int32),
             "mask": batch["mask"].astype(np.float32)}

  def load(self, rows: Sequence[int], key: Sequence[int]) -> dict[str, np.ndarray]:
    """A few examples as normalised float32 host arrays (e.g. GPM's sample of a task).

    Args:
      rows: (k,) rows of this split.
      key: the augmentation key of the pass.

    Returns:
      ``{"x": (k, H, W, 3) float32, "y": (k,) int32}``.
    """
    rows = np.asarray(rows, np.int64).reshape(1, -1)
    batch = next(iter(dataclasses.replace(self, num_threads=0).step_batches(rows, key)))
    return {"x": normalize_batch(batch["x"], self.pixel_range, self.mean, self.std),
            "y": batch["y"]}


def concat_streaming(splits: Sequence[StreamingSplit]) -> StreamingSplit:
  """The union of streaming splits of file images (joint training's cumulative view).

  Raises:
    TypeError: the splits are not all file-backed ``ImageSplit`` s with the same transforms.
  """
  first = splits[0]
  if not all(isinstance(s.images, ImageSplit) for s in splits):
    raise TypeError("concat_streaming: only file-backed ImageSplits can be concatenated")
  if any(dataclasses.replace(s, images=first.images) != first for s in splits):
    raise TypeError("concat_streaming: the splits differ in transforms or normalisation")
  images = ImageSplit(np.concatenate([s.images.paths for s in splits]),
                      np.concatenate([s.images.labels for s in splits]), first.images.classes)
  return dataclasses.replace(first, images=images)


def streaming_stream(stream: ImageStream, *, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, num_threads: int = 4,
                     prefetch: int = 2):
  """The ``clx.data.types.Stream`` the loop trains on, over :class:`StreamingSplit` s.

  Train splits stream with the stream's train transform and pass with its
  Gram transform; test splits use the test transform for both. No image is
  read here.

  Args:
    stream: an :class:`ImageStream` (e.g. :func:`official_image_stream`).
    mean, std: optional per-channel normalisation instead of ``stream.pixel_range``.
    num_threads, prefetch: grain decoding threads and batches decoded ahead.

  Returns:
    A ``Stream`` whose ``input_shape`` is the transforms' ``(H, W, 3)``.
  """
  from clx.data.types import Stream, Task  # pylint: disable=import-outside-toplevel
  norm = dict(pixel_range=stream.pixel_range, mean=None if mean is None else tuple(mean),
              std=None if std is None else tuple(std), num_threads=num_threads,
              prefetch=prefetch)
  tasks = tuple(
      Task(t.name, StreamingSplit(t.train, stream.train_transform, stream.gram_transform, **norm),
           StreamingSplit(t.test, stream.test_transform, None, **norm), t.classes)
      for t in stream.tasks)
  return Stream(stream.name, tasks, stream.scenario, stream.num_classes)
