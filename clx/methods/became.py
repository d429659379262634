"""BECAME: Bayesian continual learning with adaptive model merging (Li et al., ICML 2025).

Per task t ≥ 1, on top of a gradient-projection method (GPM or SGP):

1. **Stage 1** — projected training from the previous merged model → θ_GP
   (the loop's main training phase, with the base method's projection).
2. **Stage 2** — unconstrained training from θ_GP with a fresh optimiser
   (``stage2`` settings) → θ̂.
3. **Merge** with the closed-form coefficient of the official code
   (``GPM-based/fisher.py compute_fisher_merging``)::

       F_cur = diagFisher(θ̂, D_t)                         (true Fisher: argmax labels)
       λ = Σ F_cur (θ̂ − θ_GP)² / Σ (F_cur + F_old)(θ̂ − θ_GP)²   (one global scalar)
       θ_t = (1 − λ) θ_GP + λ θ̂
       F_old ← diagFisher(θ_t, D_t) + γ F_old

   λ minimises Σ F_cur (θ − θ̂)² + F_old (θ − θ_GP)² along the segment
   (:func:`clx.ops.merging.became_objective`). Task 0 is trained normally and
   sets F_old = diagFisher(θ_0, D_0). The memory of the base method is then
   updated on the merged model.

The Fisher covers every trained parameter (backbone and the current head; a
new head has F_old = 0, which pushes λ towards 1), uses the current head's
outputs only, batched squared gradients with the training batch size
(official ``compute_fisher_matrix_diag``: ``F += grad²·len(batch)`` over
consecutive batches of the training split in order, then ``/ N``). As the
official pass, which runs in ``model.train()``:

- dropout is **on** (``fisher_dropout=True``, default). Its masks come from a
  fixed key, ``fold_in(fold_in(task_rng, FISHER_RNG_TAG + k), b)`` for the
  k-th Fisher pass of the task (0: F at θ̂ or θ_0, 1: F at the merged θ_t) and
  batch b, so a run is reproducible; the official masks are PyTorch's global
  RNG draws. ``fisher_dropout=False`` gives the deterministic Fisher clx used
  before (dropout off), a documented departure;
- batch norm normalises each batch over its **real** rows: the last, short
  batch is padded to the batch size but the padding is masked out of the
  batch statistics (before, the padding entered them and the padded batch
  weighed about 6× a full one in ΣF on a random-weight AlexNet).

``per_layer=True`` uses one coefficient per parameter leaf instead (an
option, not the official form). λ per task is kept in the state
(``lambdas``) and printed.

The Fisher pass (:func:`current_head_fisher`) is shared with BECAME on
Adam-NSCL (:mod:`clx.methods.became_nscl`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import gpm as gpm_lib
from clx.methods import heads as heads_lib
from clx.methods import passes
from clx.methods.base import (ContinualMethod, Params, State, StreamSpec, TaskContext,
                              check_positive_int, renamed)
from clx.models.base import Backbone
from clx.ops import merging

FISHER_KINDS = ("true", "empirical")
FISHER_RNG_TAG = 1000  # fold_in tag of the Fisher passes' dropout keys (other uses: < 10)


def check_stage2(stage2: dict | None) -> None:
  """Build-time check of ``stage2`` TrainConfig overrides (keys and ranges).

  Args:
    stage2: :class:`clx.train.TrainConfig` field overrides, or None/empty.

  Raises:
    ValueError: an unknown field or an invalid value (the message starts with ``stage2:``).
  """
  if stage2:  # at build time rather than after stage 1 of task 0
    from clx.train.loop import TrainConfig  # pylint: disable=import-outside-toplevel
    try:
      dataclasses.replace(TrainConfig(), **stage2)
    except (TypeError, ValueError) as e:
      raise ValueError(f"stage2: {e}") from None


def check_fisher(fisher: str, gamma: float, aux_batch_size: int | None) -> None:
  """Build-time check of the Fisher settings shared by BECAME and BECAME-NSCL.

  Args:
    fisher: ``"true"`` or ``"empirical"``.
    gamma: decay of the accumulated Fisher (>= 0).
    aux_batch_size: batch size of the Fisher passes, or None for the training batch size.

  Raises:
    ValueError: an unknown ``fisher``, a negative (or NaN) ``gamma`` or a non-positive
      ``aux_batch_size``.
  """
  if fisher not in FISHER_KINDS:
    raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
  if not gamma >= 0:
    raise ValueError(f"gamma must be >= 0, got {gamma}")
  if aux_batch_size is not None:
    check_positive_int(aux_batch_size, "aux_batch_size (fisher_batch_size)")


@dataclasses.dataclass(frozen=True)
class BECAMEConfig:
  """BECAME's own settings (see :func:`became`); the base method's are a :class:`GPMConfig`."""

  stage2: dict | None = None
  fisher: str = "true"
  aux_batch_size: int | None = None
  gamma: float = 1.0
  per_layer: bool = False
  fisher_dropout: bool = True
  verbose: bool = True

  def __post_init__(self):
    check_fisher(self.fisher, self.gamma, self.aux_batch_size)
    check_stage2(self.stage2)


def fisher_rng(task_rng: jax.Array, pass_index: int) -> jax.Array:
  """Dropout key of a task's ``pass_index``-th Fisher pass (batch b folds in b).

  Args:
    task_rng: the task's key (``ctx.rng``).
    pass_index: 0 for the first Fisher pass of the task, 1 for the second.

  Returns:
    The pass's key, ``fold_in(task_rng, FISHER_RNG_TAG + pass_index)``.
  """
  return jax.random.fold_in(task_rng, FISHER_RNG_TAG + pass_index)


@functools.lru_cache(maxsize=32)
def _head_logits_fn(backbone, spec, task_index, mode, head_key):
  """``(params, x, mask=, rng=) -> current-head logits``; one stable object per task
  so the Fisher's jit (``logits_fn`` is a static argument) compiles once per task.
  ``mask`` keeps padding rows out of batch statistics, ``rng`` turns dropout on."""

  def logits_fn(p, x, mask=None, rng=None):
    feats = backbone.apply(p["backbone"], x, mask=mask, rng=rng)
    logits, _ = heads_lib.train_logits_and_labels(
        {head_key: p["head"]}, feats, jnp.zeros(x.shape[0], jnp.int32), spec, task_index, mode)
    return logits

  return logits_fn


def current_head_fisher(backbone: Backbone, mode: str, params: Params, state: State,
                        ctx: TaskContext, *, kind: str, batch_size: int,
                        rng: jax.Array | None = None) -> Params:
  """Diagonal Fisher of the current head's cross-entropy at ``params`` on the task's train split.

  Official ``compute_fisher_matrix_diag``: batched squared gradients over consecutive
  batches of ``batch_size``, the last batch's padding kept out of batch statistics.

  Args:
    backbone: the network.
    mode: the head layout (``"per_task"``/``"shared"``).
    params: ``{"backbone", "head"}`` at which the Fisher is taken.
    state: the method state (for the head key).
    ctx: the task context (data, task index, spec).
    kind: ``"true"`` (labels = argmax, official) or ``"empirical"`` (ground truth).
    batch_size: rows per batch (the official code: the training batch size).
    rng: dropout key (dropout on, as ``model.train()``), or None (dropout off).

  Returns:
    The Fisher, laid out like ``params``.
  """
  spec, t = ctx.spec, ctx.task_index
  data = ctx.arrays("train")
  labels = None
  if kind == "empirical":
    labels = np.asarray(heads_lib.train_labels(jnp.asarray(data["y"]), spec, t, mode))
  logits_fn = _head_logits_fn(backbone, spec, t, mode, heads_lib.head_key(state["heads"], t))
  # Once, on one device, then placed like the parameters: with them on the mesh the whole pass
  # ran on every device (8 x the work on 8 simulated CPU devices; passes.on_one_device).
  fisher = merging.diagonal_fisher(logits_fn, passes.on_one_device(params), data["x"],
                                   labels=labels, kind=kind, batch_size=batch_size,
                                   pass_mask=True, rng=passes.on_one_device(rng))
  return passes.placed_like(fisher, params)


def old_fisher(state: State, params: Params, task: int) -> Params:
  """F_old laid out like the trainable params (zeros for a new head).

  Args:
    state: the state (its ``fisher``, absent before the first merge).
    params: the trainable ``{"backbone", "head"}``, the layout to match.
    task: the current task (selects the stored head Fisher).

  Returns:
    ``{"backbone", "head"}`` accumulated Fisher, zeros where none is stored.
  """
  stored = state.get("fisher")
  if stored is None:
    return jax.tree.map(jnp.zeros_like, params)
  head = stored["heads"].get(heads_lib.head_key(state["heads"], task))
  return {"backbone": stored["backbone"],
          "head": head if head is not None else jax.tree.map(jnp.zeros_like, params["head"])}


def store_fisher(state: State, f_new: Params, task: int) -> dict:
  """The state's ``fisher`` entry with the backbone's and the current head's Fisher replaced.

  Args:
    state: the state (its ``fisher`` and ``heads``).
    f_new: ``{"backbone", "head"}`` Fisher after the task.
    task: the current task (names the head entry).

  Returns:
    ``{"backbone": F, "heads": {head key: F}}``.
  """
  stored = state.get("fisher") or {"backbone": None, "heads": {}}
  return {"backbone": f_new["backbone"],
          "heads": {**stored["heads"], heads_lib.head_key(state["heads"], task): f_new["head"]}}


def report_lambda(name: str, task: int, lam: jax.Array, verbose: bool) -> None:
  """Print a task's merge coefficient (process 0 only).

  Args:
    name: the method's name.
    task: 0-based task index (printed 1-based).
    lam: the scalar merge coefficient λ.
    verbose: print only when True.
  """
  if verbose and jax.process_index() == 0:
    print(f"{name} task {task + 1}: merge coefficient λ = {float(lam):.4f}",
          file=sys.stderr, flush=True)


def init(su: gpm_lib.Setup, rng: jax.Array, spec: StreamSpec) -> State:
  """The base method's state plus λ per task.

  Args:
    su: the base method's setup.
    rng: key for the heads.
    spec: the stream.

  Returns:
    The base GPM/SGP state plus ``lambdas`` (T,) float32 zeros.
  """
  return {**gpm_lib.init(su, rng, spec), "lambdas": jnp.zeros((spec.num_tasks,), jnp.float32)}


def end_task(su: gpm_lib.Setup, cfg: BECAMEConfig, name: str, state: State,
             ctx: TaskContext) -> State:
  """Stage 2, the Fisher merge and the base method's memory update (see the module docstring).

  Args:
    su: the base method's setup.
    cfg: the BECAME options.
    name: the method's name (progress titles, λ report).
    state: the state after stage 1 (gradient-projected training).
    ctx: the loop's context for task t.

  Returns:
    The state with the merged parameters, ``fisher``, ``lambdas[t]`` and the grown memory.
  """
  t = ctx.task_index
  params = gpm_lib.trainable(state, ctx.info)  # θ_GP: the stage-1 result, combined by the loop
  fisher_of = functools.partial(
      current_head_fisher, su.backbone, gpm_lib.head_mode(su.cfg, ctx.spec), state=state,
      ctx=ctx, kind=cfg.fisher, batch_size=cfg.aux_batch_size or ctx.config.batch_size)
  rng = (lambda k: fisher_rng(ctx.rng, k)) if cfg.fisher_dropout else (lambda k: None)
  if t == 0:
    f_new, lam, merged = fisher_of(params, rng=rng(0)), jnp.float32(1.0), params
  else:
    stage2_cfg = dataclasses.replace(ctx.config, **(cfg.stage2 or {}))
    theta_hat = ctx.fit(params, functools.partial(gpm_lib.plain_loss(su), info=ctx.info),
                        state=state, config=stage2_cfg, title=f"{name} task {t + 1} stage 2",
                        phase=2)
    f_cur = fisher_of(theta_hat, rng=rng(0))
    f_old = old_fisher(state, params, t)
    lam = merging.became_coefficient(params, theta_hat, f_cur, f_old, per_leaf=cfg.per_layer)
    merged = merging.interpolate(params, theta_hat, lam)
    f_new = jax.tree.map(lambda a, b: a + cfg.gamma * b, fisher_of(merged, rng=rng(1)), f_old)
    lam = jnp.mean(jnp.stack(jax.tree.leaves(lam))) if cfg.per_layer else lam
  report_lambda(name, t, lam, cfg.verbose)
  state = gpm_lib.combine(state, merged, ctx.info)
  state = {**state, "fisher": store_fisher(state, f_new, t),
           "lambdas": state["lambdas"].at[t].set(lam)}
  return gpm_lib.update_memory(su, state, ctx)


def diagnostics(state: State) -> dict:
  """Memory ranks and λ per task.

  Args:
    state: the state.

  Returns:
    ``{"memory_ranks": {site: rank}, "lambdas": [λ per task, rounded to 6 digits]}``.
  """
  return {"memory_ranks": gpm_lib.memory_ranks(state),
          "lambdas": [round(float(v), 6) for v in np.asarray(state["lambdas"])]}


def became(backbone: Backbone, *, memory: str | None = None, name: str | None = None,
           **kwargs: Any) -> ContinualMethod:
  """BECAME on top of GPM (``memory="gpm"``) or SGP (``memory="sgp"``).

  Args:
    backbone: the network (fully trained, as in the base method).
    memory: ``"gpm"`` or ``"sgp"``: the memory rule of the gradient-projection stage
      (``base=`` is its old name, accepted with a DeprecationWarning).
    name: registry/run name (default ``became_<memory>``).
    **kwargs: :class:`BECAMEConfig` fields, then the base method's
      :class:`clx.methods.gpm.GPMConfig` fields (threshold, num_samples, …):

      - stage2: :class:`clx.train.TrainConfig` fields overriding the run's training
        settings for the unconstrained stage (official: its own ``lr2``; the
        default re-uses the stage-1 settings).
      - fisher: ``"true"`` (labels = the model's argmax, official default) or
        ``"empirical"`` (ground-truth labels).
      - aux_batch_size (formerly ``fisher_batch_size``): batch size of the batched
        squared gradients (default: the training batch size, as the official code).
      - gamma: decay of the accumulated Fisher, ``F_old ← F(θ_t) + γ F_old``.
      - per_layer: one coefficient per parameter leaf instead of one global λ.
      - fisher_dropout: run the Fisher passes with dropout on (official
        ``model.train()``) from a fixed per-task key; False: dropout off.
      - verbose: print λ per task.

  Returns:
    The method, named ``name`` or ``became_<memory>``.

  Raises:
    TypeError: both ``base`` and ``memory`` were given.
    ValueError: invalid options.
  """
  if "base" in kwargs:  # with memory= too: renamed's TypeError (memory=None is unset)
    given = {**kwargs, **({"memory": memory} if memory is not None else {})}
    memory = renamed(given, {"base": "memory"}, "became").pop("memory")
    kwargs = {k: v for k, v in kwargs.items() if k != "base"}
  memory = "gpm" if memory is None else memory
  if memory not in gpm_lib.FAMILIES:
    raise ValueError(f"became memory must be 'gpm' or 'sgp', got {memory!r}")
  kwargs = renamed(kwargs, {"fisher_batch_size": "aux_batch_size"}, "became")
  own = {f.name for f in dataclasses.fields(BECAMEConfig)}
  cfg = BECAMEConfig(**{k: v for k, v in kwargs.items() if k in own})
  su = gpm_lib.setup(backbone, gpm_lib.GPMConfig(
      memory=memory, **{k: v for k, v in kwargs.items() if k not in own}))
  name = name or f"became_{memory}"
  return gpm_lib.method(su, name, init=functools.partial(init, su),
                        end_task=functools.partial(end_task, su, cfg, name),
                        diagnostics=diagnostics)


REGISTRY = {"became": became,
            "became_gpm": lambda backbone, **kw: became(backbone, memory="gpm", **kw),
            "became_sgp": lambda backbone, **kw: became(backbone, memory="sgp", **kw)}
