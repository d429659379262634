"""Training phases: the one training step and the one epoch loop, shared by single runs and
seed-batched runs (:class:`Fitter`, which runs a phase's epochs on a mesh).

:func:`make_train_step` builds the pure update of one step. ``Fitter._train`` is
the one epoch loop: a single run (:meth:`Fitter.fit`) scans the step over a
chunk of steps; S seeds at once (:meth:`Fitter.fit_seeds`, used by
:func:`clx.train.seeds.run_seeds`) scan its ``vmap`` over a leading seed axis
(``_Lanes`` is the only place the two differ: how a seed's tree is read, how
optimiser states and plans are stacked, how a lowered learning rate is set).
:func:`chunk_steps` is the one rule for how many steps a jitted call fuses (the
conv-on-CPU rule included), and :func:`gather_rows` the one gather of a
device-resident split.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jax_core

from clx.data.types import ArraySplit
from clx.train import sharding
from clx.train.batches import (_epoch_order, _gather, _step_index_plan, check_finite_batch,
                               example_nbytes, input_normalization, is_streaming,
                               normalize_inputs, streamed_device_batches)
from clx.train.config import (ScheduleFactory, TrainConfig, learning_rate_schedule,
                              make_optimizer)
from clx.train.progress import TaskProgress

Batch = dict[str, jax.Array]


def tree_where(pred: jax.Array, new: Any, old: Any) -> Any:
  """Leafwise ``where(pred, new, old)`` (exact: no arithmetic on either side)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def current_learning_rate(schedule, opt_state, count: jax.Array) -> jax.Array:
  """The learning rate the next update uses, for the logs (NaN when unknown).

  Args:
    schedule: a float or ``step -> lr`` (:func:`clx.train.loop.learning_rate_schedule`),
      or ``None`` when the rate lives in the optimiser state
      (``optax.inject_hyperparams``) or a method passed its own optimiser.
    opt_state: the optimiser state before the update.
    count: () int32, steps taken so far.

  Returns:
    () float32.
  """
  if schedule is None:
    hyper = getattr(opt_state, "hyperparams", None)
    if isinstance(hyper, dict) and "learning_rate" in hyper:
      return jnp.asarray(hyper["learning_rate"], jnp.float32)
    return jnp.asarray(jnp.nan, jnp.float32)
  if callable(schedule):
    return jnp.asarray(schedule(count), jnp.float32)
  return jnp.asarray(schedule, jnp.float32)


def gather_rows(data: Batch, idx: jax.Array) -> Batch:
  """A batch from a device-resident split and an index row (-1 = padding).

  Args:
    data: ``{"x": (N, ...), "y": (N,)}`` on device.
    idx: (B,) int32 indices, -1 for padding rows.

  Returns:
    ``{"x": (B, ...), "y": (B,), "mask": (B,) float32}`` (padding rows masked).
  """
  safe = jnp.maximum(idx, 0)
  return {"x": data["x"][safe], "y": data["y"][safe], "mask": (idx >= 0).astype(jnp.float32)}


