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
import optax

from clx.data.types import ArraySplit, Stream
from clx.methods.base import ContinualMethod, StreamSpec
from clx.train import sharding
from clx.train.loop import (Fitter, RunResult, TrainConfig, _Context, _largest_divisor_at_most,
                            _tree_where, check_finite_batch, evaluate_row, make_optimizer,
                            train_split_for)
from clx.train.progress import TaskProgress


def tree_stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def tree_index(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


def fit_seeds(fitter: Fitter, params, loss, splits: Sequence[ArraySplit], cfg: TrainConfig, *,
              states, base, rngs: jax.Array, transform_grads=None,
              seed_words: Sequence[tuple[int, ...]], title: str = "train"):
  """Train S stacked parameter sets, seed s on ``splits[s]``; returns stacked params.

  Args:
    fitter: provides the mesh and the per-seed index plans.
    params, states: pytrees with a leading seed axis S.
    loss: ``(params, state, base, batch, rng) -> (loss, aux)`` of ONE seed.
    splits: S training splits of equal length (kept on the device, stacked).
    rngs: (S,) PRNG keys (each seed's phase key, as in a single run).
    seed_words: per seed, the words seeding its shuffles (as in a single run).
  """
  num = len(splits)
  n = len(splits[0])
  if any(len(s) != n for s in splits):
    raise ValueError(f"{title}: seeds' training splits differ in length {[len(s) for s in splits]}")
  transform_grads = transform_grads or (lambda g, s: g)
  steps_per_epoch = math.ceil(n / cfg.batch_size)
  optimizer = make_optimizer(cfg, steps_per_epoch)
  padded = sharding.pad_to_multiple(cfg.batch_size, sharding.num_data_shards(fitter.mesh))
  chunk = cfg.steps_per_call
  if chunk <= 0:
    chunk = int(max(1, min(steps_per_epoch, cfg.max_chunk_mb * 2**20 // (num * padded * 8))))
    chunk = _largest_divisor_at_most(steps_per_epoch, chunk)
  chunk = min(chunk, steps_per_epoch)
  may_pad = steps_per_epoch % chunk != 0

  rep = sharding.replicated(fitter.mesh)
  params = jax.tree.map(jnp.copy, jax.device_put(params, rep))
  opt_state = jax.device_put(jax.vmap(optimizer.init)(params), rep)
  for split in splits:
    check_finite_batch(split.arrays, title)
  data = jax.device_put({"x": np.stack([s.x for s in splits]),
                         "y": np.stack([s.y.astype(np.int32) for s in splits])}, rep)

  def seed_step(p, o, state, d, idx, rng, step):
    safe = jnp.maximum(idx, 0)
    batch = {"x": d["x"][safe], "y": d["y"][safe], "mask": (idx >= 0).astype(jnp.float32)}
    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(
        p, state, base, batch, jax.random.fold_in(rng, step))
    grads = transform_grads(grads, state)
    updates, o2 = optimizer.update(grads, o, p)
    p2 = optax.apply_updates(p, updates)
    if may_pad:
      valid = jnp.sum(batch["mask"]) > 0
      p2, o2 = _tree_where(valid, p2, p), _tree_where(valid, o2, o)
    return p2, o2, value

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run_chunk(params, opt_state, step, idx_chunk, data, states, rngs):
    def body(carry, idx):  # idx: (S, B)
      p, o, step = carry
      p, o, values = jax.vmap(seed_step, in_axes=(0, 0, 0, 0, 0, 0, None))(
          p, o, states, data, idx, rngs, step)
      valid = jnp.sum(idx[0] >= 0) > 0
      return (p, o, step + valid.astype(jnp.int32)), values
    (params, opt_state, step), values = jax.lax.scan(body, (params, opt_state, step), idx_chunk)
    return params, opt_state, step, values

  step = jax.device_put(jnp.zeros((), jnp.int32), rep)
  bar = TaskProgress(title, cfg.epochs * steps_per_epoch, enabled=fitter.progress, quiet=fitter.quiet)
  rows = sharding.process_rows(padded, fitter.mesh)
  for epoch in range(cfg.epochs):
    plans = np.stack([fitter.plan(n, cfg.batch_size, True, (*w, epoch)) for w in seed_words], 1)
    for c in range(0, plans.shape[0], chunk):
      block = plans[c:c + chunk]
      steps = block.shape[0]
      if steps < chunk:
        block = np.concatenate([block, np.full((chunk - steps, *block.shape[1:]), -1, block.dtype)])
      idx = sharding.shard_arrays({"idx": block[:, :, rows].astype(np.int32)}, fitter.mesh, 2,
                                  padded)["idx"]
      params, opt_state, step, values = run_chunk(params, opt_state, step, idx, data, states, rngs)
      if bar.enabled or not fitter.quiet:
        last = np.asarray(values[steps - 1])
        if not np.all(np.isfinite(last)):
          raise FloatingPointError(f"{title}: loss became {last.tolist()} at epoch {epoch}")
        bar.update(steps, num * int((block >= 0).sum() // num), float(last.mean()))
  bar.close()
  return params


def run_seeds(method: ContinualMethod, streams: Sequence[Stream], config: TrainConfig,
              seeds: Sequence[int], *, mesh=None, progress: bool | None = None,
              quiet: bool = False) -> list[RunResult]:
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
  fitter = Fitter(mesh, progress=progress, quiet=quiet)
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
        title=f"{method.name} × {len(seeds)} seeds task {t + 1}/{T}")
    for s, ctx in enumerate(ctxs):
      states[s] = method.end_task(method.combine(states[s], tree_index(params, s), info), ctx)
      accs[s][t, :t + 1] = evaluate_row(method, states[s], base, streams[s], t, spec, fitter, config)
  wall = time.perf_counter() - start
  return [RunResult(method.name, acc, wall, st) for acc, st in zip(accs, states)]


__all__ = ["fit_seeds", "run_seeds", "tree_index", "tree_stack"]
del dataclasses
