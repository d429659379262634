"""DualPrompt (Wang et al., ECCV 2022), after ``google-research/l2p`` (``configs/cifar100_dualprompt.py``).

- G-prompt: one shared prompt per layer of ``g_layers`` (default ``[0, 1]``), prefix-tuned:
  a key prompt and a value prompt of length ``g_length`` (5) in front of the layer's
  projected keys and values (``models/vit.py`` l.212–221, ``prefix_attention.py`` l.131–136;
  ``same_key_value=False``: separate key and value prompts).
- E-prompts: a pool of ``pool_size`` (10) task prompts with learned keys, prefix-tuned at
  ``e_layers`` (``[2, 3, 4]``), length ``e_length`` (5), ``top_k`` 1. In training, task ``t``
  uses its own slots ``t·k … (t+1)·k − 1`` (``use_prompt_mask=True``,
  ``train_continual.py`` l.237–247; when they run past the pool the code falls back to
  key matching, as here) and the pull constraint pulls that slot's key to the queries.
  At test time the slot is chosen by cosine key–query matching, batch-wise by majority vote
  like the config (``batchwise_prompt=True``); ``batchwise=False`` selects per row.
- ``shared_prompt_pool=True``: at the start of task ``t > 0`` slot ``t`` is initialised with
  slot ``t − 1``'s learned prompt (``train_continual.py`` l.551–568); keys are not copied
  (``shared_prompt_key=False``).
- Loss: current-task-masked cross-entropy − ``pull_coeff`` · ``reduce_sim``; uniform
  U[0, 0.01) init (flax ``uniform()``), zero-initialised head; backbone frozen.
- Features: the backbone's pooled feature (``vit_classifier="token"`` in the config: the CLS
  token for ViT; MiniLM's mean pooling for text).

Task retrieval (:func:`retrieved_task`): the E-prompt slot with the most similar key,
divided by ``top_k`` (a slot belongs to the task that trained it); per row, without the
batch vote.

Departure: where E- and G-layers coincide, the code concatenates the E-prompt after the
G-prompt along the prefix axis; the same here (``jnp.concatenate``, G first).
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
                              check_positive_int)
from clx.models.base import Backbone
from clx.ops import prompts as prompt_ops

Array = jax.Array
TRAINED = ("head", "g_prompt", "e_prompt", "e_key")


@dataclasses.dataclass(frozen=True)
class DualPromptConfig:
  """DualPrompt's settings (defaults: ``configs/cifar100_dualprompt.py`` l.87–126).

  Attributes:
    g_layers: layers of the shared G-prompt.
    g_length: G-prompt length ``Lg`` (key and value prompts each).
    e_layers: layers of the E-prompts (at least one).
    e_length: E-prompt length ``Le``.
    pool_size: E-prompt slots ``P``.
    top_k: slots per input ``k`` (≤ ``pool_size``).
    batchwise: test-time selection by the batch's majority vote.
    task_slots: in training, task ``t`` uses its own slots (``use_prompt_mask``).
    shared_prompt_pool: slot ``t`` starts from slot ``t − 1``'s prompt.
    pull_coeff: weight of ``reduce_sim`` in the loss (≥ 0).
    init_scale: prompts and keys start ``U[0, init_scale)``.
    head_init: ``"zeros"`` (the code) or ``"torch"``.
  """

  g_layers: tuple[int, ...] = (0, 1)
  g_length: int = 5
  e_layers: tuple[int, ...] = (2, 3, 4)
  e_length: int = 5
  pool_size: int = 10
  top_k: int = 1
  batchwise: bool = True
  task_slots: bool = True
  shared_prompt_pool: bool = True
  pull_coeff: float = 1.0
  init_scale: float = 1e-2
  head_init: str = "zeros"

  def __post_init__(self):
    object.__setattr__(self, "g_layers", tuple(self.g_layers))
    object.__setattr__(self, "e_layers", tuple(self.e_layers))
    for name in ("g_length", "e_length", "pool_size", "top_k"):
      check_positive_int(getattr(self, name), f"dualprompt: {name}")
    if self.top_k > self.pool_size:
      raise ValueError(f"dualprompt: top_k {self.top_k} exceeds pool_size {self.pool_size}")
    if not self.e_layers:
      raise ValueError("dualprompt: e_layers must name at least one layer")
    if not np.isfinite(self.pull_coeff) or self.pull_coeff < 0:
      raise ValueError(f"dualprompt: pull_coeff must be finite and >= 0, got {self.pull_coeff!r}")
    prompting.check_head_init("dualprompt", self.head_init)


class DualPromptState(TypedDict):
  """DualPrompt's state (all of it trained on every task)."""

  head: prompting.Head  # {"kernel": (d, C), "bias": (C,)}
  g_prompt: Array       # (G, 2, Lg, d): key and value prompt per G-layer
  e_prompt: Array       # (P, E, 2, Le, d): key and value prompt per slot and E-layer
  e_key: Array          # (P, d)


