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
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import became as became_lib
from clx.methods import gpm as gpm_lib
from clx.methods import heads as heads_lib
from clx.methods import sequential
from clx.methods.base import (ContinualMethod, Params, State, StreamSpec, TaskContext,
                              check_positive_int, renamed)
from clx.models.base import Backbone
from clx.ops import merging, null_space, tree

OFFICIAL_LEARNING_RATES = {"first": 1e-4, "body": 5e-5, "head": 1e-3, "norm": 5e-4}
RENAMED = {"cov_batch_size": "aux_batch_size"}


@dataclasses.dataclass(frozen=True)
class NSCLConfig:
  """Settings of Adam-NSCL (see :func:`adam_nscl`); validated on construction."""

  threshold: float = 10.0
  covariance: str = "batch_mean"
  learning_rates: Mapping[str, float] | None = None
  weight_decay: float = 5e-5
  head_mode: str | None = None
  sites: tuple[str, ...] | None = None
  aux_batch_size: int | None = None

  def __post_init__(self):
    if self.covariance not in null_space.COVARIANCES:
      raise ValueError(f"covariance must be one of {null_space.COVARIANCES}, "
                       f"got {self.covariance!r}")
    if not self.threshold >= 1.0:
      raise ValueError(f"threshold (svd_thres) must be >= 1, got {self.threshold}")
    if not self.weight_decay >= 0:
      raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
    rates = self.rates()
    if set(rates) != set(OFFICIAL_LEARNING_RATES):
      raise ValueError(f"learning_rates needs exactly the keys {sorted(OFFICIAL_LEARNING_RATES)}, "
                       f"got {sorted(rates)}")
    bad = {k: v for k, v in rates.items() if not v > 0}
    if bad:
      raise ValueError(f"learning_rates must be > 0, got {bad}")
    heads_lib.check_mode(self.head_mode, "adam_nscl")
    if self.aux_batch_size is not None:
      check_positive_int(self.aux_batch_size, "aux_batch_size (cov_batch_size)")
    if self.sites is not None:
      object.__setattr__(self, "sites", tuple(self.sites))

  def rates(self) -> dict[str, float]:
    """The absolute learning rates ``{"first", "body", "head", "norm"}``.

    Returns:
      ``learning_rates``, or the official CIFAR-100 ones when it is None.
    """
    return dict(OFFICIAL_LEARNING_RATES if self.learning_rates is None else self.learning_rates)


class Setup(NamedTuple):
  """Settings, backbone and the projected sites with their input sizes d."""

  cfg: NSCLConfig
  backbone: Backbone
  sites: tuple[str, ...]
  dims: dict[str, int]


def setup(backbone: Backbone, cfg: NSCLConfig) -> Setup:
  """Resolve the projected kernels (default: every backbone site); errors name a non-kernel.

  Args:
    backbone: the network.
    cfg: the options (``sites``).

  Returns:
    A :class:`Setup` with the sites and each site's input size d (product of the kernel's
    leading dimensions).

  Raises:
    ValueError: a site is not at least 2-D, or the backbone has no site.
    KeyError: a site path is not in the params.
  """
  sites = gpm_lib.projected_sites(backbone, cfg.sites)
  for site in sites:
    if np.ndim(tree.get(backbone.params, site)) < 2:
      raise ValueError(f"site {site!r} is not a kernel (shape "
                       f"{np.shape(tree.get(backbone.params, site))})")
  dims = {s: int(np.prod(np.shape(tree.get(backbone.params, s))[:-1])) for s in sites}
  return Setup(cfg, backbone, sites, dims)


def _l2(params: Params) -> jax.Array:
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(params)),
             jnp.zeros((), jnp.float32))


def init(su: Setup, rng: jax.Array, spec: StreamSpec) -> State:
  """Backbone copy, heads, zero covariances and projectors per site, unit lr scales.

  Args:
    su: the setup.
    rng: key for the heads.
    spec: the stream.

  Returns:
    ``{"backbone", "heads", "cov" {site key: (d, d)}, "projector" {site key: (d, d)},
    "null_dim" {site key: ()}, "task", "lr_scale" {"body", "head", "norm"}}``.
  """
  mode = heads_lib.mode_for(su.cfg.head_mode, spec)
  return {"backbone": jax.tree.map(jnp.array, su.backbone.params),
          "heads": heads_lib.init_heads(rng, spec, su.backbone.feature_dim, mode),
          "cov": {tree.to_key(s): jnp.zeros((d, d), jnp.float32) for s, d in su.dims.items()},
          "projector": {tree.to_key(s): jnp.zeros((d, d), jnp.float32)
                        for s, d in su.dims.items()},
          "null_dim": {tree.to_key(s): jnp.zeros((), jnp.int32) for s in su.sites},
          "task": jnp.zeros((), jnp.int32),
          "lr_scale": {k: jnp.ones((), jnp.float32) for k in ("body", "head", "norm")}}


