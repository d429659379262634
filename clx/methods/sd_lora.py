"""SD-LoRA (Wu et al., ICLR 2025), after ``WuYichen-97/SD-Lora-CL`` (``models/sdlora.py``,
``backbone/lora.py``; config ``exps/sdlora_c100.json``).

Each task trains a new rank-``r`` LoRA (``lora_rank`` 10) on the query and value projections
of every block, with a scalar magnitude ``α_t`` (init 0.8); the earlier tasks' LoRAs are
frozen *directions* ``A_i B_i / (‖A_i‖ ‖B_i‖)`` whose scalar magnitudes ``α_i`` keep being
learned (:mod:`clx.ops.sd_lora`). The head is one linear layer over the global label space
grown per task (``update_fc`` keeps the old rows); the loss is cross-entropy over the
current task's classes (``logits[:, known:]`` with shifted targets, ``_update_representation``
l.225–236; on task 0 that is every class seen). All magnitudes are reset to 0.8 at the start
of every task ≥ 1, because the code builds a fresh ``LoRA_ViT_timm`` there
(``_train`` l.109 → ``update_network``; ``wrapped_param_prev`` created with 0.8, l.326–328);
``reset_magnitudes=False`` keeps the learned values instead (the paper's description).
A factors: ``kaiming_uniform_(a=√5)``; B: zeros (``reset_parameters``). The head is PILOT's
``SimpleLinear`` (``models/sdlora.py`` l.25 ``IncrementalNet`` → ``utils/inc_net.py`` l.298
``generate_fc`` → ``backbone/linears.py`` l.27-29: ``kaiming_uniform_(nonlinearity='linear')``,
U(±√(3/d)), bias 0), ``head_init="simple_linear"``; ``"torch"`` (``nn.Linear``'s U(±1/√d) for
kernel and bias, this module's head before the fix) is kept as an option.
Optimiser (SGD, momentum 0.9, lr 8e-3, batch 128, 20 epochs; weight decay on task 0 commented
out in the code) belongs to the experiment.

The reduced variants of the paper: ``SD-LoRA-RR`` (rank 10 → 8 from task 4 → 6 from task 8,
commented out in ``update_network``) is ``rank_schedule=((0, 10), (4, 8), (8, 6))``;
SD-LoRA-KD is not in the code and not implemented.

State bytes per task: each finished task adds its ``(A, B)`` pairs (``2·r·d`` floats per
adapted projection) and nothing else, see :func:`state_bytes_per_task`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import prompting
from clx.methods.base import (Batch, ContinualMethod, Params, StreamSpec, TaskContext, TaskInfo,
                              no_host_hook)
from clx.ops.tree import to_key as site_key
from clx.models.base import Backbone
from clx.ops import lora as lora_ops
from clx.ops import sd_lora as sd_ops


@dataclasses.dataclass(frozen=True)
class SDLoRAConfig:
  """SD-LoRA's settings (defaults: ``exps/sdlora_c100.json``, ``backbone/lora.py``)."""

  lora_rank: int = 10
  sites: tuple[str, ...] = ("q", "v")
  init_magnitude: float = 0.8
  reset_magnitudes: bool = True
  rank_schedule: tuple[tuple[int, int], ...] | None = None
  head_init: str = "simple_linear"

  def __post_init__(self):
    object.__setattr__(self, "sites", tuple(self.sites))
    if self.head_init not in ("simple_linear", "torch"):
      raise ValueError(f"sd_lora: head_init must be 'simple_linear' (official) or 'torch', "
                       f"got {self.head_init!r}")
    if self.rank_schedule is not None:
      object.__setattr__(self, "rank_schedule", tuple(tuple(int(v) for v in p)
                                                      for p in self.rank_schedule))
      if self.rank_schedule[0][0] != 0 or any(r < 1 for _, r in self.rank_schedule):
        raise ValueError(f"sd_lora: rank_schedule must start at task 0 with positive ranks, "
                         f"got {self.rank_schedule}")
    if isinstance(self.lora_rank, bool) or self.lora_rank < 1:
      raise ValueError(f"sd_lora: lora_rank must be a positive int, got {self.lora_rank!r}")
    if not np.isfinite(self.init_magnitude):
      raise ValueError(f"sd_lora: init_magnitude must be finite, got {self.init_magnitude!r}")


Array = jax.Array
LoRA = dict[str, dict[str, Array]]  # {site key: {"a": (d_in, r), "b": (r, d_out)}}


class SDLoRAState(TypedDict):
  """SD-LoRA's state."""

  head: prompting.Head      # {"kernel": (d, C), "bias": (C,)}
  magnitudes: Array         # (T,) α_i of every task's direction
  directions: dict[str, LoRA]  # {finished task: its LoRA factors}
  lora: LoRA                # the current task's LoRA ({} outside a task)


