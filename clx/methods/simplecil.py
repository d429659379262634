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
from collections.abc import Callable
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import prompting
from clx.methods.base import (Batch, ContinualMethod, Params, State, StreamSpec, TaskContext,
                              TaskInfo, check_positive_int, no_host_hook)
from clx.models.base import Backbone
from clx.ops import lora as lora_ops
from clx.ops import prototypes as proto_ops
from clx.ops.tree import to_key as site_key

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SimpleCILConfig:
  """SimpleCIL's settings (APER's with ``adapt_rank > 0``).

  Attributes:
    aux_batch_size: batch size of the end-of-task feature pass.
    adapt_rank: rank of the first-session LoRA; 0 keeps the backbone frozen (SimpleCIL).
    adapt_sites: roles or paths the first-session LoRA adapts.
    concat_base: with adaptation, the feature is ``[f_pretrained, f_adapted]`` (APER);
      ``False`` keeps ``f_adapted`` alone.
  """

  aux_batch_size: int = 128
  adapt_rank: int = 0
  adapt_sites: tuple[str, ...] = ("q", "v")
  concat_base: bool = True

  def __post_init__(self):
    check_adaptation("simplecil", self)


class SimpleCILState(TypedDict, total=False):
  """SimpleCIL's state; ``adapter`` and ``fsa_head`` exist only with ``adapt_rank > 0``."""

  prototypes: Array                   # (C, feature_dim), zero until the class is seen
  adapter: dict[str, dict[str, Array]]  # {site key: {"a": (d_in, r), "b": (r, d_out)}}
  fsa_head: prompting.Head            # first-session head {"kernel": (d, C), "bias": (C,)}


def check_adaptation(name: str, cfg: Any) -> None:
  """Validates ``aux_batch_size``, ``adapt_rank`` and ``adapt_sites`` of a head-only method.

  Also stores ``adapt_sites`` as a tuple (``cfg`` is a frozen dataclass).

  Args:
    name: the method, for the messages.
    cfg: a :class:`SimpleCILConfig` or :class:`clx.methods.ranpac.RanPACConfig`.

  Raises:
    ValueError: a non-positive ``aux_batch_size``, a negative ``adapt_rank``, or
      ``adapt_rank > 0`` without ``adapt_sites``.
  """
  object.__setattr__(cfg, "adapt_sites", tuple(cfg.adapt_sites))
  check_positive_int(cfg.aux_batch_size, f"{name}: aux_batch_size")
  if isinstance(cfg.adapt_rank, bool) or not isinstance(cfg.adapt_rank, (int, np.integer)) \
      or cfg.adapt_rank < 0:
    raise ValueError(f"{name}: adapt_rank must be an int >= 0 (0: frozen backbone), "
                     f"got {cfg.adapt_rank!r}")
  if cfg.adapt_rank and not cfg.adapt_sites:
    raise ValueError(f"{name}: adapt_rank={cfg.adapt_rank} needs adapt_sites (e.g. ('q', 'v'))")


def feature_dim(cfg: Any, backbone: Backbone) -> int:
  """Width of the features the head sees.

  Args:
    cfg: the method's config.
    backbone: the frozen backbone.

  Returns:
    ``2d`` with the APER concatenation, else ``d``.
  """
  both = cfg.adapt_rank and getattr(cfg, "concat_base", False)
  return 2 * backbone.feature_dim if both else backbone.feature_dim


def init_adaptation(cfg: Any, backbone: Backbone, rng: Array, spec: StreamSpec) -> State:
  """The first-session LoRA and head, or nothing without adaptation.

  The LoRA starts at ``b = 0`` (the adapted backbone equals the pre-trained one) and the
  head torch-style; both are trained on task 0 only.

  Args:
    cfg: the method's config.
    backbone: the frozen backbone.
    rng: PRNG key.
    spec: the stream's spec.

  Returns:
    ``{"adapter": {site: {a, b}}, "fsa_head": {kernel (d, C), bias (C,)}}`` or ``{}``.
  """
  if not cfg.adapt_rank:
    return {}
  paths = backbone.site_paths(cfg.adapt_sites)
  fresh = lora_ops.init_lora(jax.random.fold_in(rng, 5), backbone.params, list(paths),
                             cfg.adapt_rank)
  return {"adapter": {site_key(p): fresh[p] for p in paths},
          "fsa_head": prompting.init_head(jax.random.fold_in(rng, 6), backbone.feature_dim,
                                          spec.num_classes, "torch")}


def adapted_params(cfg: Any, backbone: Backbone, adapter: dict[str, dict[str, Array]],
                   base: Params) -> Params:
  """``base`` with the first-session LoRA added at every adapted site (``W + a b``).

  Args:
    cfg: the method's config.
    backbone: the frozen backbone.
    adapter: ``{site key: {"a", "b"}}``.
    base: the backbone's parameters.

  Returns:
    The adapted backbone parameters.
  """
  return lora_ops.apply_adapters(
      base, {p: adapter[site_key(p)] for p in backbone.site_paths(cfg.adapt_sites)})