def begin_task(su: Setup, state: State, ctx: TaskContext) -> State:
  """Add the task's head; set the groups' lr scales (lr_group / train.learning_rate).

  Args:
    su: the setup.
    state: the state after the previous task.
    ctx: the loop's context (``ctx.config.learning_rate`` is divided out of the group rates).

  Returns:
    The state with the task's head, ``task`` and ``lr_scale`` (the body uses ``rates["first"]``
    on task 0).

  Raises:
    ValueError: the run's ``train.weight_decay`` is not 0.
  """
  cfg = ctx.config
  if cfg.weight_decay:
    raise ValueError(f"adam_nscl applies its own per-group L2 decay (weight_decay="
                     f"{su.cfg.weight_decay}); set train.weight_decay=0 (got {cfg.weight_decay})")
  t = ctx.task_index
  heads = heads_lib.add_task_head(state["heads"], jax.random.fold_in(ctx.rng, 0), ctx.spec,
                                  su.backbone.feature_dim, t,
                                  heads_lib.mode_for(su.cfg.head_mode, ctx.spec))
  rates = su.cfg.rates()
  scale = {"body": rates["first"] if t == 0 else rates["body"], "head": rates["head"],
           "norm": rates["norm"]}
  return {**state, "heads": heads, "task": jnp.asarray(t, jnp.int32),
          "lr_scale": {k: jnp.asarray(v / cfg.learning_rate, jnp.float32)
                       for k, v in scale.items()}}


def scale_updates(updates: Params, state: State) -> Params:
  """Per-group learning rates: body/norm/head updates × lr_group / train.learning_rate.

  Args:
    updates: ``{"backbone", "head"}`` optimiser updates.
    state: the state (its ``lr_scale``).

  Returns:
    The updates scaled: 1-D backbone leaves by ``norm``, others by ``body``, the head by
    ``head``.
  """
  scale = state["lr_scale"]
  body = jax.tree.map(lambda u: u * (scale["norm"] if u.ndim <= 1 else scale["body"]),
                      updates["backbone"])
  return {"backbone": body, "head": jax.tree.map(lambda u: u * scale["head"], updates["head"])}


def project_updates(su: Setup, updates: Params, state: State) -> Params:
  """Scaled updates, with every site kernel's update projected (P Δ) from task 1 on.

  Args:
    su: the setup (its sites).
    updates: ``{"backbone", "head"}`` optimiser updates.
    state: the state (``lr_scale``, ``projector`` (d, d) per site, ``task``).

  Returns:
    The scaled updates, each site kernel's (d, d_out) update replaced by P Δ when task > 0.
  """
  updates = scale_updates(updates, state)
  body = updates["backbone"]
  later = state["task"] > 0
  for site in su.sites:
    u = tree.get(body, site)
    projected = null_space.project_update(u, state["projector"][tree.to_key(site)])
    body = tree.set(body, site, jnp.where(later, projected, u))
  return {**updates, "backbone": body}


def update_covariance(su: Setup, state: State, ctx: TaskContext) -> State:
  """Accumulate each site's covariance over the task's batches; recompute projectors.

  Args:
    su: the setup.
    state: the state after training the task.
    ctx: the loop's context (training batches, shuffled with seed 11).

  Returns:
    The state with ``cov``, ``projector`` and ``null_dim`` updated.

  Raises:
    ValueError: a covariance holds NaN/Inf.
  """
  taps_fn = _taps_fn(su.backbone, su.sites)
  term = null_space.batch_mean_covariance if su.cfg.covariance == "batch_mean" else (
      null_space.sample_covariance)
  cov = dict(state["cov"])
  batch_size = su.cfg.aux_batch_size or ctx.config.batch_size
  for batch in ctx.batches("train", batch_size=batch_size, shuffle=True, seed=11):
    valid = int(jnp.sum(batch["mask"]))
    if valid == 0:
      continue
    x = batch["x"][:valid] if valid < batch["x"].shape[0] else batch["x"]
    taps = taps_fn(state["backbone"], x)
    for site in su.sites:
      cov[tree.to_key(site)] = cov[tree.to_key(site)] + term(taps[site])
  projector, null_dim = {}, {}
  for site in su.sites:
    c = cov[tree.to_key(site)]
    if not bool(jnp.all(jnp.isfinite(c))):
      raise ValueError(f"task {ctx.task_index}: the input covariance of {site!r} has NaN/Inf")
    projector[tree.to_key(site)], null_dim[tree.to_key(site)] = null_space.null_space_projector(
        c, su.cfg.threshold)
  return {**state, "cov": cov, "projector": projector, "null_dim": null_dim}


