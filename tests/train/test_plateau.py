"""The GPM/BECAME validation-loss learning-rate schedule with best-model restore."""

import functools

import jax
import numpy as np
import pytest

from clx.data.types import ArraySplit, Stream, Task
from clx.methods import heads as heads_lib
from clx.methods.base import StreamSpec, TaskInfo
from clx.methods.sequential import finetune
from clx.models.mlp import mlp
from clx.train.loop import Fitter, TrainConfig, ValidationPlateau, _validation_fn, run_method
from clx.train.sharding import make_mesh
from tests.helpers import make_gaussian_stream


def _official_schedule(val_losses, lr, patience_cfg, factor, lr_min):
  """The official epoch loop (GPM main_cifar100.py), transcribed: returns the
  learning rate used by each epoch, the epochs run and the best epoch."""
  best_loss, best_epoch, lrs, patience = np.inf, None, [], None
  for epoch, valid_loss in enumerate(val_losses):
    lrs.append(lr)
    if valid_loss < best_loss:
      best_loss, best_epoch, patience = valid_loss, epoch, patience_cfg
    else:
      patience -= 1
      if patience <= 0:
        lr /= factor
        if lr < lr_min:
          break
        patience = patience_cfg
  return lrs, len(lrs), best_epoch


@pytest.mark.parametrize("seed", range(6))
def test_plateau_rule_matches_official_loop(seed):
  rng = np.random.default_rng(seed)
  # A noisy decreasing curve that flattens: plenty of plateaus.
  losses = list(np.maximum(2.0 * np.exp(-np.arange(80) / 6.0), 0.2) + 0.05 * rng.random(80))
  cfg = TrainConfig(epochs=80, learning_rate=0.05, optimizer="sgd", lr_patience=3, lr_factor=2,
                    lr_min=5e-4)
  want_lrs, want_epochs, want_best = _official_schedule(losses, 0.05, 3, 2, 5e-4)
  rule, lrs, best = ValidationPlateau(cfg), [], None
  for epoch, v in enumerate(losses):
    lrs.append(rule.lr)
    action = rule.update(v)
    if action == "best":
      best = epoch
    if action == "stop":
      break
  assert lrs == want_lrs and len(lrs) == want_epochs and best == want_best
  assert want_epochs < 80  # the case exercises the early stop


def _stream_with_val(seed=0):
  base = make_gaussian_stream(num_tasks=2, n_train=120, seed=seed, separation=1.0)
  tasks = []
  for t in base.tasks:
    x, y = t.train.x, t.train.y
    tasks.append(Task(t.name, ArraySplit({"x": x[:90], "y": y[:90]}), t.test, t.classes,
                      val=ArraySplit({"x": x[90:], "y": y[90:]})))
  return Stream(base.name, tuple(tasks), base.scenario, base.num_classes)


def test_fit_restores_best_epoch_and_stops_when_lr_below_min():
  stream = _stream_with_val()
  backbone = mlp(stream.input_shape, (16,), seed=0)
  method = finetune(backbone)
  cfg = TrainConfig(epochs=40, batch_size=10, optimizer="sgd", learning_rate=0.5,
                    lr_patience=1, lr_factor=4, lr_min=0.02, restore_best=True)
  fitter = Fitter(make_mesh(2), quiet=True)
  spec = StreamSpec.from_stream(stream)
  state = method.init(jax.random.PRNGKey(0), spec)
  state["heads"] = heads_lib.add_task_head(state["heads"], jax.random.PRNGKey(2), spec,
                                           backbone.feature_dim, 0, heads_lib.default_mode(spec))
  params = method.trainable(state, TaskInfo(0, spec))
  loss = functools.partial(method.loss, info=TaskInfo(0, spec))
  task = stream.tasks[0]
  out = fitter.fit(params, loss, task.train, cfg, state=state, base=backbone.params,
                   rng=jax.random.PRNGKey(1), val_split=task.val)
  info = fitter.last_fit
  # lr 0.5 → 0.125 → 0.03125 → 0.0078 < 0.02: at most 3 plateaus, then stop.
  assert info["epochs"] < 40 and info["final_lr"] < 0.02
  history = info["val_losses"]
  assert len(history) == info["epochs"] and info["best_val_loss"] == min(history)
  restored = fitter.validation_loss(out, _validation_fn(loss), task.val, cfg, state, backbone.params)
  assert restored == pytest.approx(min(history), rel=1e-5)


def test_plateau_run_is_same_on_one_and_four_devices():
  stream = _stream_with_val(1)
  cfg = TrainConfig(epochs=6, batch_size=10, optimizer="sgd", learning_rate=0.3, lr_patience=1,
                    lr_factor=2, lr_min=1e-3, restore_best=True)
  accs = []
  for n in (1, 4):
    backbone = mlp(stream.input_shape, (16,), seed=0)
    accs.append(run_method(finetune(backbone), stream, cfg, mesh=make_mesh(n), quiet=True).acc_matrix)
  np.testing.assert_allclose(accs[0], accs[1], atol=1e-9, equal_nan=True)


def test_validation_schedule_without_val_split_is_a_clear_error():
  stream = make_gaussian_stream(num_tasks=1)
  backbone = mlp(stream.input_shape, (8,), seed=0)
  cfg = TrainConfig(epochs=1, lr_patience=2)
  with pytest.raises(ValueError, match="validation split"):
    run_method(finetune(backbone), stream, cfg, mesh=make_mesh(1), quiet=True)
  with pytest.raises(ValueError, match="schedule='constant'"):
    TrainConfig(lr_patience=2, schedule="cosine")
  with pytest.raises(ValueError, match="lr_factor"):
    TrainConfig(lr_patience=2, lr_factor=1.0)
