"""Task streams: determinism, disjointness, permutations, the official GPM PMNIST rule."""

from __future__ import annotations

import numpy as np
import pytest

from clx.data import streams
from clx.data.types import ArraySplit, Stream, Task


def _toy_splits(num_classes=6, n_train=120, n_test=60, shape=(4, 3), seed=0, val=False):
  rng = np.random.RandomState(seed)

  def split(n):
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    return ArraySplit({"x": rng.randint(0, 256, size=(n,) + shape).astype(np.uint8), "y": y})

  out = {"train": split(n_train), "test": split(n_test)}
  if val:
    out["val"] = split(30)
  return out


def _assert_streams_equal(a: Stream, b: Stream):
  assert (a.name, a.scenario, a.num_classes, len(a)) == (b.name, b.scenario, b.num_classes, len(b))
  for ta, tb in zip(a.tasks, b.tasks):
    assert ta.name == tb.name and ta.classes == tb.classes
    for s in ("train", "test"):
      np.testing.assert_array_equal(getattr(ta, s).x, getattr(tb, s).x)
      np.testing.assert_array_equal(getattr(ta, s).y, getattr(tb, s).y)


# ---------------------------------------------------------------- sklearn replica / GPM rule


@pytest.mark.parametrize("n,seed", [(10, 2), (10, 0), (784, 400), (784, 9 * 100 + 9), (5, 123456)])
def test_sklearn_shuffle_replica_matches_sklearn(n, seed):
  from sklearn.utils import shuffle
  values = np.arange(n) * 3 + 1
  np.testing.assert_array_equal(streams.sklearn_shuffle(values, seed), shuffle(values, random_state=seed))
  rows = np.random.RandomState(0).rand(n, 2)
  np.testing.assert_array_equal(streams.sklearn_shuffle(rows, seed), shuffle(rows, random_state=seed))


def test_official_gpm_task_order_seed_2():
  np.testing.assert_array_equal(streams.gpm_pmnist_task_order(2), [4, 1, 5, 0, 7, 2, 3, 6, 9, 8])


def test_gpm_permutation_equals_the_official_per_image_shuffle():
  from sklearn.utils import shuffle
  images = np.random.RandomState(1).rand(3, 784).astype(np.float32)
  order = streams.gpm_pmnist_task_order(2)
  for i, r in enumerate(order):
    permutation = streams.gpm_pmnist_permutation(i, r)
    np.testing.assert_array_equal(np.sort(permutation), np.arange(784))
    ours = np.take(images, permutation, axis=1)
    for row in range(len(images)):  # the official loader: aux = shuffle(aux, random_state=r*100+i)
      np.testing.assert_array_equal(ours[row], shuffle(images[row], random_state=r * 100 + i))


def test_gpm_normalisation_is_float32_totensor_then_normalize():
  split = ArraySplit({"x": np.arange(256, dtype=np.uint8).reshape(1, 16, 16), "y": np.zeros(1, int)})
  out = streams.to_float_inputs(split, pixel_max=255.0, mean=0.1307, std=0.3081).x
  expected = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.1307)) / np.float32(0.3081)
  assert out.dtype == np.float32 and out.shape == (1, 256)
  np.testing.assert_array_equal(out[0], expected)
  assert out.min() == pytest.approx(-0.42421296) and out.max() == pytest.approx(2.8214867)


# ---------------------------------------------------------------- permuted


def _index_image_splits(num_classes=3, n=12, shape=(3, 4)):
  """Every image's pixel j holds value j, so a permuted image *is* its permutation."""
  dim = int(np.prod(shape))
  x = np.tile(np.arange(dim, dtype=np.int32), (n, 1)).reshape((n,) + shape)
  y = np.arange(n) % num_classes
  return {"train": ArraySplit({"x": x, "y": y}), "test": ArraySplit({"x": x[:6].copy(), "y": y[:6]})}


