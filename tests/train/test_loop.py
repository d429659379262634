"""The training loop: sharding equivalence, determinism, scenarios, bad input."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from clx.data.types import ArraySplit, Stream, Task
from clx.methods.sequential import finetune, joint, lora
from clx.models.mlp import mlp
from clx.train.loop import TrainConfig, run_method
from clx.train.sharding import make_mesh
from tests.helpers import make_gaussian_stream

CFG = TrainConfig(epochs=2, batch_size=10, learning_rate=1e-2, eval_batch_size=32)


def _run(method_fn, stream, devices, cfg=CFG, seed=0, **kw):
  backbone = mlp(stream.input_shape, (24,), seed=seed)
  return run_method(method_fn(backbone), stream, cfg, seed=seed, mesh=make_mesh(devices),
                    quiet=True, **kw)


def test_four_devices_match_one():
  assert jax.device_count() >= 4, "conftest should give 4 simulated CPU devices"
  stream = make_gaussian_stream(separation=1.0)
  # batch 10 over 4 devices exercises the masked padding rows too.
  one = _run(finetune, stream, 1)
  four = _run(finetune, stream, 4)
  np.testing.assert_allclose(one.acc_matrix, four.acc_matrix, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(one.state), jax.device_get(four.state),
                              rtol=1e-4, atol=1e-5)


def test_same_seed_same_numbers_and_different_seed_differs():
  stream = make_gaussian_stream(separation=0.8)
  a = _run(lora, stream, 2)
  b = _run(lora, stream, 2)
  chex.assert_trees_all_equal(jax.device_get(a.state), jax.device_get(b.state))
  c = _run(lora, stream, 2, seed=1)
  leaves_a = jax.tree.leaves(jax.device_get(a.state))
  leaves_c = jax.tree.leaves(jax.device_get(c.state))
  assert any(not np.array_equal(x, y) for x, y in zip(leaves_a, leaves_c))


def test_accuracy_matrix_lower_triangular_and_learns():
  stream = make_gaussian_stream()
  res = _run(finetune, stream, 1)
  T = len(stream)
  assert np.all(np.isnan(res.acc_matrix[np.triu_indices(T, 1)]))
  assert np.all(np.isfinite(res.acc_matrix[np.tril_indices(T)]))
  # Each task is well separated: it is learnt when it is trained.
  assert np.all(np.diag(res.acc_matrix) > 90)


def test_joint_upper_bound_remembers_in_class_incremental():
  stream = make_gaussian_stream(separation=2.0)
  ft = _run(finetune, stream, 1)
  jt = _run(joint, stream, 1)
  # Sequential fine-tuning in class-IL forgets the earlier tasks' classes; joint does not.
  assert jt.acc_matrix[-1].mean() > ft.acc_matrix[-1].mean() + 20


def test_task_incremental_masks_to_task_classes():
  stream = make_gaussian_stream(scenario="task", separation=2.0)
  res = _run(finetune, stream, 1)
  cls = _run(finetune, dataclasses.replace(stream, scenario="class"), 1)
  # With the task id, choosing among 2 classes is easier than among all seen classes.
  assert res.acc_matrix[-1, 0] >= cls.acc_matrix[-1, 0]


def test_lora_leaves_backbone_untouched_and_trains_adapters():
  stream = make_gaussian_stream()
  backbone = mlp(stream.input_shape, (24,), seed=0)
  before = jax.device_get(backbone.params)
  res = run_method(lora(backbone, rank=4), stream, CFG, mesh=make_mesh(1), quiet=True)
  chex.assert_trees_all_equal(before, jax.device_get(backbone.params))
  assert "backbone" not in res.state
  # b starts at zero; after training every adapter's up-projection has moved.
  ups = [np.asarray(l) for p, l in jax.tree_util.tree_flatten_with_path(
      jax.device_get(res.state["adapters"]))[0] if jax.tree_util.keystr(p).endswith("['b']")]
  assert ups and all(np.abs(u).max() > 0 for u in ups)


def test_nan_in_batch_is_reported_with_task():
  stream = make_gaussian_stream()
  x = stream.tasks[1].train.x.copy()
  x[3, 2] = np.nan
  bad_task = dataclasses.replace(stream.tasks[1], train=ArraySplit({"x": x, "y": stream.tasks[1].train.y}))
  bad = dataclasses.replace(stream, tasks=(stream.tasks[0], bad_task, stream.tasks[2]))
  with pytest.raises(ValueError, match=r"task 2/3.*NaN"):
    _run(finetune, bad, 1)


def test_stream_rejects_out_of_range_labels_and_empty_tasks():
  stream = make_gaussian_stream()
  t0 = stream.tasks[0]
  y = t0.train.y.copy()
  y[0] = 99
  with pytest.raises(ValueError, match="outside"):
    Stream("bad", (dataclasses.replace(t0, train=ArraySplit({"x": t0.train.x, "y": y})),), "class", 6)
  empty = ArraySplit({"x": t0.train.x[:0], "y": t0.train.y[:0]})
  with pytest.raises(ValueError, match="empty train"):
    Stream("bad", (dataclasses.replace(t0, train=empty),), "class", 6)
  with pytest.raises(ValueError, match="scenario"):
    Stream("bad", (t0,), "online", 6)


def test_bad_train_config_is_named():
  with pytest.raises(ValueError, match="optimizer"):
    TrainConfig(optimizer="rmsprop2")
  with pytest.raises(ValueError, match="learning_rate"):
    TrainConfig(learning_rate=0.0)
