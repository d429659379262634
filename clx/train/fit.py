"""The one training step, shared by single runs and seed-batched runs.

:func:`make_train_step` builds the pure update of one step; the single-seed
loop (:meth:`clx.train.loop.Fitter.fit`) scans it over a chunk of steps and the
seed-batched loop (:func:`clx.train.seeds.fit_seeds`) scans its ``vmap`` over a
leading seed axis. :func:`chunk_steps` is the one rule for how many steps a
jitted call fuses (the conv-on-CPU rule included), and :func:`gather_rows` the
one gather of a device-resident split, so the two loops cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jax_core

from clx.data.types import ArraySplit

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


def steps_per_epoch(n: int, batch_size: int) -> int:
  """⌈n / batch_size⌉: the last batch of an epoch may be smaller."""
  return math.ceil(n / batch_size)


del np