def make_train_step(loss: Callable, optimizer: optax.GradientTransformation, *,
                    transform_grads: Callable | None = None,
                    transform_updates: Callable | None = None, schedule=None,
                    masked: bool = True, log: bool = False) -> Callable:
  """The pure update of one training step.

  ``step(params, opt_state, count, batch, state, base, rng) -> (params,
  opt_state, count, out)``: the loss gradient at ``params`` on ``batch``
  (dropout key ``fold_in(rng, count)``), ``transform_grads(g, state)``, the
  optimiser update, ``transform_updates(u, state)``, applied. With ``masked``,
  a batch without any real row (the padded tail of a chunk, or a seed that has
  stopped) leaves params, optimiser state and ``count`` unchanged (exact
  ``where``; the loss output is 0 there so a NaN cannot leak into the
  divergence check). ``out`` is the loss, or with ``log`` ``{"loss",
  "grad_norm" (of the gradient after ``transform_grads``), "learning_rate"}``.

  Args:
    loss: ``(params, state, base, batch, rng) -> (loss, aux)``.
    optimizer: the phase's optax transformation.
    transform_grads, transform_updates: the method's projections (or ``None``).
    schedule: the learning-rate schedule for the logs (:func:`current_learning_rate`).
    masked: handle batches without real rows (needed when some can occur).
    log: return the per-step scalars.

  Returns:
    The step function (pure; jit/scan/vmap it).
  """
  transform_grads = transform_grads or (lambda g, s: g)

  def step(params, opt_state, count, batch, state, base, rng):
    (loss_value, _), grads = jax.value_and_grad(loss, has_aux=True)(
        params, state, base, batch, jax.random.fold_in(rng, count))
    grads = transform_grads(grads, state)
    out = loss_value
    if log:
      out = {"loss": loss_value, "grad_norm": optax.tree.norm(grads),
             "learning_rate": current_learning_rate(schedule, opt_state, count)}
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    if transform_updates is not None:
      updates = transform_updates(updates, state)
    new_params = optax.apply_updates(params, updates)
    if not masked:
      return new_params, new_opt_state, count + 1, out
    valid = jnp.sum(batch["mask"]) > 0
    return (tree_where(valid, new_params, params), tree_where(valid, new_opt_state, opt_state),
            count + valid.astype(count.dtype),
            jax.tree.map(lambda v: jnp.where(valid, v, jnp.zeros_like(v)), out))

  return step


