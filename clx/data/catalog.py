"""TFDS catalog datasets (cifar100, imagenet_r, domainnet, ...) from a prepared data_dir.

clx never downloads catalog datasets: offline, ``tfds.load`` waits about 200 s
for the network before failing. Instead this module looks for an already
prepared folder ``<data_dir>/<name>[/<config>]/<version>/dataset_info.json``
and reads it with ``tfds.builder_from_directory`` (no catalog code, no
network, no TensorFlow). A missing folder raises
:class:`DatasetNotPreparedError` at once, saying how to prepare it.

Reading without TensorFlow needs a random-access file format
(``array_record``, or ``parquet``); TFDS's default ``tfrecord`` needs TF.

Large data: :func:`catalog_data_source` gives a random-access source and
:func:`grain_batches` turns any such source into shuffled, per-process sharded
batches with grain, without holding the dataset in memory. For image datasets
with the official transforms and splits, use ``clx.data.images.tfds_image_split``
(or ``imagenet_r_tfds``) with ``clx.data.pipeline.image_batches`` instead: images
are decoded and augmented per batch there.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from clx.data.types import ArraySplit

_VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+$")


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared (in a readable format) under the data_dir."""


def tfds_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The TFDS data dir: the argument, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
  root = data_dir if data_dir is not None else os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return pathlib.Path(root).expanduser()


def parse_name(name: str) -> tuple[str, str | None, str | None]:
  """``"name[/config][:version]"`` -> ``(name, config, version)``."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
  base, _, version = name.partition(":")
  dataset, _, config = base.partition("/")
  if not re.fullmatch(r"[a-z0-9_]+", dataset):
    raise ValueError(f"invalid TFDS dataset name {dataset!r} in {name!r}")
  if version and not _VERSION_DIR.match(version):
    raise ValueError(f"invalid version {version!r} in {name!r}; expected e.g. '3.0.2'")
  return dataset, config or None, version or None


def _version_key(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in version.split("."))


def _prepared_versions(folder: pathlib.Path) -> list[pathlib.Path]:
  if not folder.is_dir():
    return []
  found = [child for child in folder.iterdir()
           if _VERSION_DIR.match(child.name) and (child / "dataset_info.json").is_file()]
  return sorted(found, key=lambda p: _version_key(p.name))


def _how_to_prepare(name: str, data_dir: pathlib.Path) -> str:
  return (f"clx does not download TFDS catalog datasets. On a machine with internet run\n"
          f"  tfds build {name} --data_dir {data_dir} --file_format=array_record\n"
          f"(or python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
          f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"),\n"
          f"or copy an already prepared '{name.split('/')[0]}' folder into {data_dir}. "
          f"Use file_format=array_record (or parquet): the default tfrecord cannot be read "
          f"without TensorFlow. Some datasets (e.g. imagenet2012) also need manually "
          f"downloaded files in <data_dir>/downloads/manual.")


def find_prepared(name: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The prepared version folder of ``name`` (newest version unless pinned).

  Args:
    name: ``"cifar100"``, ``"domainnet/real"``, ``"cifar100:3.0.2"`` ...
    data_dir: TFDS data dir (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

  Raises:
    DatasetNotPreparedError: nothing prepared there; the message says how to prepare it.
  """
  dataset, config, version = parse_name(name)
  root = tfds_data_dir(data_dir)
  base = root / dataset
  if config is not None:
    candidates = _prepared_versions(base / config)
  else:
    candidates = _prepared_versions(base)
    if not candidates and base.is_dir():
      configs = sorted(c.name for c in base.iterdir() if _prepared_versions(c))
      if len(configs) == 1:
        config = configs[0]
        candidates = _prepared_versions(base / config)
      elif len(configs) > 1:
        raise DatasetNotPreparedError(
            f"TFDS dataset {dataset!r} has several prepared configs under {base}: {configs}; "
            f"name one, e.g. '{dataset}/{configs[0]}'")
  if version is not None:
    candidates = [c for c in candidates if c.name == version]
  if not candidates:
    looked = base / (config or "") / (version or "<version>") / "dataset_info.json"
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} is not prepared under {root} (no {looked}).\n"
        + _how_to_prepare(name.split(":")[0], root))
  return candidates[-1]


def catalog_builder(name: str, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
  """A read-only builder over a prepared folder, checked to allow random access.

  Raises:
    DatasetNotPreparedError: not prepared, or prepared only as tfrecord.
  """
  folder = find_prepared(name, data_dir)
  builder = tfds.builder_from_directory(os.fspath(folder))
  formats = set(builder.info.available_file_formats())
  if not formats & file_adapters.FileFormat.with_random_access():
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} at {folder} is prepared as "
        f"{sorted(f.value for f in formats) or 'an unknown format'}, which cannot be read "
        f"without TensorFlow.\n" + _how_to_prepare(name.split(":")[0], tfds_data_dir(data_dir)))
  return builder


def catalog_data_source(name: str, split: str, data_dir: str | os.PathLike | None = None):
  """A random-access TFDS data source (``len``, ``__getitem__``, ``__getitems__``) of dict records."""
  builder = catalog_builder(name, data_dir)
  if split.split("[")[0] not in builder.info.splits:
    raise KeyError(f"TFDS dataset {name!r} has no split {split!r}; splits: {sorted(builder.info.splits)}")
  return builder.as_data_source(split)


def _image_keys(features) -> set[str]:
  return {k for k, f in features.items() if isinstance(f, tfds.features.Image)}


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  squeeze = image.ndim == 3 and image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
  return out[..., None] if squeeze else out


