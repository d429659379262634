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
from clx.methods.base import ContinualMethod, StreamSpec, identity_grads
from clx.models.base import Backbone
from clx.ops import lora as lora_ops


def _features(backbone: Backbone, params, x, rng=None, mask=None):
  # rng/mask: dropout and batch statistics over real rows, on models that use them.
  return backbone.apply(params, x, rng=rng, mask=mask)


def _make(name: str, backbone: Backbone, *, effective_params, trainable_keys, init_extra,
          head_mode: str | None, data_view: str = "current") -> ContinualMethod:
  """Build a method whose forward is ``backbone(effective_params(state, base))``.

  ``trainable_keys`` are the top-level state entries optimised on every task
  (besides the current head); ``init_extra(rng, base)`` creates them.
  """
  if head_mode not in (None, "shared", "per_task"):
    raise ValueError(f"{name}: head_mode must be None, 'shared' or 'per_task', got {head_mode!r}")

  def mode_for(spec):
    return head_mode or heads_lib.default_mode(spec)

  def init(rng, spec: StreamSpec):
    k_head, k_extra = jax.random.split(rng)
    state = {"heads": heads_lib.init_heads(k_head, spec, backbone.feature_dim, mode_for(spec))}
    state.update(init_extra(k_extra, backbone.params))
    return state

  def begin_task(state, ctx):
    mode = mode_for(ctx.spec)
    key = jax.random.fold_in(ctx.rng, 0)
    heads = heads_lib.add_task_head(state["heads"], key, ctx.spec, backbone.feature_dim,
                                    ctx.task_index, mode)
    return {**state, "heads": heads}

  def head_key(state, task_index):
    return "shared" if "shared" in state["heads"] else str(task_index)

  def trainable(state, task_index):
    params = {k: state[k] for k in trainable_keys}
    params["head"] = state["heads"][head_key(state, task_index)]
    return params

  def merged(state, params, task_index):
    state = {**state, **{k: params[k] for k in trainable_keys}}
    heads = dict(state["heads"])
    heads[head_key(state, task_index)] = params["head"]
    return {**state, "heads": heads}

  def loss(params, state, base, batch, rng, *, task_index, spec):
    state = merged(state, params, task_index)
    feats = _features(backbone, effective_params(state, base), batch["x"], rng, batch["mask"])
    logits, labels = heads_lib.train_logits_and_labels(
        state["heads"], feats, batch["y"], spec, task_index, mode_for(spec),
        cumulative=data_view == "cumulative")
    loss_value = heads_lib.masked_cross_entropy(logits, labels, batch["mask"])
    return loss_value, {"accuracy": heads_lib.masked_accuracy(logits, labels, batch["mask"])}

  def end_task(state, params, ctx):
    return merged(state, params, ctx.task_index)

  def predict(state, base, x, *, current_task, task_id, spec, mask=None):
    del task_id  # the same network serves every task; the loop masks task-IL logits
    feats = _features(backbone, effective_params(state, base), x, mask=mask)
    return heads_lib.global_logits(state["heads"], feats, spec, mode_for(spec), current_task)

  return ContinualMethod(name=name, backbone=backbone, init=init, begin_task=begin_task,
                         trainable=trainable, loss=loss, transform_grads=identity_grads,
                         end_task=end_task, predict=predict, data_view=data_view)


def finetune(backbone: Backbone, *, head_mode: str | None = None) -> ContinualMethod:
  """Sequential full fine-tuning of the backbone and the current head."""
  return _make("finetune", backbone,
               effective_params=lambda state, base: state["backbone"],
               trainable_keys=("backbone",),
               init_extra=lambda rng, base: {"backbone": jax.tree.map(jnp.array, base)},
               head_mode=head_mode)


def joint(backbone: Backbone) -> ContinualMethod:
  """Joint training on all tasks seen so far, one shared head (upper bound)."""
  return _make("joint", backbone,
               effective_params=lambda state, base: state["backbone"],
               trainable_keys=("backbone",),
               init_extra=lambda rng, base: {"backbone": jax.tree.map(jnp.array, base)},
               head_mode="shared", data_view="cumulative")


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

  return _make("lora", backbone,
               effective_params=lambda state, base: lora_ops.apply_adapters(
                   base, state["adapters"], scale),
               trainable_keys=("adapters",), init_extra=init_extra, head_mode=head_mode)


REGISTRY = {"finetune": finetune, "lora": lora, "joint": joint}

