"""The continual training loop: jitted, data-parallel, resumable.

For each task: ``method.begin_task`` → epochs of jitted steps (``lax.scan``
over chunks of steps, batch sharded on the mesh's ``data`` axis, method state
and backbone placed as ``TrainConfig.param_sharding`` says) →
``method.end_task`` → evaluation on every task seen so far → one checkpoint
step holding that task's state delta; :func:`run` yields a :class:`TaskResult`
per task. That per-task sequence (``_task_sequence``) is also the one of
:func:`clx.train.seeds.run_seeds`, over one "lane" per seed.

Nothing here knows a method by name: everything goes through
:class:`clx.methods.base.ContinualMethod`. The concerns live in their own
modules (``config``, ``batches``, ``fit``, ``evaluate``, ``sharding``,
``progress``, ``logging``); their public names stay importable from here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clx.data.types import ArraySplit, Stream, concat_splits
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo
from clx.train import sharding
from clx.train.batches import (_epoch_order, _gather, _step_index_plan,  # noqa: F401
                               check_finite_batch, is_streaming)
from clx.train.config import (OPTIMIZERS, SCHEDULES, TrainConfig,  # noqa: F401
                              learning_rate_schedule, make_optimizer)
from clx.train.evaluate import evaluate_row, evaluate_split, make_counter  # noqa: F401
from clx.train.fit import (Fitter, TrainingDivergedError, ValidationPlateau,  # noqa: F401
                           _all_finite, _validation_fn)
from clx.train.fit import convolutions_on_cpu as _convolutions_on_cpu  # noqa: F401
from clx.train.fit import largest_divisor_at_most as _largest_divisor_at_most  # noqa: F401
from clx.train.fit import tree_where as _tree_where  # noqa: F401

# ----------------------------------------------------------------------------
# The task context handed to methods.


@dataclasses.dataclass
class _Context:
  task_index: int
  spec: StreamSpec
  rng: jax.Array
  base: Any
  fitter: Fitter
  train_split: ArraySplit
  splits: dict[str, ArraySplit | None]
  config: TrainConfig
  seed_words: tuple[int, ...]
  # Host passes over a streaming split so far in this task: each pass draws fresh augmentations
  # (InfLoRA's two Gram passes are two iterations of its training loader).
  passes: int = 0

  @property
  def info(self) -> TaskInfo:
    """The static :class:`TaskInfo` of this task (``task_id`` None: training)."""
    return TaskInfo(self.task_index, self.spec)

  def batches(self, split: str = "train", *, batch_size: int | None = None,
              shuffle: bool = False, seed: int = 0):
    data = self._pass_split(split)
    words = (*self.seed_words, 7919, seed)
    plan = self.fitter.plan(len(data), batch_size or self.config.eval_batch_size, shuffle, words)
    key = words
    if is_streaming(data):
      key = (*words, self.passes)
      self.passes += 1
    for arrays, _, _ in self.fitter.device_batches(data, plan, f"task {self.task_index} {split}",
                                                   key=key):
      yield arrays

  def sample(self, n: int, *, split: str = "train", seed: int = 0):
    data = self._pass_split(split)
    if n > len(data):
      raise ValueError(f"asked for {n} samples of task {self.task_index} {split}, it has {len(data)}")
    idx = np.random.default_rng([*self.seed_words, 104729, seed]).choice(len(data), n, replace=False)
    if is_streaming(data):  # n examples decoded with the pass transform, not the split
      return data.load(idx, (*self.seed_words, 104729, seed))
    return {"x": data.x[idx], "y": data.y[idx].astype(np.int32)}

  def arrays(self, split: str = "train"):
    """All of a split; for a streaming split ``x`` is a stand-in that refuses to be read
    (``clx.data.pipeline.UnloadedImages``: shape and dtype only)."""
    data = self._pass_split(split)
    return {"x": data.x, "y": data.y.astype(np.int32)}

  def phase_rng(self, phase: int) -> jax.Array:
    """The PRNG key of training phase ``phase`` of this task (0: the main phase)."""
    return jax.random.fold_in(self.rng, phase)

  def phase_words(self, phase: int) -> tuple[int, ...]:
    """The words seeding the shuffles of training phase ``phase`` of this task."""
    return (*self.seed_words, phase)

  def fit(self, params, loss, *, transform_grads=None, transform_updates=None, state=None,
          optimizer=None, epochs=None, config: TrainConfig | None = None,
          title: str | None = None, phase: int = 1):
    cfg = config or self.config
    if epochs is not None:
      cfg = dataclasses.replace(cfg, epochs=epochs)
    return self.fitter.fit(
        params, loss, self.train_split, cfg, state=state, base=self.base,
        rng=self.phase_rng(phase), transform_grads=transform_grads,
        transform_updates=transform_updates, optimizer=optimizer,
        title=title or f"task {self.task_index} phase {phase}",
        seed_words=self.phase_words(phase),
        val_split=self.splits.get("val") if cfg.uses_validation else None)

  def _pass_split(self, name: str) -> ArraySplit:
    """The split as host passes read it (a streaming split with its pass transform)."""
    data = self._split(name)
    return data.for_passes() if is_streaming(data) else data

  def _split(self, name: str) -> ArraySplit:
    if name == "train":
      return self.train_split
    split = self.splits.get(name)
    if split is None:
      raise ValueError(f"task {self.task_index} has no {name!r} split")
    return split


# ----------------------------------------------------------------------------
# Running a method over a stream.


def train_split_for(method: ContinualMethod, stream: Stream, t: int) -> ArraySplit:
  """The data a method trains on at task t (the union so far for joint training)."""
  if method.data_view == "cumulative":
    splits = [s.train for s in stream.tasks[:t + 1]]
    if is_streaming(splits[0]):  # duck-typed: train does not import the image pipeline
      return splits[0].concat(splits[1:])
    return concat_splits(splits)
  return stream.tasks[t].train


@dataclasses.dataclass
class RunResult:
  method: str
  acc_matrix: np.ndarray  # (T, T) percent, NaN above the diagonal
  wall_time_s: float
  state: Any = None
  resumed_from: int | None = None
  tasks: list = dataclasses.field(default_factory=list)  # TaskResult of each task trained here


class TaskResult(NamedTuple):
  """What :func:`run` yields after each task.

  Attributes:
    task: 0-based task index.
    state: the method's state after the task (device arrays).
    acc_row: (task + 1,) test accuracies in percent on tasks 0..task.
    fit_log: the main training phase's log (``title``, ``epochs`` run,
      ``epoch_losses`` (mean training loss per epoch), and with a validation
      schedule ``final_lr``, ``best_val_loss``, ``val_losses``), plus
      ``phases``: the logs of every fit of the task in order (e.g. BECAME's
      second stage inside ``end_task``).
    diagnostics: ``method.diagnostics(state)`` (JSON-able numbers), or ``None``
      for a method without diagnostics.
  """

  task: int
  state: Any
  acc_row: np.ndarray
  fit_log: dict
  diagnostics: dict | None


PLACEMENT_FIELDS = ("param_sharding", "model_parallel")
# TrainConfig fields not fingerprinted: where arrays live, and which rows of the accuracy matrix
# are measured; neither changes a state.
UNFINGERPRINTED_FIELDS = (*PLACEMENT_FIELDS, "evaluate_after")


def config_fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tree_stack(trees):
  """The pytrees ``trees`` (same structure and shapes) stacked on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def tree_index(tree, i: int):
  """Entry ``i`` of the leading axis of every leaf of ``tree``."""
  return jax.tree.map(lambda x: x[i], tree)


