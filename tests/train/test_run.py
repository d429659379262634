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


def _inflora(stream, **kwargs):
  return build("inflora", mlp(stream.input_shape, (16,), seed=0), lora_rank=2, sites=("mlp",),
               **kwargs)


def test_the_inflora_schedule_is_supplied_by_the_method_and_the_old_name_maps_to_it():
  import pytest

  from clx.methods.inflora import epoch_cosine
  stream = make_gaussian_stream(num_tasks=2)
  cfg = dataclasses.replace(CFG, epochs=3, optimizer="adam", learning_rate=0.01)
  by_method = run_method(_inflora(stream, lr_schedule="epoch_cosine"), stream, cfg,
                         mesh=make_mesh(1), quiet=True)
  by_caller = run_method(_inflora(stream), stream, cfg, mesh=make_mesh(1), quiet=True,
                         lr_schedule=epoch_cosine(cfg.learning_rate, cfg.epochs))
  with pytest.warns(DeprecationWarning, match="inflora_cosine"):
    old_cfg = dataclasses.replace(cfg, schedule="inflora_cosine")
  by_name = run_method(_inflora(stream), stream, old_cfg, mesh=make_mesh(1), quiet=True)
  constant = run_method(_inflora(stream), stream, cfg, mesh=make_mesh(1), quiet=True)
  chex.assert_trees_all_equal(jax.device_get(by_method.state), jax.device_get(by_caller.state))
  chex.assert_trees_all_equal(jax.device_get(by_method.state), jax.device_get(by_name.state))
  leaves = zip(jax.tree.leaves(jax.device_get(constant.state)),
               jax.tree.leaves(jax.device_get(by_method.state)))
  assert any(not np.array_equal(a, b) for a, b in leaves)


def test_the_method_schedule_follows_each_phase_and_a_caller_schedule_wins(tmp_path):
  from clx.methods.inflora import epoch_cosine
  stream = make_gaussian_stream(num_tasks=1, n_train=40)
  cfg = dataclasses.replace(CFG, epochs=4, optimizer="adam", learning_rate=0.02, steps_per_call=0)
  per_epoch = 4  # 40 rows / batch 10

  def logged_rates(method, **kwargs):
    logger = run_logging.RunLogger(tmp_path / str(len(list(tmp_path.iterdir()))),
                                   tensorboard=False, enabled=True)
    run_method(method, stream, cfg, mesh=make_mesh(1), quiet=True, logger=logger, **kwargs)
    return np.array([r["learning_rate"] for r in run_logging.read_jsonl(logger.path)
                     if r["kind"] == "step"])

  seen = []
  method = _inflora(stream, lr_schedule="epoch_cosine")
  own = method.lr_schedule
  method = method._replace(lr_schedule=lambda c: seen.append(c) or own(c))
  rates = logged_rates(method)
  assert seen == [cfg]  # asked once per phase, with that phase's config
  e = np.arange(cfg.epochs * per_epoch) // per_epoch
  np.testing.assert_allclose(rates, 0.02 * np.cos(99 * np.pi * e / (200 * 3)), rtol=1e-6,
                             atol=4e-7 * 0.02)
  # A schedule supplied by the caller (an experiment) replaces the method's own.
  rates = logged_rates(method, lr_schedule=epoch_cosine(0.005, 2))
  np.testing.assert_allclose(rates, 0.005 * np.cos(99 * np.pi * e / 200), rtol=1e-6,
                             atol=4e-7 * 0.005)


def test_bad_schedules_are_refused_with_a_clear_error():
  import pytest

  from clx.train import Fitter
  from clx.train.config import make_optimizer
  stream = make_gaussian_stream(num_tasks=1)
  with pytest.raises(ValueError, match="lr_schedule must be one of"):
    _inflora(stream, lr_schedule="cosine_please")
  with pytest.raises(ValueError, match="unknown schedule"):
    TrainConfig(schedule="inflora_cosine_v2")
  # A method-supplied schedule cannot be combined with the validation-loss schedule.
  fitter = Fitter(make_mesh(1), quiet=True, method_schedule=lambda c: (lambda n: 0.1))
  cfg = TrainConfig(lr_patience=2)
  with pytest.raises(ValueError, match="cannot be combined"):
    make_optimizer(cfg, 3, fitter.schedule_factory(cfg))


def test_evaluate_after_last_task_measures_the_last_row_only(tmp_path, monkeypatch):
  """Same states and last row as ``each_task``; one evaluation instead of T; the rows before
  the last stay NaN (null in the log and checkpoint meta); a run checkpointed either way
  resumes the other way (the option is not fingerprinted: it changes no state)."""
  import pytest
  from clx.train import loop
  stream = make_gaussian_stream(separation=1.0)
  every = run_method(_method("gpm", stream), stream, CFG, mesh=make_mesh(1), quiet=True)
  calls = []
  original = loop.evaluate_row
  monkeypatch.setattr(loop, "evaluate_row", lambda *a, **k: calls.append(a[4]) or original(*a, **k))
  last_cfg = dataclasses.replace(CFG, evaluate_after="last_task")
  logger = run_logging.RunLogger(tmp_path / "log", tensorboard=False, enabled=True)
  last = run_method(_method("gpm", stream), stream, last_cfg, mesh=make_mesh(1), quiet=True,
                    checkpoint_dir=str(tmp_path / "ckpt"), logger=logger)
  assert calls == [2]
  chex.assert_trees_all_equal(jax.device_get(last.state), jax.device_get(every.state))
  np.testing.assert_array_equal(last.acc_matrix[2], every.acc_matrix[2])
  assert np.isnan(last.acc_matrix[:2]).all()
  tasks = [r for r in run_logging.read_jsonl(tmp_path / "log" / "metrics.jsonl")
           if r["kind"] == "task"]
  assert [r["acc"] is None for r in tasks] == [True, True, False]
  # Resumes under each_task from the last_task checkpoints (nothing left to train).
  resumed = run_method(_method("gpm", stream), stream, CFG, mesh=make_mesh(1), quiet=True,
                       checkpoint_dir=str(tmp_path / "ckpt"))
  assert resumed.resumed_from == 2
  np.testing.assert_array_equal(resumed.acc_matrix, last.acc_matrix)
  with pytest.raises(ValueError, match="evaluate_after must be one of"):
    TrainConfig(evaluate_after="never")


def test_experiment_metrics_of_a_last_task_only_run():
  """ACC (tasks and samples) from the last row; AIA / BWT / forgetting left out, not NaN."""
  from clx import experiment, report
  acc = np.full((3, 3), np.nan)
  acc[2] = [50.0, 60.0, 70.0]
  assert experiment.summarize(acc) == {"acc": 60.0}
  full = np.tril(np.full((3, 3), 80.0)) + np.triu(np.full((3, 3), np.nan), 1)
  assert set(experiment.summarize(full)) >= {"acc", "aia", "bwt", "forgetting"}
  assert "nan" in report.format_table({"m": experiment.summarize(acc)})
