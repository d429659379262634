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

The step itself is the single run's (:func:`clx.train.fit.make_train_step`,
vmapped), chunked by the same rule (:func:`clx.train.fit.chunk_steps`, conv-on-
CPU included), and the validation schedule (``lr_patience`` / ``restore_best``)
runs per seed. The training split is always kept on the device here (stacked
over seeds), whatever ``device_data_mb`` says; that changes where batches are
gathered, not their values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clx.data.types import ArraySplit, Stream
from clx.methods.base import ContinualMethod, StreamSpec
from clx.train import sharding
from clx.train.fit import chunk_steps, convolutions_on_cpu, gather_rows, make_train_step
from clx.train.loop import (Fitter, RunResult, TrainConfig, TrainingDivergedError,
                            ValidationPlateau, _all_finite, _Context, _validation_fn,
                            check_finite_batch, evaluate_row, make_optimizer, train_split_for)
from clx.train.progress import TaskProgress


def tree_stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def tree_index(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


def fit_seeds(fitter: Fitter, params, loss, splits: Sequence[ArraySplit], cfg: TrainConfig, *,
              states, base, rngs: jax.Array, transform_grads=None,
              seed_words: Sequence[tuple[int, ...]], title: str = "train",
              val_splits: Sequence[ArraySplit | None] | None = None):
  """Train S stacked parameter sets, seed s on ``splits[s]``; returns stacked params.

  The step is :func:`clx.train.fit.make_train_step`'s, ``vmap``-ed over seeds,
  with the single run's chunking rule (:func:`clx.train.fit.chunk_steps`,
  conv-on-CPU included) and its validation schedule: with ``lr_patience`` /
  ``restore_best`` each seed keeps its own :class:`ValidationPlateau` (its own
  learning rate, best epoch, and stop; a stopped seed's steps are masked out),
  so each seed gets its single run's numbers. ``fitter.last_fits`` holds the
  per-seed fit logs.

  Args:
    fitter: provides the mesh and the per-seed index plans.
    params, states: pytrees with a leading seed axis S.
    loss: ``(params, state, base, batch, rng) -> (loss, aux)`` of ONE seed.
    splits: S training splits of equal length (kept on the device, stacked).
    rngs: (S,) PRNG keys (each seed's phase key, as in a single run).
    seed_words: per seed, the words seeding its shuffles (as in a single run).
    val_splits: per seed, the validation split (needed by ``lr_patience`` /
      ``restore_best``).
  """
  num = len(splits)
  n = len(splits[0])
  if any(len(s) != n for s in splits):
    raise ValueError(f"{title}: seeds' training splits differ in length {[len(s) for s in splits]}")
  if cfg.uses_validation and (val_splits is None or any(v is None or len(v) == 0
                                                        for v in val_splits)):
    raise ValueError(f"{title}: lr_patience/restore_best need every seed's validation split "
                     "('val'); build the streams with a validation fraction or turn them off")
  steps_per_epoch = math.ceil(n / cfg.batch_size)
  optimizer = make_optimizer(cfg, steps_per_epoch, fitter.lr_schedule)
  padded = sharding.pad_to_multiple(cfg.batch_size, sharding.num_data_shards(fitter.mesh))
  chunk = chunk_steps(cfg, steps_per_epoch, num * padded * 8, convolutions_on_cpu=(
      cfg.steps_per_call <= 0 and convolutions_on_cpu(
          loss, tree_index(params, 0), tree_index(states, 0), base, splits[0], padded)))
  # A seed that stopped (validation schedule) trains on fully masked batches from then on.
  masked = steps_per_epoch % chunk != 0 or cfg.lr_patience > 0
  train_step = make_train_step(loss, optimizer, transform_grads=transform_grads, masked=masked)

  rep = sharding.replicated(fitter.mesh)
  params = jax.tree.map(jnp.copy, jax.device_put(params, rep))
  opt_state = jax.device_put(jax.vmap(optimizer.init)(params), rep)
  for split in splits:
    check_finite_batch(split.arrays, title)
  data = jax.device_put({"x": np.stack([s.x for s in splits]),
                         "y": np.stack([s.y.astype(np.int32) for s in splits])}, rep)

  def seed_step(p, o, count, state, d, idx, rng, active):
    batch = gather_rows(d, jnp.where(active, idx, -1))
    return train_step(p, o, count, batch, state, base, rng)

  def body(carry, idx, states, data, rngs, active):  # idx: (S, B)
    p, o, count = carry
    p, o, count, values = jax.vmap(seed_step)(p, o, count, states, data, idx, rngs, active)
    return (p, o, count), values

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run_chunk(params, opt_state, count, idx_chunk, data, states, rngs, active):
    step_fn = lambda carry, idx: body(carry, idx, states, data, rngs, active)  # noqa: E731
    if chunk == 1:  # no loop: the conv-on-CPU rule (see clx.train.fit.chunk_steps)
      carry, values = step_fn((params, opt_state, count), idx_chunk[0])
      return (*carry, values[None])
    (params, opt_state, count), values = jax.lax.scan(step_fn, (params, opt_state, count),
                                                      idx_chunk)
    return params, opt_state, count, values

  count = jax.device_put(jnp.zeros((num,), jnp.int32), rep)
  bar = TaskProgress(title, cfg.epochs * steps_per_epoch, enabled=fitter.progress, quiet=fitter.quiet)
  rows = sharding.process_rows(padded, fitter.mesh)
  plateaus = [ValidationPlateau(cfg) for _ in range(num)] if cfg.uses_validation else None
  val_fn = _validation_fn(loss) if plateaus is not None else None
  best: list = [None] * num
  active = np.ones(num, bool)
  epochs_run = [0] * num
  for epoch in range(cfg.epochs):
    if not active.any():
      break
    active_dev = jax.device_put(jnp.asarray(active), rep)
    plans = np.stack([fitter.plan(n, cfg.batch_size, True, (*w, epoch)) for w in seed_words], 1)
    finite = None
    for c in range(0, plans.shape[0], chunk):
      block = plans[c:c + chunk]
      steps = block.shape[0]
      if steps < chunk:
        block = np.concatenate([block, np.full((chunk - steps, *block.shape[1:]), -1, block.dtype)])
      idx = sharding.shard_arrays({"idx": block[:, :, rows].astype(np.int32)}, fitter.mesh, 2,
                                  padded)["idx"]
      params, opt_state, count, values = run_chunk(params, opt_state, count, idx, data, states,
                                                   rngs, active_dev)
      chunk_finite = _all_finite(values)
      finite = chunk_finite if finite is None else finite & chunk_finite
      if bar.enabled or not fitter.quiet:
        last = np.asarray(values[steps - 1])
        if not np.all(np.isfinite(last)):
          raise TrainingDivergedError(title, epoch, cfg)
        bar.update(steps, num * int((block >= 0).sum() // num), float(last.mean()))
    if finite is not None and not bool(finite):
      raise TrainingDivergedError(title, epoch, cfg)
    for s in np.flatnonzero(active):
      epochs_run[s] = epoch + 1
      if plateaus is None:
        continue
      own = tree_index(params, s)
      action = plateaus[s].update(fitter.validation_loss(own, val_fn, val_splits[s], cfg,
                                                         tree_index(states, s), base))
      if action == "best" and cfg.restore_best:
        best[s] = jax.tree.map(jnp.copy, own)
      elif action == "lower":
        lr = opt_state.hyperparams["learning_rate"]
        opt_state = opt_state._replace(hyperparams={
            **opt_state.hyperparams,
            "learning_rate": lr.at[s].set(jnp.asarray(plateaus[s].lr, jnp.float32))})
      elif action == "stop":
        active[s] = False
  bar.close()
  fitter.last_fits = [{"title": title, "epochs": epochs_run[s],
                       **(plateaus[s].summary() if plateaus is not None else {})}
                      for s in range(num)]
  if any(b is not None for b in best):
    params = tree_stack([b if b is not None else tree_index(params, s) for s, b in enumerate(best)])
  return params


def run_seeds(method: ContinualMethod, streams: Sequence[Stream], config: TrainConfig,
              seeds: Sequence[int], *, mesh=None, progress: bool | None = None,
              quiet: bool = False, lr_schedule=None) -> list[RunResult]:
  """``run_method`` for each (stream, seed) pair, with the training phases batched.

  ``streams[s]`` is seed ``seeds[s]``'s stream (same task sizes and classes).
  Returns one :class:`RunResult` per seed; ``wall_time_s`` is the shared wall time.
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
  fitter = Fitter(mesh, progress=progress, quiet=quiet, lr_schedule=lr_schedule)
  rep = sharding.replicated(mesh)
  base = jax.device_put(method.backbone.params, rep)
  keys = [jax.random.PRNGKey(s) for s in seeds]
  states = [method.init(jax.random.fold_in(k, 0), spec) for k in keys]
  accs = [np.full((T, T), np.nan) for _ in seeds]
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
    params = fit_seeds(
        fitter, params, loss, [c.train_split for c in ctxs], config, states=tree_stack(states),
        base=base, rngs=jnp.stack([jax.random.fold_in(c.rng, 0) for c in ctxs]),
        transform_grads=method.transform_grads, seed_words=[(*c.seed_words, 0) for c in ctxs],
        title=f"{method.name} × {len(seeds)} seeds task {t + 1}/{T}",
        val_splits=[c.splits.get("val") for c in ctxs] if config.uses_validation else None)
    for s, ctx in enumerate(ctxs):
      states[s] = method.end_task(method.combine(states[s], tree_index(params, s), info), ctx)
      accs[s][t, :t + 1] = evaluate_row(method, states[s], base, streams[s], t, spec, fitter, config)
  wall = time.perf_counter() - start
  return [RunResult(method.name, acc, wall, st) for acc, st in zip(accs, states)]


__all__ = ["fit_seeds", "run_seeds", "tree_index", "tree_stack"]
del dataclasses
