"""Adam-NSCL and BECAME on top of it (the BECAME repository's ``NSCL-based/`` code).

**Adam-NSCL** (``adam_nscl``; Wang et al., CVPR 2021, as run by
``NSCL-based/svd_agent`` + ``optim/adam_svd.py``): full fine-tuning with per-task
heads. Parameters fall in three groups, as ``init_model_optimizer``:

* ``body``: every backbone site kernel (conv/linear weights) — the update is
  projected into the approximate null space of the old tasks' input
  covariance (:mod:`clx.ops.null_space`) from the second task on; lr
  ``model_lr`` (1e-4) on the first task and ``svd_lr`` (5e-5) after it;
  weight decay ``model_weight_decay`` (5e-5).
* ``head``: the current task's head (``last.<task>``), lr ``head_lr`` (1e-3), no
  weight decay, never projected.
* ``norm``: 1-D backbone parameters (batch-norm scale and bias; any other 1-D
  backbone parameter, e.g. a linear bias, is put here too), lr ``bn_lr``
  (5e-4), weight decay 5e-5, never projected.

The optimiser is the run's TrainConfig optimiser (Adam in the official code,
``optimizer="adam"``, ``weight_decay=0``: the method adds the official L2 decay
in its loss, per group). The per-group learning rates are applied by scaling
each group's update by ``lr_group / train.learning_rate`` in
``transform_updates``, which is exact for Adam/SGD (their step is linear in the
lr) and for schedules that scale every group alike. The null-space projection
then acts on the scaled update: Δ ← P Δ (``adam_svd.Adam.step``).

After every task the covariance of each projected site is accumulated over
the task's training batches (shuffled, batch size = the run's) on the
trained model, and the projectors are recomputed (``update_optim_transforms``).

**BECAME-NSCL** (``became_nscl``; ``NSCL-based/main.py`` with ``--merge_list 80
--fisher_m``): for t ≥ 1,

1. stage 1: projected training (the main phase) → θ_GP;
2. stage 2: unprojected training from θ_GP with a fresh optimiser and the same
   groups (``stage2`` overrides the TrainConfig, official 80 epochs with
   early stopping on the training loss) → θ̂;
3. merge with BECAME's coefficient over the **backbone only** (the code's
   Fisher skips ``last*``, ``agent.py`` L372-373), the heads are merged with
   the same λ:

       λ = Σ F_cur (θ̂ − θ_GP)² / Σ (F_cur + F_old)(θ̂ − θ_GP)²,   θ_t = (1 − λ) θ_GP + λ θ̂

   with F_cur the diagonal true Fisher at θ̂ (current head's argmax labels,
   batched squares, :func:`clx.ops.merging.diagonal_fisher`), and
   F_old ← F_old + F(θ_t) after every task (F_old = F(θ_0) after task 0).

Departures from the official code (documented, not reproduced):

* The code's EWC penalty on batch-norm parameters (``reg_coef`` 100 with a
  per-task importance from squared gradients; ``SVDAgent.reg_loss``) is not
  implemented; the norm group trains freely at ``bn_lr``. The penalty also
  enters the code's Fisher (its ``criterion`` adds it), which clx does not have.
* The Fisher pass follows :func:`clx.ops.merging.diagonal_fisher` (training
  split in order, eval-mode forward); the code runs it in train mode over its
  shuffled, augmented loader.
* The schedules (``MultiStepLR`` [30, 60, 80] × 0.5 for Adam-NSCL; early stop
  on the training loss, patience 3, 2 halvings, in the BECAME runs) are the
  TrainConfig's; clx has no multi-step schedule or training-loss early stop.
* The covariance pass uses the training split without augmentation.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods.became import _head_logits_fn  # the same current-head logits (mask-aware)
from clx.methods import sequential
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo
from clx.models.base import Backbone
from clx.ops import merging, null_space, tree

OFFICIAL_LEARNING_RATES = {"first": 1e-4, "body": 5e-5, "head": 1e-3, "norm": 5e-4}


def _l2(params) -> jax.Array:
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(params)),
             jnp.zeros((), jnp.float32))


class NSCLParts:
  """The pieces of Adam-NSCL, shared with BECAME-NSCL."""

  def __init__(self, backbone: Backbone, *, threshold: float, covariance: str,
               learning_rates: dict | None, weight_decay: float, head_mode: str | None,
               sites=None, cov_batch_size: int | None = None):
    if covariance not in null_space.COVARIANCES:
      raise ValueError(f"covariance must be one of {null_space.COVARIANCES}, got {covariance!r}")
    if not threshold >= 1.0:
      raise ValueError(f"threshold (svd_thres) must be >= 1, got {threshold}")
    if not weight_decay >= 0:
      raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    rates = dict(OFFICIAL_LEARNING_RATES if learning_rates is None else learning_rates)
    unknown = sorted(set(rates) - set(OFFICIAL_LEARNING_RATES))
    if unknown or set(rates) != set(OFFICIAL_LEARNING_RATES):
      raise ValueError(f"learning_rates needs exactly the keys {sorted(OFFICIAL_LEARNING_RATES)}, "
                       f"got {sorted(rates)}")
    bad = {k: v for k, v in rates.items() if not v > 0}
    if bad:
      raise ValueError(f"learning_rates must be > 0, got {bad}")
    self.backbone, self.threshold, self.covariance = backbone, float(threshold), covariance
    self.rates, self.weight_decay, self.head_mode = rates, float(weight_decay), head_mode
    self.sites = (tuple(sites) if sites is not None
                  else tuple(p for ps in backbone.sites.values() for p in ps))
    if not self.sites:
      raise ValueError(f"{backbone.name} exposes no sites to project")
    for site in self.sites:
      if np.ndim(tree.get(backbone.params, site)) < 2:
        raise ValueError(f"site {site!r} is not a kernel (shape "
                         f"{np.shape(tree.get(backbone.params, site))})")
    self.cov_batch_size = cov_batch_size
    self.dims = {s: int(np.prod(np.shape(tree.get(backbone.params, s))[:-1])) for s in self.sites}
    self.loss = heads_lib.classification_loss(backbone, sequential.full_params, self.combine,
                                              head_mode=head_mode, penalty=self.l2_penalty)

  def mode(self, spec: StreamSpec) -> str:
    return self.head_mode or heads_lib.default_mode(spec)

  # -- protocol ---------------------------------------------------------------
  def init(self, rng, spec):
    return {"backbone": jax.tree.map(jnp.array, self.backbone.params),
            "heads": heads_lib.init_heads(rng, spec, self.backbone.feature_dim, self.mode(spec)),
            "cov": {tree.to_key(s): jnp.zeros((d, d), jnp.float32) for s, d in self.dims.items()},
            "projector": {tree.to_key(s): jnp.zeros((d, d), jnp.float32)
                          for s, d in self.dims.items()},
            "null_dim": {tree.to_key(s): jnp.zeros((), jnp.int32) for s in self.sites},
            "task": jnp.zeros((), jnp.int32),
            "lr_scale": {k: jnp.ones((), jnp.float32) for k in ("body", "head", "norm")}}

  def begin_task(self, state, ctx):
    cfg = ctx.config
    if cfg.weight_decay:
      raise ValueError(f"adam_nscl applies its own per-group L2 decay (weight_decay="
                       f"{self.weight_decay}); set train.weight_decay=0 (got {cfg.weight_decay})")
    t = ctx.task_index
    heads = heads_lib.add_task_head(state["heads"], jax.random.fold_in(ctx.rng, 0), ctx.spec,
                                    self.backbone.feature_dim, t, self.mode(ctx.spec))
    body = self.rates["first"] if t == 0 else self.rates["body"]
    scale = {"body": body, "head": self.rates["head"], "norm": self.rates["norm"]}
    return {**state, "heads": heads, "task": jnp.asarray(t, jnp.int32),
            "lr_scale": {k: jnp.asarray(v / cfg.learning_rate, jnp.float32)
                         for k, v in scale.items()}}

  def trainable(self, state, info: TaskInfo):
    return {"backbone": state["backbone"],
            "head": state["heads"][heads_lib.head_key(state["heads"], info.task)]}

  def combine(self, state, params, info: TaskInfo):
    return heads_lib.with_head({**state, "backbone": params["backbone"]}, params["head"], info.task)

  def l2_penalty(self, params) -> jax.Array:
    """The official L2 decay on the body and norm groups: ½ · weight_decay · Σ θ² (backbone)."""
    return 0.5 * self.weight_decay * _l2(params["backbone"])

  def scale_updates(self, updates, state):
    """Per-group learning rates: body/norm/head updates × lr_group / train.learning_rate."""
    scale = state["lr_scale"]
    body = jax.tree.map(lambda u: u * (scale["norm"] if u.ndim <= 1 else scale["body"]),
                        updates["backbone"])
    return {"backbone": body, "head": jax.tree.map(lambda u: u * scale["head"], updates["head"])}

  def project_updates(self, updates, state):
    """Scaled updates, with every site kernel's update projected (P Δ) from task 1 on."""
    updates = self.scale_updates(updates, state)
    body = updates["backbone"]
    later = state["task"] > 0
    for site in self.sites:
      u = tree.get(body, site)
      projected = null_space.project_update(u, state["projector"][tree.to_key(site)])
      body = tree.set(body, site, jnp.where(later, projected, u))
    return {**updates, "backbone": body}

  def update_covariance(self, state, ctx):
    """Accumulate each site's covariance over the task's batches; recompute projectors."""
    taps_fn = _taps_fn(self.backbone, self.sites)
    term = null_space.batch_mean_covariance if self.covariance == "batch_mean" else (
        null_space.sample_covariance)
    cov = dict(state["cov"])
    batch_size = self.cov_batch_size or ctx.config.batch_size
    for batch in ctx.batches("train", batch_size=batch_size, shuffle=True, seed=11):
      valid = int(jnp.sum(batch["mask"]))
      if valid == 0:
        continue
      x = batch["x"][:valid] if valid < batch["x"].shape[0] else batch["x"]
      taps = taps_fn(state["backbone"], x)
      for site in self.sites:
        cov[tree.to_key(site)] = cov[tree.to_key(site)] + term(taps[site])
    projector, null_dim = {}, {}
    for site in self.sites:
      c = cov[tree.to_key(site)]
      if not bool(jnp.all(jnp.isfinite(c))):
        raise ValueError(f"task {ctx.task_index}: the input covariance of {site!r} has NaN/Inf")
      projector[tree.to_key(site)], null_dim[tree.to_key(site)] = null_space.null_space_projector(
          c, self.threshold)
    return {**state, "cov": cov, "projector": projector, "null_dim": null_dim}

  def method(self, name: str, **overrides) -> ContinualMethod:
    fns = dict(init=self.init, begin_task=self.begin_task, trainable=self.trainable,
               loss=self.loss, combine=self.combine, end_task=self.update_covariance,
               params_for=sequential.full_params,
               predict=heads_lib.classification_predict(self.backbone, sequential.full_params,
                                                        head_mode=self.head_mode),
               transform_updates=self.project_updates,
               diagnostics=lambda state: {"null_dims": null_dims(state)})
    fns.update(overrides)
    return ContinualMethod(name=name, backbone=self.backbone, **fns)