def init(cfg: DualPromptConfig, backbone: Backbone, rng: Array,
         spec: StreamSpec) -> DualPromptState:
  """The initial state: ``U[0, init_scale)`` prompts and keys, the head.

  Args:
    cfg: the config.
    backbone: the frozen backbone (its ``feature_dim`` is ``d``).
    rng: PRNG key.
    spec: the stream's spec.

  Returns:
    ``{"head", "g_prompt" (G, 2, Lg, d), "e_prompt" (P, E, 2, Le, d), "e_key" (P, d)}``.
  """
  d = backbone.feature_dim
  k_head, k_g, k_e, k_key = jax.random.split(rng, 4)
  u = functools.partial(prompting.uniform, scale=cfg.init_scale)
  return {"head": prompting.init_head(k_head, d, spec.num_classes, cfg.head_init),
          "g_prompt": u(k_g, (len(cfg.g_layers), 2, cfg.g_length, d)),
          "e_prompt": u(k_e, (cfg.pool_size, len(cfg.e_layers), 2, cfg.e_length, d)),
          "e_key": u(k_key, (cfg.pool_size, d))}


def begin_task(cfg: DualPromptConfig, state: DualPromptState,
               ctx: TaskContext) -> DualPromptState:
  """``shared_prompt_pool``: task ``t``'s slots start from task ``t − 1``'s learned prompts.

  ``e_prompt[t·k:(t+1)·k] ← e_prompt[(t−1)·k:t·k]`` (``train_continual.py`` l.551–568); keys
  are not copied.

  Args:
    cfg: the config.
    state: the state before task ``t``.
    ctx: the loop's task context.

  Returns:
    The state, unchanged on task 0, without ``shared_prompt_pool`` or past the pool.
  """
  t, k = ctx.task_index, cfg.top_k
  if not (cfg.shared_prompt_pool and t > 0 and (t + 1) * k <= cfg.pool_size):
    return state
  e = state["e_prompt"]
  return {**state, "e_prompt": e.at[t * k:(t + 1) * k].set(e[(t - 1) * k:t * k])}


def select(cfg: DualPromptConfig, keys: Array, q: Array, mask: Array | None,
           task_index: int | None) -> Array:
  """E-prompt slots: the task's own slots in training, key matching otherwise.

  Args:
    cfg: the config.
    keys: ``(P, d)`` E-prompt keys.
    q: ``(n, d)`` queries.
    mask: ``(n,)`` real-row mask, or ``None``.
    task_index: the task being trained, ``None`` at test time.

  Returns:
    ``(n, k)`` int slots: ``t·k … (t+1)·k − 1`` in training while they fit in the pool,
    else ``top_k(q̂ K̂ᵀ)`` (batch-wise with ``cfg.batchwise``).
  """
  n = q.shape[0]
  if (task_index is not None and cfg.task_slots
      and (task_index + 1) * cfg.top_k <= cfg.pool_size):
    return prompt_ops.task_prompt_ids(task_index, cfg.top_k, n)
  sim = prompt_ops.key_similarity(q, keys)
  return prompt_ops.select_prompts(sim, top_k=cfg.top_k, batchwise=cfg.batchwise, mask=mask)


def kv_prefix(cfg: DualPromptConfig, params: Params, idx: Array) -> dict[int, tuple[Array, Array]]:
  """The prefix-tuning prompts of every prompted layer for the selected slots.

  At an E-layer the ``k`` selected slots' prompts are concatenated (``p = k·Le``); at a G-layer
  the shared prompt (``p = Lg``); where both, G first (``p = Lg + k·Le``).

  Args:
    cfg: the config.
    params: ``{"g_prompt" (G, 2, Lg, d), "e_prompt" (P, E, 2, Le, d), ...}``.
    idx: ``(n, k)`` selected slots.

  Returns:
    ``{layer: (key prompt (n, p, d), value prompt (n, p, d))}``.
  """
  chosen = jnp.take(params["e_prompt"], idx, axis=0)         # (n, k, E, 2, Le, d)
  n, k = idx.shape
  out = {}
  for j, layer in enumerate(cfg.e_layers):
    e = chosen[:, :, j].transpose(0, 2, 1, 3, 4).reshape(n, 2, k * cfg.e_length, -1)
    out[layer] = (e[:, 0], e[:, 1])
  for j, layer in enumerate(cfg.g_layers):
    g = jnp.broadcast_to(params["g_prompt"][j][:, None], (2, n, *params["g_prompt"].shape[2:]))
    if layer in out:
      out[layer] = (jnp.concatenate([g[0], out[layer][0]], 1),
                    jnp.concatenate([g[1], out[layer][1]], 1))
    else:
      out[layer] = (g[0], g[1])
  return out


