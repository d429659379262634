"""The official GPM/BECAME 10-split CIFAR-100 construction, on synthetic uint8 data."""

import numpy as np
import pytest
from sklearn.utils import shuffle as sk_shuffle

from clx.data import streams
from clx.data.catalog import DatasetNotPreparedError
from clx.data.types import ArraySplit


def _fake_cifar(n_per_class=(30, 6), seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for name, n in zip(("train", "test"), n_per_class):
    y = rng.permutation(np.repeat(np.arange(100), n)).astype(np.int64)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    out[name] = ArraySplit({"x": x, "y": y})
  return out


@pytest.mark.parametrize("num_tasks,seed", [(10, 0), (20, 37)])
def test_tasks_validation_and_normalisation_follow_the_official_loader(num_tasks, seed):
  raw = _fake_cifar()
  stream = streams.official_gpm_cifar100(raw, num_tasks, seed=seed, pc_valid=0.05)
  k = 100 // num_tasks
  assert stream.scenario == "task" and len(stream.tasks) == num_tasks
  mean = np.array([125.3, 123.0, 113.9]) / 255
  std = np.array([63.0, 62.1, 66.7]) / 255
  for i, task in enumerate(stream.tasks):
    assert task.classes == tuple(range(i * k, (i + 1) * k))
    # Official: the task's images in dataset order, then shuffle(r, random_state=seed).
    idx = np.flatnonzero((raw["train"].y >= i * k) & (raw["train"].y < (i + 1) * k))
    r = np.asarray(sk_shuffle(np.arange(len(idx)), random_state=seed))
    n_valid = int(0.05 * len(r))
    want_val = (raw["train"].x[idx[r[:n_valid]]] / 255.0 - mean) / std
    want_train = (raw["train"].x[idx[r[n_valid:]]] / 255.0 - mean) / std
    np.testing.assert_allclose(task.val.x, want_val, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(task.train.x, want_train, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(task.train.y, raw["train"].y[idx[r[n_valid:]]])
    assert task.train.x.dtype == np.float32 and task.train.x.shape[1:] == (32, 32, 3)
    assert len(task.test) == 6 * k


def test_bad_inputs_are_named():
  raw = _fake_cifar()
  with pytest.raises(ValueError, match="divide 100"):
    streams.official_gpm_cifar100(raw, 7)
  bad = {**raw, "train": ArraySplit({"x": raw["train"].x.astype(np.float32), "y": raw["train"].y})}
  with pytest.raises(ValueError, match="uint8"):
    streams.official_gpm_cifar100(bad)
  with pytest.raises(ValueError, match="pc_valid"):
    streams.official_gpm_cifar100(raw, pc_valid=1.5)


def test_unprepared_tfds_cifar100_fails_fast(tmp_path):
  with pytest.raises(DatasetNotPreparedError, match="cifar100"):
    streams.get_stream("gpm_cifar100", data_dir=tmp_path)