@dataclasses.dataclass
class _Lane:
  """One seed's run over its stream: a single run is one lane, :func:`clx.train.seeds.run_seeds`
  has one per seed. ``state`` and ``acc`` ((T, T) percent) are updated task by task."""

  stream: Stream
  seed: int
  key: jax.Array
  state: Any
  acc: np.ndarray

  def context(self, method: ContinualMethod, t: int, spec: StreamSpec, base, fitter: Fitter,
              config: TrainConfig) -> _Context:
    """The :class:`_Context` of task ``t`` of this lane (its key, data and seed words)."""
    task = self.stream.tasks[t]
    return _Context(t, spec, jax.random.fold_in(self.key, 1 + t), base, fitter,
                    train_split_for(method, self.stream, t), {"test": task.test, "val": task.val},
                    config, (self.seed, t))


class _Setup(NamedTuple):
  spec: StreamSpec
  fitter: Fitter
  base: Any  # the backbone's params, placed by config.param_sharding
  lanes: list[_Lane]


def _prepare(method: ContinualMethod, streams: list[Stream], seeds: list[int],
             config: TrainConfig, mesh: jax.sharding.Mesh | None, **fitter_args) -> _Setup:
  """What every run starts from: the mesh (default: ``config.model_parallel``), the Fitter,
  the backbone placed by ``config.param_sharding`` and one lane per (stream, seed) holding
  ``method.init`` under that seed's key (the streams share one :class:`StreamSpec`)."""
  mesh = mesh or sharding.make_mesh(model_parallel=config.model_parallel)
  spec = StreamSpec.from_stream(streams[0])
  fitter = Fitter(mesh, method_schedule=method.lr_schedule, **fitter_args)
  # Backbone and method state are placed as config.param_sharding says (clx/train/sharding.py).
  base = sharding.place_base(method.backbone.params, mesh, config.param_sharding)
  lanes = []
  for stream, seed in zip(streams, seeds):
    key = jax.random.PRNGKey(seed)
    lanes.append(_Lane(stream, seed, key, method.init(jax.random.fold_in(key, 0), spec),
                       np.full((spec.num_tasks, spec.num_tasks), np.nan)))
  return _Setup(spec, fitter, base, lanes)


