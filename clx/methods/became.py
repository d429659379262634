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
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods.base import ContinualMethod
from clx.methods.gpm import GPMParts, memory_ranks
from clx.models.base import Backbone
from clx.ops import merging


def became(backbone: Backbone, *, base: str = "gpm", stage2: dict | None = None,
           fisher: str = "true", fisher_batch_size: int | None = None, gamma: float = 1.0,
           per_layer: bool = False, fisher_dropout: bool = True, name: str | None = None,
           verbose: bool = True,
           **gpm_kwargs) -> ContinualMethod:
  """BECAME on top of GPM (``base="gpm"``) or SGP (``base="sgp"``).

  Args:
    backbone: the network (fully trained, as in the base method).
    base: ``"gpm"`` or ``"sgp"``.
    stage2: :class:`clx.train.TrainConfig` fields overriding the run's training
      settings for the unconstrained stage (official: its own ``lr2``; the
      default re-uses the stage-1 settings).
    fisher: ``"true"`` (labels = the model's argmax, official default) or
      ``"empirical"`` (ground-truth labels).
    fisher_batch_size: batch size of the batched squared gradients (default:
      the training batch size, as the official code).
    gamma: decay of the accumulated Fisher, ``F_old ← F(θ_t) + γ F_old``.
    per_layer: one coefficient per parameter leaf instead of one global λ.
    fisher_dropout: run the Fisher passes with dropout on (official
      ``model.train()``) from a fixed per-task key; False: dropout off.
    **gpm_kwargs: the base method's settings (threshold, num_samples, …).
  """
  if base not in ("gpm", "sgp"):
    raise ValueError(f"became base must be 'gpm' or 'sgp', got {base!r}")
  if fisher not in ("true", "empirical"):
    raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
  if not gamma >= 0:
    raise ValueError(f"gamma must be >= 0, got {gamma}")
  if fisher_batch_size is not None and (isinstance(fisher_batch_size, bool) or not isinstance(
      fisher_batch_size, (int, np.integer)) or fisher_batch_size < 1):
    raise ValueError(f"fisher_batch_size must be None or a positive integer, got {fisher_batch_size!r}")
  if stage2:  # its keys and ranges, at build time rather than after stage 1 of task 0
    from clx.train.loop import TrainConfig  # pylint: disable=import-outside-toplevel
    try:
      dataclasses.replace(TrainConfig(), **stage2)
    except (TypeError, ValueError) as e:
      raise ValueError(f"stage2: {e}") from None
  name = name or f"became_{base}"
  parts = GPMParts(backbone, variant=base, **{
      "threshold": 0.97, "threshold_increment": 0.0, "num_samples": 300, "sites": None,
      "project_head": True, "head_bias": False, "head_mode": None, "scale_coff": 10.0,
      "fast_projection": True, **gpm_kwargs})

  def init(rng, spec):
    state = parts.init(rng, spec)
    return {**state, "lambdas": jnp.zeros((spec.num_tasks,), jnp.float32)}

  def fisher_of(params, state, ctx, pass_index: int):
    """Diagonal Fisher of the current head's CE at ``params`` on the task's data
    (``pass_index`` picks this pass's dropout key)."""
    spec, t = ctx.spec, ctx.task_index
    mode, key = parts.mode(spec), heads_lib.head_key(state["heads"], t)
    data = ctx.arrays("train")
    labels = None
    if fisher == "empirical":
      labels = np.asarray(heads_lib.train_labels(jnp.asarray(data["y"]), spec, t, mode))
    rng = fisher_rng(ctx.rng, pass_index) if fisher_dropout else None
    return merging.diagonal_fisher(
        _head_logits_fn(backbone, spec, t, mode, key), params, data["x"], labels=labels,
        kind=fisher, batch_size=fisher_batch_size or ctx.config.batch_size, pass_mask=True,
        rng=rng)

  def end_task(state, ctx):
    t = ctx.task_index
    params = parts.trainable(state, ctx.info)  # θ_GP: the stage-1 result, combined by the loop
    if t == 0:
      f_new = fisher_of(params, state, ctx, 0)
      lam = jnp.float32(1.0)
      merged = params
    else:
      stage2_cfg = dataclasses.replace(ctx.config, **(stage2 or {}))
      theta_hat = ctx.fit(params, functools.partial(parts.loss, info=ctx.info, project=False),
                          state=state, config=stage2_cfg, title=f"{name} task {t + 1} stage 2",
                          phase=2)
      f_cur = fisher_of(theta_hat, state, ctx, 0)
      f_old = old_fisher(state, params, t)
      lam = merging.became_coefficient(params, theta_hat, f_cur, f_old, per_leaf=per_layer)
      merged = merging.interpolate(params, theta_hat, lam)
      f_merged = fisher_of(merged, state, ctx, 1)
      f_new = jax.tree.map(lambda a, b: a + gamma * b, f_merged, f_old)
      lam = jnp.mean(jnp.stack(jax.tree.leaves(lam))) if per_layer else lam
    if verbose and jax.process_index() == 0:
      print(f"{name} task {t + 1}: merge coefficient λ = {float(lam):.4f}",
            file=sys.stderr, flush=True)
    state = parts.combine(state, merged, ctx.info)
    state = {**state, "fisher": store_fisher(state, f_new, t),
             "lambdas": state["lambdas"].at[t].set(lam)}
    return parts.update_memory(state, ctx)

  def old_fisher(state, params, t):
    """F_old laid out like the trainable params (zeros for a new head)."""
    stored = state.get("fisher")
    key = heads_lib.head_key(state["heads"], t)
    if stored is None:
      return jax.tree.map(jnp.zeros_like, params)
    head = stored["heads"].get(key)
    return {"backbone": stored["backbone"],
            "head": head if head is not None else jax.tree.map(jnp.zeros_like, params["head"])}

  def store_fisher(state, f_new, t):
    stored = state.get("fisher") or {"backbone": None, "heads": {}}
    return {"backbone": f_new["backbone"],
            "heads": {**stored["heads"], heads_lib.head_key(state["heads"], t): f_new["head"]}}

  def diagnostics(state):
    return {"memory_ranks": memory_ranks(state),
            "lambdas": [round(float(v), 6) for v in np.asarray(state["lambdas"])]}

  return parts.method(name, init=init, end_task=end_task, diagnostics=diagnostics)


FISHER_RNG_TAG = 1000  # fold_in tag of the Fisher passes' dropout keys (other uses: < 10)


def fisher_rng(task_rng: jax.Array, pass_index: int) -> jax.Array:
  """Dropout key of a task's ``pass_index``-th Fisher pass (batch b folds in b)."""
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


REGISTRY = {"became": became,
            "became_gpm": lambda backbone, **kw: became(backbone, base="gpm", **kw),
            "became_sgp": lambda backbone, **kw: became(backbone, base="sgp", **kw)}
