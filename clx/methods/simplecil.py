"""SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained models",
IJCV 2024), after ``zhoudw-zdw/RevisitingCIL`` ``models/simplecil.py``.

Nothing is trained: after each task the class means of the frozen backbone's features on
the task's training split (``replace_fc`` l.27–50, ``train_dataset_for_protonet`` with the
test-time transform) become the rows of a cosine classifier (``CosineLinear``; its σ is never
trained in SimpleCIL, so σ = 1 and only the cosine matters). Earlier classes' prototypes are
never touched. Prediction: ``cos(f, p_c)`` over the classes seen so far.

First-session adaptation (APER, the same repository's ``models/adam_*.py``), an option:
with ``adapt_rank > 0`` a LoRA of that rank on ``adapt_sites`` and a linear head over the
first task's classes are trained on task 0 with the experiment's optimiser (the code:
``_init_train``, cross-entropy, SGD with momentum 0.9 and cosine annealing over
``tuned_epoch``), then frozen for good; from then on every feature is the concatenation
``[f_pretrained(x), f_adapted(x)]`` (``construct_dual_branch_network`` /
``MultiBranchCosineIncrementalNet.forward``: "we concatenate the features of adapters space
with the features of the original space"), ``concat_base=False`` keeps the adapted feature
alone (RanPAC's Phase 1, :mod:`clx.methods.ranpac`). Departures: the code's PETL modules are
AdaptFormer adapters, SSF or VPT (``convnet_type``); here the adapted backbone is base + a
LoRA (clx's adapter op), and the first-session head is linear, not the code's ``CosineLinear``.
The default ``adapt_rank=0`` is SimpleCIL on the frozen backbone.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods import prompting
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo, no_host_hook
from clx.models.base import Backbone
from clx.ops import lora as lora_ops
from clx.ops import prototypes as proto_ops
from clx.ops.tree import to_key as site_key


@dataclasses.dataclass(frozen=True)
class SimpleCILConfig:
  """SimpleCIL's settings."""

  aux_batch_size: int = 128
  adapt_rank: int = 0
  adapt_sites: tuple[str, ...] = ("q", "v")
  concat_base: bool = True

  def __post_init__(self):
    check_adaptation("simplecil", self)


def check_adaptation(name: str, cfg) -> None:
  """Validates ``aux_batch_size``, ``adapt_rank`` and ``adapt_sites`` of a head-only method."""
  object.__setattr__(cfg, "adapt_sites", tuple(cfg.adapt_sites))
  if isinstance(cfg.aux_batch_size, bool) or cfg.aux_batch_size < 1:
    raise ValueError(f"{name}: aux_batch_size must be a positive int, got {cfg.aux_batch_size!r}")
  if isinstance(cfg.adapt_rank, bool) or not isinstance(cfg.adapt_rank, (int, np.integer)) \
      or cfg.adapt_rank < 0:
    raise ValueError(f"{name}: adapt_rank must be an int >= 0 (0: frozen backbone), "
                     f"got {cfg.adapt_rank!r}")
  if cfg.adapt_rank and not cfg.adapt_sites:
    raise ValueError(f"{name}: adapt_rank={cfg.adapt_rank} needs adapt_sites (e.g. ('q', 'v'))")


def feature_dim(cfg, backbone: Backbone) -> int:
  """Width of the features the head sees: ``2d`` with the APER concatenation, else ``d``."""
  both = cfg.adapt_rank and getattr(cfg, "concat_base", False)
  return 2 * backbone.feature_dim if both else backbone.feature_dim


def init_adaptation(cfg, backbone: Backbone, rng, spec: StreamSpec) -> dict:
  """``{"adapter": {site: {a, b}}, "fsa_head": {kernel (d, C), bias (C,)}}`` or ``{}``.

  The LoRA starts at ``b = 0`` (the adapted backbone equals the pre-trained one) and the
  head torch-style; both are trained on task 0 only.
  """
  if not cfg.adapt_rank:
    return {}
  paths = backbone.site_paths(cfg.adapt_sites)
  fresh = lora_ops.init_lora(jax.random.fold_in(rng, 5), backbone.params, list(paths),
                             cfg.adapt_rank)
  return {"adapter": {site_key(p): fresh[p] for p in paths},
          "fsa_head": prompting.init_head(jax.random.fold_in(rng, 6), backbone.feature_dim,
                                          spec.num_classes, "torch")}


def adapted_params(cfg, backbone: Backbone, adapter: dict, base):
  """``base`` with the first-session LoRA added at every adapted site."""
  return lora_ops.apply_adapters(
      base, {p: adapter[site_key(p)] for p in backbone.site_paths(cfg.adapt_sites)})


