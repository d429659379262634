"""Baselines: sequential full fine-tuning, sequential LoRA and joint training.

- ``finetune``: every backbone parameter and the current head are trained on
  each task in turn (the lower bound every method must beat).
- ``lora``: one set of LoRA adapters on the chosen sites, trained on each task
  in turn (no protection): the baseline InfLoRA/PROTEUS improve on.
- ``joint``: full fine-tuning on the union of all tasks seen so far with one
  shared head (the multi-task upper bound).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods.base import (ContinualMethod, Params, State, StreamSpec, TaskContext, TaskInfo,
                              check_positive_int, no_host_hook, renamed)
from clx.models.base import Backbone
from clx.ops import lora as lora_ops

LORA_RENAMED = {"rank": "lora_rank", "alpha": "lora_alpha", "targets": "sites"}
LORA_COMPUTE = ("factored", "merged")
"""How a LoRA method's forward computes its adapters: ``"factored"`` runs the backbone on the
frozen base with the branch ``scale·(x a) b`` at each adapted site (``Backbone.apply(adapters=)``);
``"merged"`` runs it on ``W + scale·a b`` (:func:`clx.ops.lora.apply_adapters`). Equal up to float
rounding; factored avoids the dense (d_in, d_out) kernel gradient of every adapted site in the
backward pass. The default stays ``"merged"`` (bit-identical to every earlier result): on the
shared 2-core CPU the factored step measured no faster (BENCHMARKS.md, MiniLM LoRA step)."""


def check_lora_compute(value: str, who: str) -> None:
  """Raises ValueError unless ``value`` is one of :data:`LORA_COMPUTE`.

  Args:
    value: the ``lora_compute`` option.
    who: the method, for the message.

  Raises:
    ValueError: ``value`` is not in :data:`LORA_COMPUTE`.
  """
  if value not in LORA_COMPUTE:
    raise ValueError(f"{who}: lora_compute must be one of {LORA_COMPUTE}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Sequential LoRA's settings (see :func:`lora`); validated on construction."""

  lora_rank: int = 8
  sites: tuple[str, ...] = ("*kernel",)
  lora_alpha: float | None = None
  head_mode: str | None = None
  lora_compute: str = "merged"

  def __post_init__(self):
    check_positive_int(self.lora_rank, "lora: lora_rank (rank)")
    check_lora_compute(self.lora_compute, "lora")
    alpha = self.lora_alpha
    if alpha is not None and (isinstance(alpha, bool) or not np.isfinite(alpha) or alpha <= 0):
      raise ValueError(f"lora: lora_alpha (alpha) must be a positive finite number or None, "
                       f"got {alpha!r}")
    heads_lib.check_mode(self.head_mode, "lora")
    object.__setattr__(self, "sites", (self.sites,) if isinstance(self.sites, str)
                       else tuple(self.sites))

  @property
  def scale(self) -> float:
    """The adapter scale ``lora_alpha / lora_rank`` (1 when ``lora_alpha`` is None)."""
    return (self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / self.lora_rank


def lora_patterns(backbone: Backbone, sites: tuple[str, ...]) -> tuple[str, ...]:
  """Kernel globs of ``sites``: a backbone role (``"k"``) stands for its kernel paths,
  anything else is a glob / path over the parameter tree (``"*attention/key/kernel"``).

  Args:
    backbone: the network (its ``sites`` roles).
    sites: roles, kernel paths or globs.

  Returns:
    The patterns, duplicates dropped, in order.
  """
  out: list[str] = []
  for entry in sites:
    out.extend(backbone.sites[entry] if entry in backbone.sites else (entry,))
  return tuple(dict.fromkeys(out))


def init(backbone: Backbone, head_mode: str | None, init_extra: Callable, rng: jax.Array,
         spec: StreamSpec) -> State:
  """Heads (empty for per-task heads) and the trained entries ``init_extra(rng, base)``.

  Args:
    backbone: the network.
    head_mode: ``None`` (scenario default), ``"shared"`` or ``"per_task"``.
    init_extra: ``(rng, base params) -> {entry: value}`` of the trained entries.
    rng: the method's key (split between the heads and ``init_extra``).
    spec: the stream.

  Returns:
    ``{"heads", **init_extra(...)}``.
  """
  k_head, k_extra = jax.random.split(rng)
  mode = heads_lib.mode_for(head_mode, spec)
  state = {"heads": heads_lib.init_heads(k_head, spec, backbone.feature_dim, mode)}
  state.update(init_extra(k_extra, backbone.params))
  return state


def begin_task(backbone: Backbone, head_mode: str | None, state: State,
               ctx: TaskContext) -> State:
  """Add the task's head (per-task heads; shared heads exist from the start).

  Args:
    backbone: the network (its feature size).
    head_mode: the head mode option.
    state: the state after the previous task.
    ctx: the loop's context (``rng`` folded with 0 for the head).

  Returns:
    The state with the task's head.
  """
  heads = heads_lib.add_task_head(state["heads"], jax.random.fold_in(ctx.rng, 0), ctx.spec,
                                  backbone.feature_dim, ctx.task_index,
                                  heads_lib.mode_for(head_mode, ctx.spec))
  return {**state, "heads": heads}


def trainable(keys: tuple[str, ...], state: State, info: TaskInfo) -> Params:
  """The state entries ``keys`` and the current head.

  Args:
    keys: the state entries trained (``("backbone",)`` or ``("adapters",)``).
    state: the current state.
    info: ``info.task`` selects the head.

  Returns:
    ``{key: state[key] for key in keys}`` plus ``"head"``.
  """
  params = {k: state[k] for k in keys}
  params["head"] = state["heads"][heads_lib.head_key(state["heads"], info.task)]
  return params


def combine(keys: tuple[str, ...], state: State, params: Params, info: TaskInfo) -> State:
  """Write the trained entries ``keys`` and the current head back.

  Args:
    keys: the state entries trained.
    state: the state before the step.
    params: the trained parameters of :func:`trainable`.
    info: ``info.task`` selects the head.

  Returns:
    The new state (pure).
  """
  state = {**state, **{k: params[k] for k in keys}}
  return heads_lib.with_head(state, params["head"], info.task)


def full_params(state: State, base: Params, info: TaskInfo) -> Params:
  """Effective backbone params of full fine-tuning: the trained copy in ``state["backbone"]``.

  Args:
    state: the state (its ``backbone``).
    base: the frozen base params (unused).
    info: unused.

  Returns:
    ``state["backbone"]``.
  """
  del base, info
  return state["backbone"]


def lora_params(scale: float, state: State, base: Params, info: TaskInfo) -> Params:
  """Effective backbone params of sequential LoRA: W + scale · a @ b at every adapted kernel.

  Args:
    scale: ``lora_alpha / lora_rank``.
    state: the state (its ``adapters`` ``{site: {"a" (d_in, r), "b" (r, d_out)}}``).
    base: the frozen base params.
    info: unused.

  Returns:
    ``base`` with the deltas added (same tree).
  """
  del info
  return lora_ops.apply_adapters(base, state["adapters"], scale)


def frozen_base(state: State, base: Params, info: TaskInfo) -> Params:
  """The forward's params of a factored LoRA method: the frozen base itself.

  Args:
    state: unused.
    base: the frozen base params.
    info: unused.

  Returns:
    ``base``.
  """
  del state, info
  return base


def lora_forward_kwargs(scale: float, state: State, info: TaskInfo) -> dict:
  """``backbone.apply`` arguments of factored sequential LoRA: the adapters and their scale.

  Args:
    scale: ``lora_alpha / lora_rank``.
    state: the state (its ``adapters``).
    info: unused.

  Returns:
    ``{"adapters": state["adapters"], "adapter_scale": scale}``.
  """
  del info
  return {"adapters": state["adapters"], "adapter_scale": scale}


def _copy_of_base(rng: jax.Array, base: Params) -> State:
  del rng
  return {"backbone": jax.tree.map(jnp.array, base)}


def _make(name: str, backbone: Backbone, *, params_for: Callable, trainable_keys: tuple[str, ...],
          init_extra: Callable, head_mode: str | None, data_view: str = "current",
          forward: tuple[Callable, Callable] | None = None) -> ContinualMethod:
  """A method whose forward is ``backbone(params_for(state, base, info))``, training
  ``trainable_keys`` of the state (made by ``init_extra(rng, base)``) and the current head.
  ``forward`` = ``(forward_params, forward_kwargs)`` replaces that forward in ``loss`` and
  ``predict`` by ``backbone.apply(forward_params(...), x, **forward_kwargs(state, info))``
  (factored LoRA); ``params_for`` stays the public effective-params function."""
  heads_lib.check_mode(head_mode, name)
  comb = functools.partial(combine, trainable_keys)
  fwd_params, fwd_kwargs = forward if forward is not None else (params_for, None)
  return ContinualMethod(
      name=name, backbone=backbone, init=functools.partial(init, backbone, head_mode, init_extra),
      begin_task=functools.partial(begin_task, backbone, head_mode),
      trainable=functools.partial(trainable, trainable_keys),
      loss=heads_lib.classification_loss(backbone, fwd_params, comb, head_mode=head_mode,
                                         cumulative=data_view == "cumulative",
                                         forward_kwargs=fwd_kwargs),
      combine=comb, end_task=no_host_hook, params_for=params_for,
      predict=heads_lib.classification_predict(backbone, fwd_params, head_mode=head_mode,
                                               forward_kwargs=fwd_kwargs),
      data_view=data_view)


def finetune(backbone: Backbone, *, head_mode: str | None = None) -> ContinualMethod:
  """Sequential full fine-tuning of the backbone and the current head.

  Args:
    backbone: the network (all of it is trained).
    head_mode: ``None`` (scenario default), ``"shared"`` or ``"per_task"``.

  Returns:
    The method.
  """
  return _make("finetune", backbone, params_for=full_params, trainable_keys=("backbone",),
               init_extra=_copy_of_base, head_mode=head_mode)


def joint(backbone: Backbone) -> ContinualMethod:
  """Joint training on all tasks seen so far, one shared head (upper bound).

  Args:
    backbone: the network (all of it is trained).

  Returns:
    The method (trained on the cumulative data view).
  """
  return _make("joint", backbone, params_for=full_params, trainable_keys=("backbone",),
               init_extra=_copy_of_base, head_mode="shared", data_view="cumulative")


def lora(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """Sequential LoRA: one adapter set on ``sites``, trained on every task in turn.

  The delta on a matched kernel ``W`` (d_in, d_out) is ``(lora_alpha / lora_rank) · a @ b``
  with ``a`` (d_in, lora_rank) Kaiming-uniform and ``b`` (lora_rank, d_out) zero at init,
  so training starts from the base model.

  Args:
    backbone: the network (frozen; only adapters and heads train).
    **kwargs: :class:`LoRAConfig` fields: ``lora_rank`` (formerly ``rank``, default 8),
      ``sites`` (formerly ``targets``: backbone roles such as ``"k"`` and/or kernel globs,
      default every kernel), ``lora_alpha`` (formerly ``alpha``; default ``lora_rank``),
      ``head_mode``. The old names still work for one release (DeprecationWarning).

  Returns:
    The method.

  Raises:
    TypeError: an unknown option, or an option under both its old and its new name.
    ValueError: invalid options; a rank above a kernel's width or no matched kernel (the
      build-time dry run).
  """
  cfg = LoRAConfig(**renamed(kwargs, LORA_RENAMED, "lora"))
  patterns = lora_patterns(backbone, cfg.sites)
  # Shape-only dry run of the adapter init: a rank above a kernel's width (or no
  # matched kernel) fails here, at build time, before any data loads.
  jax.eval_shape(lambda: lora_ops.init_lora(jax.random.PRNGKey(0), backbone.params, patterns,
                                            cfg.lora_rank))

  def init_extra(rng, base):
    return {"adapters": lora_ops.init_lora(rng, base, patterns, cfg.lora_rank)}

  return _make("lora", backbone, params_for=functools.partial(lora_params, cfg.scale),
               trainable_keys=("adapters",), init_extra=init_extra, head_mode=cfg.head_mode)


REGISTRY = {"finetune": finetune, "lora": lora, "joint": joint}