def rank_for(cfg: SDLoRAConfig, task_index: int) -> int:
  """The LoRA rank of task ``t``.

  Args:
    cfg: the config.
    task_index: the task.

  Returns:
    ``rank_schedule``'s rank for ``t`` (SD-LoRA-RR), else ``lora_rank``.
  """
  if cfg.rank_schedule is None:
    return cfg.lora_rank
  return [r for start, r in cfg.rank_schedule if start <= task_index][-1]


def init(cfg: SDLoRAConfig, backbone: Backbone, rng: Array, spec: StreamSpec) -> SDLoRAState:
  """The head, the initial magnitudes, no directions and no current LoRA.

  Args:
    cfg: the config.
    backbone: the frozen backbone (its ``feature_dim`` is ``d``).
    rng: PRNG key.
    spec: the stream's spec.

  Returns:
    ``{"head", "magnitudes" (T,), "directions": {task: {site: {a, b}}}, "lora": {site: {a, b}}}``.
  """
  return {"head": prompting.init_head(rng, backbone.feature_dim, spec.num_classes, cfg.head_init),
          "magnitudes": jnp.full((spec.num_tasks,), cfg.init_magnitude, jnp.float32),
          "directions": {}, "lora": {}}


def begin_task(cfg: SDLoRAConfig, backbone: Backbone, state: SDLoRAState,
               ctx: TaskContext) -> SDLoRAState:
  """A fresh current LoRA (A Kaiming-uniform, B zero); magnitudes reset as the code does.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    state: the state before task ``t``.
    ctx: the loop's task context.

  Returns:
    The state with a new ``lora`` of rank :func:`rank_for` and, with ``reset_magnitudes`` on
    task ``t ≥ 1``, every magnitude back at ``init_magnitude``.
  """
  paths = backbone.site_paths(cfg.sites)
  fresh = lora_ops.init_lora(jax.random.fold_in(ctx.rng, 3), backbone.params, list(paths),
                             rank_for(cfg, ctx.task_index))
  mags = state["magnitudes"]
  if cfg.reset_magnitudes and ctx.task_index > 0:
    mags = jnp.full_like(mags, cfg.init_magnitude)
  return {**state, "lora": {site_key(p): fresh[p] for p in paths}, "magnitudes": mags}


def effective_params(cfg: SDLoRAConfig, backbone: Backbone, base: Params,
                     directions: dict[str, LoRA], lora: LoRA, magnitudes: Array,
                     task_index: int, *, current: bool) -> Params:
  """Base + the decoupled update of every site (:func:`clx.ops.sd_lora.decoupled_adapters`).

  ``W = W₀ + Σ_{i<t} α_i A_i B_i / (‖A_i‖ ‖B_i‖) (+ α_t A_t B_t when current)``: tasks
  ``0 … task_index − 1`` are directions; the current task's LoRA is added unnormalised when
  ``current`` (training and evaluation right after it, as the code's live module).

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    base: its parameters.
    directions: ``{task: LoRA}`` of the finished tasks.
    lora: the current task's LoRA (read only with ``current``).
    magnitudes: ``(T,)`` α.
    task_index: ``t``.
    current: add task ``t``'s LoRA.

  Returns:
    The effective backbone parameters (``base`` itself when nothing is added).
  """
  adapters = {}
  for path in backbone.site_paths(cfg.sites):
    key = site_key(path)
    past = [directions[str(i)][key] for i in range(task_index)]
    adapters[path] = sd_ops.decoupled_adapters(
        past, magnitudes[:task_index], lora[key] if current else None, magnitudes[task_index])
  adapters = {p: a for p, a in adapters.items() if a}
  return lora_ops.apply_adapters(base, adapters) if adapters else base


def trainable(state: SDLoRAState, info: TaskInfo) -> Params:
  """Task ``info.task``'s LoRA, the magnitudes and the head.

  Before :func:`combine` the LoRA is ``state["lora"]``; after it, the same factors are
  ``directions[str(task)]``, so ``trainable(combine(state, p, info), info)`` gives ``p`` back
  (the protocol's read-back, used by ``end_task`` hooks and by reports that count the trained
  parameters of a finished task from its checkpoint).

  Args:
    state: the state.
    info: the task being trained (or just trained).

  Returns:
    ``{"head", "lora", "magnitudes"}``.
  """
  lora = state["lora"]
  if not lora and str(info.task) in state["directions"]:  # after combine
    lora = state["directions"][str(info.task)]
  return {"head": state["head"], "lora": lora, "magnitudes": state["magnitudes"]}