def features(cfg, backbone: Backbone, state, base, x, mask=None):
  """``(n, feature_dim)``: the frozen feature, the adapted one, or both concatenated (APER)."""
  if "adapter" not in state:
    return prompting.query(backbone, base, x, mask)
  adapted = prompting.query(backbone, adapted_params(cfg, backbone, state["adapter"], base), x,
                            mask)
  if not getattr(cfg, "concat_base", False):
    return adapted
  return jnp.concatenate([prompting.query(backbone, base, x, mask), adapted], axis=-1)


def trainable(state, info: TaskInfo) -> dict:
  """Task 0 with first-session adaptation: ``{"adapter", "head"}``; otherwise nothing."""
  if info.task == 0 and "adapter" in state:
    return {"adapter": state["adapter"], "head": state["fsa_head"]}
  return {}


def combine(state, params, info: TaskInfo) -> dict:
  """Writes the first-session LoRA and head back (a no-op when nothing was trained)."""
  del info
  if not params:
    return state
  return {**state, "adapter": params["adapter"], "fsa_head": params["head"]}


def loss(cfg, backbone: Backbone, params, state, base, batch, rng, info: TaskInfo):
  """Cross-entropy over the first task's classes through base + LoRA (task 0), else zero."""
  if not params:
    return no_loss(params, state, base, batch, rng, info)
  eff = adapted_params(cfg, backbone, params["adapter"], base)
  # backbone.apply, not prompting.query: the query stops the gradient the LoRA needs
  feats = backbone.apply(eff, batch["x"], mask=batch["mask"]).astype(jnp.float32)
  ce, acc = prompting.current_task_loss(params["head"], feats, batch["y"], batch["mask"],
                                        info.spec, info.task)
  return ce, {"accuracy": acc}


def init(cfg: SimpleCILConfig, backbone: Backbone, rng, spec: StreamSpec) -> dict:
  """``{"prototypes" (C, feature_dim)}`` (zero until a class is seen), plus the
  first-session LoRA and head when ``adapt_rank > 0``."""
  return {"prototypes": jnp.zeros((spec.num_classes, feature_dim(cfg, backbone)), jnp.float32),
          **init_adaptation(cfg, backbone, rng, spec)}


def class_feature_sums(cfg, backbone: Backbone, state, ctx, num_classes: int, batch_size: int):
  """``(sums (C, feature_dim), counts (C,))`` of the features over the task's training split."""
  step = jax.jit(lambda st, base, x, y, m: proto_ops.class_sums(
      features(cfg, backbone, st, base, x, m), y, num_classes, m))
  sums, counts = 0.0, 0.0
  for batch in ctx.batches("train", batch_size=batch_size):
    s, c = step(state, ctx.base, batch["x"], batch["y"], batch["mask"])
    sums, counts = sums + s, counts + c
  return sums, counts


def end_task(cfg: SimpleCILConfig, backbone: Backbone, state, ctx) -> dict:
  sums, counts = class_feature_sums(cfg, backbone, state, ctx, ctx.spec.num_classes,
                                    cfg.aux_batch_size)
  new = np.asarray(counts) > 0
  protos = jnp.where(jnp.asarray(new)[:, None], proto_ops.prototypes(sums, counts),
                     state["prototypes"])
  return {**state, "prototypes": protos}


def predict(cfg, backbone, state, base, x, info: TaskInfo, mask=None):
  logits = proto_ops.cosine_logits(features(cfg, backbone, state, base, x, mask),
                                   state["prototypes"])
  seen = prompting.class_mask(info.spec, range(info.task + 1))
  return jnp.where(jnp.asarray(seen), logits, heads_lib.NEG_INF)


def nothing_trained(state, info) -> dict:
  """``trainable`` of a method that trains nothing."""
  del state, info
  return {}


def no_loss(params, state, base, batch, rng, info):
  """Nothing to train: a zero loss on the empty parameter dict."""
  del params, state, base, rng, info
  return jnp.zeros(()), {"accuracy": jnp.zeros(()) * batch["mask"][0]}


def simplecil(backbone: Backbone, **kwargs) -> ContinualMethod:
  """SimpleCIL (APER with ``adapt_rank > 0``); ``kwargs`` are :class:`SimpleCILConfig` fields."""
  cfg = SimpleCILConfig(**kwargs)
  if cfg.adapt_rank:
    backbone.site_paths(cfg.adapt_sites)  # unknown roles fail at build time
  bound = lambda fn: functools.partial(fn, cfg, backbone)
  return ContinualMethod(
      name="simplecil", backbone=backbone, init=bound(init), begin_task=no_host_hook,
      trainable=trainable, loss=bound(loss), combine=combine,
      end_task=bound(end_task), predict=bound(predict))


REGISTRY = {"simplecil": simplecil}