@functools.lru_cache(maxsize=16)
def _taps_fn(backbone: Backbone, sites: tuple[str, ...]):
  return jax.jit(lambda params, x: backbone.apply(params, x, taps="inputs", tap_sites=sites)[1])


def null_dims(state) -> dict[str, int]:
  """``{site: k}``: the null-space dimension of each projected site."""
  return {tree.to_path(tree.from_key(k)): int(v) for k, v in state["null_dim"].items()}


def adam_nscl(backbone: Backbone, *, threshold: float = 10.0, covariance: str = "batch_mean",
              learning_rates: dict | None = None, weight_decay: float = 5e-5,
              head_mode: str | None = None, sites=None, cov_batch_size: int | None = None,
              name: str = "adam_nscl") -> ContinualMethod:
  """Adam-NSCL (see the module docstring).

  Args:
    backbone: the network (fully trained).
    threshold: ``svd_thres``: null space = eigenvectors with s ≤ s_min·threshold
      (official 10 on CIFAR-100 10 tasks and TinyImageNet, 30 on 20 tasks).
    covariance: ``"batch_mean"`` (official ``SVDAgentAvg``) or ``"sample"``.
    learning_rates: ``{"first", "body", "head", "norm"}`` absolute learning rates
      (official CIFAR-100: 1e-4, 5e-5, 1e-3, 5e-4); the run's
      ``train.learning_rate`` is divided out.
    weight_decay: L2 decay of the body and norm groups (official 5e-5); the
      head has none. ``train.weight_decay`` must be 0.
    head_mode: ``"per_task"``/``"shared"`` (default by scenario).
    sites: kernels to project (default: every backbone site).
    cov_batch_size: batch size of the covariance pass (default: the training
      batch size, which the batch-mean form depends on).
    name: registry/run name.
  """
  parts = NSCLParts(backbone, threshold=threshold, covariance=covariance,
                    learning_rates=learning_rates, weight_decay=weight_decay, head_mode=head_mode,
                    sites=sites, cov_batch_size=cov_batch_size)
  return parts.method(name)


