"""L2P, Learning to Prompt (Wang et al., CVPR 2022), after ``google-research/l2p``.

A pool of ``P`` prompts ``(P, Lp, d)`` with learned keys ``(P, d)``. For an input, the
frozen backbone's pooled feature is the query; the ``k`` keys most cosine-similar to it
pick the prompts (``models/prompt.py`` l.216–223), which are prepended to the input tokens
(``e_prompt_layer_idx=[0]``, prompt-tuning, not prefix-tuning). With ``batchwise=True``
(the config's ``batchwise_prompt``) every row of a batch uses the ``k`` ids most often
chosen in that batch (l.224–229), at training and at test time. The loss is the masked
cross-entropy of the current task's classes minus ``pull_coeff`` times the surrogate
``reduce_sim`` (``train_continual.py`` l.294–295). Prompts, keys and head are trained; the
backbone is frozen (``freeze_part = ["encoder", "embedding", "cls"]``). Defaults are
``configs/cifar100_l2p.py`` (l.96–106): pool 10, prompt length 10, top-k 4, uniform U[0, 0.01) init of prompts and keys (flax ``uniform()``),
zero-initialised head, pull coefficient 1. Optimiser settings of that config (Adam,
lr 0.03, constant, batch 16 per device, 5 epochs, gradient clip 1.0) are the
experiment's ``train`` settings, not method fields.

Departures (documented, not silent):

- Features: the official default classifier is ``vit_classifier="prompt"`` (the mean of the
  prompt positions' outputs); here the backbone's own pooled feature is classified (the CLS
  token for ViT as with ``"token"``, the mean over real tokens for MiniLM), because the
  backbone contract returns pooled features only.
- Token order: the code puts the prompts in front of the CLS token, here they follow it;
  prompts carry no position embedding in either, so attention sees the same set.
- Task retrieval diagnostic (not in the code, whose pool is not task-assigned): each prompt
  is owned by the task whose training data selected it most (``state["usage"]``, counted
  at the end of each task); a row's retrieved task is the owner of its top-1 prompt
  (:func:`retrieved_task`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import prompting
from clx.methods.base import (Batch, ContinualMethod, Params, StreamSpec, TaskContext, TaskInfo,
                              check_positive_int, to_host)
from clx.models.base import Backbone
from clx.ops import prompts as prompt_ops

Array = jax.Array
TRAINED = ("head", "prompt", "key")


@dataclasses.dataclass(frozen=True)
class L2PConfig:
  """L2P's settings (defaults: ``configs/cifar100_l2p.py``).

  Attributes:
    pool_size: prompts in the pool ``P``.
    length: tokens per prompt ``Lp``.
    top_k: prompts chosen per input ``k`` (≤ ``pool_size``).
    batchwise: every row of a batch uses the batch's ``k`` most chosen prompts.
    pull_coeff: weight of the surrogate ``reduce_sim`` in the loss (≥ 0).
    init_scale: prompts and keys start ``U[0, init_scale)``.
    head_init: ``"zeros"`` (the code) or ``"torch"``.
    aux_batch_size: batch size of the end-of-task usage count.
  """

  pool_size: int = 10
  length: int = 10
  top_k: int = 4
  batchwise: bool = True
  pull_coeff: float = 1.0
  init_scale: float = 1e-2
  head_init: str = "zeros"
  aux_batch_size: int = 128

  def __post_init__(self):
    for name in ("pool_size", "length", "top_k", "aux_batch_size"):
      check_positive_int(getattr(self, name), f"l2p: {name}")
    if self.top_k > self.pool_size:
      raise ValueError(f"l2p: top_k {self.top_k} exceeds pool_size {self.pool_size}")
    if not np.isfinite(self.pull_coeff) or self.pull_coeff < 0:
      raise ValueError(f"l2p: pull_coeff must be finite and >= 0, got {self.pull_coeff!r}")
    prompting.check_head_init("l2p", self.head_init)


class L2PState(TypedDict):
  """L2P's state (every entry but ``usage`` is trained on every task)."""

  head: prompting.Head  # {"kernel": (d, C), "bias": (C,)}
  prompt: Array         # (P, Lp, d)
  key: Array            # (P, d)
  usage: Array          # (T, P) float32: how often task t's training data chose each prompt


def init(cfg: L2PConfig, backbone: Backbone, rng: Array, spec: StreamSpec) -> L2PState:
  """The initial state: ``U[0, init_scale)`` prompts and keys, the head, zero usage.

  Args:
    cfg: the config.
    backbone: the frozen backbone (its ``feature_dim`` is ``d``).
    rng: PRNG key.
    spec: the stream's spec.

  Returns:
    ``{"head", "prompt" (P, Lp, d), "key" (P, d), "usage" (T, P)}``.
  """
  d = backbone.feature_dim
  k_head, k_prompt, k_key = jax.random.split(rng, 3)
  return {"head": prompting.init_head(k_head, d, spec.num_classes, cfg.head_init),
          "prompt": prompting.uniform(k_prompt, (cfg.pool_size, cfg.length, d), cfg.init_scale),
          "key": prompting.uniform(k_key, (cfg.pool_size, d), cfg.init_scale),
          "usage": jnp.zeros((spec.num_tasks, cfg.pool_size), jnp.float32)}


def select(cfg: L2PConfig, keys: Array, query: Array, mask: Array | None = None) -> Array:
  """The prompts of each row: the ``k`` keys most cosine-similar to its query.

  ``ids = top_k(q̂ K̂ᵀ)``, batch-wise majority vote with ``cfg.batchwise``
  (:func:`clx.ops.prompts.select_prompts`).

  Args:
    cfg: the config.
    keys: ``(P, d)`` prompt keys.
    query: ``(n, d)`` queries.
    mask: ``(n,)`` real-row mask (padding rows do not vote), or ``None``.

  Returns:
    ``(n, k)`` int prompt ids.
  """
  sim = prompt_ops.key_similarity(query, keys)
  return prompt_ops.select_prompts(sim, top_k=cfg.top_k, batchwise=cfg.batchwise, mask=mask)


