"""Several seeds of one method in one compiled program (``vmap`` over seeds).

A PyTorch experiment runs seeds one after another; here the S seeds' training
phases run as one jitted ``lax.scan`` whose step is ``vmap``-ed over a leading
seed axis of the parameters, optimiser states, method states, data and index
plans. Each seed keeps its own initialisation, data (e.g. its own PMNIST task
order), shuffling and RNG — exactly those of a single run with that seed — so
the results equal the single runs up to float rounding of batched matmuls.

The host-side hooks (``begin_task``/``end_task``: memory updates, BECAME's
merge, evaluation) run per seed; a method whose ``end_task`` trains further
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

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clx.data.types import ArraySplit, Stream
from clx.methods.base import ContinualMethod, StreamSpec
from clx.train import sharding
from clx.train.loop import (Fitter, RunResult, TaskResult, TrainConfig, _Context, evaluate_row,
                            train_split_for)


def tree_stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def tree_index(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


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
  ``run_method``'s: the accuracy row, the seed's own fit log (``phases``: the
  batched main phase, then any fit its ``end_task`` ran) and diagnostics; the
  state only on the last task.
  """
  if method.transform_updates is not None:
    raise ValueError(f"run_seeds does not batch methods with transform_updates ({method.name}); "
                     "use run_method per seed")
  if len(streams) != len(seeds) or not seeds:
    raise ValueError(f"need one stream per seed, got {len(streams)} streams for seeds {list(seeds)}")
  mesh = mesh or sharding.make_mesh()
  specs = [StreamSpec.from_stream(s) for s in streams]
  if any(sp != specs[0] for sp in specs):
    raise ValueError("the seeds' streams differ in tasks, classes or shapes; they cannot be batched")
  spec = specs[0]
  T = spec.num_tasks
  fitter = Fitter(mesh, progress=progress, quiet=quiet, lr_schedule=lr_schedule,
                  method_schedule=method.lr_schedule)
  rep = sharding.replicated(mesh)
  base = jax.device_put(method.backbone.params, rep)
  keys = [jax.random.PRNGKey(s) for s in seeds]
  states = [method.init(jax.random.fold_in(k, 0), spec) for k in keys]
  accs = [np.full((T, T), np.nan) for _ in seeds]
  tasks: list[list[TaskResult]] = [[] for _ in seeds]
  start = time.perf_counter()
  for t in range(T):
    ctxs = [_Context(t, spec, jax.random.fold_in(k, 1 + t), base, fitter,
                     train_split_for(method, stream, t),
                     {"test": stream.tasks[t].test, "val": stream.tasks[t].val}, config, (seed, t))
            for k, stream, seed in zip(keys, streams, seeds)]
    states = [jax.device_put(method.begin_task(jax.device_put(st, rep), ctx), rep)
              for st, ctx in zip(states, ctxs)]
    info = ctxs[0].info
    params = tree_stack([method.trainable(st, info) for st in states])
    loss = functools.partial(method.loss, info=info)
    params = fitter.fit_seeds(
        params, loss, [c.train_split for c in ctxs], config, states=tree_stack(states),
        base=base, rngs=jnp.stack([jax.random.fold_in(c.rng, 0) for c in ctxs]),
        transform_grads=method.transform_grads, seed_words=[(*c.seed_words, 0) for c in ctxs],
        title=f"{method.name} × {len(seeds)} seeds task {t + 1}/{T}",
        val_splits=[c.splits.get("val") for c in ctxs] if config.uses_validation else None)
    main_logs = fitter.last_fits
    for s, ctx in enumerate(ctxs):
      first_fit = len(fitter.fits)
      states[s] = method.end_task(method.combine(states[s], tree_index(params, s), info), ctx)
      fit_log = {**main_logs[s], "phases": [main_logs[s], *fitter.fits[first_fit:]]}
      accs[s][t, :t + 1] = evaluate_row(method, states[s], base, streams[s], t, spec, fitter, config)
      diagnostics = (method.diagnostics(jax.device_get(states[s]))
                     if method.diagnostics is not None else None)
      tasks[s].append(TaskResult(t, None, accs[s][t, :t + 1].copy(), fit_log, diagnostics))
  wall = time.perf_counter() - start
  for s, st in enumerate(states):
    tasks[s][-1] = tasks[s][-1]._replace(state=st)
  return [RunResult(method.name, acc, wall, st, tasks=task_results)
          for acc, st, task_results in zip(accs, states, tasks)]


__all__ = ["fit_seeds", "run_seeds", "tree_index", "tree_stack"]
