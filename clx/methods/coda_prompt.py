"""CODA-Prompt (Smith et al., CVPR 2023), after ``GT-RIPL/CODA-Prompt`` ``models/zoo.py``.

At each layer of ``layers`` (``e_layers = [0, 1, 2, 3, 4]``, ``zoo.py`` l.46) a pool of
``M = pool_size`` (100) prompt components ``P (M, Lp, d)`` with keys ``K (M, d)`` and
attention vectors ``A (M, d)``; the prompt of an input is ``Σ_m α_m P_m`` with
``α_m = cos(q ⊙ A_m, K_m)`` for the frozen query ``q`` (:func:`clx.ops.prompts.coda_prompt`),
split into a key prefix ``[:Lp/2]`` and a value prefix ``[Lp/2:]`` for prefix-tuning
(l.175–177). Task ``t`` owns components ``[t·M/T, (t+1)·M/T)``: they are re-initialised by
Gram–Schmidt against all earlier ones at the start of the task (``process_task_count`` /
``gram_schmidt``, l.49–130; rows after the task's are zero), training sees components
``[0, (t+1)·M/T)`` with the earlier tasks' detached (l.147–157), and test time uses the
same range. Loss: cross-entropy over the current task's classes (earlier classes at −∞,
``learners/prompt.py`` l.27–30) plus ``ortho_mu`` × the orthogonality penalties of K, A and P
(``ortho_mu = 0`` in the published commands ``experiments/*.sh`` ``--prompt_param 100 8 0.0``).
Length ``Lp = 8``; torch-default head; U[0, 1) init (``tensor_prompt``) before the
Gram–Schmidt step. Optimiser settings (Adam, lr 1e-3, β₁ 0.9, cosine, batch 128, 20
epochs; ``configs/cifar-100_prompt.yaml``) belong to the experiment; its per-epoch cosine is
:func:`official_lr_schedule` (an experiment's ``lr_schedules`` entry).

Task retrieval (:func:`retrieved_task`, a diagnostic the code does not have): the task whose
components carry the largest total |α|, averaged over the prompted layers.

Departures: the Gram–Schmidt restart on a zero earlier component (the code loops forever on
one) skips it instead (:func:`clx.ops.prompts.gram_schmidt_init`); the query is the
backbone's pooled feature (the CLS token for ViT as in the code, MiniLM's mean pooling for text).
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
                              check_positive_int)
from clx.models.base import Backbone
from clx.ops import prompts as prompt_ops
from clx.ops.schedules import epoch_cosine

Array = jax.Array
TRAINED = ("head", "K", "A", "P")


@dataclasses.dataclass(frozen=True)
class CodaPromptConfig:
  """CODA-Prompt's settings (defaults: ``experiments/cifar-100.sh``, ``zoo.py``).

  Attributes:
    pool_size: prompt components per layer ``M`` (at least one per task).
    length: prompt length ``Lp`` (≥ 2: halves for keys and values).
    layers: the prompted layers (``E`` of them).
    ortho_mu: weight of the orthogonality penalties (≥ 0; 0 in the published commands).
    init_scale: K, A, P start ``U[0, init_scale)`` before the Gram–Schmidt step.
    head_init: ``"torch"`` (the code) or ``"zeros"``.
  """

  pool_size: int = 100
  length: int = 8
  layers: tuple[int, ...] = (0, 1, 2, 3, 4)
  ortho_mu: float = 0.0
  init_scale: float = 1.0
  head_init: str = "torch"

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    for name in ("pool_size", "length"):
      check_positive_int(getattr(self, name), f"coda_prompt: {name}")
    if self.length < 2:
      raise ValueError(f"coda_prompt: length must be >= 2 (key and value halves), got {self.length}")
    if not np.isfinite(self.ortho_mu) or self.ortho_mu < 0:
      raise ValueError(f"coda_prompt: ortho_mu must be finite and >= 0, got {self.ortho_mu!r}")
    prompting.check_head_init("coda_prompt", self.head_init)


class CODAPromptState(TypedDict):
  """CODA-Prompt's state (all of it trained; earlier tasks' components are detached)."""

  head: prompting.Head  # {"kernel": (d, C), "bias": (C,)}
  K: Array              # (E, M, d) component keys
  A: Array              # (E, M, d) attention vectors
  P: Array              # (E, M, Lp, d) prompt components


def per_task(cfg: CodaPromptConfig, spec: StreamSpec) -> int:
  """Components per task ``M // T`` (the code's ``int(e_pool_size / n_tasks)``).

  Args:
    cfg: the config.
    spec: the stream's spec.

  Returns:
    ``M // T``.

  Raises:
    ValueError: fewer components than tasks.
  """
  pt = cfg.pool_size // spec.num_tasks
  if pt < 1:
    raise ValueError(f"coda_prompt: pool_size {cfg.pool_size} < {spec.num_tasks} tasks")
  return pt


def init(cfg: CodaPromptConfig, backbone: Backbone, rng: Array,
         spec: StreamSpec) -> CODAPromptState:
  """The initial state: ``U[0, init_scale)`` components until each task's Gram–Schmidt step
  in :func:`begin_task`, and the head.

  Args:
    cfg: the config.
    backbone: the frozen backbone (its ``feature_dim`` is ``d``).
    rng: PRNG key.
    spec: the stream's spec.

  Returns:
    ``{"head", "K" (E, M, d), "A" (E, M, d), "P" (E, M, Lp, d)}``.
  """
  per_task(cfg, spec)
  d, e, m = backbone.feature_dim, len(cfg.layers), cfg.pool_size
  k_head, k_k, k_a, k_p = jax.random.split(rng, 4)
  u = functools.partial(prompting.uniform, scale=cfg.init_scale)
  return {"head": prompting.init_head(k_head, d, spec.num_classes, cfg.head_init),
          "K": u(k_k, (e, m, d)), "A": u(k_a, (e, m, d)), "P": u(k_p, (e, m, cfg.length, d))}


def begin_task(cfg: CodaPromptConfig, state: CODAPromptState,
               ctx: TaskContext) -> CODAPromptState:
  """Gram–Schmidt re-initialisation of the task's components in K, A and P of every layer.

  Components ``[t·M/T, (t+1)·M/T)`` become random vectors orthogonalised against all the
  earlier ones (:func:`clx.ops.prompts.gram_schmidt_init`); the later rows are zero.

  Args:
    cfg: the config.
    state: the state before task ``t``.
    ctx: the loop's task context.

  Returns:
    The state with K, A, P re-initialised for task ``t``.
  """
  pt = per_task(cfg, ctx.spec)
  s, f = ctx.task_index * pt, (ctx.task_index + 1) * pt
  out = dict(state)
  for n, name in enumerate(("K", "A", "P")):
    keys = jax.random.split(jax.random.fold_in(ctx.rng, n), len(cfg.layers))
    out[name] = jnp.stack([prompt_ops.gram_schmidt_init(keys[j], state[name][j], start=s, stop=f)
                           for j in range(len(cfg.layers))])
  return out


def _components(params: Params, upto: int, frozen: int) -> tuple[Array, Array, Array]:
  """K, A, P restricted to ``[0, upto)`` with ``[0, frozen)`` detached."""
  def cut(x):
    x = x[:, :upto]
    if frozen == 0:
      return x
    return jnp.concatenate([jax.lax.stop_gradient(x[:, :frozen]), x[:, frozen:]], axis=1)
  return cut(params["K"]), cut(params["A"]), cut(params["P"])


def weights(K: Array, A: Array, q: Array) -> Array:
  """Component weights of every prompted layer: ``α[e, i, m] = cos(q_i ⊙ A[e, m], K[e, m])``.

  Args:
    K: ``(E, M', d)`` component keys.
    A: ``(E, M', d)`` attention vectors.
    q: ``(n, d)`` queries.

  Returns:
    ``(E, n, M')``.
  """
  return jax.vmap(lambda k, a: prompt_ops.coda_weights(q, k, a))(K, A)


def features(cfg: CodaPromptConfig, backbone: Backbone, params: Params, base: Params, x: Array,
             mask: Array | None, *, upto: int,
             frozen: int, ordered: bool = False) -> tuple[Array, tuple[Array, Array, Array]]:
  """Prompted features: at each layer the prompt ``Σ_m α_m P_m`` split into key and value halves.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    params: ``{"K", "A", "P", ...}`` (trained params or the state).
    base: the backbone's parameters.
    x: ``(n, ...)`` inputs.
    mask: ``(n,)`` real-row mask, or ``None``.
    upto: components ``[0, upto)`` take part (``M' = upto``).
    frozen: components ``[0, frozen)`` are detached.
    ordered: run the prompted pass after the query pass (:func:`prompting.after_query`;
      evaluation only, where it bounds the temporaries).

  Returns:
    ``(features (n, d), (K (E, M', d), A (E, M', d), P (E, M', Lp, d)))``.
  """
  q = prompting.query(backbone, base, x, mask)
  if ordered:
    base, q = prompting.after_query(base, q)
  K, A, P = _components(params, upto, frozen)
  kv = {}
  for j, layer in enumerate(cfg.layers):
    kv[layer] = prompt_ops.split_key_value(prompt_ops.coda_prompt(q, K[j], A[j], P[j]))
  return prompting.prompted_features(backbone, base, x, kv_prefix=kv), (K, A, P)


def loss(cfg: CodaPromptConfig, backbone: Backbone, params: Params, state: CODAPromptState,
         base: Params, batch: Batch, rng: Array | None,
         info: TaskInfo) -> tuple[Array, dict[str, Array]]:
  """``CE_t + ortho_mu · Σ_layers (o(K) + o(A) + o(P))``, ``o(T) = mean((T Tᵀ − I)²)``.

  ``P`` is flattened to ``(M', Lp·d)`` for its penalty. Training sees components ``[0, (t+1)·M/T)`` with the earlier tasks' detached.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    params: ``{"head", "K", "A", "P"}``.
    state: the state (unused: everything trained is in ``params``).
    base: the backbone's parameters.
    batch: ``{"x", "y", "mask"}``.
    rng: unused (no dropout).
    info: the task being trained.

  Returns:
    ``(loss, {"accuracy", "ortho"})``, scalars.
  """
  del state, rng
  task_index, spec = info.task, info.spec
  pt = per_task(cfg, spec)
  feats, (K, A, P) = features(cfg, backbone, params, base, batch["x"], batch["mask"],
                              upto=(task_index + 1) * pt, frozen=task_index * pt)
  ce, acc = prompting.current_task_loss(params["head"], feats, batch["y"], batch["mask"], spec,
                                        task_index)
  ortho = jnp.zeros(())
  if cfg.ortho_mu > 0:
    for j in range(len(cfg.layers)):
      ortho = ortho + cfg.ortho_mu * (prompt_ops.ortho_penalty(K[j]) + prompt_ops.ortho_penalty(A[j])
                                      + prompt_ops.ortho_penalty(P[j].reshape(P.shape[1], -1)))
  return ce + ortho, {"accuracy": acc, "ortho": ortho}


def predict(cfg: CodaPromptConfig, backbone: Backbone, state: CODAPromptState, base: Params,
            x: Array, info: TaskInfo, mask: Array | None = None) -> Array:
  """The head's logits with components ``[0, (t+1)·M/T)``, over the classes seen so far.

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
  upto = (info.task + 1) * per_task(cfg, info.spec)
  feats, _ = features(cfg, backbone, state, base, x, mask, upto=upto, frozen=0, ordered=True)
  return prompting.seen_logits(state["head"], feats, info.spec, info.task)


def retrieved_task(cfg: CodaPromptConfig, backbone: Backbone, state: CODAPromptState,
                   base: Params, x: Array, info: TaskInfo) -> Array:
  """The task whose components get the largest total |α|, averaged over the layers.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    state: the state.
    base: the backbone's parameters.
    x: ``(n, ...)`` inputs.
    info: the last trained task.

  Returns:
    ``(n,)`` int task indices in ``[0, t]``.
  """
  current_task, pt = info.task, per_task(cfg, info.spec)
  q = prompting.query(backbone, base, x)
  K, A, _ = _components(state, (current_task + 1) * pt, 0)
  alpha = jnp.mean(jnp.abs(weights(K, A, q)), axis=0)            # (n, (t+1)·pt)
  per = alpha.reshape(alpha.shape[0], current_task + 1, pt).sum(-1)
  return jnp.argmax(per, axis=1)


def official_lr_schedule(train_config: Any) -> Callable[[int], Callable[[Array], Array]]:
  """CODA-Prompt's ``CosineSchedule``, for an experiment's ``lr_schedules`` entry.

  ``GT-RIPL/CODA-Prompt`` at 6417d4f: ``utils/schedulers.py`` ``CosineSchedule(optimizer,
  K=schedule[-1])`` gives ``lr_e = lr·cos(99π·e / (200(K−1)))`` for epoch ``e`` of ``K``
  (``learners/prompt.py`` l.74) and is stepped once per epoch (``learners/default.py`` l.95,
  ``if epoch > 0: self.scheduler.step()``), so the rate is constant within an epoch. It is
  the formula of InfLoRA's (the same ``utils/schedulers.py``): :func:`clx.ops.schedules.epoch_cosine`.

  Args:
    train_config: the phase's TrainConfig (its ``learning_rate`` and ``epochs`` = K).

  Returns:
    A schedule factory ``steps_per_epoch -> (step -> lr)`` (jit-able, () float32 rate).
  """
  return epoch_cosine(train_config.learning_rate, train_config.epochs)


def coda_prompt(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """CODA-Prompt on a frozen backbone.

  Args:
    backbone: the frozen backbone (a transformer deep enough for ``layers``).
    **kwargs: :class:`CodaPromptConfig` fields.

  Returns:
    The :class:`ContinualMethod` ``"coda_prompt"``.
  """
  cfg = CodaPromptConfig(**kwargs)
  prompting.check_layers("coda_prompt layers", cfg.layers, prompting.num_layers(backbone))
  return prompting.prompt_method(
      "coda_prompt", cfg, backbone, init=init, loss=loss, predict=predict,
      trained=TRAINED, begin_task=functools.partial(begin_task, cfg))


REGISTRY = {"coda_prompt": coda_prompt}
