"""RanPAC (McDonnell et al., NeurIPS 2023) as its own method, after ``RanPAC/RanPAC`` ``RanPAC.py``.

A frozen backbone's feature ``f`` is projected by a fixed Gaussian matrix and a ReLU,
``h = ReLU(f W_rand)`` (``setup_RP`` l.246–260, ``torch.randn(d, M)``, M = 10,000), and
classified by a ridge-regression head over the Gram statistics of every task so far:
``G += Hᵀ H``, ``Q += Hᵀ Y``, ``W_o = (G + λ I)⁻¹ Q`` with λ chosen per task from
``10⁻⁸ … 10⁸`` on an 80/20 split of the task's (shuffled) rows (``replace_fc`` l.91–126,
``optimise_ridge_parameter`` l.138–150). The head is the one PROTEUS uses
(:func:`clx.ops.ridge.update_head`). No gradient training on any task.

``rp_dim=0`` is the code's ``M = 0`` branch without projection (ridge on ``f`` itself).
First-session adaptation ("Phase 1", ``model_name`` adapter/SSF/VPT tuned on task 0 with
``body_lr``/``head_lr``, then frozen; ``args/*_publish.csv``), an option: ``adapt_rank > 0``
trains a LoRA of that rank on ``adapt_sites`` and a linear head over the first task's classes
on task 0 (the shared code of :mod:`clx.methods.simplecil`), and every later feature is the
adapted backbone's alone (no concatenation, unlike APER). Departure: the code's PETL module is
an AdaptFormer adapter (CIFAR-100) or SSF (ImageNet-R), here a LoRA; one learning rate for the
LoRA and the head (the code's ``body_lr`` and ``head_lr`` are both 0.01 in its published
rows). The default ``adapt_rank=0`` is RanPAC on the frozen backbone (the paper's "No Phase 1"
row).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import passes
from clx.methods import prompting
from clx.methods import simplecil as fsa
from clx.methods.base import (ContinualMethod, Params, State, StreamSpec, TaskContext, TaskInfo,
                              to_host)
from clx.models.base import Backbone
from clx.ops import ridge as ridge_ops

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RanPACConfig:
  """RanPAC's settings (defaults: ``RanPAC.py`` and ``args/*_publish.csv``).

  Attributes:
    rp_dim: random-projection width ``M``; 0: no projection (ridge on the features).
    ridge_grid: λ candidates (positive).
    ridge_fit_fraction: λ is chosen by the MSE on the rest after fitting on this fraction.
    ridge_with_history: add the earlier statistics to λ's fit part (False, as the code).
    aux_batch_size: batch size of the end-of-task feature pass.
    adapt_rank: rank of the first-session (Phase 1) LoRA; 0 keeps the backbone frozen.
    adapt_sites: roles or paths the first-session LoRA adapts.
  """

  rp_dim: int = 10_000
  ridge_grid: Sequence[float] = ridge_ops.RIDGE_GRID
  ridge_fit_fraction: float = 0.8
  ridge_with_history: bool = False
  aux_batch_size: int = 128
  adapt_rank: int = 0
  adapt_sites: tuple[str, ...] = ("q", "v")

  def __post_init__(self):
    fsa.check_adaptation("ranpac", self)
    object.__setattr__(self, "ridge_grid", tuple(float(g) for g in self.ridge_grid))
    if isinstance(self.rp_dim, bool) or not isinstance(self.rp_dim, (int, np.integer)) \
        or self.rp_dim < 0:
      raise ValueError(f"ranpac: rp_dim must be an int >= 0, got {self.rp_dim!r}")
    if not 0.0 < self.ridge_fit_fraction < 1.0:
      raise ValueError(f"ranpac: ridge_fit_fraction must be in (0, 1), got {self.ridge_fit_fraction!r}")
    if not self.ridge_grid or min(self.ridge_grid) <= 0:
      raise ValueError(f"ranpac: ridge_grid must be positive values, got {self.ridge_grid!r}")


class RanPACState(TypedDict, total=False):
  """RanPAC's state. ``w_rand`` exists only with ``rp_dim > 0``; ``adapter`` and ``fsa_head``
  only with ``adapt_rank > 0``; ``ridge_lambda`` from the end of task 0."""

  w_rand: Array                       # (d, M) fixed Gaussian projection
  gram: Array                         # (M, M) G = Σ Hᵀ H over the tasks so far
  xty: Array                          # (M, C) Q = Σ Hᵀ Y
  count: Array                        # () int32, rows accumulated
  w_out: Array                        # (M, C) W_o = (G + λ I)⁻¹ Q
  ridge_lambda: dict[str, Array]      # {task: λ chosen on that task}
  adapter: dict[str, dict[str, Array]]  # first-session LoRA {site key: {"a", "b"}}
  fsa_head: prompting.Head            # first-session head


def init(cfg: RanPACConfig, backbone: Backbone, rng: Array, spec: StreamSpec) -> RanPACState:
  """The projection, zero ridge statistics and head, and the optional first-session LoRA.

  Args:
    cfg: the config.
    backbone: the frozen backbone (its ``feature_dim`` is ``d``).
    rng: PRNG key.
    spec: the stream's spec.

  Returns:
    ``{"w_rand" (d, M) or absent, "gram" (M, M), "xty" (M, C), "count", "w_out" (M, C)}``
    (``M = d`` with ``rp_dim=0``), plus ``adapter``/``fsa_head`` with ``adapt_rank > 0``.
  """
  d = backbone.feature_dim
  m = cfg.rp_dim or d
  stats = ridge_ops.init_statistics(m, spec.num_classes)
  state = {**stats, "w_out": jnp.zeros((m, spec.num_classes), jnp.float32),
           **fsa.init_adaptation(cfg, backbone, rng, spec)}
  if cfg.rp_dim:
    state["w_rand"] = ridge_ops.random_projection(rng, d, cfg.rp_dim)
  return state


def hidden(state: State, feats: Array) -> Array:
  """The ridge head's input ``h = ReLU(f W_rand)``, or ``f`` itself for ``rp_dim=0``.

  Args:
    state: the state (``w_rand`` if any).
    feats: ``(n, d)`` features.

  Returns:
    ``(n, M)``.
  """
  return ridge_ops.project(feats, state["w_rand"]) if "w_rand" in state else feats


@functools.lru_cache(maxsize=32)
def _hidden_fn(cfg: RanPACConfig, backbone: Backbone) -> Callable[..., Array]:
  """One jitted ``(inputs, base, x, mask) -> h`` per (config, backbone): compiled once per run,
  not once per task (``inputs`` has the same structure on every task)."""
  return jax.jit(lambda inputs, base, x, m: hidden(
      inputs, fsa.features(cfg, backbone, inputs, base, x, m)))


def end_task(cfg: RanPACConfig, backbone: Backbone, state: RanPACState,
             ctx: TaskContext) -> RanPACState:
  """Adds the task's rows to the ridge statistics and solves the head (``replace_fc``).

  ``G += Hᵀ H``, ``Q += Hᵀ Y``, λ chosen on the task's shuffled rows
  (:func:`clx.ops.ridge.update_head`), ``W_o = (G + λ I)⁻¹ Q``.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    state: the state after task ``t`` (the first-session LoRA trained on task 0).
    ctx: the loop's task context.

  Returns:
    The state with new ``gram``, ``xty``, ``count``, ``w_out`` and ``ridge_lambda[t]``.
  """
  fn = _hidden_fn(cfg, backbone)
  inputs = {**fsa.feature_inputs(state), **{k: state[k] for k in ("w_rand",) if k in state}}
  hs, ys = [], []
  for batch in ctx.batches("train", batch_size=cfg.aux_batch_size):
    real = to_host(batch["mask"]) > 0
    hs.append(to_host(fn(inputs, ctx.base, batch["x"], batch["mask"]))[real])
    ys.append(to_host(batch["y"])[real])
  h, y = np.concatenate(hs), np.concatenate(ys)
  perm = np.asarray(jax.random.permutation(jax.random.fold_in(ctx.rng, 7), len(h)))  # shuffled loader
  onehot = ridge_ops.one_hot(jnp.asarray(y[perm]), ctx.spec.num_classes)
  # Once, on one device: with the state on the mesh, the λ search's M x M solves would
  # otherwise run on every device (passes.on_one_device).
  held = {k: state[k] for k in ("gram", "xty", "count", "w_out")}
  stats, lam = ridge_ops.update_head(passes.on_one_device(held), jnp.asarray(h[perm]), onehot,
                                     grid=cfg.ridge_grid, fit_fraction=cfg.ridge_fit_fraction,
                                     with_history=cfg.ridge_with_history)
  stats = passes.placed_like({k: stats[k] for k in held}, held)
  lams = dict(state.get("ridge_lambda", {}))
  lams[str(ctx.task_index)] = jnp.asarray(lam, jnp.float32)
  return {**state, **stats, "ridge_lambda": lams}


def predict(cfg: RanPACConfig, backbone: Backbone, state: RanPACState, base: Params, x: Array,
            info: TaskInfo, mask: Array | None = None) -> Array:
  """The ridge head's logits ``h W_o`` over the classes seen so far.

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
  h = hidden(state, fsa.features(cfg, backbone, state, base, x, mask))
  logits = jnp.matmul(h, state["w_out"], precision=jax.lax.Precision.HIGHEST)
  return prompting.mask_unseen(logits, info.spec, info.task)


def diagnostics(state: RanPACState) -> dict[str, Any]:
  """The λ chosen on each task.

  Args:
    state: the state.

  Returns:
    ``{"ridge_lambda": {task: λ}}``.
  """
  return {"ridge_lambda": {k: float(v) for k, v in state.get("ridge_lambda", {}).items()}}


def ranpac(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """RanPAC on a frozen backbone.

  Args:
    backbone: the frozen backbone.
    **kwargs: :class:`RanPACConfig` fields.

  Returns:
    The :class:`ContinualMethod` ``"ranpac"``.
  """
  cfg = RanPACConfig(**kwargs)
  return fsa.head_only_method("ranpac", cfg, backbone, init=init, end_task=end_task,
                              predict=predict, diagnostics=diagnostics)


REGISTRY = {"ranpac": ranpac}