def _train_main(method: ContinualMethod, lanes: list[_Lane], ctxs: list[_Context],
                setup: _Setup, config: TrainConfig, *, batched: bool) -> tuple[list, list[dict]]:
  """The main training phase (phase 0) of the task of ``ctxs`` for every lane.

  One lane, ``batched=False``: :meth:`_Context.fit` (:meth:`Fitter.fit`). ``batched=True``:
  one :meth:`Fitter.fit_seeds` over the lanes stacked on a leading axis, each lane with its
  own data, key and shuffle words (those of its single run).

  Returns:
    ``(params, logs)``: per lane, the trained params and the phase's fit log.
  """
  info, fitter = ctxs[0].info, setup.fitter
  loss = functools.partial(method.loss, info=info)
  task = f"task {info.task + 1}/{setup.spec.num_tasks}"
  if not batched:
    (lane,), (ctx,) = lanes, ctxs
    params = ctx.fit(method.trainable(lane.state, info), loss,
                     transform_grads=method.transform_grads,
                     transform_updates=method.transform_updates, state=lane.state,
                     title=f"{method.name} {task}", phase=0)
    return [params], [fitter.last_fit]
  params = fitter.fit_seeds(
      tree_stack([method.trainable(lane.state, info) for lane in lanes]), loss,
      [c.train_split for c in ctxs], config, states=tree_stack([lane.state for lane in lanes]),
      base=setup.base, rngs=jnp.stack([c.phase_rng(0) for c in ctxs]),
      transform_grads=method.transform_grads, seed_words=[c.phase_words(0) for c in ctxs],
      title=f"{method.name} × {len(lanes)} seeds {task}",
      val_splits=[c.splits.get("val") for c in ctxs] if config.uses_validation else None)
  return [tree_index(params, s) for s in range(len(lanes))], fitter.last_fits