def features(cfg: Any, backbone: Backbone, state: State, base: Params, x: Array,
             mask: Array | None = None) -> Array:
  """The features the head sees: frozen, adapted, or both concatenated (APER).

  Args:
    cfg: the method's config.
    backbone: the frozen backbone.
    state: the state (only ``adapter`` is read).
    base: the backbone's parameters.
    x: ``(n, ...)`` inputs.
    mask: ``(n,)`` real-row mask, or ``None``.

  Returns:
    ``(n, feature_dim)`` float32, without gradient.
  """
  if "adapter" not in state:
    return prompting.query(backbone, base, x, mask)
  adapted = prompting.query(backbone, adapted_params(cfg, backbone, state["adapter"], base), x,
                            mask)
  if not getattr(cfg, "concat_base", False):
    return adapted
  return jnp.concatenate([prompting.query(backbone, base, x, mask), adapted], axis=-1)


def feature_inputs(state: State) -> State:
  """The state entries :func:`features` reads (``adapter`` if any): a structure that stays the
  same from task to task, so a jitted feature pass compiles once.

  Args:
    state: the state.

  Returns:
    ``{"adapter": ...}`` or ``{}``.
  """
  return {k: state[k] for k in ("adapter",) if k in state}


def trainable(state: State, info: TaskInfo) -> Params:
  """Task 0 with first-session adaptation: the LoRA and its head; otherwise nothing.

  Args:
    state: the state.
    info: the task being trained.

  Returns:
    ``{"adapter", "head"}`` or ``{}``.
  """
  if info.task == 0 and "adapter" in state:
    return {"adapter": state["adapter"], "head": state["fsa_head"]}
  return {}


def combine(state: State, params: Params, info: TaskInfo) -> State:
  """Writes the first-session LoRA and head back (a no-op when nothing was trained).

  Args:
    state: the state.
    params: :func:`trainable`'s params after training.
    info: the task just trained (unused).

  Returns:
    The state with ``adapter`` and ``fsa_head`` replaced.
  """
  del info
  if not params:
    return state
  return {**state, "adapter": params["adapter"], "fsa_head": params["head"]}


def no_loss(params: Params, state: State, base: Params, batch: Batch, rng: Array | None,
            info: TaskInfo) -> tuple[Array, dict[str, Array]]:
  """Nothing to train: a zero loss on the empty parameter dict.

  Args:
    params: ``{}``.
    state: unused.
    base: unused.
    batch: ``{"x", "y", "mask"}`` (``mask`` gives the accuracy's dtype and placement).
    rng: unused.
    info: unused.

  Returns:
    ``(0, {"accuracy": 0})``.
  """
  del params, state, base, rng, info
  return jnp.zeros(()), {"accuracy": jnp.zeros(()) * batch["mask"][0]}


def loss(cfg: Any, backbone: Backbone, params: Params, state: State, base: Params, batch: Batch,
         rng: Array | None, info: TaskInfo) -> tuple[Array, dict[str, Array]]:
  """Cross-entropy over the first task's classes through base + LoRA (task 0), else zero.

  Args:
    cfg: the method's config.
    backbone: the frozen backbone.
    params: ``{"adapter", "head"}`` on task 0 with adaptation, else ``{}``.
    state: the state.
    base: the backbone's parameters.
    batch: ``{"x", "y", "mask"}``.
    rng: unused (no dropout).
    info: the task being trained.

  Returns:
    ``(loss, {"accuracy"})``, scalars.
  """
  if not params:
    return no_loss(params, state, base, batch, rng, info)
  eff = adapted_params(cfg, backbone, params["adapter"], base)
  # backbone.apply, not prompting.query: the query stops the gradient the LoRA needs
  feats = backbone.apply(eff, batch["x"], mask=batch["mask"]).astype(jnp.float32)
  ce, acc = prompting.current_task_loss(params["head"], feats, batch["y"], batch["mask"],
                                        info.spec, info.task)
  return ce, {"accuracy": acc}


def init(cfg: SimpleCILConfig, backbone: Backbone, rng: Array,
         spec: StreamSpec) -> SimpleCILState:
  """Zero prototypes, plus the first-session LoRA and head when ``adapt_rank > 0``.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    rng: PRNG key.
    spec: the stream's spec.

  Returns:
    ``{"prototypes" (C, feature_dim)}`` (+ ``adapter``, ``fsa_head``).
  """
  return {"prototypes": jnp.zeros((spec.num_classes, feature_dim(cfg, backbone)), jnp.float32),
          **init_adaptation(cfg, backbone, rng, spec)}


