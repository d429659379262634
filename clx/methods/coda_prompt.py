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

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import prompting
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo
from clx.models.base import Backbone
from clx.ops import prompts as prompt_ops

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CodaPromptConfig:
  """CODA-Prompt's settings (defaults: ``experiments/cifar-100.sh``, ``zoo.py``)."""

  pool_size: int = 100
  length: int = 8
  layers: tuple[int, ...] = (0, 1, 2, 3, 4)
  ortho_mu: float = 0.0
  init_scale: float = 1.0
  head_init: str = "torch"

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    for name in ("pool_size", "length"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"coda_prompt: {name} must be a positive int, got {v!r}")
    if self.length < 2:
      raise ValueError(f"coda_prompt: length must be >= 2 (key and value halves), got {self.length}")
    if not np.isfinite(self.ortho_mu) or self.ortho_mu < 0:
      raise ValueError(f"coda_prompt: ortho_mu must be finite and >= 0, got {self.ortho_mu!r}")


def per_task(cfg: CodaPromptConfig, spec: StreamSpec) -> int:
  """Components per task ``M // T`` (the code's ``int(e_pool_size / n_tasks)``)."""
  pt = cfg.pool_size // spec.num_tasks
  if pt < 1:
    raise ValueError(f"coda_prompt: pool_size {cfg.pool_size} < {spec.num_tasks} tasks")
  return pt


def init(cfg: CodaPromptConfig, backbone: Backbone, rng: Array, spec: StreamSpec) -> dict:
  """``{"head", "K" (E, M, d), "A" (E, M, d), "P" (E, M, Lp, d)}`` (U[0, scale) until each
  task's Gram–Schmidt step in :func:`begin_task`)."""
  per_task(cfg, spec)
  d, e, m = backbone.feature_dim, len(cfg.layers), cfg.pool_size
  k_head, k_k, k_a, k_p = jax.random.split(rng, 4)
  u = functools.partial(prompting.uniform, scale=cfg.init_scale)
  return {"head": prompting.init_head(k_head, d, spec.num_classes, cfg.head_init),
          "K": u(k_k, (e, m, d)), "A": u(k_a, (e, m, d)), "P": u(k_p, (e, m, cfg.length, d))}


def begin_task(cfg: CodaPromptConfig, state, ctx):
  """Gram–Schmidt re-initialisation of the task's components in K, A and P of every layer."""
  pt = per_task(cfg, ctx.spec)
  s, f = ctx.task_index * pt, (ctx.task_index + 1) * pt
  out = dict(state)
  for n, name in enumerate(("K", "A", "P")):
    keys = jax.random.split(jax.random.fold_in(ctx.rng, n), len(cfg.layers))
    out[name] = jnp.stack([prompt_ops.gram_schmidt_init(keys[j], state[name][j], start=s, stop=f)
                           for j in range(len(cfg.layers))])
  return out


def _components(params, upto: int, frozen: int):
  """K, A, P restricted to ``[0, upto)`` with ``[0, frozen)`` detached."""
  def cut(x):
    x = x[:, :upto]
    if frozen == 0:
      return x
    return jnp.concatenate([jax.lax.stop_gradient(x[:, :frozen]), x[:, frozen:]], axis=1)
  return cut(params["K"]), cut(params["A"]), cut(params["P"])


def weights(K, A, q) -> Array:
  """``(E, n, M')`` component weights of every prompted layer."""
  return jax.vmap(lambda k, a: prompt_ops.coda_weights(q, k, a))(K, A)


def features(cfg, backbone, params, base, x, mask, *, upto: int, frozen: int,
             ordered: bool = False):
  """``(prompted features (n, d), (K, A, P))``; ``ordered`` (evaluation) runs the prompted
  pass after the query pass (:func:`prompting.after_query`)."""
  q = prompting.query(backbone, base, x, mask)
  if ordered:
    base, q = prompting.after_query(base, q)
  K, A, P = _components(params, upto, frozen)
  kv = {}
  for j, layer in enumerate(cfg.layers):
    kv[layer] = prompt_ops.split_key_value(prompt_ops.coda_prompt(q, K[j], A[j], P[j]))
  return prompting.prompted_features(backbone, base, x, kv_prefix=kv), (K, A, P)


def loss(cfg, backbone, params, state, base, batch, rng, info: TaskInfo):
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


def predict(cfg, backbone, state, base, x, info: TaskInfo, mask=None):
  upto = (info.task + 1) * per_task(cfg, info.spec)
  feats, _ = features(cfg, backbone, state, base, x, mask, upto=upto, frozen=0, ordered=True)
  return prompting.seen_logits(state["head"], feats, info.spec, info.task)


def retrieved_task(cfg: CodaPromptConfig, backbone: Backbone, state, base, x: Array,
                   info: TaskInfo) -> Array:
  """``(n,)`` the task whose components get the largest mean |α| over the layers."""
  current_task, pt = info.task, per_task(cfg, info.spec)
  q = prompting.query(backbone, base, x)
  K, A, _ = _components(state, (current_task + 1) * pt, 0)
  alpha = jnp.mean(jnp.abs(weights(K, A, q)), axis=0)            # (n, (t+1)·pt)
  per = alpha.reshape(alpha.shape[0], current_task + 1, pt).sum(-1)
  return jnp.argmax(per, axis=1)


def official_lr_schedule(train_config):
  """CODA-Prompt's ``CosineSchedule``, for an experiment's ``lr_schedules`` entry.

  ``GT-RIPL/CODA-Prompt`` at 6417d4f: ``utils/schedulers.py`` ``CosineSchedule(optimizer,
  K=schedule[-1])`` gives ``lr_e = lr·cos(99π·e / (200(K−1)))`` for epoch ``e`` of ``K``
  (``learners/prompt.py`` l.74) and is stepped once per epoch (``learners/default.py`` l.95,
  ``if epoch > 0: self.scheduler.step()``), so the rate is constant within an epoch. It is
  the formula of :func:`clx.methods.inflora.epoch_cosine`, which this returns.

  Args:
    train_config: the phase's TrainConfig (its ``learning_rate`` and ``epochs`` = K).

  Returns:
    A schedule factory ``steps_per_epoch -> (step -> lr)`` (jit-able, () float32 rate).
  """
  from clx.methods import inflora  # pylint: disable=import-outside-toplevel
  return inflora.epoch_cosine(train_config.learning_rate, train_config.epochs)


def coda_prompt(backbone: Backbone, **kwargs) -> ContinualMethod:
  """CODA-Prompt on a frozen ``backbone``; ``kwargs`` are :class:`CodaPromptConfig` fields."""
  cfg = CodaPromptConfig(**kwargs)
  prompting.check_layers("coda_prompt layers", cfg.layers, prompting.num_layers(backbone))
  return prompting.prompt_method(
      "coda_prompt", cfg, backbone, init=init, loss=loss, predict=predict,
      trained=("head", "K", "A", "P"), begin_task=functools.partial(begin_task, cfg))


REGISTRY = {"coda_prompt": coda_prompt}