def chunk_steps(cfg, steps_per_epoch: int, bytes_per_step: int, *, convolutions_on_cpu: bool) -> int:
  """Steps fused in one jitted call.

  ``cfg.steps_per_call`` when set; else 1 for convolutions on CPU (XLA:CPU runs
  them ~10× slower inside ``lax.scan``); else as many as fit ``max_chunk_mb`` of
  input, rounded to a divisor of the epoch when one is close.

  Args:
    cfg: the :class:`clx.train.loop.TrainConfig`.
    steps_per_epoch: steps of one epoch.
    bytes_per_step: input bytes one step moves into a call (all seeds together).
    convolutions_on_cpu: from :func:`convolutions_on_cpu`.

  Returns:
    The chunk length, in ``[1, steps_per_epoch]``.
  """
  chunk = cfg.steps_per_call
  if chunk <= 0 and convolutions_on_cpu:
    chunk = 1
  if chunk <= 0:
    chunk = int(max(1, min(steps_per_epoch, cfg.max_chunk_mb * 2**20 // max(bytes_per_step, 1))))
    chunk = largest_divisor_at_most(steps_per_epoch, chunk)
  return min(chunk, steps_per_epoch)


def largest_divisor_at_most(n: int, cap: int) -> int:
  """The largest divisor of ``n`` that is ≤ ``cap``, unless it is tiny (then ``cap``)."""
  best = max(d for d in range(1, min(n, cap) + 1) if n % d == 0)
  return best if best * 4 >= min(n, cap) else min(n, cap)


def convolutions_on_cpu(loss: Callable, params, state, base, split: ArraySplit, rows: int) -> bool:
  """Whether this phase runs on CPU and its loss contains a convolution.

  Automatic chunking then fuses one step per call: XLA:CPU executes
  convolutions inside a ``while`` loop (``lax.scan``) about 10× slower than
  the same step on its own (AlexNet, batch 64: 2.0 s vs 0.16 s per step).
  """
  if jax.default_backend() != "cpu":
    return False
  x = jax.ShapeDtypeStruct((rows, *split.x.shape[1:]), split.x.dtype)
  batch = {"x": x, "y": jax.ShapeDtypeStruct((rows,), jnp.int32),
           "mask": jax.ShapeDtypeStruct((rows,), jnp.float32)}
  jaxpr = jax.make_jaxpr(lambda p, b: loss(p, state, base, b, None))(params, batch)
  return _has_primitive(jaxpr.jaxpr, "conv_general_dilated")


def _has_primitive(jaxpr, name: str) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
    for sub in jax_core.jaxprs_in_params(eqn.params):
      if _has_primitive(sub, name):
        return True
  return False


class TrainingDivergedError(FloatingPointError):
  """The training loss became NaN or Inf: the phase (method, task), epoch and
  learning rate are in the message. Raised whatever the display settings."""

  def __init__(self, title: str, epoch: int, cfg: TrainConfig):
    self.title, self.epoch = title, epoch
    super().__init__(
        f"{title}: training diverged, the loss became NaN/Inf in epoch {epoch + 1}/{cfg.epochs} "
        f"(optimizer {cfg.optimizer}, learning_rate {cfg.learning_rate:g}); lower the learning "
        f"rate or set train.grad_clip")


@jax.jit
def _all_finite(losses: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(losses))


@jax.jit
def _sum(losses: jax.Array) -> jax.Array:
  """Sum over the steps axis: () for (chunk,) losses, (S,) for (chunk, S)."""
  return jnp.sum(losses.astype(jnp.float32), axis=0)


class _Lanes:
  """How the epoch loop addresses its carried pytrees: one run (``batched=False``) or S
  seeds stacked on a leading axis (``batched=True``); the only place the two differ."""

  def __init__(self, batched: bool):
    self.batched = batched

  def get(self, tree: Any, s: int) -> Any:
    """Seed ``s``'s pytree (the tree itself for one run)."""
    return jax.tree.map(lambda x: x[s], tree) if self.batched else tree

  def map(self, fn: Callable, in_axes: int | tuple = 0) -> Callable:
    """``fn`` over the seed axis (``vmap`` with ``in_axes``); ``fn`` itself for one run."""
    return jax.vmap(fn, in_axes=in_axes) if self.batched else fn

  def stack(self, trees: list) -> Any:
    """One run's tree, or the seeds' trees stacked (NumPy, host side)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *trees) if self.batched else trees[0]

  def stack_plans(self, plans: list[np.ndarray]) -> np.ndarray:
    """(steps, B) for one run, (steps, S, B) for S seeds."""
    return np.stack(plans, 1) if self.batched else plans[0]

  def set_learning_rate(self, opt_state, s: int, lr: float, rep) -> Any:
    """The optimiser state with seed ``s``'s injected learning rate set to ``lr``."""
    value = jnp.asarray(lr, jnp.float32)
    current = opt_state.hyperparams["learning_rate"]
    new = current.at[s].set(value) if self.batched else jax.device_put(value, rep)
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": new})

  def unstack_best(self, params: Any, best: list) -> Any:
    """The best epoch's params where one was kept, else the last (per seed)."""
    if not self.batched:
      return best[0]
    return jax.tree.map(lambda *xs: jnp.stack(xs),
                        *[b if b is not None else self.get(params, s) for s, b in enumerate(best)])


@dataclasses.dataclass
class Fitter:
  """Runs training phases on a mesh; caches nothing across phases but the mesh."""

  mesh: jax.sharding.Mesh
  progress: bool | None = None
  quiet: bool = False
  last_fit: dict = dataclasses.field(default_factory=dict)  # epochs run, LR/val history
  last_fits: list = dataclasses.field(default_factory=list)  # per seed, of a seed-batched fit
  fits: list = dataclasses.field(default_factory=list)  # the log of every fit, in order
  # steps_per_epoch → learning rate, supplied by the run for every phase (else method_schedule)
  lr_schedule: ScheduleFactory | None = None
  # the method's ``lr_schedule`` field: a phase's TrainConfig → factory (else cfg.schedule)
  method_schedule: Callable[[TrainConfig], ScheduleFactory | None] | None = None
  logger: Any = None  # clx.train.logging.RunLogger: per-step scalars, read once per chunk
  profiler: Any = None  # clx.train.logging.StepProfiler: a jax.profiler trace after warm-up

  def plan(self, n: int, batch_size: int, shuffle: bool, seed_words: tuple[int, ...]) -> np.ndarray:
    padded = sharding.pad_to_multiple(batch_size, sharding.num_data_shards(self.mesh))
    return _step_index_plan(_epoch_order(n, shuffle, seed_words), batch_size, padded)

  def device_batches(self, split: ArraySplit, plan: np.ndarray, where: str,
                     chunk: int | None = None, key: tuple[int, ...] = (0,), raw: bool = False
                     ) -> Iterator[tuple[dict[str, jax.Array], int, int]]:
    """Yield sharded arrays for ``plan`` rows: single steps or (chunk, B) stacks.

    Yields ``(arrays, steps, examples)``. When ``chunk`` is given, the last
    stack is padded with fully masked steps so every call has the same shape.
    A streaming split (``clx.data.pipeline.StreamingSplit``) is decoded per
    batch, augmented under ``key`` (:func:`clx.train.batches.streamed_device_batches`);
    with ``raw`` its ``x`` stays uint8 for a step that normalises inside
    (:func:`clx.train.batches.normalize_inputs` with ``input_normalization(split)``).
    """
    if is_streaming(split):
      yield from streamed_device_batches(split, plan, self.mesh, key, chunk, raw=raw)
      return
    rows = sharding.process_rows(plan.shape[1], self.mesh)
    if chunk is None:
      for s in range(plan.shape[0]):
        local = _gather(split, plan[s, rows])
        check_finite_batch(local, where)
        yield sharding.shard_arrays(local, self.mesh, 0, plan.shape[1]), 1, int((plan[s] >= 0).sum())
      return
    for c in range(0, plan.shape[0], chunk):
      block = plan[c:c + chunk]
      steps = block.shape[0]
      if steps < chunk:
        block = np.concatenate([block, np.full((chunk - steps, block.shape[1]), -1, block.dtype)])
      local = _gather(split, block[:, rows])
      check_finite_batch(local, where)
      yield (sharding.shard_arrays(local, self.mesh, 1, plan.shape[1]), steps,
             int((block >= 0).sum()))

  def fit(self, params, loss: Callable, split: ArraySplit, cfg: TrainConfig, *, state, base,
          rng: jax.Array, transform_grads: Callable | None = None,
          transform_updates: Callable | None = None,
          optimizer: optax.GradientTransformation | None = None, title: str = "train",
          seed_words: tuple[int, ...] = (0,), val_split: ArraySplit | None = None):
    """Train ``params`` for ``cfg.epochs`` epochs over ``split``; returns params.

    ``loss(params, state, base, batch, rng) -> (loss, aux)``. Every step sees a
    global batch of ``cfg.batch_size`` real examples (the last one of an epoch
    may be smaller), identical for any device count, so 1 and N devices give
    the same result up to float reduction order. The phase's log is
    ``self.last_fit`` (also appended to ``self.fits``). The seed-batched
    :meth:`fit_seeds` runs the same epoch loop over a stacked seed axis.
    """
    if cfg.uses_validation and (val_split is None or len(val_split) == 0):
      raise ValueError(f"{title}: lr_patience/restore_best need the task's validation split "
                       "('val'), and this task has none; build the stream with a validation "
                       "fraction or turn them off")
    params, logs = self._train(params, loss, [split], cfg, state=state, base=base, rng=rng,
                               transform_grads=transform_grads,
                               transform_updates=transform_updates, optimizer=optimizer,
                               title=title, seed_words=[seed_words], val_splits=[val_split],
                               batched=False)
    self.last_fit = logs[0]
    self.fits.append(self.last_fit)
    return params

  def fit_seeds(self, params, loss: Callable, splits: Sequence[ArraySplit], cfg: TrainConfig, *,
                states, base, rngs: jax.Array, transform_grads: Callable | None = None,
                seed_words: Sequence[tuple[int, ...]], title: str = "train",
                val_splits: Sequence[ArraySplit | None] | None = None):
    """Train S stacked parameter sets, seed s on ``splits[s]``; returns stacked params.

    The epoch loop of :meth:`fit` with the step ``vmap``-ed over a leading seed
    axis: each seed draws its single run's batches (``seed_words[s]``) and
    dropout keys (``rngs[s]``), and with ``lr_patience`` / ``restore_best``
    keeps its own :class:`ValidationPlateau` (its own learning rate, best epoch
    and stop; a stopped seed's steps are masked out), so each seed gets its
    single run's numbers. The training splits are always kept on the device
    (stacked over seeds), whatever ``device_data_mb`` says; that changes where
    batches are gathered, not their values. ``self.last_fits`` holds the
    per-seed fit logs.

    Args:
      params, states: pytrees with a leading seed axis S.
      loss: ``(params, state, base, batch, rng) -> (loss, aux)`` of ONE seed.
      splits: S training splits of equal length.
      cfg: the phase's settings (shared by the seeds).
      base: the frozen backbone (shared).
      rngs: (S,) PRNG keys (each seed's phase key, as in a single run).
      transform_grads: the method's gradient transform (per seed).
      seed_words: per seed, the words seeding its shuffles (as in a single run).
      title: the phase's name (progress bar, errors).
      val_splits: per seed, the validation split (needed by ``lr_patience`` /
        ``restore_best``).

    Returns:
      The trained params, stacked over seeds.
    """
    n = len(splits[0])
    if any(len(s) != n for s in splits):
      raise ValueError(f"{title}: seeds' training splits differ in length "
                       f"{[len(s) for s in splits]}")
    if val_splits is None:
      val_splits = [None] * len(splits)
    if any(is_streaming(s) for s in splits):
      raise ValueError(f"{title}: run_seeds keeps every seed's training split on the device; "
                       "a streaming image split trains one seed at a time (run_method)")
    if cfg.uses_validation and any(v is None or len(v) == 0 for v in val_splits):
      raise ValueError(f"{title}: lr_patience/restore_best need every seed's validation split "
                       "('val'); build the streams with a validation fraction or turn them off")
    params, self.last_fits = self._train(
        params, loss, list(splits), cfg, state=states, base=base, rng=rngs,
        transform_grads=transform_grads, transform_updates=None, optimizer=None, title=title,
        seed_words=list(seed_words), val_splits=list(val_splits), batched=True)
    return params

  def _train(self, params, loss: Callable, splits: list[ArraySplit], cfg: TrainConfig, *,
             state, base, rng: jax.Array, transform_grads: Callable | None,
             transform_updates: Callable | None, optimizer: optax.GradientTransformation | None,
             title: str, seed_words: list[tuple[int, ...]], val_splits: list[ArraySplit | None],
             batched: bool) -> tuple[Any, list[dict]]:
    """The one epoch loop: a single run (``batched=False``, one split) or S seeds stacked
    on a leading axis of ``params`` / ``state`` / ``rng`` (``batched=True``).

    Returns:
      ``(params, fit logs)``: one log per seed (one for a single run).
    """
    num, n = len(splits), len(splits[0])
    if n == 0:
      raise ValueError(f"{title}: empty training split")
    lane = _Lanes(batched)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    supplied = self.schedule_factory(cfg) if optimizer is None else None
    schedule = None if (optimizer is not None or cfg.lr_patience > 0) else \
        learning_rate_schedule(cfg, steps_per_epoch, supplied)
    optimizer = optimizer or make_optimizer(cfg, steps_per_epoch, supplied)
    # Per-step scalars are computed inside the jitted chunk only when something logs them
    # (the program, and so every number, is otherwise the one without logs).
    log = not batched and self.logger is not None and self.logger.enabled
    padded = sharding.pad_to_multiple(cfg.batch_size, sharding.num_data_shards(self.mesh))
    resident = batched or self.resident(splits[0], cfg)
    per_step = (num * padded * 8 if resident
                else padded * example_nbytes(splits[0]) + padded * 8)
    chunk = chunk_steps(cfg, steps_per_epoch, per_step, convolutions_on_cpu=(
        cfg.steps_per_call <= 0 and convolutions_on_cpu(
            loss, lane.get(params, 0), lane.get(state, 0), base, splits[0], padded)))
    # Chunks that tile the epoch exactly never contain fully padded steps; a seed that
    # stopped (validation schedule) trains on fully masked batches from then on.
    masked = steps_per_epoch % chunk != 0 or (batched and cfg.lr_patience > 0)

    rep = sharding.replicated(self.mesh)
    # Copy: the chunk function donates its params buffers, and the caller's
    # state (e.g. the previous task's checkpoint delta) may still hold them.
    params = jax.tree.map(jnp.copy, jax.device_put(params, rep))
    opt_state = jax.device_put(lane.map(optimizer.init)(params), rep)
    data = None
    if resident:
      for split in splits:
        check_finite_batch(split.arrays, title)
      data = jax.device_put(lane.stack([{"x": s.x, "y": s.y.astype(np.int32)} for s in splits]),
                            rep)
    train_step = make_train_step(loss, optimizer, transform_grads=transform_grads,
                                 transform_updates=transform_updates, schedule=schedule,
                                 masked=masked, log=log)

    # Streamed uint8 pixels are normalised inside the step (no float32 copy of the batch).
    normalization = None if resident else input_normalization(splits[0])

    def lane_step(params, opt_state, count, batch, state, data, rng, active, base):
      if data is not None:  # device-resident split: the batch is an index plan
        idx = batch["idx"] if active is None else jnp.where(active, batch["idx"], -1)
        batch = gather_rows(data, idx)
      batch = normalize_inputs(batch, normalization)
      return train_step(params, opt_state, count, batch, state, base, rng)

    step_fn = lane.map(lane_step, in_axes=(0,) * 8 + (None,))  # base is shared by the seeds

    # state and base are arguments, not closed-over constants: XLA would embed
    # them (the frozen backbone, GPM memories) in the program and compile slowly.
    # Outputs pinned replicated like the inputs: with a sharded (fsdp/tensor) backbone XLA
    # may otherwise return parameters sharded like it, and the next chunk recompiles.
    @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=(rep, rep, rep, rep))
    def run_chunk(params, opt_state, count, chunk_arrays, data, state, base, rng, active):
      def body(carry, batch):
        params, opt_state, count, out = step_fn(*carry, batch, state, data, rng, active, base)
        return (params, opt_state, count), out
      if chunk == 1:
        # No loop at all: XLA:CPU runs convolutions inside while loops an order of
        # magnitude slower (AlexNet step: 2 s vs 0.2 s), so conv nets on CPU use
        # steps_per_call=1 (experiments/BENCHMARKS.md).
        carry, out = body((params, opt_state, count), jax.tree.map(lambda a: a[0], chunk_arrays))
        return (*carry, jax.tree.map(lambda v: v[None], out))
      (params, opt_state, count), out = jax.lax.scan(body, (params, opt_state, count),
                                                     chunk_arrays)
      return params, opt_state, count, out

    count = jax.device_put(jnp.zeros((num,) if batched else (), jnp.int32), rep)
    bar = TaskProgress(title, cfg.epochs * steps_per_epoch, enabled=self.progress, quiet=self.quiet)
    plateaus = [ValidationPlateau(cfg) for _ in range(num)] if cfg.uses_validation else None
    val_fn = _validation_fn(loss) if plateaus is not None else None
    best: list = [None] * num
    active = np.ones(num, bool)  # seeds still training (all, until the validation rule stops one)
    epochs_run = [0] * num
    epoch_losses: list[list[float]] = [[] for _ in range(num)]  # mean training loss per epoch
    logs = _ChunkLog(self.logger, title) if log else None
    chunk_index = 0
    for epoch in range(cfg.epochs):
      if not active.any():
        break
      active_dev = jax.device_put(jnp.asarray(active), rep) if batched else None
      plan = lane.stack_plans([self.plan(n, cfg.batch_size, True, (*w, epoch))
                               for w in seed_words])
      batches = (self.index_chunks(plan, chunk) if resident
                 else self.device_batches(splits[0], plan, title, chunk,
                                          key=(*seed_words[0], epoch), raw=True))
      # Divergence check, independent of display: every step's loss is reduced
      # on device into one flag, read once per epoch (no host sync per chunk).
      finite = loss_sum = None
      for arrays, steps, examples in batches:
        if self.profiler is not None:
          self.profiler.before_chunk(chunk_index)
        params, opt_state, count, out = run_chunk(params, opt_state, count, arrays, data, state,
                                                  base, rng, active_dev)
        chunk_index += 1
        if self.profiler is not None:
          self.profiler.after_chunk(steps, params)
        losses = out["loss"] if log else out  # (chunk,) or (chunk, S)
        if logs is not None:  # reads the previous chunk: the device keeps working meanwhile
          logs.add(out, steps, examples, epoch)
        chunk_finite = _all_finite(losses)
        finite = chunk_finite if finite is None else finite & chunk_finite
        chunk_sum = _sum(losses)  # padded steps hold 0: the sum is over real steps
        loss_sum = chunk_sum if loss_sum is None else loss_sum + chunk_sum
        if bar.enabled or not self.quiet:  # the display reads the loss anyway: fail early
          last = np.asarray(losses[steps - 1])
          if not np.all(np.isfinite(last)):
            raise TrainingDivergedError(title, epoch, cfg)
          bar.update(steps, examples, float(last.mean()))
      if logs is not None:
        logs.flush()
      if finite is not None and not bool(finite):
        raise TrainingDivergedError(title, epoch, cfg)
      sums = np.atleast_1d(np.asarray(loss_sum))
      for s in np.flatnonzero(active):
        epochs_run[s] = epoch + 1
        epoch_losses[s].append(float(sums[s]) / steps_per_epoch)
        if plateaus is None:
          continue
        own = lane.get(params, s)
        action = plateaus[s].update(self.validation_loss(own, val_fn, val_splits[s], cfg,
                                                         lane.get(state, s), base))
        if action == "best" and cfg.restore_best:
          best[s] = jax.tree.map(jnp.copy, own)
        elif action == "lower":
          opt_state = lane.set_learning_rate(opt_state, s, plateaus[s].lr, rep)
        elif action == "stop":
          active[s] = False
    bar.close()
    if self.profiler is not None:
      self.profiler.end_fit(params)
    fit_logs = [{"title": title, "epochs": epochs_run[s], "epoch_losses": epoch_losses[s],
                 **(plateaus[s].summary() if plateaus is not None else {})} for s in range(num)]
    if any(b is not None for b in best):
      params = lane.unstack_best(params, best)
    return params, fit_logs

  def schedule_factory(self, cfg: TrainConfig) -> ScheduleFactory | None:
    """The schedule supplied for a phase with ``cfg``: the run's ``lr_schedule``, else the
    method's (``method_schedule(cfg)``), else ``None`` (``cfg.schedule`` applies)."""
    if self.lr_schedule is not None:
      return self.lr_schedule
    if self.method_schedule is not None:
      return self.method_schedule(cfg)
    return None

  def validation_loss(self, params, fn: Callable, split: ArraySplit, cfg: TrainConfig,
                      state, base) -> float:
    """Mean loss over ``split``; ``fn`` from :func:`_validation_fn` (normalises inside)."""
    plan = self.plan(len(split), cfg.eval_batch_size, False, (0,))
    normalization = input_normalization(split)
    sums = [fn(params, state, base, arrays, normalization=normalization) for arrays, _, _ in
            self.device_batches(split, plan, "validation", raw=True)]
    return float(sum(float(a) for a, _ in sums) / max(sum(float(c) for _, c in sums), 1.0))

  def resident(self, split: ArraySplit, cfg: TrainConfig) -> bool:
    """Keep the split on device and gather batches there (small in-memory data)."""
    if is_streaming(split):  # decoded and augmented per batch: never resident
      return False
    nbytes = split.x.nbytes + split.y.nbytes
    return cfg.device_data_mb > 0 and nbytes <= cfg.device_data_mb * 2**20

  def index_chunks(self, plan: np.ndarray, chunk: int):
    """Yield sharded ``{"idx": (chunk, [S,] B)}`` index stacks (-1 = padding row).

    ``plan`` is (steps, B), or (steps, S, B) for S stacked seeds; the batch axis
    (last) is sharded. Yields ``(arrays, steps, examples)``.
    """
    rows = sharding.process_rows(plan.shape[-1], self.mesh)
    for c in range(0, plan.shape[0], chunk):
      block = plan[c:c + chunk]
      steps = block.shape[0]
      if steps < chunk:
        block = np.concatenate([block, np.full((chunk - steps, *block.shape[1:]), -1,
                                               block.dtype)])
      local = {"idx": block[..., rows].astype(np.int32)}
      yield (sharding.shard_arrays(local, self.mesh, block.ndim - 1, plan.shape[-1]), steps,
             int((block >= 0).sum()))


class _ChunkLog:
  """Hands each chunk's per-step scalars to a logger, one chunk late.

  A chunk's outputs are read after the next chunk is dispatched, so the read
  waits for work that is already done and the device never idles for the
  logs; examples/s is the chunk's examples over the time between reads.
  """

  def __init__(self, logger, title: str):
    self.logger, self.title = logger, title
    self.pending = None
    self.last = time.perf_counter()

  def add(self, out: dict[str, jax.Array], steps: int, examples: int, epoch: int) -> None:
    self.flush()
    self.pending = (out, steps, examples, epoch)

  def flush(self) -> None:
    if self.pending is None:
      return
    out, steps, examples, epoch = self.pending
    self.pending = None
    host = jax.device_get(out)
    now = time.perf_counter()
    rate = examples / max(now - self.last, 1e-9)
    self.last = now
    self.logger.log_steps({k: np.asarray(v)[:steps] for k, v in host.items()}, phase=self.title,
                          epoch=epoch, examples_per_s=rate)


def _validation_fn(loss: Callable) -> Callable:
  """Jitted ``(params, state, base, batch, normalization=None) -> (loss · rows, rows)``
  without dropout (``rng=None``, as the official ``model.eval()`` validation pass);
  ``normalization`` (static, :func:`clx.train.batches.input_normalization`) turns a raw
  uint8 batch into model inputs inside the step."""

  def total(params, state, base, batch, normalization=None):
    batch = normalize_inputs(batch, normalization)
    value, _ = loss(params, state, base, batch, None)
    count = jnp.sum(batch["mask"])
    return value * count, count

  return jax.jit(total, static_argnames=("normalization",))


class ValidationPlateau:
  """The official GPM/BECAME per-epoch rule on the validation loss.

  A new best resets the patience; otherwise the patience drops by one and at
  zero the learning rate is divided by ``lr_factor``: below ``lr_min`` the
  phase stops, else the patience restarts. :meth:`update` returns ``"best"``,
  ``"lower"``, ``"stop"`` or ``None``.
  """

  def __init__(self, cfg: TrainConfig):
    self.cfg, self.lr = cfg, cfg.learning_rate
    self.best_loss, self.patience, self.history = math.inf, cfg.lr_patience, []

  def update(self, val_loss: float) -> str | None:
    self.history.append(val_loss)
    if val_loss < self.best_loss:
      self.best_loss, self.patience = val_loss, self.cfg.lr_patience
      return "best"
    if self.cfg.lr_patience <= 0:
      return None
    self.patience -= 1
    if self.patience > 0:
      return None
    self.lr /= self.cfg.lr_factor
    if self.lr < self.cfg.lr_min:
      return "stop"
    self.patience = self.cfg.lr_patience
    return "lower"

  def summary(self) -> dict:
    return {"final_lr": self.lr, "best_val_loss": self.best_loss,
            "val_losses": list(self.history)}
