"""``clx.train.run``: one TaskResult per task, equal to what run_method computes."""

import dataclasses

import chex
import jax
import numpy as np

from clx.methods import build
from clx.models.mlp import mlp
from clx.train import TaskResult, TrainConfig, run, run_method
from clx.train import logging as run_logging
from clx.train.sharding import make_mesh
from tests.helpers import make_gaussian_stream

CFG = TrainConfig(epochs=2, batch_size=10, optimizer="sgd", learning_rate=0.05, steps_per_call=4)


def _method(name, stream):
  return build(name, mlp(stream.input_shape, (16,), seed=0))


def test_run_yields_each_tasks_state_row_fit_log_and_diagnostics(tmp_path):
  stream = make_gaussian_stream(separation=1.0)
  logger = run_logging.RunLogger(tmp_path, tensorboard=False, enabled=True)
  results = list(run(_method("gpm", stream), stream, CFG, mesh=make_mesh(1), quiet=True,
                     logger=logger))
  assert [r.task for r in results] == [0, 1, 2] and all(isinstance(r, TaskResult) for r in results)
  whole = run_method(_method("gpm", stream), stream, CFG, mesh=make_mesh(1), quiet=True)
  for r in results:
    np.testing.assert_array_equal(r.acc_row, whole.acc_matrix[r.task, :r.task + 1])
    assert r.fit_log["epochs"] == CFG.epochs and len(r.fit_log["phases"]) == 1
    assert r.diagnostics is not None and "memory_ranks" in r.diagnostics
  chex.assert_trees_all_equal(jax.device_get(results[-1].state), jax.device_get(whole.state))
  # Task 0's state is the final state of a run over the first task alone.
  first = dataclasses.replace(stream, tasks=stream.tasks[:1])
  alone = run_method(_method("gpm", first), first, CFG, mesh=make_mesh(1), quiet=True)
  chex.assert_trees_all_equal(jax.device_get(results[0].state), jax.device_get(alone.state))
  # The per-epoch mean losses are the means of the logged per-step losses.
  steps = [r for r in run_logging.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
  for r in results:
    for epoch, mean in enumerate(r.fit_log["epoch_losses"]):
      logged = [s["loss"] for s in steps if s["task"] == r.task and s["epoch"] == epoch]
      np.testing.assert_allclose(mean, np.mean(logged), rtol=1e-5)


def test_second_stage_fits_are_in_the_task_fit_log():
  stream = make_gaussian_stream(num_tasks=2, separation=1.0)
  results = list(run(_method("became_gpm", stream), stream, CFG, mesh=make_mesh(1), quiet=True))
  # BECAME: the projected stage (main phase) and the free stage inside end_task.
  assert [len(r.fit_log["phases"]) for r in results] == [1, 2]
  assert results[1].fit_log["phases"][0]["title"] == results[1].fit_log["title"]


def test_run_method_keeps_every_state_on_request():
  stream = make_gaussian_stream(num_tasks=2)
  kept = run_method(_method("finetune", stream), stream, CFG, mesh=make_mesh(1), quiet=True,
                    keep_states=True)
  assert all(r.state is not None for r in kept.tasks) and kept.tasks[0].diagnostics is None
  light = run_method(_method("finetune", stream), stream, CFG, mesh=make_mesh(1), quiet=True)
  assert light.tasks[0].state is None and light.tasks[-1].state is light.state


def test_a_supplied_schedule_replaces_the_named_one():
  from clx.train.config import epoch_cosine
  stream = make_gaussian_stream(num_tasks=2)
  cfg = dataclasses.replace(CFG, epochs=3, optimizer="adam", learning_rate=0.01)
  named = run_method(_method("finetune", stream), stream,
                     dataclasses.replace(cfg, schedule="inflora_cosine"), mesh=make_mesh(1),
                     quiet=True)
  supplied = run_method(_method("finetune", stream), stream, cfg, mesh=make_mesh(1), quiet=True,
                        lr_schedule=epoch_cosine(cfg.learning_rate, cfg.epochs))
  constant = run_method(_method("finetune", stream), stream, cfg, mesh=make_mesh(1), quiet=True)
  chex.assert_trees_all_equal(jax.device_get(named.state), jax.device_get(supplied.state))
  leaves = zip(jax.tree.leaves(jax.device_get(constant.state)),
               jax.tree.leaves(jax.device_get(supplied.state)))
  assert any(not np.array_equal(a, b) for a, b in leaves)
