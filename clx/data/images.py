"""Image datasets on disk: image folders, official split lists and the official splits.

An :class:`ImageSplit` is a list of image files and their labels (paths stay
strings; images are decoded per batch by :mod:`clx.data.pipeline`). Readers:

  :func:`image_folder`        torchvision ``ImageFolder`` semantics (sorted class
                              subfolders, sorted files, same extensions).
  :func:`read_split_list`     the CODA-Prompt / InfLoRA YAML split lists
                              (``{"data": [path, ...], "targets": [int, ...]}``).
  :func:`torch_randperm`      ``torch.randperm(n)`` after ``torch.manual_seed(seed)``,
                              in NumPy (for InfLoRA's ImageNet-R ``random_split``).

Datasets, each with the official code's split (``load_image_dataset``):

  ``imagenet_r``   InfLoRA (``utils/data.py`` ``iIMAGENET_R``): if ``<root>/train``
                   and ``<root>/test`` exist they are read as image folders (the
                   official code writes them on its first run, and PILOT/LibContinual
                   distribute that layout); else the raw 200-class folder is split
                   by ``torch.utils.data.random_split(ImageFolder(root), [0.8n, n-0.8n])``
                   after ``torch.manual_seed(seed)`` (seed 0 in the official runs),
                   reproduced by :func:`torch_randperm`. ``split="coda"`` reads
                   CODA-Prompt's lists ``imagenet-r_{train,test}.yaml`` instead.
  ``imagenet_a``,  ``<root>/train`` and ``<root>/test`` image folders
  ``cub``          (InfLoRA ``iIMAGENET_A`` / ``iCUB``; the PILOT/LibContinual layout).
  ``domainnet``    the split lists ``domainnet_{train,test}.yaml`` of CODA-Prompt,
                   which InfLoRA reads from ``dataloaders/splits`` (not in the
                   repositories' git history: they exceed GitHub's size limit).

Split-list paths are relative to the official repository's working directory
(``data/imagenet-r/n01443537/art_0.jpg``); clx maps them onto the user's dataset
folder by dropping the leading ``data/<folder>/`` (or a given ``prefix``).

Prepared TFDS datasets (``imagenet_r``, ``cifar100``, ... as ArrayRecord; TFDS
decodes their images with PIL, no TensorFlow) are read per example the same way
through :class:`TfdsImageSplit` / :func:`tfds_image_split`.

Every reader checks that folders, list files and (by default) every listed
image exist before returning, and raises :class:`ImageDataMissingError` naming
what is missing — no image is decoded for that.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageDataMissingError(FileNotFoundError):
  """Image folders, split lists or listed images are missing; the message lists them."""


@dataclasses.dataclass(frozen=True)
class ImageSplit:
  """Images on disk with int32 labels: ``paths[i]`` (absolute) has label ``labels[i]``.

  Attributes:
    paths: (n,) array of str.
    labels: (n,) int32 global labels.
    classes: class names of the label space (index = label), when known.
  """

  paths: np.ndarray
  labels: np.ndarray
  classes: tuple[str, ...] = ()

  def __post_init__(self):
    paths = np.asarray(self.paths)
    labels = np.asarray(self.labels)
    if paths.ndim != 1 or labels.ndim != 1 or len(paths) != len(labels):
      raise ValueError(f"ImageSplit needs 1-D paths and labels of equal length, got "
                       f"{paths.shape} and {labels.shape}")
    if len(labels) and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
      raise ValueError(f"ImageSplit labels must be non-negative integers, got dtype {labels.dtype}")
    object.__setattr__(self, "paths", paths.astype(str))
    object.__setattr__(self, "labels", labels.astype(np.int32))

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def y(self) -> np.ndarray:
    return self.labels

  def take(self, indices) -> "ImageSplit":
    indices = np.asarray(indices, np.int64)
    return ImageSplit(self.paths[indices], self.labels[indices], self.classes)

  def relabel(self, label_map: np.ndarray) -> "ImageSplit":
    """Labels ``label_map[y]`` (e.g. PyCIL's class-order remapping)."""
    return ImageSplit(self.paths, np.asarray(label_map)[self.labels], self.classes)

  def load_image(self, i: int):
    """Example ``i`` as an RGB ``PIL.Image`` (the official ``pil_loader``)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    with open(self.paths[i], "rb") as f:
      return Image.open(f).convert("RGB")

  def missing(self, limit: int | None = None) -> list[str]:
    """Paths that are not files (stat only; nothing is opened), at most ``limit``."""
    out = []
    for path in self.paths:
      if not os.path.isfile(path):
        out.append(str(path))
        if limit is not None and len(out) >= limit:
          break
    return out


def _missing_error(what: str, missing: Sequence[str], total: int | None = None,
                   hint: str = "") -> ImageDataMissingError:
  shown = "\n  ".join(missing[:20])
  more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
  count = f" ({len(missing)} of {total})" if total is not None else ""
  return ImageDataMissingError(f"{what}: missing{count}:\n  {shown}{more}" + (f"\n{hint}" if hint else ""))


def check_files(split: ImageSplit, what: str, hint: str = "") -> ImageSplit:
  """Raise :class:`ImageDataMissingError` listing the split's missing image files."""
  missing = split.missing()
  if missing:
    raise _missing_error(what, missing, len(split), hint)
  return split


def image_folder(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS,
                 classes: Sequence[str] | None = None) -> ImageSplit:
  """torchvision ``ImageFolder(root)``: one subfolder per class.

  Classes are the sorted subfolder names (label = position); files are walked
  recursively in sorted order (``sorted(os.walk(...))``, ``sorted(fnames)``)
  and kept when their lower-cased name ends with one of ``extensions`` —
  the order and labels of torchvision's ``make_dataset``.

  Args:
    root: the folder with class subfolders.
    extensions: accepted file endings.
    classes: the label space to use instead of ``root``'s subfolders (e.g. the
      train folder's classes for a test folder missing some); every subfolder
      must be one of them.

  Returns:
    An ImageSplit with absolute paths and ``classes``.

  Raises:
    ImageDataMissingError: ``root`` is not a folder, has no class subfolders,
      or a class has no image (torchvision raises there too).
  """
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise ImageDataMissingError(f"image folder {root} does not exist (expected one subfolder "
                                f"of images per class)")
  found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
  if classes is None:
    classes = found
  else:
    unknown = sorted(set(found) - set(classes))
    if unknown:
      raise ValueError(f"{root} has class folders {unknown[:10]} that are not in the given classes")
  if not classes:
    raise ImageDataMissingError(f"image folder {root} has no class subfolders")
  lowered = tuple(e.lower() for e in extensions)
  paths, labels, empty = [], [], []
  for label, name in enumerate(classes):
    class_dir = root / name
    if not class_dir.is_dir():
      continue
    count = 0
    for folder, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
      for fname in sorted(fnames):
        if fname.lower().endswith(lowered):
          paths.append(os.path.join(folder, fname))
          labels.append(label)
          count += 1
    if count == 0:
      empty.append(str(class_dir))
  if empty:
    raise _missing_error(f"image folder {root}: class folders without images "
                         f"(extensions {', '.join(extensions)})", empty)
  return ImageSplit(np.array(paths, dtype=str), np.array(labels, np.int32), tuple(classes))


def read_split_list(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
  """A CODA-Prompt / InfLoRA split list: YAML ``{"data": [paths], "targets": [ints]}``.

  Returns:
    ``(paths, targets)``: the listed paths as written, int32 targets.

  Raises:
    ImageDataMissingError: the file does not exist.
    ValueError: not a mapping with equally long ``data`` and ``targets`` lists
      of strings and non-negative integers.
  """
  import yaml  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise ImageDataMissingError(f"split list {path} does not exist")
  loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: ~10x faster on 48k lines
  with open(path, encoding="utf-8") as f:
    content = yaml.load(f, Loader=loader)
  if not isinstance(content, dict) or "data" not in content or "targets" not in content:
    raise ValueError(f"split list {path}: expected a YAML mapping with keys 'data' and 'targets', "
                     f"got {type(content).__name__}"
                     + (f" with keys {sorted(content)}" if isinstance(content, dict) else ""))
  data, targets = content["data"], content["targets"]
  if not isinstance(data, list) or not isinstance(targets, list) or len(data) != len(targets):
    raise ValueError(f"split list {path}: 'data' and 'targets' must be lists of equal length, got "
                     f"{type(data).__name__} of {len(data) if isinstance(data, list) else '?'} and "
                     f"{type(targets).__name__} of {len(targets) if isinstance(targets, list) else '?'}")
  if not all(isinstance(p, str) for p in data):
    raise ValueError(f"split list {path}: 'data' entries must be strings (image paths)")
  if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in targets):
    raise ValueError(f"split list {path}: 'targets' entries must be non-negative integers")
  return data, np.asarray(targets, np.int32)


def resolve_list_paths(paths: Sequence[str], root: str | os.PathLike,
                       prefix: str | None = None) -> np.ndarray:
  """Map split-list paths onto the user's dataset folder ``root``.

  The official lists hold paths relative to the repository's working
  directory, ``data/<folder>/<rest>``; ``<rest>`` is joined to ``root``. With
  ``prefix`` given, that prefix is dropped instead (``prefix=""`` joins the
  paths as written).

  Raises:
    ValueError: a path does not start with the prefix (or, by default, ``data/<folder>/``).
  """
  root = pathlib.Path(root).expanduser()
  out = []
  for p in paths:
    p = p.replace("\\", "/")
    if prefix is None:
      parts = p.split("/", 2)
      if len(parts) < 3 or parts[0] != "data":
        raise ValueError(f"split-list path {p!r} does not start with 'data/<folder>/'; pass prefix=")
      rest = parts[2]
    else:
      if not p.startswith(prefix):
        raise ValueError(f"split-list path {p!r} does not start with prefix {prefix!r}")
      rest = p[len(prefix):].lstrip("/")
    out.append(os.fspath(root / rest))
  return np.array(out, dtype=str)


def split_list(list_path: str | os.PathLike, root: str | os.PathLike, *,
               prefix: str | None = None, check: bool = True) -> ImageSplit:
  """An ImageSplit from an official split list, paths resolved under ``root``.

  Args:
    list_path: the YAML list.
    root: the dataset folder the list's ``data/<folder>/`` stands for.
    prefix: see :func:`resolve_list_paths`.
    check: stat every listed file and raise if any is missing.
  """
  data, targets = read_split_list(list_path)
  split = ImageSplit(resolve_list_paths(data, root, prefix), targets)
  if check:
    check_files(split, f"images listed in {list_path} under {root}")
  return split


def torch_randperm(n: int, seed: int) -> np.ndarray:
  """``torch.manual_seed(seed); torch.randperm(n)`` on the CPU generator, in NumPy.

  PyTorch's CPU ``randperm`` (``aten/src/ATen/native/TensorFactories.cpp``,
  ``randperm_cpu``, the path for ``n < 2**32 / 20``) starts from ``0..n-1`` and
  for ``i = 0..n-2`` swaps ``r[i]`` with ``r[i + u_i % (n - i)]``, where
  ``u_i`` are consecutive 32-bit outputs of its MT19937 engine. ``manual_seed``
  initialises that engine with the standard ``init_genrand(seed & 0xffffffff)``,
  which is also NumPy's legacy ``RandomState(seed)`` seeding; so ``u_i`` are
  ``RandomState(seed)``'s raw MT19937 outputs. Tested against an independent
  pure-Python MT19937; checked once against torch 2.13.0 (CPU) itself:
  ``randperm`` equal for (n, seed) = (10, 0), (1000, 0), (30000, 0), (24000, 1993),
  (5, 7), and ``random_split(range(24000), [19200, 4800])`` after
  ``manual_seed(0)`` gives the same first part (torch is not a test dependency).

  Args:
    n: permutation length (``< 2**32 / 20``).
    seed: ``torch.manual_seed`` argument (0 <= seed < 2**32).

  Returns:
    int64 (n,) permutation.
  """
  if not 0 <= n < (2 ** 32 - 1) // 20:
    raise ValueError(f"n must be in [0, {(2 ** 32 - 1) // 20}), got {n}")
  if not 0 <= seed < 2 ** 32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  bits = np.random.RandomState(seed)._bit_generator  # pylint: disable=protected-access
  raw = bits.random_raw(max(n - 1, 0)).astype(np.int64)
  r = np.arange(n, dtype=np.int64)
  for i in range(n - 1):
    z = i + int(raw[i] % (n - i))
    r[i], r[z] = r[z], r[i]
  return r


def random_split_indices(n: int, fraction: float = 0.8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``torch.utils.data.random_split(range(n), [int(fraction·n), n - int(fraction·n)])``
  after ``torch.manual_seed(seed)``: the first part of :func:`torch_randperm`, then the rest."""
  if not 0 < fraction < 1:
    raise ValueError(f"fraction must be in (0, 1), got {fraction}")
  perm = torch_randperm(n, seed)
  cut = int(fraction * n)
  return perm[:cut], perm[cut:]


# ------------------------------------------------------------------ datasets

DATASETS = ("imagenet_r", "imagenet_a", "cub", "domainnet")
NUM_CLASSES = {"imagenet_r": 200, "imagenet_a": 200, "cub": 200, "domainnet": 345}


def _train_test_folders(root: pathlib.Path, name: str, hint: str) -> dict[str, ImageSplit]:
  missing = [str(root / s) for s in ("train", "test") if not (root / s).is_dir()]
  if missing:
    raise _missing_error(f"{name}: expected train/ and test/ image folders under {root}",
                         missing, hint=hint)
  train = image_folder(root / "train")
  test = image_folder(root / "test", classes=train.classes)
  return {"train": train, "test": test}


def imagenet_r(root: str | os.PathLike, *, split: str = "inflora", seed: int = 0,
               list_dir: str | os.PathLike | None = None, check: bool = True) -> dict[str, ImageSplit]:
  """ImageNet-R with the official split.

  Args:
    root: the ``imagenet-r`` folder (200 wnid subfolders), or a folder with
      ``train/`` and ``test/`` (the layout InfLoRA's first run leaves behind).
    split: ``"inflora"`` (``random_split`` 80/20 after ``torch.manual_seed(seed)``
      over the ImageFolder order; pre-split ``train/``+``test/`` folders are
      read as they are, as the official code does) or ``"coda"`` (the CODA-Prompt
      lists ``imagenet-r_train.yaml`` / ``imagenet-r_test.yaml`` in ``list_dir``).
    seed: the torch seed of the split. The official code moves the files into
      ``train/`` and ``test/`` on its first run and every later run (and seed)
      reuses them, so all official seeds share the split of the first run's
      seed: 0 in ``configs/mimg*_inflora.json`` (``"seed": [0, 1, 2, 3, 4]``).
    list_dir: folder with the CODA-P lists (``split="coda"``).
    check: stat every image before returning.
  """
  root = pathlib.Path(root).expanduser()
  if split == "coda":
    if list_dir is None:
      raise ValueError("imagenet_r(split='coda') needs list_dir, the folder with "
                       "imagenet-r_train.yaml and imagenet-r_test.yaml (GT-RIPL/CODA-Prompt "
                       "dataloaders/splits)")
    lists = {s: pathlib.Path(list_dir).expanduser() / f"imagenet-r_{s}.yaml" for s in ("train", "test")}
    missing = [str(p) for p in lists.values() if not p.is_file()]
    if not root.is_dir():
      missing.append(str(root))
    if missing:
      raise _missing_error("imagenet_r (CODA-Prompt split)", missing)
    return {s: split_list(p, root, check=check) for s, p in lists.items()}
  if split != "inflora":
    raise ValueError(f"imagenet_r: split must be 'inflora' or 'coda', got {split!r}")
  if (root / "train").is_dir() or (root / "test").is_dir():
    return _train_test_folders(root, "imagenet_r", "")
  whole = image_folder(root)
  train_idx, test_idx = random_split_indices(len(whole), 0.8, seed)
  return {"train": whole.take(train_idx), "test": whole.take(test_idx)}


def load_image_dataset(name: str, root: str | os.PathLike, *, split: str | None = None,
                       seed: int = 0, list_dir: str | os.PathLike | None = None,
                       check: bool = True) -> dict[str, ImageSplit]:
  """``{"train", "test"}`` ImageSplits of a dataset with its official split.

  Args:
    name: one of ``DATASETS``.
    root: the dataset folder (see the module docstring for each layout).
    split: ``imagenet_r`` only: ``"inflora"`` (default) or ``"coda"``.
    seed: ``imagenet_r`` inflora split seed.
    list_dir: folder with the YAML split lists (``domainnet``, ``imagenet_r`` coda).
    check: stat every image file before returning.

  Raises:
    ImageDataMissingError: listing the missing folders / list files / images.
  """
  root_path = pathlib.Path(root).expanduser()
  if name == "imagenet_r":
    return imagenet_r(root_path, split=split or "inflora", seed=seed, list_dir=list_dir, check=check)
  if split not in (None, "official"):
    raise ValueError(f"{name}: only the official split exists, got split={split!r}")
  if name in ("imagenet_a", "cub"):
    return _train_test_folders(root_path, name, "(InfLoRA reads data/imagenet-a/{train,test}/ and "
                               "data/cub/{train,test}/, the PILOT/LibContinual layout)")
  if name == "domainnet":
    return domainnet(root_path, list_dir, check=check)
  raise KeyError(f"unknown image dataset {name!r}; known: {DATASETS}")


def domainnet(root: str | os.PathLike, list_dir: str | os.PathLike | None, *,
              check: bool = True) -> dict[str, ImageSplit]:
  """DomainNet with the CODA-Prompt / InfLoRA split lists.

  Args:
    root: the DomainNet folder (``clipart/``, ``infograph/``, ... with class subfolders).
    list_dir: folder with ``domainnet_train.yaml`` and ``domainnet_test.yaml``.
    check: stat every listed image.

  Raises:
    ImageDataMissingError: names the missing list files / folder / images, and
      where the lists come from.
  """
  hint = ("DomainNet's split lists are CODA-Prompt's dataloaders/splits/domainnet_train.yaml and "
          "domainnet_test.yaml (also used by InfLoRA); they are too large for the repositories' git "
          "history, so get them from the authors' release and pass their folder as list_dir.")
  root = pathlib.Path(root).expanduser()
  if list_dir is None:
    raise ImageDataMissingError("domainnet needs list_dir (the folder with domainnet_train.yaml "
                                "and domainnet_test.yaml).\n" + hint)
  lists = {s: pathlib.Path(list_dir).expanduser() / f"domainnet_{s}.yaml" for s in ("train", "test")}
  missing = [str(p) for p in lists.values() if not p.is_file()]
  if not root.is_dir():
    missing.append(f"{root} (the DomainNet image folder)")
  if missing:
    raise _missing_error("domainnet", missing, hint=hint)
  return {s: split_list(p, root, check=check) for s, p in lists.items()}


# ------------------------------------------------------------------ TFDS sources

_SOURCES: dict = {}


def _tfds_source(name: str, split: str, data_dir):
  key = (name, split, None if data_dir is None else os.fspath(data_dir))
  if key not in _SOURCES:  # one open data source per process (grain threads share it)
    from clx.data.catalog import catalog_data_source  # pylint: disable=import-outside-toplevel
    _SOURCES[key] = catalog_data_source(name, split, data_dir)
  return _SOURCES[key]


@dataclasses.dataclass(frozen=True)
class TfdsImageSplit:
  """Examples of a prepared TFDS split, read (and decoded) one at a time.

  The interface of :class:`ImageSplit` that the pipeline uses (``len``,
  ``labels``, ``take``, ``relabel``, ``load_image``); ``rows[i]`` is the TFDS
  record index of example ``i``.
  """

  name: str
  split: str
  data_dir: str | None
  rows: np.ndarray
  labels: np.ndarray
  image_key: str = "image"
  classes: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def y(self) -> np.ndarray:
    return self.labels

  def take(self, indices) -> "TfdsImageSplit":
    indices = np.asarray(indices, np.int64)
    return dataclasses.replace(self, rows=self.rows[indices], labels=self.labels[indices])

  def relabel(self, label_map: np.ndarray) -> "TfdsImageSplit":
    return dataclasses.replace(self, labels=np.asarray(label_map)[self.labels].astype(np.int32))

  def load_image(self, i: int):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    image = np.asarray(_tfds_source(self.name, self.split, self.data_dir)[int(self.rows[i])][self.image_key])
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    return Image.fromarray(image).convert("RGB")


def tfds_image_split(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                     image_key: str = "image", label_key: str = "label",
                     order_key: str | None = None,
                     class_of_key: Callable[[str], str] | None = None) -> TfdsImageSplit:
  """A prepared TFDS split as a per-example image source.

  Labels (and ``order_key``) are read in one streaming pass over the records
  (TFDS decodes every feature of a record it returns, so this decodes each
  image once and drops it; nothing is kept but the labels).

  Args:
    name, split, data_dir: as ``clx.data.catalog.catalog_data_source``.
    image_key, label_key: record keys.
    order_key: sort the examples by this record key (e.g. ``"file_name"``, to
      recover an ImageFolder order from TFDS's shuffled records before an
      official ``random_split``); default: record order.
    class_of_key: with ``order_key``: labels become the index of
      ``class_of_key(value)`` among the sorted distinct classes (ImageFolder's
      labels), instead of the record's ``label_key``.

  Raises:
    DatasetNotPreparedError: not prepared (from the catalog, within milliseconds).
  """
  source = _tfds_source(name, split, data_dir)
  labels, keys = [], []
  for start in range(0, len(source), 1024):
    for record in source.__getitems__(list(range(start, min(start + 1024, len(source))))):
      for key in (image_key, label_key) + ((order_key,) if order_key else ()):
        if key not in record:
          raise KeyError(f"TFDS {name!r} records have no key {key!r}; keys: {sorted(record)}")
      labels.append(int(record[label_key]))
      if order_key:
        value = record[order_key]
        keys.append(value.decode("utf-8") if isinstance(value, bytes) else value)
  rows = np.arange(len(labels), dtype=np.int64)
  classes: tuple[str, ...] = ()
  if order_key:
    rows = np.array(sorted(rows, key=lambda r: keys[r]), dtype=np.int64)
    if class_of_key is not None:
      names = [class_of_key(k) for k in keys]
      classes = tuple(sorted(set(names)))
      index = {c: i for i, c in enumerate(classes)}
      labels = [index[c] for c in names]
  elif class_of_key is not None:
    raise ValueError("class_of_key needs order_key")
  return TfdsImageSplit(name, split, None if data_dir is None else os.fspath(data_dir), rows,
                        np.asarray(labels, np.int32)[rows], image_key, classes)


def imagenet_r_tfds(data_dir: str | os.PathLike | None = None, *, seed: int = 0
                    ) -> dict[str, TfdsImageSplit]:
  """InfLoRA's ImageNet-R split from a prepared TFDS ``imagenet_r`` (0.2.0+).

  TFDS stores the 30,000 images in one shuffled ``test`` split with
  ``file_name = "<wnid>/<file>"`` and ImageNet-1k labels. Sorting by
  ``file_name`` gives ``ImageFolder``'s order (wnids have equal length, so
  the string order is (class, file) order), labels become the index of the
  wnid among the 200 sorted wnids (ImageFolder's labels), then
  :func:`random_split_indices` (80/20, ``torch.manual_seed(seed)``) splits it,
  as ``iIMAGENET_R.download_data``. Not run on a real prepared ``imagenet_r``
  here (none offline); tested on a stand-in source with the same keys.
  """
  whole = tfds_image_split("imagenet_r", "test", data_dir, order_key="file_name",
                           class_of_key=lambda name: name.replace("\\", "/").split("/")[0])
  train_idx, test_idx = random_split_indices(len(whole), 0.8, seed)
  return {"train": whole.take(train_idx), "test": whole.take(test_idx)}