def _task_sequence(method: ContinualMethod, setup: _Setup, t: int, config: TrainConfig, *,
                   batched: bool) -> list[TaskResult]:
  """Task ``t`` for every lane of ``setup``: the one per-task sequence of :func:`run` and
  :func:`clx.train.seeds.run_seeds`.

  Per lane: state placed by ``config.param_sharding`` → ``method.begin_task`` → placed
  again; then the main phase (:func:`_train_main`); per lane: ``method.combine`` →
  ``method.end_task`` → evaluation on tasks 0..t. Updates each lane's ``state`` and row
  ``t`` of its ``acc``.

  Returns:
    One :class:`TaskResult` per lane (its state, accuracy row, fit log, diagnostics).
  """
  fitter, mesh, mode = setup.fitter, setup.fitter.mesh, config.param_sharding
  ctxs, begin_fits = [], []
  for lane in setup.lanes:
    ctx = lane.context(method, t, setup.spec, setup.base, fitter, config)
    first_fit = len(fitter.fits)
    state = method.begin_task(sharding.place_state(lane.state, mesh, mode), ctx)
    lane.state = sharding.place_state(state, mesh, mode)
    ctxs.append(ctx)
    begin_fits.append(fitter.fits[first_fit:])  # fits run inside begin_task, if any
  trained, main_logs = _train_main(method, setup.lanes, ctxs, setup, config, batched=batched)
  results = []
  for lane, ctx, params, main_log, before in zip(setup.lanes, ctxs, trained, main_logs,
                                                 begin_fits):
    first_fit = len(fitter.fits)
    lane.state = method.end_task(method.combine(lane.state, params, ctx.info), ctx)
    fit_log = {**main_log, "phases": [*before, main_log, *fitter.fits[first_fit:]]}
    if config.evaluate_after == "each_task" or t == setup.spec.num_tasks - 1:
      lane.acc[t, :t + 1] = evaluate_row(method, lane.state, setup.base, lane.stream, t,
                                         setup.spec, fitter, config)
    diagnostics = (method.diagnostics(jax.device_get(lane.state))
                   if method.diagnostics is not None else None)
    results.append(TaskResult(t, lane.state, lane.acc[t, :t + 1].copy(), fit_log, diagnostics))
  return results


def run_method(method: ContinualMethod, stream: Stream, config: TrainConfig, *, seed: int = 0,
               mesh: jax.sharding.Mesh | None = None, checkpoint_dir: str | None = None,
               run_info: dict | None = None, progress: bool | None = None, quiet: bool = False,
               on_task_end: Callable[[int, np.ndarray], None] | None = None,
               logger=None, profiler=None, keep_states: bool = False,
               lr_schedule=None) -> RunResult:
  """Train ``method`` on every task of ``stream`` in order and evaluate after each.

  Collects :func:`run` (same arguments); ``keep_states`` keeps every task's
  state in ``RunResult.tasks`` (by default only the last state is kept there,
  the earlier :class:`TaskResult` s hold ``state=None``).
  """
  gen = run(method, stream, config, seed=seed, mesh=mesh, checkpoint_dir=checkpoint_dir,
            run_info=run_info, progress=progress, quiet=quiet, on_task_end=on_task_end,
            logger=logger, profiler=profiler, lr_schedule=lr_schedule)
  tasks = []
  while True:
    try:
      result = next(gen)
    except StopIteration as stop:
      summary: RunResult = stop.value
      break
    if tasks and not keep_states:
      tasks[-1] = tasks[-1]._replace(state=None)
    tasks.append(result)
  summary.tasks = tasks
  return summary