@functools.lru_cache(maxsize=16)
def _taps_fn(backbone: Backbone, sites: tuple[str, ...]):
  return jax.jit(lambda params, x: backbone.apply(params, x, taps="inputs", tap_sites=sites)[1])


def null_dims(state: State) -> dict[str, int]:
  """``{site: k}``: the null-space dimension of each projected site.

  Args:
    state: the state (its ``null_dim``).

  Returns:
    ``{site path: null-space dimension}``.
  """
  return {tree.to_path(tree.from_key(k)): int(v) for k, v in state["null_dim"].items()}


def loss_fn(su: Setup) -> Callable:
  """Cross-entropy of the current head + the official L2 decay on the body and norm groups.

  Args:
    su: the setup (``cfg.weight_decay``, ``cfg.head_mode``).

  Returns:
    A loss ``(params, state, base, batch, rng, info) -> (loss, metrics)``.
  """
  def penalty(params):
    return 0.5 * su.cfg.weight_decay * _l2(params["backbone"])
  return heads_lib.classification_loss(su.backbone, sequential.full_params, gpm_lib.combine,
                                       head_mode=su.cfg.head_mode, penalty=penalty)


def method(su: Setup, name: str, **overrides: Any) -> ContinualMethod:
  """The :class:`ContinualMethod` of an Adam-NSCL setup; ``overrides`` replace protocol fields.

  Args:
    su: the setup.
    name: the method's name.
    **overrides: :class:`ContinualMethod` fields replacing Adam-NSCL's (BECAME-NSCL).

  Returns:
    The method.
  """
  fns = dict(init=functools.partial(init, su), begin_task=functools.partial(begin_task, su),
             trainable=gpm_lib.trainable, loss=loss_fn(su), combine=gpm_lib.combine,
             end_task=functools.partial(update_covariance, su),
             params_for=sequential.full_params,
             predict=heads_lib.classification_predict(su.backbone, sequential.full_params,
                                                      head_mode=su.cfg.head_mode),
             transform_updates=functools.partial(project_updates, su),
             diagnostics=lambda state: {"null_dims": null_dims(state)})
  return ContinualMethod(name=name, backbone=su.backbone, **{**fns, **overrides})


def adam_nscl(backbone: Backbone, *, name: str = "adam_nscl", **kwargs: Any) -> ContinualMethod:
  """Adam-NSCL (see the module docstring).

  Args:
    backbone: the network (fully trained).
    name: registry/run name.
    **kwargs: :class:`NSCLConfig` fields:

      - threshold: ``svd_thres``: null space = eigenvectors with s ≤ s_min·threshold
        (official 10 on CIFAR-100 10 tasks and TinyImageNet, 30 on 20 tasks).
      - covariance: ``"batch_mean"`` (official ``SVDAgentAvg``) or ``"sample"``.
      - learning_rates: ``{"first", "body", "head", "norm"}`` absolute learning rates
        (official CIFAR-100: 1e-4, 5e-5, 1e-3, 5e-4); the run's
        ``train.learning_rate`` is divided out.
      - weight_decay: L2 decay of the body and norm groups (official 5e-5); the
        head has none. ``train.weight_decay`` must be 0.
      - head_mode: ``"per_task"``/``"shared"`` (default by scenario).
      - sites: kernels to project (default: every backbone site).
      - aux_batch_size (formerly ``cov_batch_size``): batch size of the covariance
        pass (default: the training batch size, which the batch-mean form depends on).

  Returns:
    The method.

  Raises:
    TypeError: an option was given under both its old and its new name.
    ValueError: invalid options or sites.
  """
  kwargs = renamed(kwargs, RENAMED, name)
  return method(setup(backbone, NSCLConfig(**kwargs)), name)


