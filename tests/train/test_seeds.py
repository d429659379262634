"""Seeds batched in one program (vmap) give the single runs' results."""

import dataclasses
import functools

import chex
import jax
import numpy as np
import pytest

from clx.methods import build
from clx.models.mlp import mlp
from clx.train import sharding
from clx.train.fit import Fitter
from clx.train.loop import TrainConfig, run_method
from clx.train.seeds import run_seeds
from clx.train.sharding import make_mesh
from tests.helpers import make_gaussian_stream


def _assert_batched_equal_single(method, streams, cfg, seeds):
  batched = run_seeds(method, streams, cfg, seeds, mesh=make_mesh(1), quiet=True)
  for res, stream, seed in zip(batched, streams, seeds):
    single = run_method(method, stream, cfg, seed=seed, mesh=make_mesh(1), quiet=True)
    np.testing.assert_allclose(res.acc_matrix, single.acc_matrix, atol=1e-6)
    chex.assert_trees_all_close(jax.device_get(res.state), jax.device_get(single.state),
                                rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["finetune", "gpm"])
def test_batched_seeds_equal_single_runs(name):
  seeds = [0, 1]
  streams = [make_gaussian_stream(num_tasks=2, scenario="domain", classes_per_task=2, seed=s,
                                  separation=1.0) for s in seeds]
  # Domain scenario needs every task to hold every class: relabel to a shared 2-way space.
  from clx.data.types import ArraySplit, Stream
  shared = []
  for st in streams:
    tasks = tuple(dataclasses.replace(
        t, classes=(0, 1),
        train=ArraySplit({"x": t.train.x, "y": t.train.y % 2}),
        test=ArraySplit({"x": t.test.x, "y": t.test.y % 2})) for t in st.tasks)
    shared.append(Stream(st.name, tasks, "domain", 2))
  backbone = mlp(shared[0].input_shape, (16,), seed=0)
  method = build(name, backbone)
  cfg = TrainConfig(epochs=2, batch_size=8, optimizer="sgd", learning_rate=0.05)
  _assert_batched_equal_single(method, shared, cfg, seeds)


def test_mismatched_streams_are_rejected():
  a = make_gaussian_stream(num_tasks=2)
  b = make_gaussian_stream(num_tasks=3)
  method = build("finetune", mlp(a.input_shape, (8,)))
  with pytest.raises(ValueError, match="cannot be batched"):
    run_seeds(method, [a, b], TrainConfig(), [0, 1], mesh=make_mesh(1), quiet=True)


def _stream_with_val(seed):
  from clx.data.types import ArraySplit, Stream, Task
  base = make_gaussian_stream(num_tasks=2, n_train=120, seed=seed, separation=1.0)
  tasks = tuple(Task(t.name, ArraySplit({"x": t.train.x[:90], "y": t.train.y[:90]}), t.test,
                     t.classes, val=ArraySplit({"x": t.train.x[90:], "y": t.train.y[90:]}))
                for t in base.tasks)
  return Stream(base.name, tasks, base.scenario, base.num_classes)


def test_batched_seeds_follow_the_validation_schedule_of_single_runs():
  # lr_patience / restore_best: each seed lowers its own learning rate, stops on its own and
  # ends with its own best epoch, exactly as its single run (ignored by run_seeds before).
  seeds = [0, 1, 2]
  streams = [_stream_with_val(s) for s in seeds]
  backbone = mlp(streams[0].input_shape, (16,), seed=0)
  method = build("finetune", backbone)
  cfg = TrainConfig(epochs=14, batch_size=10, optimizer="sgd", learning_rate=0.5,
                    lr_patience=1, lr_factor=4, lr_min=0.02, restore_best=True)
  _assert_batched_equal_single(method, streams, cfg, seeds)


