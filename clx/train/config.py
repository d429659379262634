"""Optimisation settings of a training phase (:class:`TrainConfig`) and its optax optimiser."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import numpy as np
import optax

from clx.ops import schedules
from clx.train import sharding

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
EVALUATE_AFTER = ("each_task", "last_task")
# Accepted for one release with a DeprecationWarning: {old name: what replaces it}.
DEPRECATED_SCHEDULES = {
    "inflora_cosine": "InfLoRA's per-epoch cosine is supplied by the method "
                      "(method_args lr_schedule='epoch_cosine') or by the caller "
                      "(run_method(..., lr_schedule=clx.ops.schedules.epoch_cosine(lr, epochs)))",
}


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
    schedule: ``constant`` or ``cosine`` (per step to 0). A method or an
      experiment may supply its own schedule instead (the method's
      ``lr_schedule`` field, ``run_method(..., lr_schedule=)``), e.g. InfLoRA's
      per-epoch cosine; the old name ``inflora_cosine`` still selects that one
      for one release, with a DeprecationWarning.
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
    evaluate_after: ``each_task`` (the accuracy matrix's every row) or
      ``last_task`` (only its last row: the final ACC, e.g. for a learning-rate
      search; the other rows stay NaN, so AIA, BWT and forgetting are not
      defined). Training, and so every state and the last row, do not depend on it.
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
  evaluate_after: str = "each_task"

  @property
  def uses_validation(self) -> bool:
    return self.lr_patience > 0 or self.restore_best

  def __post_init__(self):
    # Every value is range-checked here, at config time, so a bad value fails
    # before any data loads instead of training silently wrong (a negative
    # grad_clip flips the gradients, a negative weight_decay grows weights).
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
    if self.schedule in DEPRECATED_SCHEDULES:
      warnings.warn(f"TrainConfig(schedule={self.schedule!r}) is deprecated and goes away in the "
                    f"next release: {DEPRECATED_SCHEDULES[self.schedule]}", DeprecationWarning,
                    stacklevel=3)
    elif self.schedule not in SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
    if self.evaluate_after not in EVALUATE_AFTER:
      raise ValueError(f"evaluate_after must be one of {EVALUATE_AFTER}, got "
                       f"{self.evaluate_after!r}")
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


ScheduleFactory = Callable[[int], "float | optax.Schedule"]  # steps_per_epoch → learning rate


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int,
                   lr_schedule: ScheduleFactory | None = None) -> optax.GradientTransformation:
  """The optax transformation for ``cfg`` (a fresh one per task, as the official codes).

  With ``lr_patience`` the learning rate is an injected hyper-parameter
  (``optax.inject_hyperparams``) that the loop lowers between epochs.

  Args:
    cfg: the phase's settings.
    steps_per_epoch: optimiser steps of one epoch.
    lr_schedule: a schedule supplied by the method or the experiment
      (``steps_per_epoch -> float | optax.Schedule``), used instead of
      ``cfg.schedule`` (not with ``lr_patience``).
  """
  if cfg.lr_patience > 0:
    if lr_schedule is not None:
      raise ValueError("lr_patience (validation-loss schedule) cannot be combined with a "
                       "supplied lr_schedule")
    return optax.inject_hyperparams(
        lambda learning_rate: _optimizer(cfg, learning_rate))(learning_rate=cfg.learning_rate)
  return _optimizer(cfg, learning_rate_schedule(cfg, steps_per_epoch, lr_schedule))


def learning_rate_schedule(cfg: TrainConfig, steps_per_epoch: int,
                           lr_schedule: ScheduleFactory | None = None) -> float | optax.Schedule:
  """The learning rate of ``cfg`` as optax takes it: a float or ``step -> lr``.

  ``lr_schedule(steps_per_epoch)`` when a schedule is supplied, else
  ``cfg.schedule``. (With ``lr_patience`` the rate is an injected
  hyper-parameter instead; see :func:`make_optimizer`.)

  Args:
    cfg: the phase's settings.
    steps_per_epoch: optimiser steps of one epoch.
    lr_schedule: a schedule supplied by the method or the experiment, or ``None``.

  Returns:
    The learning rate: a float (constant) or an optax schedule ``step -> lr``.
  """
  if lr_schedule is not None:
    return lr_schedule(steps_per_epoch)
  if cfg.schedule == "constant":
    return cfg.learning_rate
  if cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(cfg.learning_rate, max(1, cfg.epochs * steps_per_epoch))
  # The deprecated name maps to the schedule InfLoRA now supplies itself (one release).
  return schedules.epoch_cosine(cfg.learning_rate, cfg.epochs)(steps_per_epoch)


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