@functools.lru_cache(maxsize=32)
def _class_sums_fn(cfg: Any, backbone: Backbone, num_classes: int) -> Callable[..., Any]:
  """One jitted per-batch class-sum pass per (config, backbone, C): compiled once per run,
  not once per task."""
  return jax.jit(lambda inputs, base, x, y, m: proto_ops.class_sums(
      features(cfg, backbone, inputs, base, x, m), y, num_classes, m))


def class_feature_sums(cfg: Any, backbone: Backbone, state: State, ctx: TaskContext,
                       num_classes: int, batch_size: int) -> tuple[Array, Array]:
  """Per-class sums and counts of the features over the task's training split.

  ``sums[c] = Σ_{y_i = c} f(x_i)``, ``counts[c] = |{i : y_i = c}|`` over the real rows.

  Args:
    cfg: the method's config.
    backbone: the frozen backbone.
    state: the state (its ``adapter``, if any, shapes the features).
    ctx: the loop's task context.
    num_classes: ``C``.
    batch_size: batch size of the pass.

  Returns:
    ``(sums (C, feature_dim), counts (C,))``.
  """
  step = _class_sums_fn(cfg, backbone, num_classes)
  inputs = feature_inputs(state)
  sums, counts = 0.0, 0.0
  for batch in ctx.batches("train", batch_size=batch_size):
    s, c = step(inputs, ctx.base, batch["x"], batch["y"], batch["mask"])
    sums, counts = sums + s, counts + c
  return sums, counts


def end_task(cfg: SimpleCILConfig, backbone: Backbone, state: SimpleCILState,
             ctx: TaskContext) -> SimpleCILState:
  """The task's classes get their prototypes: the mean feature ``p_c = sums[c] / counts[c]``.

  Args:
    cfg: the config.
    backbone: the frozen backbone.
    state: the state after training task ``t``.
    ctx: the loop's task context.

  Returns:
    The state with the rows of the classes present in the task's training split replaced.
  """
  sums, counts = class_feature_sums(cfg, backbone, state, ctx, ctx.spec.num_classes,
                                    cfg.aux_batch_size)
  new = np.asarray(counts) > 0
  protos = jnp.where(jnp.asarray(new)[:, None], proto_ops.prototypes(sums, counts),
                     state["prototypes"])
  return {**state, "prototypes": protos}


def predict(cfg: SimpleCILConfig, backbone: Backbone, state: SimpleCILState, base: Params,
            x: Array, info: TaskInfo, mask: Array | None = None) -> Array:
  """Cosine classifier ``cos(f(x), p_c)`` over the classes seen so far.

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
  logits = proto_ops.cosine_logits(features(cfg, backbone, state, base, x, mask),
                                   state["prototypes"])
  return prompting.mask_unseen(logits, info.spec, info.task)


def head_only_method(name: str, cfg: Any, backbone: Backbone, *, init: Callable,
                     end_task: Callable, predict: Callable,
                     diagnostics: Callable | None = None) -> ContinualMethod:
  """The protocol of a method that trains nothing but an optional first-session LoRA
  (SimpleCIL/APER, RanPAC): its head is built on the host in ``end_task``.

  Args:
    name: registry name.
    cfg: the method's frozen config (with ``adapt_rank``/``adapt_sites``), bound as the first
      argument of ``init``/``end_task``/``predict`` and of the shared :func:`loss`.
    backbone: the frozen backbone, bound as their second argument; with ``adapt_rank > 0``
      its ``adapt_sites`` are resolved now, so unknown roles fail at build time.
    init: module-level ``fn(cfg, backbone, rng, spec) -> state``.
    end_task: module-level ``fn(cfg, backbone, state, ctx) -> state``.
    predict: module-level ``fn(cfg, backbone, state, base, x, info, mask=None)``.
    diagnostics: optional ``state -> dict``.

  Returns:
    The :class:`ContinualMethod`.
  """
  if cfg.adapt_rank:
    backbone.site_paths(cfg.adapt_sites)
  bound = lambda fn: functools.partial(fn, cfg, backbone)
  return ContinualMethod(
      name=name, backbone=backbone, init=bound(init), begin_task=no_host_hook,
      trainable=trainable, loss=bound(loss), combine=combine,
      end_task=bound(end_task), predict=bound(predict), diagnostics=diagnostics)


def simplecil(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """SimpleCIL (APER with ``adapt_rank > 0``) on a frozen backbone.

  Args:
    backbone: the frozen backbone.
    **kwargs: :class:`SimpleCILConfig` fields.

  Returns:
    The :class:`ContinualMethod` ``"simplecil"``.
  """
  cfg = SimpleCILConfig(**kwargs)
  return head_only_method("simplecil", cfg, backbone, init=init, end_task=end_task,
                          predict=predict)


REGISTRY = {"simplecil": simplecil}