def test_batched_seeds_report_the_fit_logs_of_single_runs():
  # One epoch loop: each seed's fit log (epochs run, per-epoch training losses, the validation
  # schedule's history) equals its single run's, and BECAME's second stage is in ``phases``.
  seeds = [0, 1]
  streams = [_stream_with_val(s) for s in seeds]
  backbone = mlp(streams[0].input_shape, (16,), seed=0)
  cfg = TrainConfig(epochs=6, batch_size=10, optimizer="sgd", learning_rate=0.5,
                    lr_patience=1, lr_factor=4, lr_min=0.02, restore_best=True)
  finetune = build("finetune", backbone)
  # A begin_task that trains (a warm-up fit, phase 2): its log is in ``phases`` before the
  # main phase, as in a single run (run_seeds' own task sequence dropped it before).
  warm_up = finetune._replace(name="finetune_warm_up", begin_task=_warm_up_fit(finetune))
  for method in (finetune, build("became_gpm", backbone), warm_up):
    batched = run_seeds(method, streams, cfg, seeds, mesh=make_mesh(1), quiet=True)
    for s, seed in enumerate(seeds):
      single = run_method(method, streams[s], cfg, seed=seed, mesh=make_mesh(1), quiet=True)
      assert len(batched[s].tasks) == len(single.tasks) == 2
      assert batched[s].tasks[-1].state is batched[s].state
      for got, want in zip(batched[s].tasks, single.tasks):
        assert got.task == want.task
        np.testing.assert_allclose(got.acc_row, want.acc_row, atol=1e-6)
        if want.diagnostics is not None:
          chex.assert_trees_all_close(got.diagnostics, want.diagnostics, rtol=1e-5, atol=1e-6)
        assert len(got.fit_log["phases"]) == len(want.fit_log["phases"])
        for g, w in zip(got.fit_log["phases"], want.fit_log["phases"]):
          assert g["epochs"] == w["epochs"] and g.get("final_lr") == w.get("final_lr")
          np.testing.assert_allclose(g["epoch_losses"], w["epoch_losses"], rtol=1e-5)
          np.testing.assert_allclose(g.get("val_losses", []), w.get("val_losses", []), rtol=1e-5)


def _warm_up_fit(method):
  """``method.begin_task`` followed by one epoch of the task's own loss (a training phase)."""

  def begin_task(state, ctx):
    state = method.begin_task(state, ctx)
    params = ctx.fit(method.trainable(state, ctx.info),
                     functools.partial(method.loss, info=ctx.info), state=state, epochs=1,
                     config=dataclasses.replace(ctx.config, lr_patience=0, restore_best=False),
                     phase=2)
    return method.combine(state, params, ctx.info)

  return begin_task


@pytest.mark.parametrize("mode, model_parallel", [("fsdp", 1), ("tensor", 2)])
def test_batched_seeds_use_the_single_run_mesh_and_placement(monkeypatch, mode, model_parallel):
  # run_seeds builds run_method's default mesh (config.model_parallel on a ``model`` axis) and
  # places the backbone by config.param_sharding; before, it built a 1-D ``data`` mesh and
  # replicated the backbone whatever the config said. Per-seed numbers equal single runs.
  seen = {}
  original = Fitter.fit_seeds

  def spy(self, params, loss, splits, cfg, *, base, **kwargs):
    seen["mesh"] = dict(self.mesh.shape)
    seen["base"] = base
    return original(self, params, loss, splits, cfg, base=base, **kwargs)

  monkeypatch.setattr(Fitter, "fit_seeds", spy)
  seeds = [0, 1]
  streams = [make_gaussian_stream(num_tasks=2, dim=32, n_train=48, seed=s) for s in seeds]
  backbone = mlp(streams[0].input_shape, (64,), seed=0)
  method = build("finetune", backbone)
  cfg = TrainConfig(epochs=1, batch_size=8, optimizer="sgd", learning_rate=0.05,
                    param_sharding=mode, model_parallel=model_parallel)
  batched = run_seeds(method, streams, cfg, seeds, quiet=True)

  mesh = make_mesh(model_parallel=model_parallel)
  assert seen["mesh"] == dict(mesh.shape)
  want = sharding.base_shardings(backbone.params, mesh, mode)
  got = jax.tree.map(lambda a: a.sharding, seen["base"])
  assert jax.tree.leaves(jax.tree.map(lambda g, w: g.spec == w.spec and g.mesh == w.mesh,
                                      got, want)) == [True] * len(jax.tree.leaves(want))
  if mode == "fsdp":  # the 32x64 kernel is split over the 4 test devices
    assert not all(s.is_fully_replicated for s in jax.tree.leaves(got))
  for res, stream, seed in zip(batched, streams, seeds):
    single = run_method(method, stream, cfg, seed=seed, quiet=True)
    np.testing.assert_allclose(res.acc_matrix, single.acc_matrix, atol=1e-6)
    chex.assert_trees_all_close(jax.device_get(res.state), jax.device_get(single.state),
                                rtol=1e-5, atol=1e-6)