def fisher_end_task(su: Setup, cfg: became_lib.BECAMEConfig, name: str, state: State,
                    ctx: TaskContext) -> State:
  """BECAME-NSCL's end of task: stage 2, the backbone-only Fisher merge, the covariance update.

  Args:
    su: the Adam-NSCL setup.
    cfg: the BECAME options.
    name: the method's name (progress titles, λ report).
    state: the state after stage 1 (null-space-projected training).
    ctx: the loop's context for task t.

  Returns:
    The state with the merged parameters, backbone ``fisher``, ``lambdas[t]`` and the updated
    covariances/projectors.
  """
  t = ctx.task_index
  params = gpm_lib.trainable(state, ctx.info)  # θ_GP: the stage-1 result, combined by the loop
  # The official Fisher skips the heads (agent.py L372-373): backbone leaves only.
  fisher_of = lambda p: became_lib.current_head_fisher(  # noqa: E731
      su.backbone, heads_lib.mode_for(su.cfg.head_mode, ctx.spec), p, state, ctx,
      kind=cfg.fisher, batch_size=cfg.aux_batch_size or ctx.config.batch_size)["backbone"]
  if t == 0:
    merged, lam = params, jnp.float32(1.0)
    f_old = jax.tree.map(jnp.zeros_like, state["fisher"])
  else:
    stage2_cfg = dataclasses.replace(ctx.config, **(cfg.stage2 or {}))
    theta_hat = ctx.fit(params, functools.partial(loss_fn(su), info=ctx.info),
                        transform_updates=scale_updates, state=state, config=stage2_cfg,
                        title=f"{name} task {t + 1} stage 2", phase=2)
    f_old = state["fisher"]
    lam = merging.became_coefficient(params["backbone"], theta_hat["backbone"],
                                     fisher_of(theta_hat), f_old)
    merged = merging.interpolate(params, theta_hat, lam)  # heads too, with the same λ
  became_lib.report_lambda(name, t, lam, cfg.verbose)
  f_new = jax.tree.map(lambda a, b: a + cfg.gamma * b, fisher_of(merged), f_old)
  state = gpm_lib.combine(state, merged, ctx.info)
  state = {**state, "fisher": f_new, "lambdas": state["lambdas"].at[t].set(lam)}
  return update_covariance(su, state, ctx)


def fisher_diagnostics(state: State) -> dict:
  """Null-space dimensions and λ per task.

  Args:
    state: the state.

  Returns:
    ``{"null_dims": {site: k}, "lambdas": [λ per task, rounded to 6 digits]}``.
  """
  return {"null_dims": null_dims(state),
          "lambdas": [round(float(v), 6) for v in np.asarray(state["lambdas"])]}


def became_nscl(backbone: Backbone, *, name: str = "became_nscl",
                **kwargs: Any) -> ContinualMethod:
  """BECAME on Adam-NSCL (see the module docstring).

  Args:
    backbone: the network.
    name: registry/run name.
    **kwargs: :class:`clx.methods.became.BECAMEConfig` fields (``stage2``: the
      unprojected stage's TrainConfig overrides, official 80 epochs with early
      stopping; ``fisher``; ``gamma``: F_old ← F(θ_t) + γ F_old, official 1;
      ``verbose``) and :func:`adam_nscl`'s :class:`NSCLConfig` fields.
      ``aux_batch_size`` (formerly ``fisher_batch_size`` / ``cov_batch_size``) is
      the batch size of both host passes (default: the training batch size).

  Returns:
    The method.

  Raises:
    TypeError: an option was given under both its old and its new name.
    ValueError: invalid options or sites.
  """
  kwargs = renamed(renamed(kwargs, {"fisher_batch_size": "aux_batch_size"}, name), RENAMED, name)
  own = {f.name for f in dataclasses.fields(became_lib.BECAMEConfig)} - {"aux_batch_size",
                                                                          "per_layer",
                                                                          "fisher_dropout"}
  cfg = became_lib.BECAMEConfig(aux_batch_size=kwargs.get("aux_batch_size"),
                                **{k: v for k, v in kwargs.items() if k in own})
  su = setup(backbone, NSCLConfig(**{k: v for k, v in kwargs.items() if k not in own}))

  def fisher_init(rng, spec):
    state = init(su, rng, spec)
    return {**state, "fisher": jax.tree.map(jnp.zeros_like, state["backbone"]),
            "lambdas": jnp.zeros((spec.num_tasks,), jnp.float32)}

  return method(su, name, init=fisher_init,
                end_task=functools.partial(fisher_end_task, su, cfg, name),
                diagnostics=fisher_diagnostics)


REGISTRY = {"adam_nscl": adam_nscl, "became_nscl": became_nscl}