def features(cfg: L2PConfig, backbone: Backbone, params: Params, base: Params, x: Array,
             mask: Array | None = None) -> tuple[Array, Array, Array]:
  """Prompted features: the selected prompts ``(n, k·Lp, d)`` join the input tokens.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    params: ``{"prompt", "key", ...}`` (trained params or the state).
    base: the backbone's parameters.
    x: ``(n, ...)`` inputs.
    mask: ``(n,)`` real-row mask, or ``None``.

  Returns:
    ``(prompted features (n, d), query (n, d), selected ids (n, k))``.
  """
  q = prompting.query(backbone, base, x, mask)
  idx = select(cfg, params["key"], q, mask)
  prefix = prompt_ops.gather_prompts(params["prompt"], idx)
  return prompting.prompted_features(backbone, base, x, prefix=prefix), q, idx


def loss(cfg: L2PConfig, backbone: Backbone, params: Params, state: L2PState, base: Params,
         batch: Batch, rng: Array | None, info: TaskInfo) -> tuple[Array, dict[str, Array]]:
  """``CE_t − pull_coeff · reduce_sim`` (``train_continual.py`` l.294–295).

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    params: ``{"head", "prompt", "key"}``.
    state: the state (unused: everything trained is in ``params``).
    base: the backbone's parameters.
    batch: ``{"x", "y", "mask"}``.
    rng: unused (no dropout).
    info: the task being trained.

  Returns:
    ``(loss, {"accuracy", "reduce_sim"})``, scalars.
  """
  del state, rng
  task_index, spec = info.task, info.spec
  feats, q, idx = features(cfg, backbone, params, base, batch["x"], batch["mask"])
  ce, acc = prompting.current_task_loss(params["head"], feats, batch["y"], batch["mask"], spec,
                                        task_index)
  pull = prompt_ops.pull_constraint(q, params["key"], idx, batch["mask"])
  return ce - cfg.pull_coeff * pull, {"accuracy": acc, "reduce_sim": pull}


@functools.lru_cache(maxsize=32)
def _query_fn(backbone: Backbone) -> Callable[..., Array]:
  """One jitted :func:`prompting.query` per backbone, so the usage count compiles once per run
  (not once per task)."""
  return jax.jit(functools.partial(prompting.query, backbone))


def end_task(cfg: L2PConfig, backbone: Backbone, state: L2PState, ctx: TaskContext) -> L2PState:
  """Counts which prompts this task's training data selects (``usage[t]``, top-k per row).

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    state: the state after training task ``t``.
    ctx: the loop's task context.

  Returns:
    ``state`` with row ``t`` of ``usage`` set to the selection counts ``(P,)``.
  """
  query_fn = _query_fn(backbone)
  counts = np.zeros(cfg.pool_size, np.float32)
  for batch in ctx.batches("train", batch_size=cfg.aux_batch_size):
    q = query_fn(ctx.base, batch["x"], batch["mask"])
    ids = to_host(prompt_ops.select_prompts(prompt_ops.key_similarity(q, state["key"]),
                                            top_k=cfg.top_k))
    real = to_host(batch["mask"]) > 0
    counts += np.bincount(ids[real].ravel(), minlength=cfg.pool_size)
  return {**state, "usage": jnp.asarray(state["usage"]).at[ctx.task_index].set(counts)}


def predict(cfg: L2PConfig, backbone: Backbone, state: L2PState, base: Params, x: Array,
            info: TaskInfo, mask: Array | None = None) -> Array:
  """The head's logits on the prompted features over the classes seen so far.

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
  feats, _, _ = features(cfg, backbone, state, base, x, mask)
  return prompting.seen_logits(state["head"], feats, info.spec, info.task)


def retrieved_task(cfg: L2PConfig, backbone: Backbone, state: L2PState, base: Params, x: Array,
                   info: TaskInfo) -> Array:
  """The task owning each row's top-1 prompt (owner: the task that selected it most).

  Args:
    cfg: the config (unused: top-1 whatever ``top_k``).
    backbone: the frozen backbone.
    state: the state (``key``, ``usage``).
    base: the backbone's parameters.
    x: ``(n, ...)`` inputs.
    info: the last trained task.

  Returns:
    ``(n,)`` int task indices.
  """
  del cfg
  q = prompting.query(backbone, base, x)
  top1 = prompt_ops.select_prompts(prompt_ops.key_similarity(q, state["key"]), top_k=1)[:, 0]
  owner = jnp.argmax(state["usage"][:info.task + 1], axis=0)
  return owner[top1]


def diagnostics(state: L2PState) -> dict[str, Any]:
  """The usage counts.

  Args:
    state: the state.

  Returns:
    ``{"prompt_usage": (T, P) nested list of ints}``.
  """
  usage = np.asarray(state["usage"])
  return {"prompt_usage": usage.astype(int).tolist()}


def l2p(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """L2P on a frozen backbone.

  Args:
    backbone: the frozen backbone.
    **kwargs: :class:`L2PConfig` fields.

  Returns:
    The :class:`ContinualMethod` ``"l2p"``.
  """
  cfg = L2PConfig(**kwargs)
  return prompting.prompt_method(
      "l2p", cfg, backbone, init=init, loss=loss, predict=predict, trained=TRAINED,
      end_task=functools.partial(end_task, cfg, backbone), diagnostics=diagnostics)


REGISTRY = {"l2p": l2p}
