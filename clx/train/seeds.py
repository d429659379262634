"""Several seeds of one method in one compiled program (``vmap`` over seeds).

A PyTorch experiment runs seeds one after another; here the S seeds' training
phases run as one jitted ``lax.scan`` whose step is ``vmap``-ed over a leading
seed axis of the parameters, optimiser states, method states, data and index
plans. Each seed keeps its own initialisation, data (e.g. its own PMNIST task
order), shuffling and RNG — exactly those of a single run with that seed — so
the results equal the single runs up to float rounding of batched matmuls.

Each task runs the single run's per-task sequence (``clx.train.loop._task_sequence``,
one "lane" per seed): the same mesh (``config.model_parallel``), placement of the
backbone and method state (``config.param_sharding``), and host-side hooks
(``begin_task``/``end_task``: memory updates, BECAME's merge, evaluation) per seed;
only the main phase is batched. A method whose ``end_task`` trains further
(BECAME's stage 2) runs that extra phase per seed, unbatched. Method states
must have the same structure and shapes across seeds at every task (true for
clx's fixed-shape methods: GPM/SGP/BECAME memories are zero-padded (d, d)).
No checkpoints are written on this path; use ``run_method`` per seed for
resumable runs.

The epoch loop is the single run's (:meth:`clx.train.fit.Fitter.fit_seeds` is
:meth:`~clx.train.fit.Fitter.fit`'s loop with the step ``vmap``-ed): the same
step builder, chunking rule (conv-on-CPU included), divergence check and
validation schedule (``lr_patience`` / ``restore_best``, per seed). The
training split is always kept on the device here (stacked over seeds),
whatever ``device_data_mb`` says; that changes where batches are gathered, not
their values.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax

from clx.data.types import ArraySplit, Stream
from clx.methods.base import ContinualMethod, StreamSpec
from clx.train.loop import (Fitter, RunResult, TaskResult, TrainConfig, _prepare, _task_sequence,
                            tree_index, tree_stack)


def fit_seeds(fitter: Fitter, params, loss, splits: Sequence[ArraySplit], cfg: TrainConfig, *,
              states, base, rngs: jax.Array, transform_grads=None,
              seed_words: Sequence[tuple[int, ...]], title: str = "train",
              val_splits: Sequence[ArraySplit | None] | None = None):
  """:meth:`clx.train.fit.Fitter.fit_seeds` (the single run's epoch loop over stacked seeds)."""
  return fitter.fit_seeds(params, loss, splits, cfg, states=states, base=base, rngs=rngs,
                          transform_grads=transform_grads, seed_words=seed_words, title=title,
                          val_splits=val_splits)


def run_seeds(method: ContinualMethod, streams: Sequence[Stream], config: TrainConfig,
              seeds: Sequence[int], *, mesh=None, progress: bool | None = None,
              quiet: bool = False, lr_schedule=None) -> list[RunResult]:
  """``run_method`` for each (stream, seed) pair, with the training phases batched.

  ``streams[s]`` is seed ``seeds[s]``'s stream (same task sizes and classes).
  Returns one :class:`RunResult` per seed; ``wall_time_s`` is the shared wall time.
  Each result's ``tasks`` holds a :class:`clx.train.loop.TaskResult` per task, as
  ``run_method``'s: the accuracy row, the seed's own fit log (``phases``: any fit
  its ``begin_task`` ran, the batched main phase, then any fit its ``end_task``
  ran) and diagnostics; the state only on the last task. ``mesh`` defaults to
  ``run_method``'s (all devices, ``config.model_parallel`` on a ``model`` axis).
  """
  if method.transform_updates is not None:
    raise ValueError(f"run_seeds does not batch methods with transform_updates ({method.name}); "
                     "use run_method per seed")
  if len(streams) != len(seeds) or not seeds:
    raise ValueError(f"need one stream per seed, got {len(streams)} streams for seeds {list(seeds)}")
  specs = [StreamSpec.from_stream(s) for s in streams]
  if any(sp != specs[0] for sp in specs):
    raise ValueError("the seeds' streams differ in tasks, classes or shapes; they cannot be batched")
  setup = _prepare(method, list(streams), list(seeds), config, mesh, progress=progress,
                   quiet=quiet, lr_schedule=lr_schedule)
  tasks: list[list[TaskResult]] = [[] for _ in seeds]
  start = time.perf_counter()
  for t in range(setup.spec.num_tasks):
    for per_seed, result in zip(tasks, _task_sequence(method, setup, t, config, batched=True)):
      per_seed.append(result._replace(state=None))
  wall = time.perf_counter() - start
  for per_seed, lane in zip(tasks, setup.lanes):
    per_seed[-1] = per_seed[-1]._replace(state=lane.state)
  return [RunResult(method.name, lane.acc, wall, lane.state, tasks=per_seed)
          for lane, per_seed in zip(setup.lanes, tasks)]


__all__ = ["fit_seeds", "run_seeds", "tree_index", "tree_stack"]