def loss(cfg: SDLoRAConfig, backbone: Backbone, params: Params, state: SDLoRAState,
         base: Params, batch: Batch, rng: Array | None,
         info: TaskInfo) -> tuple[Array, dict[str, Array]]:
  """Cross-entropy over the current task's classes through the decoupled network.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    params: ``{"head", "lora", "magnitudes"}``.
    state: the state (its ``directions``).
    base: the backbone's parameters.
    batch: ``{"x", "y", "mask"}``.
    rng: unused (no dropout).
    info: the task being trained.

  Returns:
    ``(loss, {"accuracy"})``, scalars.
  """
  del rng
  task_index, spec = info.task, info.spec
  eff = effective_params(cfg, backbone, base, state["directions"], params["lora"],
                         params["magnitudes"], task_index, current=True)
  feats = backbone.apply(eff, batch["x"], mask=batch["mask"]).astype(jnp.float32)
  ce, acc = prompting.current_task_loss(params["head"], feats, batch["y"], batch["mask"], spec,
                                        task_index)
  return ce, {"accuracy": acc}


def combine(state: SDLoRAState, params: Params, info: TaskInfo) -> SDLoRAState:
  """Write back; the finished task's LoRA becomes a frozen direction.

  Args:
    state: the state.
    params: :func:`trainable`'s params after training.
    info: the task just trained.

  Returns:
    The state with the head and magnitudes replaced, ``directions[t]`` the trained LoRA and
    no current LoRA.
  """
  t = info.task
  return {**state, "head": params["head"], "magnitudes": params["magnitudes"], "lora": {},
          "directions": {**state["directions"], str(t): params["lora"]}}


def params_for(cfg: SDLoRAConfig, backbone: Backbone, state: SDLoRAState, base: Params,
               info: TaskInfo) -> Params:
  """The backbone parameters used after task ``info.task`` (see :func:`predict`).

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    state: the state after task ``t``.
    base: the backbone's parameters.
    info: the last trained task.

  Returns:
    :func:`effective_params` with task ``t``'s LoRA unnormalised.
  """
  return effective_params(cfg, backbone, base, state["directions"],
                          state["directions"][str(info.task)], state["magnitudes"], info.task,
                          current=True)


def predict(cfg: SDLoRAConfig, backbone: Backbone, state: SDLoRAState, base: Params, x: Array,
            info: TaskInfo, mask: Array | None = None) -> Array:
  """The live network after task ``t``: tasks < t as directions, task t's LoRA unnormalised.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    state: the state.
    base: the backbone's parameters.
    x: ``(n, ...)`` inputs.
    info: the last trained task.
    mask: ``(n,)`` real-row mask, or ``None``.

  Returns:
    ``(n, C)`` logits, unseen classes at −∞.
  """
  feats = backbone.apply(params_for(cfg, backbone, state, base, info), x, mask=mask)
  return prompting.seen_logits(state["head"], feats.astype(jnp.float32), info.spec, info.task)


def state_bytes_per_task(state: SDLoRAState) -> dict[str, int]:
  """Bytes each finished task's direction adds to the state (float32 ``A`` and ``B``).

  Args:
    state: the state.

  Returns:
    ``{task: bytes}``.
  """
  return {t: int(sum(np.asarray(v).nbytes for v in jax.tree.leaves(entry)))
          for t, entry in state["directions"].items()}


def diagnostics(state: SDLoRAState) -> dict[str, Any]:
  """The magnitudes and the bytes of each direction.

  Args:
    state: the state.

  Returns:
    ``{"magnitudes": [α_i], "direction_bytes": {task: bytes}}``.
  """
  return {"magnitudes": [float(m) for m in np.asarray(state["magnitudes"])],
          "direction_bytes": state_bytes_per_task(state)}


def sd_lora(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """SD-LoRA on a frozen backbone.

  Args:
    backbone: the frozen backbone (its ``sites`` are resolved now: unknown roles fail here).
    **kwargs: :class:`SDLoRAConfig` fields.

  Returns:
    The :class:`ContinualMethod` ``"sd_lora"``.
  """
  cfg = SDLoRAConfig(**kwargs)
  backbone.site_paths(cfg.sites)  # unknown roles fail at build time
  bound = lambda fn: functools.partial(fn, cfg, backbone)
  return ContinualMethod(
      name="sd_lora", backbone=backbone, init=bound(init), begin_task=bound(begin_task),
      trainable=trainable, loss=bound(loss), combine=combine, end_task=no_host_hook,
      predict=bound(predict), params_for=bound(params_for), diagnostics=diagnostics)


REGISTRY = {"sd_lora": sd_lora}
