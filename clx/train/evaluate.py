"""Evaluation: accuracy of a method's predictions on test splits, batched on the mesh."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clx.data.types import ArraySplit, Stream
from clx.methods import passes
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo
from clx.train import sharding
from clx.train.batches import input_normalization, normalize_inputs
from clx.train.config import TrainConfig
from clx.train.fit import Fitter


def make_counter(predict: Callable) -> Callable:
  """Jitted ``(state, base, x, y, mask, class_mask, normalization=None) -> number correct``.

  ``normalization`` (static, :func:`clx.train.batches.input_normalization` of the split)
  turns raw uint8 pixels of a streamed split into model inputs inside the step.

  ``predict(state, base, x, mask) -> (n, C)`` (:func:`clx.methods.passes.predict_fn`):
  the row mask reaches the model, so on batch-statistic backbones the padding
  rows of the last batch do not change the real rows' logits (the official
  code runs that batch alone). ``class_mask`` (C,) restricts the argmax to one
  task's classes (task-incremental scenario; all-True otherwise).
  """

  @functools.partial(jax.jit, static_argnames=("normalization",))
  def count(state, base, x, y, mask, class_mask, normalization=None):
    x = normalize_inputs({"x": x}, normalization)["x"]
    logits = jnp.where(class_mask, predict(state, base, x, mask), -jnp.inf)
    return jnp.sum((jnp.argmax(logits, -1) == y) * mask)

  return count


def evaluate_split(fitter: Fitter, count: Callable, state, base, split: ArraySplit,
                   batch_size: int, class_mask: np.ndarray) -> float:
  """Accuracy (percent) on ``split`` with a counter from :func:`make_counter`."""
  if len(split) == 0:
    raise ValueError("evaluate_split: empty split")
  plan = fitter.plan(len(split), batch_size, False, (0,))
  class_mask = jax.device_put(jnp.asarray(class_mask), sharding.replicated(fitter.mesh))
  normalization = input_normalization(split)
  correct = 0.0
  for arrays, _, _ in fitter.device_batches(split, plan, "eval", raw=True):
    correct += float(count(state, base, arrays["x"], arrays["y"], arrays["mask"], class_mask,
                           normalization=normalization))
  return 100.0 * correct / len(split)


def evaluate_row(method: ContinualMethod, state, base, stream: Stream, t: int, spec: StreamSpec,
                 fitter: Fitter, config: TrainConfig) -> np.ndarray:
  """Accuracies (percent) on the test splits of tasks 0..t after training task t."""
  counters, row = {}, np.zeros(t + 1)
  for i in range(t + 1):
    task_id = i if spec.scenario == "task" else None
    if task_id not in counters:
      counters[task_id] = make_counter(passes.predict_fn(method, TaskInfo(t, spec, task_id)))
    class_mask = np.ones(spec.num_classes, bool)
    if spec.scenario == "task":
      class_mask[:] = False
      class_mask[list(spec.task_classes[i])] = True
    row[i] = evaluate_split(fitter, counters[task_id], state, base, stream.tasks[i].test,
                            config.eval_batch_size, class_mask)
  return row