def run(method: ContinualMethod, stream: Stream, config: TrainConfig, *, seed: int = 0,
        mesh: jax.sharding.Mesh | None = None, checkpoint_dir: str | None = None,
        run_info: dict | None = None, progress: bool | None = None, quiet: bool = False,
        on_task_end: Callable[[int, np.ndarray], None] | None = None,
        logger=None, profiler=None, lr_schedule=None) -> Generator[TaskResult, None, RunResult]:
  """Train ``method`` on every task of ``stream`` in order, yielding after each task.

  ``for r in run(...)``: ``r`` is a :class:`TaskResult` (the task's state,
  accuracy row, fit log and diagnostics), yielded after the task's checkpoint
  is committed; tasks restored from ``checkpoint_dir`` are not yielded. The
  generator's return value (``StopIteration.value``) is the :class:`RunResult`.
  Each task runs the per-task sequence shared with
  :func:`clx.train.seeds.run_seeds` (``_task_sequence``).

  Args:
    method: the continual method.
    stream: the task stream.
    config: optimisation settings for the main training phase of each task.
    seed: run seed (model init, head init, shuffling); same seed → same numbers.
    mesh: device mesh (default: all devices, ``config.model_parallel`` on a
      ``model`` axis, the rest on ``data``).
    checkpoint_dir: if given, one checkpoint step per task is written there and
      an existing directory is resumed from its last complete task.
    run_info: JSON metadata stored with each checkpoint (e.g. the experiment
      config); a resumed run must present the same fingerprint.
    progress: force the progress bar on/off (default: on for a TTY).
    logger: a :class:`clx.train.logging.RunLogger` (per-step scalars and per-task
      metrics); opened here at the first task to train (the lines of tasks
      not checkpointed are dropped) and closed at the end.
    profiler: a :class:`clx.train.logging.StepProfiler` (a trace of a few steps).
    lr_schedule: a learning-rate schedule supplied by the caller (e.g. an
      experiment) for every phase the loop builds the optimiser of:
      ``steps_per_epoch -> float | optax.Schedule`` (e.g.
      :func:`clx.methods.inflora.epoch_cosine`); it replaces the method's own
      (``method.lr_schedule``, applied per phase with that phase's config) and
      ``config.schedule``.

  Returns:
    A :class:`RunResult` with the (T, T) accuracy matrix in percent.
  """
  setup = _prepare(method, [stream], [seed], config, mesh, progress=progress, quiet=quiet,
                   logger=logger, profiler=profiler, lr_schedule=lr_schedule)
  (lane,) = setup.lanes
  start, elapsed_before, resumed_from = 0, 0.0, None
  # Placement fields are left out: they change where arrays live, not the numbers (up to float
  # reduction order), so a run may resume on another layout, and workdirs written before those
  # fields existed keep resuming.
  numeric = {k: v for k, v in dataclasses.asdict(config).items()
             if k not in UNFINGERPRINTED_FIELDS}
  fingerprint = config_fingerprint({"method": method.name, "config": numeric,
                                    "seed": seed, "run": run_info or {}})

  checkpointer = None
  if checkpoint_dir:
    from clx import checkpoint as ckpt  # local: Orbax is only needed when checkpointing
    checkpointer = ckpt.TaskCheckpointer(checkpoint_dir)
  try:
    if checkpointer is not None and checkpointer.latest_task() is not None:
      last = checkpointer.latest_task()
      # Every task's fingerprint and meta-hash chain is checked (CheckpointMismatchError /
      # CheckpointCorruptedError), not only the last task's.
      lane.state, meta = checkpointer.restore_state(last, lane.state,
                                                    expect={"fingerprint": fingerprint})
      for t, row in enumerate(meta["acc_matrix"]):
        lane.acc[t, :len(row)] = row
      start, elapsed_before, resumed_from = last + 1, float(meta.get("wall_time_s", 0.0)), last
    if logger is not None:
      logger.open(start)

    t0 = time.perf_counter()
    acc = lane.acc
    for t in range(start, setup.spec.num_tasks):
      if logger is not None:
        logger.task = t
      prev_state = lane.state
      (result,) = _task_sequence(method, setup, t, config, batched=False)
      if logger is not None:  # before the checkpoint: a task's lines exist once it is complete
        logger.log_task(t, acc[t, :t + 1], fit=result.fit_log,
                        wall_time_s=elapsed_before + time.perf_counter() - t0)
      if on_task_end is not None:
        on_task_end(t, acc)
      if checkpointer is not None:
        delta, removed = ckpt.state_delta(jax.device_get(prev_state), jax.device_get(lane.state))
        meta = {"method": method.name, "task": t, "task_name": stream.tasks[t].name,
                "fingerprint": fingerprint,
                # null: a row not measured (evaluate_after="last_task")
                "acc_matrix": [[None if np.isnan(a) else float(a) for a in acc[r, :r + 1]]
                               for r in range(t + 1)],
                "wall_time_s": elapsed_before + time.perf_counter() - t0, "run": run_info or {}}
        checkpointer.save(t, delta, removed, meta)
      yield result
    wall = elapsed_before + time.perf_counter() - t0
  finally:
    if checkpointer is not None:
      checkpointer.close()
    if logger is not None:
      logger.close()
  return RunResult(method.name, acc, wall, lane.state, resumed_from)