def features(cfg: DualPromptConfig, backbone: Backbone, params: Params, base: Params, x: Array,
             mask: Array | None, task_index: int | None, *,
             ordered: bool = False) -> tuple[Array, Array, Array]:
  """Prompted features with the G-prompt and the selected E-prompts (prefix-tuning).

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    params: ``{"g_prompt", "e_prompt", "e_key", ...}`` (trained params or the state).
    base: the backbone's parameters.
    x: ``(n, ...)`` inputs.
    mask: ``(n,)`` real-row mask, or ``None``.
    task_index: the task being trained, ``None`` at test time (:func:`select`).
    ordered: run the prompted pass after the query pass (:func:`prompting.after_query`;
      evaluation only, where it bounds the temporaries).

  Returns:
    ``(prompted features (n, d), query (n, d), selected slots (n, k))``.
  """
  q = prompting.query(backbone, base, x, mask)
  if ordered:
    base, q = prompting.after_query(base, q)
  idx = select(cfg, params["e_key"], q, mask, task_index)
  feats = prompting.prompted_features(backbone, base, x, kv_prefix=kv_prefix(cfg, params, idx))
  return feats, q, idx


def loss(cfg: DualPromptConfig, backbone: Backbone, params: Params, state: DualPromptState,
         base: Params, batch: Batch, rng: Array | None,
         info: TaskInfo) -> tuple[Array, dict[str, Array]]:
  """``CE_t − pull_coeff · reduce_sim`` with the task's own E-prompt slots.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    params: ``{"head", "g_prompt", "e_prompt", "e_key"}``.
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
  feats, q, idx = features(cfg, backbone, params, base, batch["x"], batch["mask"], task_index)
  ce, acc = prompting.current_task_loss(params["head"], feats, batch["y"], batch["mask"], spec,
                                        task_index)
  pull = prompt_ops.pull_constraint(q, params["e_key"], idx, batch["mask"])
  return ce - cfg.pull_coeff * pull, {"accuracy": acc, "reduce_sim": pull}


def predict(cfg: DualPromptConfig, backbone: Backbone, state: DualPromptState, base: Params,
            x: Array, info: TaskInfo, mask: Array | None = None) -> Array:
  """The head's logits with key-matched E-prompts, over the classes seen so far.

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
  feats, _, _ = features(cfg, backbone, state, base, x, mask, None, ordered=True)
  return prompting.seen_logits(state["head"], feats, info.spec, info.task)


def retrieved_task(cfg: DualPromptConfig, backbone: Backbone, state: DualPromptState,
                   base: Params, x: Array, info: TaskInfo) -> Array:
  """The task of each row's most similar E-prompt key (``slot // top_k``), per row.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    state: the state.
    base: the backbone's parameters.
    x: ``(n, ...)`` inputs.
    info: the last trained task (unused: every slot's owner is fixed).

  Returns:
    ``(n,)`` int task indices.
  """
  del info
  q = prompting.query(backbone, base, x)
  top1 = prompt_ops.select_prompts(prompt_ops.key_similarity(q, state["e_key"]), top_k=1)
  return top1[:, 0] // cfg.top_k


def dualprompt(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """DualPrompt on a frozen backbone.

  Args:
    backbone: the frozen backbone (a transformer deep enough for ``g_layers``/``e_layers``).
    **kwargs: :class:`DualPromptConfig` fields.

  Returns:
    The :class:`ContinualMethod` ``"dualprompt"``.
  """
  cfg = DualPromptConfig(**kwargs)
  depth = prompting.num_layers(backbone)
  prompting.check_layers("dualprompt g_layers", cfg.g_layers, depth)
  prompting.check_layers("dualprompt e_layers", cfg.e_layers, depth)
  return prompting.prompt_method(
      "dualprompt", cfg, backbone, init=init, loss=loss, predict=predict, trained=TRAINED,
      begin_task=functools.partial(begin_task, cfg))


REGISTRY = {"dualprompt": dualprompt}
