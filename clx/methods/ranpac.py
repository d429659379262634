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
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods import prompting
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo, no_host_hook, to_host
from clx.methods import simplecil as fsa
from clx.models.base import Backbone
from clx.ops import ridge as ridge_ops


@dataclasses.dataclass(frozen=True)
class RanPACConfig:
  """RanPAC's settings (defaults: ``RanPAC.py`` and ``args/*_publish.csv``)."""

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


def init(cfg: RanPACConfig, backbone: Backbone, rng, spec: StreamSpec) -> dict:
  """``{"w_rand" (d, M) or absent, "gram" (M, M), "xty" (M, C), "count", "w_out" (M, C)}``."""
  d = backbone.feature_dim
  m = cfg.rp_dim or d
  stats = ridge_ops.init_statistics(m, spec.num_classes)
  state = {**stats, "w_out": jnp.zeros((m, spec.num_classes), jnp.float32),
           **fsa.init_adaptation(cfg, backbone, rng, spec)}
  if cfg.rp_dim:
    state["w_rand"] = ridge_ops.random_projection(rng, d, cfg.rp_dim)
  return state


def hidden(state, feats):
  """``ReLU(f W_rand)`` or ``f`` itself for ``rp_dim=0``."""
  return ridge_ops.project(feats, state["w_rand"]) if "w_rand" in state else feats


def end_task(cfg: RanPACConfig, backbone: Backbone, state, ctx) -> dict:
  fn = jax.jit(lambda st, base, x, m: hidden(st, fsa.features(cfg, backbone, st, base, x, m)))
  hs, ys = [], []
  for batch in ctx.batches("train", batch_size=cfg.aux_batch_size):
    real = to_host(batch["mask"]) > 0
    hs.append(to_host(fn(state, ctx.base, batch["x"], batch["mask"]))[real])
    ys.append(to_host(batch["y"])[real])
  h, y = np.concatenate(hs), np.concatenate(ys)
  perm = np.asarray(jax.random.permutation(jax.random.fold_in(ctx.rng, 7), len(h)))  # shuffled loader
  onehot = ridge_ops.one_hot(jnp.asarray(y[perm]), ctx.spec.num_classes)
  stats, lam = ridge_ops.update_head(state, jnp.asarray(h[perm]), onehot, grid=cfg.ridge_grid,
                                     fit_fraction=cfg.ridge_fit_fraction,
                                     with_history=cfg.ridge_with_history)
  lams = dict(state.get("ridge_lambda", {}))
  lams[str(ctx.task_index)] = jnp.asarray(lam, jnp.float32)
  return {**state, **stats, "ridge_lambda": lams}


def predict(cfg, backbone, state, base, x, info: TaskInfo, mask=None):
  h = hidden(state, fsa.features(cfg, backbone, state, base, x, mask))
  logits = jnp.matmul(h, state["w_out"], precision=jax.lax.Precision.HIGHEST)
  seen = prompting.class_mask(info.spec, range(info.task + 1))
  return jnp.where(jnp.asarray(seen), logits, heads_lib.NEG_INF)


def diagnostics(state) -> dict:
  return {"ridge_lambda": {k: float(v) for k, v in state.get("ridge_lambda", {}).items()}}


def ranpac(backbone: Backbone, **kwargs) -> ContinualMethod:
  """RanPAC on a frozen ``backbone``; ``kwargs`` are :class:`RanPACConfig` fields."""
  cfg = RanPACConfig(**kwargs)
  if cfg.adapt_rank:
    backbone.site_paths(cfg.adapt_sites)  # unknown roles fail at build time
  bound = lambda fn: functools.partial(fn, cfg, backbone)
  return ContinualMethod(
      name="ranpac", backbone=backbone, init=bound(init), begin_task=no_host_hook,
      trainable=fsa.trainable, loss=bound(fsa.loss), combine=fsa.combine,
      end_task=bound(end_task), predict=bound(predict), diagnostics=diagnostics)


REGISTRY = {"ranpac": ranpac}
