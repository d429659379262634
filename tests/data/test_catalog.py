"""Catalog access (prepared TFDS folders only, fail fast otherwise) and grain batching."""

from __future__ import annotations

import io
import json
import shutil
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from clx.data import builders, catalog


def _png(image: np.ndarray) -> bytes:
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _test_images(n: int, seed: int):
  rng = np.random.RandomState(seed)
  sizes = [(6 + i % 3, 5 + i % 2) for i in range(n)]  # varying shapes, like imagenet_r
  images = [rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]
  return images, rng.randint(0, 3, size=n)


class ClxCatalogProbe(tfds.core.GeneratorBasedBuilder):
  """A catalog-like dataset with encoded PNG Image features (no TF needed to write bytes)."""

  VERSION = tfds.core.Version("2.1.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12, 0), "test": self._generate_examples(5, 1)}

  def _generate_examples(self, n, seed):
    images, labels = _test_images(n, seed)
    for i in range(n):
      yield i, {"image": _png(images[i]), "label": int(labels[i]), "caption": f"example {i}"}


@pytest.fixture(scope="module")
def probe_data_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("catalog")
  with builders.quiet_progress():
    ClxCatalogProbe(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_cifar100_not_prepared_fails_fast(tmp_path):
  start = time.perf_counter()
  with pytest.raises(catalog.DatasetNotPreparedError) as info:
    catalog.load_catalog("cifar100", data_dir=tmp_path)
  assert time.perf_counter() - start < 10.0
  message = str(info.value)
  assert f"tfds build cifar100 --data_dir {tmp_path} --file_format=array_record" in message
  assert "copy" in message and "tfrecord" in message


@pytest.mark.parametrize("name", ["imagenet_r", "domainnet/real", "super_glue/boolq", "cifar100:3.0.2"])
def test_other_catalog_names_fail_fast(tmp_path, name):
  start = time.perf_counter()
  with pytest.raises(catalog.DatasetNotPreparedError, match="not prepared"):
    catalog.catalog_data_source(name, "train", data_dir=tmp_path)
  assert time.perf_counter() - start < 10.0


def test_data_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert catalog.tfds_data_dir() == tmp_path
  with pytest.raises(catalog.DatasetNotPreparedError, match=str(tmp_path)):
    catalog.find_prepared("cifar100")


@pytest.mark.parametrize("bad", ["", "CIFAR", "cifar100:v3", "../etc"])
def test_bad_names_are_rejected(bad):
  with pytest.raises(ValueError, match="invalid|non-empty"):
    catalog.parse_name(bad)


def test_prepared_images_come_back_as_uint8(probe_data_dir):
  train_images, train_labels = _test_images(12, 0)
  with pytest.raises(ValueError, match="image_size"):
    catalog.load_catalog("clx_catalog_probe", probe_data_dir)
  same_shape = [i for i, im in enumerate(train_images) if im.shape == train_images[0].shape]
  splits = catalog.load_catalog("clx_catalog_probe", probe_data_dir, image_size=(6, 5))
  train = splits["train"]
  assert train.x.dtype == np.uint8 and train.x.shape == (12, 6, 5, 3)
  np.testing.assert_array_equal(train.y, train_labels)
  assert train.y.dtype == np.int32
  for i in same_shape:  # no resize needed: exact pixels
    np.testing.assert_array_equal(train.x[i], train_images[i])
  assert train.arrays["caption"][3] == "example 3"
  assert len(splits["test"]) == 5


def test_max_examples_caps_each_split(probe_data_dir):
  splits = catalog.load_catalog("clx_catalog_probe", probe_data_dir, splits=["train"],
                                max_examples=4, image_size=(8, 8))
  assert list(splits) == ["train"] and len(splits["train"]) == 4
  with pytest.raises(ValueError, match="max_examples"):
    catalog.load_catalog("clx_catalog_probe", probe_data_dir, max_examples=0)


def test_bad_keys_and_splits(probe_data_dir):
  with pytest.raises(KeyError, match="features"):
    catalog.load_catalog("clx_catalog_probe", probe_data_dir, x_key="pixels")
  with pytest.raises(KeyError, match="no split 'validation'"):
    catalog.load_catalog("clx_catalog_probe", probe_data_dir, splits=["validation"])


def test_tfrecord_folder_is_refused_with_advice(probe_data_dir, tmp_path):
  source = probe_data_dir / "clx_catalog_probe" / "2.1.0"
  target = tmp_path / "clx_catalog_probe" / "2.1.0"
  shutil.copytree(source, target)
  info_path = target / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(catalog.DatasetNotPreparedError, match="cannot be read without TensorFlow"):
    catalog.catalog_builder("clx_catalog_probe", tmp_path)


def test_configs_and_versions_are_resolved(probe_data_dir, tmp_path):
  source = probe_data_dir / "clx_catalog_probe" / "2.1.0"
  shutil.copytree(source, tmp_path / "probe" / "cfg_a" / "2.1.0")
  assert catalog.find_prepared("probe", tmp_path) == tmp_path / "probe" / "cfg_a" / "2.1.0"
  shutil.copytree(source, tmp_path / "probe" / "cfg_b" / "2.1.0")
  with pytest.raises(catalog.DatasetNotPreparedError, match=r"\['cfg_a', 'cfg_b'\]"):
    catalog.find_prepared("probe", tmp_path)
  shutil.copytree(source, tmp_path / "probe" / "cfg_b" / "2.10.0")
  assert catalog.find_prepared("probe/cfg_b", tmp_path).name == "2.10.0"
  assert catalog.find_prepared("probe/cfg_b:2.1.0", tmp_path).name == "2.1.0"
  with pytest.raises(catalog.DatasetNotPreparedError):
    catalog.find_prepared("probe/cfg_b:9.9.9", tmp_path)


def _ids(batches):
  # digits images are distinct enough to identify records by their bytes + label
  return [(b["x"][i].tobytes(), int(b["y"][i])) for b in batches for i in range(len(b["y"]))]


def _xy(record):
  return {"x": record["image"], "y": record["label"]}


def test_grain_shards_cover_every_example_exactly_once(digits_data_dir):
  source = builders.get_builder("clx_digits", digits_data_dir).as_data_source("train")
  columns = builders.read_data_source(source)
  reference = _ids([{"x": columns["image"], "y": columns["label"]}])
  shards = [_ids(catalog.grain_batches(source, 100, seed=3, shard_index=k, shard_count=3,
                                       transform=_xy)) for k in range(3)]
  assert sum(len(s) for s in shards) == len(source) == 1437
  assert sorted(shards[0] + shards[1] + shards[2]) == sorted(reference)
  assert all(abs(len(s) - 1437 / 3) <= 1 for s in shards)
  # same seed -> same order; different seed -> different order
  assert _ids(catalog.grain_batches(source, 100, seed=3, shard_index=1, shard_count=3,
                                    transform=_xy)) == shards[1]
  assert _ids(catalog.grain_batches(source, 100, seed=4, shard_index=1, shard_count=3,
                                    transform=_xy)) != shards[1]


def test_grain_batches_shapes_epochs_and_defaults(digits_data_dir):
  source = builders.get_builder("clx_digits", digits_data_dir).as_data_source("test")
  batches = list(catalog.grain_batches(source, 64, seed=0, drop_remainder=True))  # jax process 0 of 1
  assert len(batches) == 360 // 64
  assert batches[0]["image"].shape == (64, 8, 8) and batches[0]["image"].dtype == np.uint8
  columns = builders.read_data_source(source)
  reference = sorted(_ids([{"x": columns["image"], "y": columns["label"]}]))
  shards = [_ids(catalog.grain_batches(source, 60, seed=0, shard_index=k, shard_count=2,
                                       num_epochs=2, transform=_xy)) for k in range(2)]
  assert [len(s) for s in shards] == [360, 360]
  epoch_1 = shards[0][:180] + shards[1][:180]
  epoch_2 = shards[0][180:] + shards[1][180:]
  assert sorted(epoch_1) == reference and sorted(epoch_2) == reference  # each epoch: exactly once
  assert shards[0][:180] != shards[0][180:]  # reshuffled between epochs
  with pytest.raises(ValueError, match="shard_index"):
    catalog.grain_batches(source, 8, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="batch_size"):
    catalog.grain_batches(source, 0)
