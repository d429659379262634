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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import prompting
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo, to_host
from clx.models.base import Backbone
from clx.ops import prompts as prompt_ops

Array = jax.Array
TRAINED = ("head", "prompt", "key")


@dataclasses.dataclass(frozen=True)
class L2PConfig:
  """L2P's settings (defaults: ``configs/cifar100_l2p.py``)."""

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
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"l2p: {name} must be a positive int, got {v!r}")
    if self.top_k > self.pool_size:
      raise ValueError(f"l2p: top_k {self.top_k} exceeds pool_size {self.pool_size}")
    if not np.isfinite(self.pull_coeff) or self.pull_coeff < 0:
      raise ValueError(f"l2p: pull_coeff must be finite and >= 0, got {self.pull_coeff!r}")
    if self.head_init not in ("zeros", "torch"):
      raise ValueError(f"l2p: head_init must be 'zeros' or 'torch', got {self.head_init!r}")


def init(cfg: L2PConfig, backbone: Backbone, rng: Array, spec: StreamSpec) -> dict[str, Any]:
  """``{"head", "prompt" (P, Lp, d), "key" (P, d), "usage" (T, P)}``."""
  d = backbone.feature_dim
  k_head, k_prompt, k_key = jax.random.split(rng, 3)
  return {"head": prompting.init_head(k_head, d, spec.num_classes, cfg.head_init),
          "prompt": prompting.uniform(k_prompt, (cfg.pool_size, cfg.length, d), cfg.init_scale),
          "key": prompting.uniform(k_key, (cfg.pool_size, d), cfg.init_scale),
          "usage": jnp.zeros((spec.num_tasks, cfg.pool_size), jnp.float32)}


def select(cfg: L2PConfig, keys: Array, query: Array, mask: Array | None = None) -> Array:
  """``(n, k)`` prompt ids for queries ``(n, d)``."""
  sim = prompt_ops.key_similarity(query, keys)
  return prompt_ops.select_prompts(sim, top_k=cfg.top_k, batchwise=cfg.batchwise, mask=mask)


def features(cfg: L2PConfig, backbone: Backbone, params: dict, base, x: Array,
             mask: Array | None = None) -> tuple[Array, Array, Array]:
  """``(prompted features (n, d), query (n, d), selected ids (n, k))``."""
  q = prompting.query(backbone, base, x, mask)
  idx = select(cfg, params["key"], q, mask)
  prefix = prompt_ops.gather_prompts(params["prompt"], idx)
  return prompting.prompted_features(backbone, base, x, prefix=prefix), q, idx


def loss(cfg: L2PConfig, backbone: Backbone, params, state, base, batch, rng, info: TaskInfo):
  del state, rng
  task_index, spec = info.task, info.spec
  feats, q, idx = features(cfg, backbone, params, base, batch["x"], batch["mask"])
  ce, acc = prompting.current_task_loss(params["head"], feats, batch["y"], batch["mask"], spec,
                                        task_index)
  pull = prompt_ops.pull_constraint(q, params["key"], idx, batch["mask"])
  return ce - cfg.pull_coeff * pull, {"accuracy": acc, "reduce_sim": pull}


def end_task(cfg: L2PConfig, backbone: Backbone, state, ctx):
  """Count which prompts this task's training data selects (``usage[t]``)."""
  query_fn = jax.jit(functools.partial(prompting.query, backbone))
  counts = np.zeros(cfg.pool_size, np.float32)
  for batch in ctx.batches("train", batch_size=cfg.aux_batch_size):
    q = query_fn(ctx.base, batch["x"], batch["mask"])
    ids = to_host(prompt_ops.select_prompts(prompt_ops.key_similarity(q, state["key"]),
                                            top_k=cfg.top_k))
    real = to_host(batch["mask"]) > 0
    counts += np.bincount(ids[real].ravel(), minlength=cfg.pool_size)
  return {**state, "usage": jnp.asarray(state["usage"]).at[ctx.task_index].set(counts)}


def predict(cfg: L2PConfig, backbone: Backbone, state, base, x, info: TaskInfo, mask=None):
  feats, _, _ = features(cfg, backbone, state, base, x, mask)
  return prompting.seen_logits(state["head"], feats, info.spec, info.task)


def retrieved_task(cfg: L2PConfig, backbone: Backbone, state, base, x: Array,
                   info: TaskInfo) -> Array:
  """``(n,)`` the task owning each row's top-1 prompt (owner: most selections in training)."""
  q = prompting.query(backbone, base, x)
  top1 = prompt_ops.select_prompts(prompt_ops.key_similarity(q, state["key"]), top_k=1)[:, 0]
  owner = jnp.argmax(state["usage"][:info.task + 1], axis=0)
  return owner[top1]


def diagnostics(state) -> dict:
  usage = np.asarray(state["usage"])
  return {"prompt_usage": usage.astype(int).tolist()}


def l2p(backbone: Backbone, **kwargs) -> ContinualMethod:
  """L2P on a frozen ``backbone``; ``kwargs`` are :class:`L2PConfig` fields."""
  cfg = L2PConfig(**kwargs)
  return prompting.prompt_method(
      "l2p", cfg, backbone, init=init, loss=loss, predict=predict, trained=TRAINED,
      end_task=functools.partial(end_task, cfg, backbone), diagnostics=diagnostics)


REGISTRY = {"l2p": l2p}