def _to_column(key: str, values: list, is_image: bool, image_size: tuple[int, int] | None) -> np.ndarray:
  if is_image:
    if image_size is not None:
      values = [_resize(np.asarray(v), image_size) for v in values]
    shapes = {np.shape(v) for v in values}
    if len(shapes) > 1:
      raise ValueError(f"images in {key!r} have {len(shapes)} different shapes (e.g. "
                       f"{sorted(shapes)[:3]}); pass image_size=(height, width) to resize them")
    return np.stack(values).astype(np.uint8, copy=False)
  if values and isinstance(values[0], (bytes, str)):
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in values], dtype=object)
  try:
    return np.stack([np.asarray(v) for v in values])
  except ValueError:  # ragged
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def load_catalog(name: str, data_dir: str | os.PathLike | None = None, *,
                 splits: Sequence[str] | None = None, x_key: str | None = None,
                 y_key: str | None = None, max_examples: int | None = None,
                 image_size: tuple[int, int] | None = None) -> dict[str, ArraySplit]:
  """A prepared TFDS dataset as in-memory ``ArraySplit``s (``x``, ``y`` + other features).

  Args:
    name: ``"cifar100"``, ``"domainnet/real"``, ``"imagenet_r:0.2.0"`` ...
    data_dir: TFDS data dir (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    splits: splits to read (default: all prepared splits).
    x_key, y_key: record keys that become ``x`` and ``y`` (default: the
      dataset's supervised keys, else ``"image"``/``"label"``).
    max_examples: read at most this many records per split (the first ones
      in file order, which TFDS already shuffled when preparing).
    image_size: ``(height, width)`` to resize images to (needed when image
      shapes vary, as in imagenet_r or domainnet).

  Returns:
    split -> ArraySplit; images are uint8 ``(n, H, W, C)``, ``y`` is int32,
    text features become object arrays of ``str``.

  Raises:
    DatasetNotPreparedError: not prepared (raised within milliseconds).
  """
  if max_examples is not None and max_examples <= 0:
    raise ValueError(f"max_examples must be positive, got {max_examples}")
  builder = catalog_builder(name, data_dir)
  features = builder.info.features
  supervised = builder.info.supervised_keys
  if isinstance(supervised, (tuple, list)) and len(supervised) == 2 and all(
      isinstance(k, str) for k in supervised):
    default_x, default_y = supervised
  else:
    default_x, default_y = "image", "label"
  x_key, y_key = x_key or default_x, y_key or default_y
  for role, key in (("x_key", x_key), ("y_key", y_key)):
    if key not in features:
      raise KeyError(f"{role}={key!r} is not a feature of {name!r}; features: {sorted(features.keys())}")
  images = _image_keys(features)
  out = {}
  for split in (splits or list(builder.info.splits)):
    if split not in builder.info.splits:
      raise KeyError(f"TFDS dataset {name!r} has no split {split!r}; splits: {sorted(builder.info.splits)}")
    source = builder.as_data_source(split)
    total = len(source) if max_examples is None else min(max_examples, len(source))
    raw: dict[str, list] = {}
    getitems = source.__getitems__
    for start in range(0, total, 8192):
      for record in getitems(list(range(start, min(start + 8192, total)))):
        for key, value in record.items():
          if not isinstance(value, Mapping):
            raw.setdefault(key, []).append(value)
    arrays = {key: _to_column(key, values, key in images, image_size) for key, values in raw.items()}
    arrays["x"] = arrays.pop(x_key)
    arrays["y"] = arrays.pop(y_key).astype(np.int32)
    out[split] = ArraySplit(arrays)
  return out


def grain_batches(data_source, batch_size: int, *, seed: int = 0, shard_index: int | None = None,
                  shard_count: int | None = None, shuffle: bool = True, num_epochs: int = 1,
                  drop_remainder: bool = False,
                  transform: Callable[[Any], Any] | None = None):
  """Shuffled, per-process sharded batches over a random-access source, with grain.

  The whole source is shuffled with one ``seed`` (the same on every process),
  then process ``shard_index`` keeps positions ``shard_index::shard_count``; so
  the shards partition the data exactly. With ``num_epochs > 1`` every epoch is
  reshuffled (grain reseeds per epoch, identically on every process) and the
  shards again partition it; a batch may span an epoch boundary. Records are
  read lazily, so the data never has to fit in memory.

  Args:
    data_source: ``len`` + ``__getitem__`` (e.g. ``builder.as_data_source(split)``).
    batch_size: examples per batch (per process).
    seed: shuffle seed.
    shard_index: this process's shard (default ``jax.process_index()``).
    shard_count: number of shards (default ``jax.process_count()``).
    shuffle: shuffle before sharding.
    num_epochs: passes over the data.
    drop_remainder: drop each shard's last short batch (use it to keep step
      counts equal across processes).
    transform: optional per-record function applied before batching (e.g.
      ``lambda r: {"x": r["image"], "y": r["label"]}``).

  Returns:
    A ``grain.MapDataset`` of batches (dicts of stacked NumPy arrays). Index it
    (``ds[k]``) to read sequentially, or call ``.to_iter_dataset(grain.ReadOptions(
    num_threads=..., prefetch_buffer_size=...))`` for bounded prefetching. Do not
    iterate it directly: ``MapDataset.__iter__`` uses grain's default read options,
    16 threads and 500 *batches* buffered.
  """
  import grain  # pylint: disable=import-outside-toplevel
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if num_epochs <= 0:
    raise ValueError(f"num_epochs must be positive, got {num_epochs}")
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if shard_count <= 0 or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
                     f"shard_count={shard_count}")
  dataset = grain.MapDataset.source(data_source)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset[shard_index::shard_count]
  if num_epochs > 1:
    dataset = dataset.repeat(num_epochs)
  if transform is not None:
    dataset = dataset.map(transform)
  return dataset.batch(batch_size, drop_remainder=drop_remainder)