def test_permuted_is_a_bijection_shared_by_train_and_test():
  stream = streams.permuted(_index_image_splits(), num_tasks=4, seed=7)
  assert stream.scenario == "domain" and stream.num_classes == 3 and stream.input_shape == (12,)
  permutations = []
  for task in stream.tasks:
    permutation = task.train.x[0]
    np.testing.assert_array_equal(np.sort(permutation), np.arange(12))  # bijection
    assert np.all(task.train.x == permutation) and np.all(task.test.x == permutation)
    assert task.classes == (0, 1, 2)
    permutations.append(tuple(permutation))
  assert len(set(permutations)) == 4
  assert permutations[0] != tuple(range(12))


def test_permuted_options_and_determinism():
  splits = _index_image_splits()
  first = streams.permuted(splits, num_tasks=3, seed=1, permute_first=False, flatten=False)
  np.testing.assert_array_equal(first.tasks[0].train.x, splits["train"].x)
  assert first.input_shape == (3, 4)
  _assert_streams_equal(streams.permuted(splits, 3, seed=1), streams.permuted(splits, 3, seed=1))
  assert not np.array_equal(streams.permuted(splits, 2, seed=1).tasks[1].train.x,
                            streams.permuted(splits, 2, seed=2).tasks[1].train.x)
  with_val = streams.permuted(splits, num_tasks=2, seed=1, val_fraction=0.25)
  task = with_val.tasks[1]
  assert (len(task.val), len(task.train)) == (3, 9)
  np.testing.assert_array_equal(task.val.y, splits["train"].y[:3])  # the FIRST examples
  np.testing.assert_array_equal(task.train.y, splits["train"].y[3:])


@pytest.mark.parametrize("kwargs,match", [
    ({"num_tasks": 0}, "num_tasks"), ({"num_tasks": 2, "val_fraction": 1.0}, "val_fraction"),
    ({"num_tasks": 2.5}, "num_tasks")])
def test_permuted_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    streams.permuted(_index_image_splits(), **kwargs)


# ---------------------------------------------------------------- class incremental


def test_class_incremental_disjoint_and_complete():
  splits = _toy_splits(num_classes=6, val=True)
  stream = streams.class_incremental(splits, num_tasks=3)
  assert stream.scenario == "class" and stream.num_classes == 6 and len(stream) == 3
  seen = []
  for t, task in enumerate(stream.tasks):
    assert task.classes == (2 * t, 2 * t + 1)
    assert set(np.unique(task.train.y)) == set(task.classes) == set(np.unique(task.test.y))
    assert set(np.unique(task.val.y)) <= set(task.classes)
    seen += list(task.classes)
  assert sorted(seen) == list(range(6))
  assert sum(len(t.train) for t in stream.tasks) == len(splits["train"])
  # original example order is kept inside a task
  mask = np.isin(splits["train"].y, [2, 3])
  np.testing.assert_array_equal(stream.tasks[1].train.x, splits["train"].x[mask])


def test_class_incremental_seeded_order_matches_pycil_and_is_deterministic():
  splits = _toy_splits(num_classes=6)
  stream = streams.class_incremental(splits, num_tasks=3, class_order="seed", seed=1993)
  np.random.seed(1993)  # PyCIL / InfLoRA: np.random.seed(seed); np.random.permutation(n)
  expected = np.random.permutation(6)
  for t, task in enumerate(stream.tasks):
    original = sorted(expected[2 * t:2 * t + 2].tolist())
    assert task.name == f"classes {original}"
    assert task.classes == (2 * t, 2 * t + 1)  # remapped to positions in the order
    mask = np.isin(splits["train"].y, original)
    np.testing.assert_array_equal(task.train.x, splits["train"].x[mask])
    lookup = {c: i for i, c in enumerate(expected.tolist())}
    np.testing.assert_array_equal(task.train.y, [lookup[c] for c in splits["train"].y[mask]])
  _assert_streams_equal(stream, streams.class_incremental(splits, 3, class_order="seed", seed=1993))
  other = streams.class_incremental(splits, 3, class_order="seed", seed=0)
  assert [t.name for t in other.tasks] != [t.name for t in stream.tasks]


