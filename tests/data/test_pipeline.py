"""clx.data.pipeline: per-process, seeded, per-batch decoded image batches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clx.data import images, pipeline
from clx.data.transforms import ImageTransform, example_rng

SMALL_RRC = ImageTransform("rrc16", "random_resized_crop", size=16, flip=0.5)
SMALL_TEST = ImageTransform("r18c16", "resize_center_crop", size=16, resize=18)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("imgs")
  rng = np.random.default_rng(0)
  for c in range(4):
    (root / f"c{c}").mkdir()
    for i in range(5):
      h, w = rng.integers(20, 40, 2)
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
  return images.image_folder(root)


def _epoch(split, **kw):
  kw = {"batch_size": 6, "transform": SMALL_RRC, "seed": 0, "process_index": 0,
        "process_count": 1, **kw}
  return list(pipeline.image_batches(split, **kw))


def test_batches_are_the_transform_of_each_file_with_its_example_rng(folder):
  batches = _epoch(folder, task=2, epoch=3, dtype="uint8")
  seen = []
  for b in batches:
    for x, y, i, m in zip(b["x"], b["y"], b["index"], b["mask"]):
      if not m:
        assert i == -1 and not x.any()
        continue
      image = Image.open(folder.paths[i]).convert("RGB")
      np.testing.assert_array_equal(x, SMALL_RRC(image, example_rng(0, 2, 3, int(i))))
      assert y == folder.labels[i]
      seen.append(int(i))
  assert sorted(seen) == list(range(len(folder)))  # every example exactly once
  assert [len(b["x"]) for b in batches] == [6, 6, 6, 6]  # 20 -> padded last batch
  assert batches[-1]["mask"].sum() == 2


def test_same_seed_same_batches_resume_and_threads(folder):
  a = _epoch(folder, task=1, epoch=0)
  b = _epoch(folder, task=1, epoch=0, num_threads=0)  # no prefetch threads: same bits
  for u, v in zip(a, b, strict=True):
    for k in u:
      np.testing.assert_array_equal(u[k], v[k])
  # a "resumed" run starts directly at task 1 after other passes ran: same batches
  _epoch(folder, task=0, epoch=5)
  c = _epoch(folder, task=1, epoch=0)
  for u, v in zip(a, c, strict=True):
    np.testing.assert_array_equal(u["x"], v["x"])
  tail = _epoch(folder, task=1, epoch=0, start_step=2)  # mid-epoch resume
  assert len(tail) == len(a) - 2
  for u, v in zip(a[2:], tail, strict=True):
    np.testing.assert_array_equal(u["x"], v["x"])
  with pytest.raises(ValueError, match="start_step"):
    _epoch(folder, start_step=5)
  d = _epoch(folder, task=1, epoch=1)
  assert not np.array_equal(a[0]["index"], d[0]["index"])
  assert not np.array_equal(a[0]["x"], d[0]["x"])


def test_processes_read_their_slice_of_the_same_global_batches(folder):
  whole = _epoch(folder, batch_size=8)
  parts = [_epoch(folder, batch_size=8, process_index=p, process_count=4) for p in range(4)]
  for k, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([parts[p][k][key] for p in range(4)]), batch[key])
  with pytest.raises(ValueError, match="divide evenly"):
    _epoch(folder, batch_size=6, process_count=4)


def test_float_output_and_drop_remainder(folder):
  batches = _epoch(folder, transform=SMALL_TEST, shuffle=False, drop_remainder=True,
                   pixel_range="-1,1")
  assert len(batches) == 3 and all(b["mask"].all() for b in batches)
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), np.arange(18))
  x = batches[0]["x"]
  assert x.dtype == np.float32 and x.shape == (6, 16, 16, 3)
  ref = SMALL_TEST(Image.open(folder.paths[0]).convert("RGB")).astype(np.float64) / 127.5 - 1
  np.testing.assert_allclose(x[0], ref, atol=1e-6)


def test_batch_plan_partitions_the_split():
  plan = pipeline.batch_plan(103, 10, seed=4, task=0, epoch=0)
  assert plan.shape == (11, 10)
  assert sorted(plan[plan >= 0].tolist()) == list(range(103)) and (plan < 0).sum() == 7
  assert pipeline.batch_plan(103, 10, seed=4, task=0, epoch=0, drop_remainder=True).shape == (10, 10)


def test_bad_arguments(folder):
  with pytest.raises(ValueError, match="batch_size"):
    _epoch(folder, batch_size=0)
  with pytest.raises(ValueError, match=r"gives \(224, \d+, 3\) for example \d+; batching needs"):
    _epoch(folder, transform="resize224")  # keeps the aspect ratio: square inputs only (CIFAR)
  with pytest.raises(ValueError, match="pixel_range"):
    _epoch(folder, pixel_range="0,255")
  with pytest.raises(ValueError, match="seed"):
    _epoch(folder, seed=-1)


def test_class_incremental_images_relabel_like_pycil(folder):
  assert pipeline.inflora_increments(345, 69, 69) == [69] * 5
  assert pipeline.inflora_increments(10, 4, 4) == [4, 4, 2]
  stream = pipeline.class_incremental_images({"train": folder, "test": folder}, [2, 2],
                                             class_order=[3, 1, 0, 2])
  assert stream.num_classes == 4 and stream.tasks[1].classes == (2, 3)
  assert stream.gram_transform == stream.train_transform == "rrc224_flip"
  t0 = stream.tasks[0].train
  # class 3 -> 0, class 1 -> 1; files keep the split order
  np.testing.assert_array_equal(t0.labels, [1] * 5 + [0] * 5)
  np.testing.assert_array_equal(t0.paths, folder.paths[np.isin(folder.labels, [1, 3])])
  assert stream.input_shape == (224, 224, 3)


def test_tfds_source_batches_equal_the_transform_of_each_record(digits_data_dir):
  from clx.data import builders
  split = images.tfds_image_split("clx_digits", "train", digits_data_dir)
  ref = builders.load_builtin("clx_digits", digits_data_dir)["train"]
  np.testing.assert_array_equal(split.labels, ref.y)
  part = split.take(np.arange(10, 22))
  (batch,) = _epoch(part, batch_size=12, transform=SMALL_RRC, seed=3, dtype="uint8")
  for x, i in zip(batch["x"], batch["index"]):
    image = Image.fromarray(ref.x[10 + i]).convert("RGB")  # 8x8 grayscale digits
    np.testing.assert_array_equal(x, SMALL_RRC(image, example_rng(3, 0, 0, int(i))))
  # InfLoRA's CIFAR test transform Resize(224) batches on square inputs
  (square,) = _epoch(part, batch_size=12, transform="resize224", shuffle=False)
  assert square["x"].shape == (12, 224, 224, 3)
  # a sort key recovers a chosen order (here: by label, stable on ties)
  by_label = images.tfds_image_split("clx_digits", "train", digits_data_dir, order_key="label")
  assert np.all(np.diff(by_label.labels) >= 0)
  with pytest.raises(KeyError, match="no key 'file_name'"):
    images.tfds_image_split("clx_digits", "train", digits_data_dir, order_key="file_name")


class _Counting(images.ImageSplit):
  """An ImageSplit that counts decoded images (a list shared by its copies)."""

  def load_image(self, i):
    _LOADED.append(i)
    return super().load_image(i)


_LOADED: list = []


@pytest.mark.parametrize("num_threads,prefetch", [(0, 0), (2, 1)])
def test_decoding_runs_at_most_prefetch_batches_ahead(folder, num_threads, prefetch):
  split = _Counting(np.tile(folder.paths, 10), np.tile(folder.labels, 10))  # 200 images
  _LOADED.clear()
  it = pipeline.image_batches(split, 8, transform=SMALL_TEST, seed=0, process_index=0,
                              process_count=1, num_threads=num_threads, prefetch=prefetch)
  next(it)
  import time
  time.sleep(0.5)  # let prefetch threads run as far as they are allowed
  ahead = len(_LOADED) - 8
  # sequential: nothing ahead; threads: the buffer of prefetch·b images plus one per thread
  assert ahead <= (0 if num_threads == 0 else prefetch * 8 + num_threads + 8), ahead


def test_official_image_stream_imagenet_r_folder(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "imagenet-r"
  for c in range(200):
    (root / f"n{c:08d}").mkdir(parents=True)
    for i in range(5):
      Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(root / f"n{c:08d}" / f"a_{i}.png")
  stream = pipeline.official_image_stream("imagenet_r", root=root, num_tasks=20)
  assert len(stream) == 20 and stream.tasks[19].classes == tuple(range(190, 200))
  assert (stream.train_transform, stream.test_transform) == ("rrc224_flip", "resize256_center224")
  assert sum(len(t.train) for t in stream.tasks) == 800 and sum(len(t.test) for t in stream.tasks) == 200
  with pytest.raises(images.ImageDataMissingError, match="train"):
    pipeline.official_image_stream("cub", root=tmp_path)
