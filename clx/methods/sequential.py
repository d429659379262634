"""Baselines: sequential full fine-tuning, sequential LoRA and joint training.

- ``finetune``: every backbone parameter and the current head are trained on
  each task in turn (the lower bound every method must beat).
- ``lora``: one set of LoRA adapters on the chosen sites, trained on each task
  in turn (no protection): the baseline InfLoRA/PROTEUS improve on.
- ``joint``: full fine-tuning on the union of all tasks seen so far with one
  shared head (the multi-task upper bound).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods.base import (ContinualMethod, Params, State, StreamSpec, TaskInfo,
                              no_host_hook)
from clx.models.base import Backbone
from clx.ops import lora as lora_ops


def _make(name: str, backbone: Backbone, *, params_for, trainable_keys: tuple[str, ...],
          init_extra, head_mode: str | None, data_view: str = "current") -> ContinualMethod:
  """Build a method whose forward is ``backbone(params_for(state, base, info))``.

  ``trainable_keys`` are the top-level state entries optimised on every task
  (besides the current head); ``init_extra(rng, base)`` creates them.
  """
  heads_lib.check_mode(head_mode, name)

  def init(rng, spec: StreamSpec):
    k_head, k_extra = jax.random.split(rng)
    mode = heads_lib.mode_for(head_mode, spec)
    state = {"heads": heads_lib.init_heads(k_head, spec, backbone.feature_dim, mode)}
    state.update(init_extra(k_extra, backbone.params))
    return state

  def begin_task(state, ctx):
    key = jax.random.fold_in(ctx.rng, 0)
    heads = heads_lib.add_task_head(state["heads"], key, ctx.spec, backbone.feature_dim,
                                    ctx.task_index, heads_lib.mode_for(head_mode, ctx.spec))
    return {**state, "heads": heads}

  def trainable(state, info: TaskInfo):
    params = {k: state[k] for k in trainable_keys}
    params["head"] = state["heads"][heads_lib.head_key(state["heads"], info.task)]
    return params

  def combine(state, params, info: TaskInfo):
    state = {**state, **{k: params[k] for k in trainable_keys}}
    return heads_lib.with_head(state, params["head"], info.task)

  loss = heads_lib.classification_loss(backbone, params_for, combine, head_mode=head_mode,
                                       cumulative=data_view == "cumulative")
  predict = heads_lib.classification_predict(backbone, params_for, head_mode=head_mode)
  return ContinualMethod(name=name, backbone=backbone, init=init, begin_task=begin_task,
                         trainable=trainable, loss=loss, combine=combine, end_task=no_host_hook,
                         predict=predict, params_for=params_for, data_view=data_view)


def full_params(state: State, base: Params, info: TaskInfo) -> Params:
  """Effective backbone params of full fine-tuning: the trained copy in ``state["backbone"]``."""
  del base, info
  return state["backbone"]


def _copy_of_base(rng: jax.Array, base: Params) -> State:
  del rng
  return {"backbone": jax.tree.map(jnp.array, base)}


def finetune(backbone: Backbone, *, head_mode: str | None = None) -> ContinualMethod:
  """Sequential full fine-tuning of the backbone and the current head."""
  return _make("finetune", backbone, params_for=full_params, trainable_keys=("backbone",),
               init_extra=_copy_of_base, head_mode=head_mode)


def joint(backbone: Backbone) -> ContinualMethod:
  """Joint training on all tasks seen so far, one shared head (upper bound)."""
  return _make("joint", backbone, params_for=full_params, trainable_keys=("backbone",),
               init_extra=_copy_of_base, head_mode="shared", data_view="cumulative")


def lora(backbone: Backbone, *, rank: int = 8, targets: tuple[str, ...] = ("*kernel",),
         alpha: float | None = None, head_mode: str | None = None) -> ContinualMethod:
  """Sequential LoRA: one adapter set on ``targets``, trained on every task in turn.

  The delta on a matched kernel ``W`` (d_in, d_out) is ``(alpha / rank) · a @ b``
  with ``a`` (d_in, rank) Kaiming-uniform and ``b`` (rank, d_out) zero at init,
  so training starts from the base model. ``alpha`` defaults to ``rank``.
  """
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"lora: rank must be a positive integer, got {rank!r}")
  # Shape-only dry run of the adapter init: rank above a kernel's width (or no
  # matched kernel) fails here, at build time, before any data loads.
  jax.eval_shape(lambda: lora_ops.init_lora(jax.random.PRNGKey(0), backbone.params, targets, rank))
  if alpha is not None and (isinstance(alpha, bool) or not np.isfinite(alpha) or alpha <= 0):
    raise ValueError(f"lora: alpha must be a positive finite number or None, got {alpha!r}")
  scale = (alpha if alpha is not None else rank) / rank

  def init_extra(rng, base):
    return {"adapters": lora_ops.init_lora(rng, base, targets, rank)}

  def params_for(state, base, info):
    del info
    return lora_ops.apply_adapters(base, state["adapters"], scale)

  return _make("lora", backbone, params_for=params_for, trainable_keys=("adapters",),
               init_extra=init_extra, head_mode=head_mode)


REGISTRY = {"finetune": finetune, "lora": lora, "joint": joint}

