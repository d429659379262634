"""The loop on streaming image splits (clx.data.pipeline.StreamingSplit): a synthetic image
folder decoded per batch, uint8 to the device, seeded augmentation, resume, host passes."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from clx import methods
from clx.data import images, pipeline
from clx.data.transforms import ImageTransform, keyed_rng
from clx.data.types import Stream
from clx.models.vit import vit
from clx.train import batches as batches_lib
from clx.train import loop
from clx.train.fit import Fitter
from clx.train.loop import TrainConfig, run, run_method
from clx.train.sharding import make_mesh

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
# 32² outputs: the test ViT has 16-pixel patches, so 4 patches per image
RRC = ImageTransform("rrc32_test", "random_resized_crop", size=32, flip=0.5)
CENTER = ImageTransform("r36c32_test", "resize_center_crop", size=32, resize=36)
CFG = TrainConfig(epochs=2, batch_size=8, optimizer="adam", learning_rate=1e-2,
                  eval_batch_size=16)


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"{name}_under_test", EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> images.ImageSplit:
  root = tmp_path_factory.mktemp("synthetic") / "folder"
  _load("make_synthetic_image_folder").make_folder(root, num_images=40, num_classes=4,
                                                   min_side=24, max_side=48)
  return images.image_folder(root)


def _image_stream(folder, train=RRC, test=CENTER, gram=None):
  rows = np.arange(len(folder))
  is_test = rows % 4 == 0
  splits = {"train": folder.take(rows[~is_test]), "test": folder.take(rows[is_test])}
  return pipeline.class_incremental_images(splits, [2, 2], train_transform=train,
                                           test_transform=test, gram_transform=gram)


def _reference(split: pipeline.StreamingSplit, plan_rows: np.ndarray, key) -> np.ndarray:
  """float64 pixels of each planned row: the transform of the file with keyed_rng(key, row)."""
  transform = split.transform
  out = np.zeros((*plan_rows.shape, *split.example_shape))
  for index, row in np.ndenumerate(plan_rows):
    if row >= 0:
      rng = keyed_rng(key, int(row)) if transform.random else None
      out[index] = transform(split.images.load_image(int(row)), rng) / 255.0
  return out


def test_device_batches_are_each_files_transform_under_the_pass_key(folder):
  split = pipeline.StreamingSplit(folder, RRC, num_threads=2)
  fitter = Fitter(make_mesh(2), quiet=True)
  plan = fitter.plan(len(split), 6, True, (0, 1, 0, 3))  # 40 rows: the last batch is padded
  key = (0, 1, 0, 3)
  steps = list(fitter.device_batches(split, plan, "test", key=key))
  x = np.stack([np.asarray(a["x"]) for a, _, _ in steps])
  assert x.dtype == np.float32
  np.testing.assert_allclose(x, _reference(split, plan, key), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.stack([np.asarray(a["y"]) for a, _, _ in steps]),
                                np.where(plan < 0, 0, folder.labels[np.maximum(plan, 0)]))
  np.testing.assert_array_equal(np.stack([np.asarray(a["mask"]) for a, _, _ in steps]), plan >= 0)
  assert [n for _, _, n in steps] == [int((p >= 0).sum()) for p in plan]
  # chunks of 3 steps: the same batches, the last chunk padded with fully masked steps
  chunks = list(fitter.device_batches(split, plan, "test", chunk=3, key=key))
  stacked = np.concatenate([np.asarray(a["x"]) for a, _, _ in chunks])
  np.testing.assert_array_equal(stacked[:len(plan)], x)
  assert not stacked[len(plan):].any() and sum(s for _, s, _ in chunks) == len(plan)
  # another epoch draws other crops
  other = next(fitter.device_batches(split, plan, "test", key=(0, 1, 0, 4)))[0]["x"]
  assert not np.array_equal(np.asarray(other), x[0])


def test_a_streaming_split_is_never_materialised(folder):
  split = pipeline.StreamingSplit(folder, RRC)
  assert split.x.shape == (40, 32, 32, 3) and split.x.dtype == np.float32
  with pytest.raises(pipeline.MaterializationError, match="streams its images"):
    split.x[0]  # pylint: disable=pointless-statement
  with pytest.raises(pipeline.MaterializationError):
    np.asarray(split.x)
  assert not Fitter(make_mesh(1)).resident(split, CFG)
  with pytest.raises(ValueError, match="one size"):
    pipeline.StreamingSplit(folder, RRC, pass_transform=ImageTransform("c16", "resize_center_crop",
                                                                       size=16, resize=18))
  with pytest.raises(TypeError, match="ImageSplit"):
    pipeline.StreamingSplit(np.zeros((3, 4)), RRC)


def test_host_passes_use_the_pass_transform_with_fresh_draws_per_pass(folder):
  stream = pipeline.streaming_stream(_image_stream(folder, train=CENTER, test=CENTER, gram=RRC))
  task = stream.tasks[0]
  fitter = Fitter(make_mesh(2), quiet=True)
  ctx = loop._Context(0, None, jax.random.PRNGKey(0), None, fitter, task.train,  # pylint: disable=protected-access
                      {"test": task.test, "val": None}, CFG, (5, 0))
  passes = [np.concatenate([np.asarray(b["x"]) for b in ctx.batches("train", batch_size=8)])
            for _ in range(2)]
  plan = fitter.plan(len(task.train), 8, False, (5, 0, 7919, 0)).reshape(-1)
  gram_split = task.train.for_passes()
  assert gram_split.transform is RRC
  for p, x in enumerate(passes):  # pass p is keyed (seed words, 7919, seed, p)
    keep = plan >= 0
    np.testing.assert_allclose(x[keep], _reference(gram_split, plan[keep][None], (5, 0, 7919, 0, p))[0],
                               atol=1e-6)
  assert not np.array_equal(passes[0], passes[1])
  sample = ctx.sample(3, seed=2)
  assert sample["x"].shape == (3, 32, 32, 3) and sample["x"].dtype == np.float32
  arrays = ctx.arrays("train")
  assert len(arrays["y"]) == len(task.train)
  with pytest.raises(pipeline.MaterializationError):
    arrays["x"][:2]  # pylint: disable=pointless-statement


@pytest.fixture(scope="module")
def inflora_runs(folder, tmp_path_factory):
  """InfLoRA on a tiny ViT over the streamed folder: uninterrupted, then stopped after task 0
  and resumed from its checkpoint; records the dtype of every x that crosses to the devices."""
  stream = pipeline.streaming_stream(_image_stream(folder), num_threads=2)
  method = methods.build("inflora", vit(stream.input_shape, variant="test", depth=1, seed=0),
                         lora_rank=2, sites=["k", "v"])
  crossed = []
  shard = batches_lib.sharding.shard_arrays

  def recording(local, mesh, axis, global_batch):
    crossed.append(local["x"].dtype if "x" in local else None)
    return shard(local, mesh, axis, global_batch)

  mp = pytest.MonkeyPatch()
  mp.setattr(batches_lib.sharding, "shard_arrays", recording)
  try:
    whole = run_method(method, stream, CFG, seed=3, mesh=make_mesh(2), quiet=True)
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    gen = run(method, stream, CFG, seed=3, mesh=make_mesh(2), checkpoint_dir=ckpt, quiet=True)
    first = next(gen)  # yielded after task 0's checkpoint is committed
    gen.close()
    resumed = run_method(method, stream, CFG, seed=3, mesh=make_mesh(2), checkpoint_dir=ckpt,
                         quiet=True)
  finally:
    mp.undo()
  return {"stream": stream, "whole": whole, "first": first, "resumed": resumed,
          "crossed": crossed}


def test_only_uint8_pixels_cross_to_the_device(inflora_runs):
  crossed = [d for d in inflora_runs["crossed"] if d is not None]
  # epochs, Gram passes and evaluation of 3 runs all streamed; none moved float pixels
  assert len(crossed) > 20 and set(crossed) == {np.dtype(np.uint8)}


def test_same_seed_same_numbers_and_resume_at_a_task_boundary(inflora_runs):
  whole, first, resumed = inflora_runs["whole"], inflora_runs["first"], inflora_runs["resumed"]
  np.testing.assert_array_equal(first.acc_row, whole.acc_matrix[0, :1])
  assert resumed.resumed_from == 0
  np.testing.assert_array_equal(resumed.acc_matrix, whole.acc_matrix)
  chex.assert_trees_all_equal(jax.device_get(resumed.state), jax.device_get(whole.state))


@pytest.mark.slow
def test_streamed_run_equals_the_in_memory_run_of_the_same_pixels(folder):
  """Deterministic transforms: the streamed run and the run on the materialised float32 stream
  (host-normalised, device-resident) see the same batches, so they give the same numbers."""
  image_stream = _image_stream(folder, train=CENTER, test=CENTER)
  streamed = pipeline.streaming_stream(image_stream, num_threads=2)
  in_memory = pipeline.materialize(image_stream, num_threads=0)
  assert isinstance(in_memory.tasks[0].train.x, np.ndarray)
  method = methods.build("inflora", vit(streamed.input_shape, variant="test", depth=1, seed=0),
                         lora_rank=2, sites=["k", "v"])
  cfg = dataclasses.replace(CFG, epochs=1)
  a = run_method(method, streamed, cfg, seed=1, mesh=make_mesh(2), quiet=True)
  b = run_method(method, in_memory, cfg, seed=1, mesh=make_mesh(2), quiet=True)
  np.testing.assert_array_equal(a.acc_matrix, b.acc_matrix)
  chex.assert_trees_all_close(jax.device_get(a.state), jax.device_get(b.state), rtol=1e-5,
                              atol=1e-6)


def test_vit_configs_stream_an_image_folder_and_name_what_is_missing(tmp_path):
  config = _load("vit_inflora").get_config()
  assert (config["stream"]["source"], config["stream"]["dataset"]) == ("folder", "imagenet_r")
  args = {k: v for k, v in config["stream"].items() if k != "name"}
  proteus = _load("vit_proteus")
  with pytest.raises(images.ImageDataMissingError, match="absent"):
    proteus.vit_split_stream(**{**args, "root": str(tmp_path / "absent")})
  root = tmp_path / "imagenet-r"
  rng = np.random.default_rng(0)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for c in range(200):
    (root / f"n{c:08d}").mkdir(parents=True)
    for i in range(5):
      Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(
          root / f"n{c:08d}" / f"a_{i}.png")
  stream = proteus.vit_split_stream(**{**args, "root": str(root)})
  assert isinstance(stream, Stream) and len(stream) == 10 and stream.input_shape == (224, 224, 3)
  train, test = stream.tasks[0].train, stream.tasks[0].test
  assert isinstance(train, pipeline.StreamingSplit)
  assert (train.transform, train.for_passes().transform, test.transform) == (
      "rrc224_flip", "rrc224_flip", "resize256_center224")  # InfLoRA: Gram passes = train
  # InfLoRA's random_split: 800 of the 1,000 images train
  assert sum(len(t.train) for t in stream.tasks) == 800


def test_joint_training_streams_the_union_of_the_tasks(folder):
  stream = pipeline.streaming_stream(_image_stream(folder))
  union = loop.train_split_for(methods.build("joint", vit(stream.input_shape, variant="test",
                                                          depth=1, seed=0)), stream, 1)
  assert isinstance(union, pipeline.StreamingSplit)
  assert len(union) == len(stream.tasks[0].train) + len(stream.tasks[1].train)
  np.testing.assert_array_equal(union.y, np.concatenate([t.train.y for t in stream.tasks]))
  with pytest.raises(TypeError, match="transforms"):
    pipeline.concat_streaming([stream.tasks[0].train, stream.tasks[1].test])


@dataclasses.dataclass(frozen=True)
class _CountingImages:
  """An ImageSplit that records which rows are decoded (thread-safe list appends)."""

  split: images.ImageSplit
  loaded: list

  @property
  def labels(self):
    return self.split.labels

  def __len__(self):
    return len(self.split)

  def take(self, indices):
    return _CountingImages(self.split.take(indices), self.loaded)

  def load_image(self, i):
    self.loaded.append(int(i))
    return self.split.load_image(i)


def test_each_process_decodes_only_its_rows_of_every_global_batch(folder, monkeypatch):
  """Multi-host: process p decodes the rows sharding.process_rows gives it, nothing else."""
  loaded, handed = [], []
  split = pipeline.StreamingSplit(_CountingImages(folder, loaded), CENTER, num_threads=2)
  fitter = Fitter(make_mesh(2), quiet=True)
  plan = fitter.plan(len(split), 8, True, (0, 0, 0, 0))
  mine = slice(4, 8)  # as if this were process 1 of 2
  monkeypatch.setattr(batches_lib.sharding, "process_rows", lambda n, mesh: mine)
  monkeypatch.setattr(batches_lib.sharding, "shard_arrays",
                      lambda local, mesh, axis, n: handed.append(local) or {"x": local["x"]})
  monkeypatch.setattr(batches_lib, "_normalizer", lambda *a: lambda x: x)
  list(fitter.device_batches(split, plan, "test", key=(0,)))
  expected = plan[:, mine]
  assert sorted(loaded) == sorted(expected[expected >= 0].tolist())
  assert all(h["x"].shape == (4, 32, 32, 3) and h["x"].dtype == np.uint8 for h in handed)
  np.testing.assert_array_equal(np.stack([h["mask"] for h in handed]), expected >= 0)


def test_train_and_eval_steps_take_uint8_pixels_and_normalise_inside(folder, monkeypatch):
  """Streamed batches reach the jitted train and evaluation steps as uint8 (normalised inside
  the step). The old code normalised every training and evaluation batch by a separate
  jitted call first (a float32 copy on device): this test saw float32 there."""
  stream = pipeline.streaming_stream(_image_stream(folder), num_threads=2)
  method = methods.build("lora", vit(stream.input_shape, variant="test", depth=1, seed=0),
                         lora_rank=2, sites=["k", "v"])
  seen = []
  batches = Fitter.device_batches

  def recording(self, split, plan, where, *args, **kwargs):
    for arrays, steps, examples in batches(self, split, plan, where, *args, **kwargs):
      seen.append((where, np.dtype(arrays["x"].dtype)))
      yield arrays, steps, examples

  monkeypatch.setattr(Fitter, "device_batches", recording)
  cfg = dataclasses.replace(CFG, epochs=1)
  result = run_method(method, stream, cfg, seed=3, mesh=make_mesh(2), quiet=True)
  assert np.all(np.isfinite(result.acc_matrix[np.tril_indices(2)]))
  steps = {dtype for where, dtype in seen if where != "eval"}
  evals = {dtype for where, dtype in seen if where == "eval"}
  assert steps == {np.dtype(np.uint8)} and evals == {np.dtype(np.uint8)}, seen


@pytest.mark.parametrize("norm", [dict(pixel_range="0,1"), dict(pixel_range="-1,1"),
                                  dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
def test_normalising_inside_the_step_gives_the_separate_normalisers_numbers(folder, norm):
  """Features of a jitted forward that normalises raw uint8 inside, against the forward of the
  separately normalised float32 batch (the old path): bit-identical for the 0-1 range,
  rounding-level otherwise."""
  split = pipeline.StreamingSplit(folder, CENTER, num_threads=0, **norm)
  backbone = vit(split.example_shape, variant="test", depth=1, seed=0)
  fitter = Fitter(make_mesh(2), quiet=True)
  plan = fitter.plan(len(split), 8, False, (0,))
  normalization = batches_lib.input_normalization(split)
  assert normalization == (split.pixel_range, split.mean, split.std)
  inside = jax.jit(lambda b, x: backbone.apply(
      b, batches_lib.normalize_inputs({"x": x}, normalization)["x"]))
  separate = jax.jit(backbone.apply)
  raw = [a["x"] for a, _, _ in fitter.device_batches(split, plan, "t", raw=True)]
  old = [a["x"] for a, _, _ in fitter.device_batches(split, plan, "t")]
  assert {r.dtype for r in raw} == {np.dtype(np.uint8)} and {o.dtype for o in old} == {
      np.dtype(np.float32)}
  exact = norm.get("pixel_range") == "0,1"  # x / 255 rounds the same fused or not
  for r, o in zip(raw, old):
    mine = np.asarray(batches_lib.normalize_inputs({"x": r}, normalization)["x"])
    np.testing.assert_allclose(mine, o, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)
    a, b = np.asarray(inside(backbone.params, r)), np.asarray(separate(backbone.params, o))
    if exact:
      np.testing.assert_array_equal(a, b)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert batches_lib.input_normalization(folder) is None