def test_class_incremental_explicit_order_without_remap_task_scenario():
  splits = _toy_splits(num_classes=6)
  stream = streams.class_incremental(splits, num_tasks=2, classes_per_task=2, class_order=[5, 0, 3, 1],
                                     scenario="task", remap_labels=False)
  assert stream.scenario == "task" and stream.num_classes == 6
  assert [t.classes for t in stream.tasks] == [(0, 5), (1, 3)]
  assert set(np.unique(stream.tasks[0].test.y)) == {0, 5}


@pytest.mark.parametrize("kwargs,error,match", [
    ({"num_tasks": 4}, ValueError, "do not divide"),
    ({"num_tasks": 4, "classes_per_task": 2}, ValueError, "need 8 classes"),
    ({"num_tasks": 2, "class_order": "random"}, ValueError, "class_order"),
    ({"num_tasks": 2, "class_order": [0, 0, 1, 2, 3, 4]}, ValueError, "repeats"),
    ({"num_tasks": 2, "class_order": [0, 1, 2, 3, 4, 9]}, ValueError, r"\[9\]"),
    ({"num_tasks": 2, "scenario": "domain"}, ValueError, "scenario"),
    ({"num_tasks": 0}, ValueError, "num_tasks"),
])
def test_class_incremental_rejects_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    streams.class_incremental(_toy_splits(num_classes=6), **kwargs)


def test_bad_splits_are_named():
  good = _toy_splits()
  with pytest.raises(KeyError, match="missing \\['test'\\]"):
    streams.class_incremental({"train": good["train"]}, 3)
  negative = {"train": ArraySplit({"x": np.zeros((2, 1)), "y": np.array([0, -1])}), "test": good["test"]}
  with pytest.raises(ValueError, match="negative labels"):
    streams.class_incremental(negative, 1)
  floats = {"train": ArraySplit({"x": np.zeros((2, 1)), "y": np.array([0.0, 1.0])}), "test": good["test"]}
  with pytest.raises(ValueError, match="integer"):
    streams.permuted(floats, 1)
  with pytest.raises(TypeError, match="mapping"):
    streams.permuted([good["train"], good["test"]], 1)


def test_stream_validation_catches_label_errors():
  split = ArraySplit({"x": np.zeros((3, 2), np.float32), "y": np.array([0, 1, 5], np.int32)})
  with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
    Stream("s", (Task("t0", split, split, (0, 1, 5)),), "class", num_classes=3)
  empty = split.take(np.array([], dtype=int))
  with pytest.raises(ValueError, match="empty test split"):
    Stream("s", (Task("t0", split, empty, (0, 1, 5)),), "class", num_classes=6)
  with pytest.raises(ValueError, match=r"labels \[5\] not in the task's classes"):
    Stream("s", (Task("t0", split, split, (0, 1)),), "class", num_classes=6)
  # a class-incremental task whose classes have no test examples fails loudly too
  splits = _toy_splits(num_classes=4)
  splits["test"] = splits["test"].take(np.flatnonzero(splits["test"].y < 2))
  with pytest.raises(ValueError, match="empty test split"):
    streams.class_incremental(splits, num_tasks=2)


# ---------------------------------------------------------------- domains


def test_domain_sequence():
  a, b = _toy_splits(num_classes=4, seed=0), _toy_splits(num_classes=4, seed=1)
  stream = streams.domain_sequence([("a", a), ("b", b)], name="ab")
  assert stream.scenario == "domain" and stream.num_classes == 4 and [t.name for t in stream.tasks] == ["a", "b"]
  assert stream.tasks[1].train is b["train"]
  assert stream.tasks[0].classes == (0, 1, 2, 3)
  with pytest.raises(ValueError, match="disagree on input shape"):
    streams.domain_sequence([("a", a), ("c", _toy_splits(shape=(5, 5)))])
  with pytest.raises(ValueError, match="at least one"):
    streams.domain_sequence([])
  with pytest.raises(TypeError, match=r"\(name, splits\)"):
    streams.domain_sequence([a])


# ---------------------------------------------------------------- registry


