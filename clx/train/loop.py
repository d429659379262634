"""The continual training loop: jitted, data-parallel, resumable.

For each task: ``method.begin_task`` → epochs of jitted steps (``lax.scan``
over chunks of steps, batch sharded on the mesh's ``data`` axis, method state
and backbone replicated) → ``method.end_task`` → evaluation on every task seen
so far → one checkpoint step holding that task's state delta.

Nothing here knows a method by name: everything goes through
:class:`clx.methods.base.ContinualMethod`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jax_core

from clx.data.types import ArraySplit, Stream, concat_splits
from clx.methods import passes
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo
from clx.train import sharding
from clx.train.progress import TaskProgress

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "inflora_cosine")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings of one training phase.

  Attributes:
    epochs: passes over the task's training data.
    batch_size: global batch size (split over all devices; padded with masked
      rows when not divisible by the device count, so every example is used).
    eval_batch_size: global batch size for evaluation passes.
    optimizer: ``sgd`` (plain, as the GPM code), ``momentum``, ``adam``, ``adamw``.
    learning_rate, momentum, weight_decay, b1, b2: optimiser hyper-parameters.
    schedule: ``constant``, ``cosine`` (per step to 0) or ``inflora_cosine``
      (InfLoRA's per-epoch ``lr·cos(99π·e / (200(E−1)))``).
    grad_clip: global-norm clip (0 = off).
    steps_per_call: steps fused in one ``lax.scan`` (0 = automatic: the whole
      epoch, capped by ``max_chunk_mb`` of input data per call).
    max_chunk_mb: cap on the input bytes of one fused call.
    device_data_mb: a training split up to this size is placed on the
      devices (replicated) once per phase and batches are gathered there from
      index plans, instead of being gathered on the host per chunk (0 = off).
    lr_patience: > 0 turns on the validation-loss schedule of the official
      GPM/BECAME code: after every epoch the loss on the task's ``val`` split
      (no dropout) is measured; after ``lr_patience`` epochs without a new
      best, the learning rate is divided by ``lr_factor`` and training stops
      once it falls below ``lr_min``. Needs the ``constant`` schedule.
    lr_factor, lr_min: see ``lr_patience``.
    restore_best: end the phase with the parameters of the epoch with the
      lowest validation loss (GPM/BECAME stage 1; their stage 2 keeps the last).
    param_sharding: where :func:`run_method` puts the frozen backbone and the
      method state: ``replicated``, ``fsdp``, ``tensor`` or ``tensor_fsdp``
      (:mod:`clx.train.sharding`); the numbers do not depend on it.
    model_parallel: size of the mesh's ``model`` axis when :func:`run_method`
      builds the mesh (> 1 only with ``tensor``/``tensor_fsdp``).
  """

  epochs: int = 1
  batch_size: int = 64
  eval_batch_size: int = 1024
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  momentum: float = 0.9
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  schedule: str = "constant"
  grad_clip: float = 0.0
  steps_per_call: int = 0
  max_chunk_mb: float = 64.0
  device_data_mb: float = 1024.0
  lr_patience: int = 0
  lr_factor: float = 2.0
  lr_min: float = 0.0
  restore_best: bool = False
  param_sharding: str = "replicated"
  model_parallel: int = 1

  @property
  def uses_validation(self) -> bool:
    return self.lr_patience > 0 or self.restore_best

  def __post_init__(self):
    # Every value is range-checked here, at config time, so a bad value fails
    # before any data loads instead of training silently wrong (a negative
    # grad_clip flips the gradients, a negative weight_decay grows weights).
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
    for name in ("epochs", "batch_size", "eval_batch_size", "steps_per_call", "lr_patience"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    for name in ("learning_rate", "momentum", "weight_decay", "b1", "b2", "grad_clip",
                 "max_chunk_mb", "device_data_mb", "lr_factor", "lr_min"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
      if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if self.epochs < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
      raise ValueError(f"epochs must be >= 0 and batch sizes >= 1, got epochs={self.epochs}, "
                       f"batch_size={self.batch_size}, eval_batch_size={self.eval_batch_size}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    nonnegative = ("weight_decay", "grad_clip", "steps_per_call", "max_chunk_mb", "device_data_mb")
    bad = {name: getattr(self, name) for name in nonnegative if getattr(self, name) < 0}
    if bad:
      raise ValueError(f"{', '.join(bad)} must be >= 0 (0 = off), got {bad}")
    if not self.max_chunk_mb > 0:
      raise ValueError(f"max_chunk_mb must be > 0, got {self.max_chunk_mb}")
    bad = {name: getattr(self, name) for name in ("momentum", "b1", "b2")
           if not 0 <= getattr(self, name) < 1}
    if bad:
      raise ValueError(f"{', '.join(bad)} must lie in [0, 1), got {bad}")
    if self.param_sharding not in sharding.PARAM_SHARDINGS:
      raise ValueError(f"param_sharding must be one of {sharding.PARAM_SHARDINGS}, "
                       f"got {self.param_sharding!r}")
    if isinstance(self.model_parallel, bool) or not isinstance(self.model_parallel, int) \
        or self.model_parallel < 1 or (self.model_parallel > 1
                                       and not self.param_sharding.startswith("tensor")):
      raise ValueError(f"model_parallel must be an integer >= 1, and > 1 only with "
                       f"param_sharding='tensor' or 'tensor_fsdp'; got {self.model_parallel!r} "
                       f"with {self.param_sharding!r}")
    if self.lr_patience < 0 or not self.lr_factor > 1.0 or self.lr_min < 0:
      raise ValueError(f"need lr_patience >= 0, lr_factor > 1, lr_min >= 0; got "
                       f"{self.lr_patience}, {self.lr_factor}, {self.lr_min}")
    if self.lr_patience > 0 and self.schedule != "constant":
      raise ValueError(f"lr_patience (validation-loss schedule) needs schedule='constant', "
                       f"got {self.schedule!r}")


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optax transformation for ``cfg`` (a fresh one per task, as the official codes).

  With ``lr_patience`` the learning rate is an injected hyper-parameter
  (``optax.inject_hyperparams``) that the loop lowers between epochs.
  """
  if cfg.lr_patience > 0:
    return optax.inject_hyperparams(
        lambda learning_rate: _optimizer(cfg, learning_rate))(learning_rate=cfg.learning_rate)
  total = max(1, cfg.epochs * steps_per_epoch)
  if cfg.schedule == "constant":
    lr = cfg.learning_rate
  elif cfg.schedule == "cosine":
    lr = optax.cosine_decay_schedule(cfg.learning_rate, total)
  else:
    epochs = max(cfg.epochs, 2)

    def lr(step):
      epoch = step // max(steps_per_epoch, 1)
      return cfg.learning_rate * jnp.cos(99 * jnp.pi * epoch / (200 * (epochs - 1)))
  return _optimizer(cfg, lr)


def _optimizer(cfg: TrainConfig, lr) -> optax.GradientTransformation:
  if cfg.optimizer == "sgd":
    opt = optax.sgd(lr)
  elif cfg.optimizer == "momentum":
    opt = optax.sgd(lr, momentum=cfg.momentum)
  elif cfg.optimizer == "adam":
    opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  else:
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  if cfg.weight_decay and cfg.optimizer in ("sgd", "momentum", "adam"):
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
  if cfg.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt


def check_finite_batch(arrays: dict[str, np.ndarray], where: str) -> None:
  x = arrays["x"]
  if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
    bad = int(np.sum(~np.isfinite(x)))
    raise ValueError(f"{where}: inputs contain {bad} NaN/Inf values")


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


# ----------------------------------------------------------------------------
# Batches: global index plans → per-process rows → sharded device arrays.


def _epoch_order(n: int, shuffle: bool, seed_words: tuple[int, ...]) -> np.ndarray:
  if not shuffle:
    return np.arange(n)
  return np.random.default_rng(list(seed_words)).permutation(n)


def _step_index_plan(order: np.ndarray, batch_size: int, padded: int) -> np.ndarray:
  """(steps, padded) example indices, -1 for padding rows (:func:`clx.methods.passes.index_plan`
  over ``order``; the padding rows are masked out of the model's batch statistics)."""
  plan = passes.index_plan(len(order), batch_size, padded)
  return np.where(plan < 0, -1, np.asarray(order, np.int64)[np.maximum(plan, 0)])


def _gather(split: ArraySplit, idx: np.ndarray) -> dict[str, np.ndarray]:
  safe = np.where(idx < 0, 0, idx)
  out = {"x": split.x[safe], "y": split.y[safe].astype(np.int32),
         "mask": (idx >= 0).astype(np.float32)}
  return out


def _tree_where(pred, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


@dataclasses.dataclass
class Fitter:
  """Runs training phases on a mesh; caches nothing across phases but the mesh."""

  mesh: jax.sharding.Mesh
  progress: bool | None = None
  quiet: bool = False
  last_fit: dict = dataclasses.field(default_factory=dict)  # epochs run, LR/val history

  def plan(self, n: int, batch_size: int, shuffle: bool, seed_words: tuple[int, ...]) -> np.ndarray:
    padded = sharding.pad_to_multiple(batch_size, sharding.num_data_shards(self.mesh))
    return _step_index_plan(_epoch_order(n, shuffle, seed_words), batch_size, padded)

  def device_batches(self, split: ArraySplit, plan: np.ndarray, where: str,
                     chunk: int | None = None) -> Iterator[tuple[dict[str, jax.Array], int, int]]:
    """Yield sharded arrays for ``plan`` rows: single steps or (chunk, B) stacks.

    Yields ``(arrays, steps, examples)``. When ``chunk`` is given, the last
    stack is padded with fully masked steps so every call has the same shape.
    """
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
    the same result up to float reduction order.
    """
    if len(split) == 0:
      raise ValueError(f"{title}: empty training split")
    if cfg.uses_validation and (val_split is None or len(val_split) == 0):
      raise ValueError(f"{title}: lr_patience/restore_best need the task's validation split "
                       "('val'), and this task has none; build the stream with a validation "
                       "fraction or turn them off")
    transform_grads = transform_grads or (lambda g, s: g)
    steps_per_epoch = math.ceil(len(split) / cfg.batch_size)
    optimizer = optimizer or make_optimizer(cfg, steps_per_epoch)
    padded = sharding.pad_to_multiple(cfg.batch_size, sharding.num_data_shards(self.mesh))
    resident = self.resident(split, cfg)
    chunk = cfg.steps_per_call
    if chunk <= 0 and _convolutions_on_cpu(loss, params, state, base, split, padded):
      chunk = 1  # see run_chunk: XLA:CPU convolutions are slow inside loops
    if chunk <= 0:
      per_step = padded * 8 if resident else padded * split.x[0].nbytes + padded * 8
      chunk = int(max(1, min(steps_per_epoch, cfg.max_chunk_mb * 2**20 // per_step)))
      chunk = _largest_divisor_at_most(steps_per_epoch, chunk)
    chunk = min(chunk, steps_per_epoch)
    # Chunks that tile the epoch exactly never contain fully padded steps.
    may_pad = steps_per_epoch % chunk != 0

    rep = sharding.replicated(self.mesh)
    # Copy: the chunk function donates its params buffers, and the caller's
    # state (e.g. the previous task's checkpoint delta) may still hold them.
    params = jax.tree.map(jnp.copy, jax.device_put(params, rep))
    opt_state = jax.device_put(optimizer.init(params), rep)
    data = None
    if resident:
      check_finite_batch(split.arrays, title)
      data = jax.device_put({"x": split.x, "y": split.y.astype(np.int32)}, rep)

    def one_step(carry, batch, data, state, base):
      params, opt_state, step = carry
      if data is not None:  # device-resident split: the batch is an index plan
        idx = batch["idx"]
        safe = jnp.maximum(idx, 0)
        batch = {"x": data["x"][safe], "y": data["y"][safe],
                 "mask": (idx >= 0).astype(jnp.float32)}
      step_rng = jax.random.fold_in(rng, step)
      (loss_value, aux), grads = jax.value_and_grad(loss, has_aux=True)(
          params, state, base, batch, step_rng)
      grads = transform_grads(grads, state)
      updates, new_opt_state = optimizer.update(grads, opt_state, params)
      if transform_updates is not None:
        updates = transform_updates(updates, state)
      new_params = optax.apply_updates(params, updates)
      if not may_pad:
        return (new_params, new_opt_state, step + 1), loss_value
      # Fully padded steps (end of the last chunk) must not move the optimiser.
      valid = jnp.sum(batch["mask"]) > 0
      params = _tree_where(valid, new_params, params)
      opt_state = _tree_where(valid, new_opt_state, opt_state)
      # where, not a product: a non-finite loss on a padded step must not leak
      # into the divergence check (NaN · 0 = NaN).
      return ((params, opt_state, step + valid.astype(jnp.int32)),
              jnp.where(valid, loss_value, jnp.zeros_like(loss_value)))

    # state and base are arguments, not closed-over constants: XLA would embed
    # them (the frozen backbone, GPM memories) in the program and compile slowly.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def run_chunk(params, opt_state, step, chunk_arrays, data, state, base):
      body = lambda carry, batch: one_step(carry, batch, data, state, base)  # noqa: E731
      if chunk == 1:
        # No loop at all: XLA:CPU runs convolutions inside while loops an order of
        # magnitude slower (AlexNet step: 2 s vs 0.2 s), so conv nets on CPU use
        # steps_per_call=1 (experiments/BENCHMARKS.md).
        carry, loss_value = body((params, opt_state, step), jax.tree.map(lambda a: a[0], chunk_arrays))
        return (*carry, loss_value[None])
      (params, opt_state, step), losses = jax.lax.scan(body, (params, opt_state, step), chunk_arrays)
      return params, opt_state, step, losses

    step = jax.device_put(jnp.zeros((), jnp.int32), rep)
    bar = TaskProgress(title, cfg.epochs * steps_per_epoch, enabled=self.progress, quiet=self.quiet)
    plateau = ValidationPlateau(cfg) if cfg.uses_validation else None
    val_fn = _validation_fn(loss) if plateau is not None else None
    best = None
    for epoch in range(cfg.epochs):
      plan = self.plan(len(split), cfg.batch_size, True, (*seed_words, epoch))
      batches = (self.index_chunks(plan, chunk) if resident
                 else self.device_batches(split, plan, title, chunk))
      # Divergence check, independent of display: every step's loss is reduced
      # on device into one flag, read once per epoch (no host sync per chunk).
      finite = None
      for arrays, steps, examples in batches:
        params, opt_state, step, losses = run_chunk(params, opt_state, step, arrays, data, state,
                                                    base)
        chunk_finite = _all_finite(losses)
        finite = chunk_finite if finite is None else finite & chunk_finite
        if bar.enabled or not self.quiet:  # the display reads the loss anyway: fail early
          last = float(losses[steps - 1])
          if not math.isfinite(last):
            raise TrainingDivergedError(title, epoch, cfg)
          bar.update(steps, examples, last)
      if finite is not None and not bool(finite):
        raise TrainingDivergedError(title, epoch, cfg)
      if plateau is not None:
        action = plateau.update(self.validation_loss(params, val_fn, val_split, cfg, state, base))
        if action == "best" and cfg.restore_best:
          best = jax.tree.map(jnp.copy, params)
        elif action == "lower":
          opt_state = opt_state._replace(hyperparams={
              **opt_state.hyperparams,
              "learning_rate": jax.device_put(jnp.asarray(plateau.lr, jnp.float32), rep)})
        elif action == "stop":
          break
    bar.close()
    self.last_fit = {"title": title, "epochs": epoch + 1 if cfg.epochs else 0,
                     **(plateau.summary() if plateau is not None else {})}
    return best if best is not None else params

  def validation_loss(self, params, fn: Callable, split: ArraySplit, cfg: TrainConfig,
                      state, base) -> float:
    """Mean loss over ``split``; ``fn`` from :func:`_validation_fn`."""
    plan = self.plan(len(split), cfg.eval_batch_size, False, (0,))
    sums = [fn(params, state, base, arrays) for arrays, _, _ in
            self.device_batches(split, plan, "validation")]
    return float(sum(float(a) for a, _ in sums) / max(sum(float(c) for _, c in sums), 1.0))

  def resident(self, split: ArraySplit, cfg: TrainConfig) -> bool:
    """Keep the split on device and gather batches there (small in-memory data)."""
    nbytes = split.x.nbytes + split.y.nbytes
    return cfg.device_data_mb > 0 and nbytes <= cfg.device_data_mb * 2**20

  def index_chunks(self, plan: np.ndarray, chunk: int):
    """Yield sharded ``{"idx": (chunk, B)}`` index stacks (-1 = padding row)."""
    for c in range(0, plan.shape[0], chunk):
      block = plan[c:c + chunk]
      steps = block.shape[0]
      if steps < chunk:
        block = np.concatenate([block, np.full((chunk - steps, block.shape[1]), -1, block.dtype)])
      rows = sharding.process_rows(plan.shape[1], self.mesh)
      local = {"idx": block[:, rows].astype(np.int32)}
      yield sharding.shard_arrays(local, self.mesh, 1, plan.shape[1]), steps, int((block >= 0).sum())


def _validation_fn(loss: Callable) -> Callable:
  """Jitted ``(params, state, base, batch) -> (loss · rows, rows)`` without dropout
  (``rng=None``, as the official ``model.eval()`` validation pass)."""

  def total(params, state, base, batch):
    value, _ = loss(params, state, base, batch, None)
    count = jnp.sum(batch["mask"])
    return value * count, count

  return jax.jit(total)


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


def _convolutions_on_cpu(loss: Callable, params, state, base, split: ArraySplit, rows: int) -> bool:
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


def _largest_divisor_at_most(n: int, cap: int) -> int:
  """The largest divisor of ``n`` that is ≤ ``cap``, unless it is tiny (then ``cap``)."""
  best = max(d for d in range(1, min(n, cap) + 1) if n % d == 0)
  return best if best * 4 >= min(n, cap) else min(n, cap)


# ----------------------------------------------------------------------------
# Evaluation.


def make_counter(predict: Callable) -> Callable:
  """Jitted ``(state, base, x, y, mask, class_mask) -> number correct``.

  ``predict(state, base, x, mask) -> (n, C)`` (:func:`clx.methods.passes.predict_fn`):
  the row mask reaches the model, so on batch-statistic backbones the padding
  rows of the last batch do not change the real rows' logits (the official
  code runs that batch alone). ``class_mask`` (C,) restricts the argmax to one
  task's classes (task-incremental scenario; all-True otherwise).
  """

  @jax.jit
  def count(state, base, x, y, mask, class_mask):
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
  correct = 0.0
  for arrays, _, _ in fitter.device_batches(split, plan, "eval"):
    correct += float(count(state, base, arrays["x"], arrays["y"], arrays["mask"], class_mask))
  return 100.0 * correct / len(split)


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

  @property
  def info(self) -> TaskInfo:
    """The static :class:`TaskInfo` of this task (``task_id`` None: training)."""
    return TaskInfo(self.task_index, self.spec)

  def batches(self, split: str = "train", *, batch_size: int | None = None,
              shuffle: bool = False, seed: int = 0):
    data = self._split(split)
    plan = self.fitter.plan(len(data), batch_size or self.config.eval_batch_size, shuffle,
                            (*self.seed_words, 7919, seed))
    for arrays, _, _ in self.fitter.device_batches(data, plan, f"task {self.task_index} {split}"):
      yield arrays

  def sample(self, n: int, *, split: str = "train", seed: int = 0):
    data = self._split(split)
    if n > len(data):
      raise ValueError(f"asked for {n} samples of task {self.task_index} {split}, it has {len(data)}")
    idx = np.random.default_rng([*self.seed_words, 104729, seed]).choice(len(data), n, replace=False)
    return {"x": data.x[idx], "y": data.y[idx].astype(np.int32)}

  def arrays(self, split: str = "train"):
    data = self._split(split)
    return {"x": data.x, "y": data.y.astype(np.int32)}

  def fit(self, params, loss, *, transform_grads=None, transform_updates=None, state=None,
          optimizer=None, epochs=None, config: TrainConfig | None = None,
          title: str | None = None, phase: int = 1):
    cfg = config or self.config
    if epochs is not None:
      cfg = dataclasses.replace(cfg, epochs=epochs)
    return self.fitter.fit(
        params, loss, self.train_split, cfg, state=state, base=self.base,
        rng=jax.random.fold_in(self.rng, phase), transform_grads=transform_grads,
        transform_updates=transform_updates, optimizer=optimizer,
        title=title or f"task {self.task_index} phase {phase}",
        seed_words=(*self.seed_words, phase),
        val_split=self.splits.get("val") if cfg.uses_validation else None)

  def _split(self, name: str) -> ArraySplit:
    if name == "train":
      return self.train_split
    split = self.splits.get(name)
    if split is None:
      raise ValueError(f"task {self.task_index} has no {name!r} split")
    return split


# ----------------------------------------------------------------------------
# Running a method over a stream.


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


def train_split_for(method: ContinualMethod, stream: Stream, t: int) -> ArraySplit:
  """The data a method trains on at task t (the union so far for joint training)."""
  if method.data_view == "cumulative":
    return concat_splits([s.train for s in stream.tasks[:t + 1]])
  return stream.tasks[t].train


@dataclasses.dataclass
class RunResult:
  method: str
  acc_matrix: np.ndarray  # (T, T) percent, NaN above the diagonal
  wall_time_s: float
  state: Any = None
  resumed_from: int | None = None


PLACEMENT_FIELDS = ("param_sharding", "model_parallel")  # TrainConfig fields not fingerprinted


def config_fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_method(method: ContinualMethod, stream: Stream, config: TrainConfig, *, seed: int = 0,
               mesh: jax.sharding.Mesh | None = None, checkpoint_dir: str | None = None,
               run_info: dict | None = None, progress: bool | None = None, quiet: bool = False,
               on_task_end: Callable[[int, np.ndarray], None] | None = None) -> RunResult:
  """Train ``method`` on every task of ``stream`` in order and evaluate after each.

  Args:
    method: the continual method.
    stream: the task stream.
    config: optimisation settings for the main training phase of each task.
    seed: run seed (model init, head init, shuffling); same seed → same numbers.
    mesh: device mesh (default: all devices on a ``data`` axis).
    checkpoint_dir: if given, one checkpoint step per task is written there and
      an existing directory is resumed from its last complete task.
    run_info: JSON metadata stored with each checkpoint (e.g. the experiment
      config); a resumed run must present the same fingerprint.
    progress: force the progress bar on/off (default: on for a TTY).

  Returns:
    A :class:`RunResult` with the (T, T) accuracy matrix in percent.
  """
  mesh = mesh or sharding.make_mesh(model_parallel=config.model_parallel)
  spec = StreamSpec.from_stream(stream)
  T = spec.num_tasks
  key = jax.random.PRNGKey(seed)
  fitter = Fitter(mesh, progress=progress, quiet=quiet)
  # Backbone and method state are placed as config.param_sharding says (clx/train/sharding.py).
  base = sharding.place_base(method.backbone.params, mesh, config.param_sharding)
  state = method.init(jax.random.fold_in(key, 0), spec)
  acc = np.full((T, T), np.nan)
  start, elapsed_before, resumed_from = 0, 0.0, None
  # Placement fields are left out: they change where arrays live, not the numbers (up to float
  # reduction order), so a run may resume on another layout, and workdirs written before those
  # fields existed keep resuming.
  numeric = {k: v for k, v in dataclasses.asdict(config).items() if k not in PLACEMENT_FIELDS}
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
      state, meta = checkpointer.restore_state(last, state, expect={"fingerprint": fingerprint})
      rows = meta["acc_matrix"]
      for t, row in enumerate(rows):
        acc[t, :len(row)] = row
      start, elapsed_before, resumed_from = last + 1, float(meta.get("wall_time_s", 0.0)), last

    t0 = time.perf_counter()
    for t in range(start, T):
      task = stream.tasks[t]
      rng_t = jax.random.fold_in(key, 1 + t)
      ctx = _Context(t, spec, rng_t, base, fitter, train_split_for(method, stream, t),
                     {"test": task.test, "val": task.val}, config, (seed, t))
      prev_state = state
      state = sharding.place_state(state, mesh, config.param_sharding)
      state = method.begin_task(state, ctx)
      state = sharding.place_state(state, mesh, config.param_sharding)
      params = method.trainable(state, ctx.info)
      loss = functools.partial(method.loss, info=ctx.info)
      params = ctx.fit(params, loss, transform_grads=method.transform_grads,
                       transform_updates=method.transform_updates, state=state,
                       title=f"{method.name} task {t + 1}/{T}", phase=0)
      state = method.combine(state, params, ctx.info)
      state = method.end_task(state, ctx)

      acc[t, :t + 1] = evaluate_row(method, state, base, stream, t, spec, fitter, config)
      if on_task_end is not None:
        on_task_end(t, acc)
      if checkpointer is not None:
        delta, removed = ckpt.state_delta(jax.device_get(prev_state), jax.device_get(state))
        meta = {"method": method.name, "task": t, "task_name": task.name, "fingerprint": fingerprint,
                "acc_matrix": [acc[r, :r + 1].tolist() for r in range(t + 1)],
                "wall_time_s": elapsed_before + time.perf_counter() - t0, "run": run_info or {}}
        checkpointer.save(t, delta, removed, meta)
    wall = elapsed_before + time.perf_counter() - t0
  finally:
    if checkpointer is not None:
      checkpointer.close()
  return RunResult(method.name, acc, wall, state, resumed_from)