def became_nscl(backbone: Backbone, *, stage2: dict | None = None, fisher: str = "true",
                fisher_batch_size: int | None = None, gamma: float = 1.0,
                name: str = "became_nscl", verbose: bool = True, **nscl_kwargs) -> ContinualMethod:
  """BECAME on Adam-NSCL (see the module docstring).

  Args:
    backbone: the network.
    stage2: TrainConfig fields overriding the run's for the unprojected stage
      (official: 80 epochs with early stopping).
    fisher: ``"true"`` (argmax labels, official) or ``"empirical"``.
    fisher_batch_size: batch size of the Fisher pass (default: training batch).
    gamma: F_old ← F(θ_t) + γ F_old (official 1).
    name: registry/run name.
    verbose: print λ per task.
    **nscl_kwargs: :func:`adam_nscl` arguments.
  """
  if fisher not in ("true", "empirical"):
    raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
  if not gamma >= 0:
    raise ValueError(f"gamma must be >= 0, got {gamma}")
  nscl_kwargs.setdefault("threshold", 10.0)
  nscl_kwargs.setdefault("covariance", "batch_mean")
  nscl_kwargs.setdefault("learning_rates", None)
  nscl_kwargs.setdefault("weight_decay", 5e-5)
  nscl_kwargs.setdefault("head_mode", None)
  parts = NSCLParts(backbone, **nscl_kwargs)

  def init(rng, spec):
    state = parts.init(rng, spec)
    return {**state, "fisher": jax.tree.map(jnp.zeros_like, state["backbone"]),
            "lambdas": jnp.zeros((spec.num_tasks,), jnp.float32)}

  def fisher_of(params, state, ctx):
    """Diagonal Fisher of the current head's CE, backbone leaves only (heads excluded)."""
    spec, t = ctx.spec, ctx.task_index
    mode, key = parts.mode(spec), heads_lib.head_key(state["heads"], t)
    data = ctx.arrays("train")
    labels = None
    if fisher == "empirical":
      labels = np.asarray(heads_lib.train_labels(jnp.asarray(data["y"]), spec, t, mode))
    full = merging.diagonal_fisher(
        _head_logits_fn(backbone, spec, t, mode, key), params, data["x"], labels=labels,
        kind=fisher, batch_size=fisher_batch_size or ctx.config.batch_size,
        pass_mask=True)  # padding rows of the last batch stay out of batch statistics
    return full["backbone"]

  def end_task(state, ctx):
    t = ctx.task_index
    params = parts.trainable(state, ctx.info)  # θ_GP: the stage-1 result, combined by the loop
    if t == 0:
      merged, lam = params, jnp.float32(1.0)
      f_old = jax.tree.map(jnp.zeros_like, state["fisher"])
    else:
      stage2_cfg = dataclasses.replace(ctx.config, **(stage2 or {}))
      theta_hat = ctx.fit(params, functools.partial(parts.loss, info=ctx.info),
                          transform_updates=parts.scale_updates, state=state, config=stage2_cfg,
                          title=f"{name} task {t + 1} stage 2", phase=2)
      f_cur = fisher_of(theta_hat, state, ctx)
      f_old = state["fisher"]
      lam = merging.became_coefficient(params["backbone"], theta_hat["backbone"], f_cur, f_old)
      merged = merging.interpolate(params, theta_hat, lam)  # heads too, with the same λ
    if verbose and jax.process_index() == 0:
      print(f"{name} task {t + 1}: merge coefficient λ = {float(lam):.4f}", file=sys.stderr,
            flush=True)
    f_new = jax.tree.map(lambda a, b: a + gamma * b, fisher_of(merged, state, ctx), f_old)
    state = parts.combine(state, merged, ctx.info)
    state = {**state, "fisher": f_new, "lambdas": state["lambdas"].at[t].set(lam)}
    return parts.update_covariance(state, ctx)

  def diagnostics(state):
    return {"null_dims": null_dims(state),
            "lambdas": [round(float(v), 6) for v in np.asarray(state["lambdas"])]}

  return parts.method(name, init=init, end_task=end_task, diagnostics=diagnostics)


REGISTRY = {"adam_nscl": adam_nscl, "became_nscl": became_nscl}