def test_get_stream_split_digits(digits_data_dir, digits_splits):
  stream = streams.get_stream("split_digits", data_dir=digits_data_dir)
  assert stream.name == "split_digits" and stream.scenario == "class" and len(stream) == 5
  assert stream.input_shape == (64,) and stream.tasks[0].train.x.dtype == np.float32
  assert [t.classes for t in stream.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
  x = np.concatenate([t.train.x for t in stream.tasks])
  assert x.min() == 0.0 and x.max() == 1.0
  assert sum(len(t.train) for t in stream.tasks) == 1437
  mask = np.isin(digits_splits["train"].y, [4, 5])
  np.testing.assert_array_equal(stream.tasks[2].train.x,
                                digits_splits["train"].x[mask].reshape(-1, 64) / np.float32(16))
  _assert_streams_equal(stream, streams.get_stream("split_digits", data_dir=digits_data_dir))
  images = streams.get_stream("split_digits", data_dir=digits_data_dir, flatten=False,
                              scenario="task", class_order="seed", seed=3)
  assert images.input_shape == (8, 8, 1) and images.scenario == "task"


def test_get_stream_permuted_digits(digits_data_dir):
  stream = streams.get_stream("permuted_digits", data_dir=digits_data_dir, num_tasks=3)
  assert stream.scenario == "domain" and len(stream) == 3 and stream.input_shape == (64,)
  assert all(t.classes == tuple(range(10)) for t in stream.tasks)


def test_unknown_stream_lists_known_names():
  with pytest.raises(KeyError) as info:
    streams.get_stream("split_cifar")
  for known in ("split_mnist", "split_digits", "pmnist", "mnist_animal_domains"):
    assert known in str(info.value)


def test_register_stream(monkeypatch):
  monkeypatch.setattr(streams, "STREAMS", dict(streams.STREAMS))
  toy = lambda **kwargs: streams.permuted(_index_image_splits(), num_tasks=2)  # noqa: E731
  streams.register_stream("toy", toy)
  assert streams.get_stream("toy").name == "pmnist"
  with pytest.raises(ValueError, match="already registered"):
    streams.register_stream("toy", toy)


# ---------------------------------------------------------------- real MNIST (downloads once)


@pytest.mark.slow
def test_official_gpm_pmnist_on_real_mnist():
  from sklearn.utils import shuffle
  from clx.data.builders import load_builtin
  mnist = load_builtin("clx_mnist")
  stream = streams.get_stream("pmnist")
  assert stream.scenario == "domain" and stream.num_classes == 10 and len(stream) == 10
  order = [4, 1, 5, 0, 7, 2, 3, 6, 9, 8]
  normalized = (mnist["train"].x.reshape(-1, 784).astype(np.float32) / np.float32(255)
                - np.float32(0.1307)) / np.float32(0.3081)
  for i, task in enumerate(stream.tasks):
    assert (len(task.train), len(task.val), len(task.test)) == (54000, 6000, 10000)
    np.testing.assert_array_equal(task.val.y, mnist["train"].y[:6000])
    np.testing.assert_array_equal(task.train.y, mnist["train"].y[6000:])
    for row in (0, 5999, 6000, 59999):  # the official per-image rule, literally
      expected = shuffle(normalized[row], random_state=order[i] * 100 + i)
      got = task.val.x[row] if row < 6000 else task.train.x[row - 6000]
      np.testing.assert_array_equal(got, expected)
  x = np.concatenate([stream.tasks[0].val.x, stream.tasks[0].train.x])
  assert x.min() == pytest.approx(-0.4242, abs=1e-4) and x.max() == pytest.approx(2.8215, abs=1e-4)
  assert abs(float(x.mean())) < 1e-3 and float(x.std()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_split_mnist_and_domains_on_real_data():
  split = streams.get_stream("split_mnist")
  assert [t.classes for t in split.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
  assert sum(len(t.train) for t in split.tasks) == 60000
  assert split.tasks[0].train.x.max() == 1.0
  domains = streams.get_stream("mnist_animal_domains", flatten=False)
  assert [t.name for t in domains.tasks] == ["mnist", "animal_mnist"]
  assert domains.input_shape == (28, 28, 1) and domains.num_classes == 10
  assert (len(domains.tasks[1].train), len(domains.tasks[1].test)) == (8000, 2000)
