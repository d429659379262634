"""InfLoRA: interference-free low-rank adaptation (Liang & Li, CVPR 2024).

Every task t adds one LoRA branch to each adapted kernel W (the k and v
projections of every attention block by default). In clx's Flax layout the
branch is

    ΔW_t = a_t @ b_t,   a_t (d_in, r) designed and frozen,   b_t (r, d_out) trained from 0,

so a_t is the paper's B_tᵀ (the designed down-projection) and b_t is the
paper's A_tᵀ (the trained up-projection). The official code's names are the
reverse again: its ``lora_A`` is a_tᵀ and its ``lora_B`` is b_tᵀ. All branches
stay active, so the forward of task t uses W + Σ_{j≤t} a_j b_j.

Per task:

1. ``begin_task``: one pass over the task's training data with every old branch
   active accumulates each adapted layer's input Gram matrix C = (1/n) Σ x xᵀ
   over all valid tokens. The q/k/v kernels of one attention block read the
   same input, so they share one C and one memory, and k and v get the same
   a_t, as in the official code. From C and the layer's DualGPM memory, a_t is
   designed orthogonal to the old tasks' input space
   (:func:`clx.ops.dualgpm.design_down_projection`). The task's b_t = 0 and
   its head are created.
2. Training: only b_t of every adapted kernel and the current head (local
   cross-entropy over the task's classes, :mod:`clx.methods.heads`).
3. ``combine`` writes b_t and the head back; then ``end_task``: a second Gram
   pass, now with branch t included, updates each memory with DualGPM (or plain
   GPM, ``memory="gpm"``) at threshold ε_t = lamb + (lame − lamb)·t/T.
4. Prediction: every branch active; class-IL logits are the concatenation of
   all seen heads; the loop masks them to one task's classes for task-IL.

Why it protects old tasks: for any input x in a memory's protected space,
x a_t = 0. So x W_t = x W_{t−1} whatever b_t becomes. Old tasks' inputs lie
there up to the energy threshold.

State (:class:`InfLoRAState`, a nested dict; keys never contain '/'; site paths are escaped
with '.')::

  heads:    {str(t): {"kernel", "bias"}}              (per-task heads; "shared" for domain-IL)
  branches: {str(t): {"a": {group: (d_in, r)},        designed, frozen (one per input group)
                      "b": {site: (r, d_out)}}}       trained on task t only
  memory:   {group: {"basis": (d, d) zero-padded, "rank": int32,
                     "kind": int32 (0 remove, 1 retain)}}
  folded:   {site: (d_in, d_out)}                     only with fold=True

A *group* is a set of sites that read the same input. It is named by its
block and members, e.g. ``encoder.layers.0.attention.key+value``; a site that
does not share its input keeps its own key, e.g. ``lin1.kernel``.

Official code vs paper (defaults follow the code; the paper form is an option):

* Down-projection: the code takes the SVD of the one-sided projected Gram
  matrix Ĉ = (I − M Mᵀ) C. The paper (Eqs. 6-8) takes the SVD of the projected
  representation (I − M Mᵀ) H. The column space is the same, but the
  directions and their order differ. Option: ``design="official"|"paper"``.
* Scale: the code divides the designed matrix by √3, which is not in the
  paper. Option: ``design_scale`` (use 1.0 for the paper).
* Energy criterion: the code squares the singular values of the Gram matrix,
  i.e. it uses σ⁴ of the representation; the paper uses σ². Option:
  ``energy="official"|"paper"`` (see :mod:`clx.ops.dualgpm`).
* Memory: the code uses DualGPM (remove/retain with the d/2 switch). InfLoRA-b5
  and DomainNet use plain GPM. Option: ``memory="dual"|"gpm"``. b5 adapts only
  the first 5 blocks: pass those kernel paths as ``sites``.
* First-task corner case: when the first task keeps r ≥ d/2 directions, the
  code stores U[:, :r] labelled 'retain' (the wrong subspace) and then fails
  its own assert. clx stores the complement U[:, r:]. The other numerical
  differences are listed in :mod:`clx.ops.dualgpm`.
* Input matrix: the code's Gram pass uses the training loader *with training
  augmentations* and all 197 ViT tokens. clx uses the task's training split as
  the loop serves it (no augmentation) and every valid token the backbone
  reports (padding excluded for text).
* Optimiser, epochs and batch size are the run's TrainConfig. The official
  ``CosineSchedule`` (per epoch, ``lr·cos(99π·e / (200(E−1)))``, :func:`epoch_cosine`) is
  the method's own schedule: ``lr_schedule="epoch_cosine"`` makes the method supply it
  to the loop (the protocol's ``lr_schedule`` field) for every phase the loop trains
  with the run's TrainConfig; the default ``None`` keeps the TrainConfig's schedule,
  since only the official ViT configs use the cosine (clx's text experiments train
  at a constant rate). The heads are PyTorch-default ``nn.Linear``, as in
  the code.

Layout of the module: :class:`InfLoRAConfig` (every option, validated), :class:`SiteLayout`
(the adapted kernels and their input groups, from the backbone's declared ``site_groups``),
and pure module-level helpers that the short factory :func:`inflora` binds: :func:`gram_pass`
(the representation pass), :func:`design` and :func:`update_memory` (one input group's step
with the :class:`clx.ops.memory.Memory` rule), :func:`params_for` (the adapted backbone of a
state, W + Σ_j a_j b_j at every site, which notebooks, tests and
:mod:`clx.methods.inflora_ca` call from a state alone; the method's ``params_for`` field),
and the protocol steps :func:`init`, :func:`begin_task`, :func:`trainable`, :func:`combine`
and :func:`end_task`. ``loss`` and ``predict`` are the default classification head over
``params_for`` (:mod:`clx.methods.heads`; the forward receives the batch's ``rng`` and
``mask`` like every other method, which only batch-statistic / dropout backbones read).
InfLoRA+CA (classifier alignment) is :mod:`clx.methods.inflora_ca`.

``fold=True`` folds each finished task's a_t b_t into one dense per-site delta
kept in the state (``folded``) and drops the branch. Inference then costs one
dense add per site whatever T is, and the state no longer grows with T. The
price is the checkpoint: each task's delta then holds a dense (d_in, d_out)
matrix per adapted site (24 × 768² floats ≈ 57 MB per task for ViT-B k/v)
instead of the branch itself (12 a's + 24 b's at r = 10 ≈ 1.1 MB). The
DualGPM memories add 12 × 768² floats ≈ 28 MB per task in both cases.
Predictions equal the unfolded ones up to float rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import base as methods_base
from clx.methods import heads as heads_lib
from clx.methods import passes
from clx.methods import sequential
from clx.methods.base import ContinualMethod, Params, StreamSpec, TaskContext, TaskInfo
from clx.models.base import Backbone
from clx.ops import dualgpm
from clx.ops import lora as lora_ops
from clx.ops import memory as memory_ops
from clx.ops.schedules import epoch_cosine  # re-exported: clx.methods.inflora.epoch_cosine
from clx.ops import tree as tree_ops

_HIGHEST = jax.lax.Precision.HIGHEST
MEMORY_RULES = ("dual", "gpm")
LR_SCHEDULES = (None, "epoch_cosine")  # None: the run's TrainConfig.schedule
# Old keyword → its one name (DESIGN "one name per concept"); accepted with a DeprecationWarning.
RENAMED = {"rank": "lora_rank", "scale": "design_scale", "gram_batch_size": "aux_batch_size",
           "variant": "memory"}


# -- configuration ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InfLoRAConfig:
  """Every InfLoRA option, each default written once and validated on construction.

  Attributes:
    lora_rank: r, the rank of every task's branch (official 10; 30 on DomainNet).
    sites: site roles (e.g. ``("k", "v")``, official) and/or kernel paths; a
      single string is one entry.
    lamb: ε at the first task (0.95 CIFAR/DomainNet, 0.98 ImageNet-R).
    lame: ε_t = lamb + (lame − lamb)·t/T (1.0 in every official config).
    design_scale: factor on the designed a (official 1/√3; the paper has 1.0).
      It is folded into a at design time, so it is not a LoRA α/r scale.
    energy: ``"official"`` (σ⁴ of the representation) or ``"paper"`` (σ²).
    design: ``"official"`` (SVD of (I − M Mᵀ) C) or ``"paper"`` (of (I − M Mᵀ) H).
    memory: ``"dual"`` (DualGPM, official InfLoRA) or ``"gpm"`` (b5/DomainNet).
    head_mode: ``"per_task"``/``"shared"``; None: shared for domain-IL, else per task.
    fold: fold finished branches into one dense delta per site.
    aux_batch_size: batch size of the host passes (Gram, and features for CA);
      None: the run's eval batch size.
    lr_schedule: ``"epoch_cosine"``: the method supplies the official per-epoch
      cosine (:func:`epoch_cosine` at the phase's learning rate and epochs) to
      the loop; ``None``: the run's ``TrainConfig.schedule``.
    name: registry/run name.
    lora_compute: how the training forward and ``predict`` compute the branches:
      ``"merged"`` (default, W + Σ_j a_j b_j) or ``"factored"`` (the branch of the task
      being trained / last trained as (x a_t) b_t at each site, the frozen older branches
      merged into W); equal up to float rounding (:data:`clx.methods.sequential.LORA_COMPUTE`). The Gram passes and
      :func:`params_for` always use the merged params.
  """

  lora_rank: int = 10
  sites: str | tuple[str, ...] = ("k", "v")
  lamb: float = 0.95
  lame: float = 1.0
  design_scale: float = dualgpm.DEFAULT_SCALE
  energy: str = "official"
  design: str = "official"
  memory: str = "dual"
  head_mode: str | None = None
  fold: bool = False
  aux_batch_size: int | None = None
  lr_schedule: str | None = None
  name: str = "inflora"
  lora_compute: str = "merged"

  def __post_init__(self) -> None:
    sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
    object.__setattr__(self, "sites", sites)  # lists from JSON configs become hashable tuples
    if not sites:
      raise ValueError("inflora needs at least one site")
    if self.memory not in MEMORY_RULES:
      raise ValueError(f"memory must be one of {MEMORY_RULES}, got {self.memory!r}")
    if self.energy not in dualgpm.ENERGIES:
      raise ValueError(f"energy must be one of {sorted(dualgpm.ENERGIES)}, got {self.energy!r}")
    if self.design not in dualgpm.FORMS:
      raise ValueError(f"design must be one of {sorted(dualgpm.FORMS)}, got {self.design!r}")
    if not 0.0 < self.lamb <= 1.0 or not 0.0 < self.lame <= 1.0:
      raise ValueError(f"lamb and lame must lie in (0, 1], got {self.lamb} and {self.lame}")
    if (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, (int, np.integer))
        or self.lora_rank < 1):
      raise ValueError(f"lora_rank must be a positive int, got {self.lora_rank!r}")
    if not math.isfinite(self.design_scale) or self.design_scale == 0:
      raise ValueError(f"design_scale must be finite and non-zero, got {self.design_scale}")
    heads_lib.check_mode(self.head_mode, self.name)
    sequential.check_lora_compute(self.lora_compute, self.name)
    if self.aux_batch_size is not None and (
        isinstance(self.aux_batch_size, bool)
        or not isinstance(self.aux_batch_size, (int, np.integer)) or self.aux_batch_size < 1):
      raise ValueError(f"aux_batch_size must be a positive int or None, got "
                       f"{self.aux_batch_size!r}")
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")

  @property
  def memory_rule(self) -> memory_ops.MemoryRule:
    """The memory rule: DualGPM (``memory="dual"``) or plain GPM on Gram matrices."""
    return memory_ops.dualgpm_rule(energy=self.energy, dual=self.memory == "dual")


def config_from_kwargs(config_cls: type, kwargs: Mapping[str, Any],
                       renamed: Mapping[str, str] = RENAMED) -> Any:
  """``config_cls(**kwargs)`` with the old keyword names mapped to the new ones.

  Args:
    config_cls: a config dataclass (:class:`InfLoRAConfig` or a subclass).
    kwargs: the factory's keywords; old names (``renamed`` keys) are accepted
      with a ``DeprecationWarning``.
    renamed: ``{old name: new name}``.

  Returns:
    The validated config.

  Raises:
    TypeError: an option was given under both its old and its new name.
  """
  return config_cls(**methods_base.renamed(dict(kwargs), dict(renamed), config_cls.__name__))


def factory_signature(config_cls: type, renamed: Mapping[str, str] = RENAMED
                      ) -> inspect.Signature:
  """``(backbone, *, <config fields>, <old names>)``: what ``inspect.signature`` of a factory
  taking ``**kwargs`` reports, so configs are checked by name before any data loads.

  Args:
    config_cls: a config dataclass (its fields become keyword-only parameters).
    renamed: ``{old name: new name}``; each old name is added with default None.

  Returns:
    The :class:`inspect.Signature`, returning :class:`ContinualMethod`.
  """
  kw = inspect.Parameter.KEYWORD_ONLY
  params = [inspect.Parameter("backbone", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
  params += [inspect.Parameter(f.name, kw, default=f.default)
             for f in dataclasses.fields(config_cls)]
  params += [inspect.Parameter(old, kw, default=None) for old in renamed]
  return inspect.Signature(params, return_annotation=ContinualMethod)


# -- learning-rate schedule ------------------------------------------------------


def official_lr_schedule(train_config: Any) -> Callable[[int], Callable[[Any], jax.Array]]:
  """The method's ``lr_schedule`` field with ``lr_schedule="epoch_cosine"``: the
  :func:`epoch_cosine` of a phase's TrainConfig (its ``learning_rate`` and ``epochs``).

  Args:
    train_config: a :class:`clx.train.TrainConfig` (``learning_rate``, ``epochs``).

  Returns:
    A schedule factory ``steps_per_epoch -> (step -> lr)``.
  """
  return epoch_cosine(train_config.learning_rate, train_config.epochs)


# -- sites and their input groups ----------------------------------------------


def resolve_sites(backbone: Backbone, sites: str | Sequence[str]) -> tuple[str, ...]:
  """Kernel paths from roles (``"k"``, ``"v"``, …) and/or explicit kernel paths.

  Args:
    backbone: the backbone whose ``sites`` roles and params are looked up.
    sites: roles and/or '/'-separated kernel paths (a single string is one entry).

  Returns:
    The kernel paths, each once, in the order given (a role expands to its paths).
  """
  sites = (sites,) if isinstance(sites, str) else tuple(sites)
  if not sites:
    raise ValueError("inflora needs at least one site")
  out: list[str] = []
  for entry in sites:
    if entry in backbone.sites:
      paths = backbone.sites[entry]
    else:
      try:
        kernel = tree_ops.get(backbone.params, entry)
      except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{entry!r} is neither a site role of {backbone.name} ({sorted(backbone.sites)}) "
            f"nor a kernel path in its params") from None
      if np.ndim(kernel) != 2:
        raise ValueError(f"site {entry!r} has shape {np.shape(kernel)}; expected a 2-D kernel")
      paths = (entry,)
    out.extend(p for p in paths if p not in out)
  return tuple(out)


def input_groups(backbone: Backbone, sites: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """Sites grouped by shared input: ``{group key: (site, ...)}``, in site order.

  The backbone declares which kernels read one array (``Backbone.site_groups``:
  the q, k and v kernels of an attention block read the block's hidden states /
  ``norm1`` output). The adapted members of such a group form one group keyed
  ``<group>.<member+member>`` by the module name of each member's kernel, e.g.
  ``encoder.layers.0.attention.key+value``; any other site is its own group keyed
  by its site key, e.g. ``lin1.kernel`` (:func:`clx.ops.tree.to_key`). The Gram
  pass checks that the members' Gram matrices really agree.

  Args:
    backbone: the backbone (its ``site_groups``).
    sites: kernel paths (:func:`resolve_sites`).

  Returns:
    ``{group key: member site paths}``.
  """
  buckets: dict[str, list[str]] = {}
  for site in sites:
    group = backbone.group_of(site)
    buckets.setdefault(site if group is None else group, []).append(site)
  groups = {}
  for name, members in buckets.items():
    if name in backbone.site_groups:  # each member named by its kernel's module ("key")
      key = tree_ops.to_key(name) + "." + "+".join(tree_ops.as_site(m)[-2] for m in members)
    else:
      key = tree_ops.to_key(name)
    groups[key] = tuple(members)
  return groups


def site_groups(backbone: Backbone, sites: str | Sequence[str]) -> dict[str, str]:
  """``{site path: group key}`` of the kernels ``sites`` resolves to (see :func:`input_groups`).

  Args:
    backbone: the network.
    sites: a role, a kernel path, or a sequence of them.

  Returns:
    ``{site path: group key}``; sites reading the same input share a group.
  """
  groups = input_groups(backbone, resolve_sites(backbone, sites))
  return {s: g for g, members in groups.items() for s in members}


class SiteLayout(NamedTuple):
  """The adapted kernels of one backbone and their input groups (static, host side).

  Attributes:
    sites: kernel paths, in order.
    groups: ``{group key: member site paths}`` (sites reading one input).
    shapes: ``{site path: (d_in, d_out)}``.
  """

  sites: tuple[str, ...]
  groups: dict[str, tuple[str, ...]]
  shapes: dict[str, tuple[int, int]]

  @property
  def site_group(self) -> dict[str, str]:
    """``{site path: group key}``."""
    return {s: g for g, members in self.groups.items() for s in members}

  @property
  def group_dim(self) -> dict[str, int]:
    """``{group key: d}``, the input dim the group's members share."""
    return {g: self.shapes[members[0]][0] for g, members in self.groups.items()}


def site_layout(backbone: Backbone, sites: str | Sequence[str], lora_rank: int) -> SiteLayout:
  """The :class:`SiteLayout` of ``sites`` on ``backbone``, checked against ``lora_rank``.

  Args:
    backbone: the frozen backbone.
    sites: roles and/or kernel paths.
    lora_rank: r; it must not exceed min(d_in, d_out) of any site.

  Returns:
    The layout. Raises ValueError if members of a group disagree on d_in.
  """
  paths = resolve_sites(backbone, sites)
  groups = input_groups(backbone, paths)
  shapes = {s: tuple(np.shape(tree_ops.get(backbone.params, s))) for s in paths}
  for members in groups.values():
    dims = {shapes[s][0] for s in members}
    if len(dims) != 1:
      raise ValueError(f"sites {members} share an input but have input dims {sorted(dims)}")
  for s, (d_in, d_out) in shapes.items():
    if lora_rank > min(d_in, d_out):
      raise ValueError(f"rank {lora_rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {s!r}")
  return SiteLayout(paths, groups, shapes)


# -- state ------------------------------------------------------------------------


class GroupMemory(TypedDict):
  """One input group's memory as the state stores it (:class:`clx.ops.memory.Memory`
  without its derived ``scale``, so checkpoints keep their format)."""

  basis: jax.Array  # (d, d) zero-padded
  rank: jax.Array   # int32 scalar, valid columns
  kind: jax.Array   # int32 scalar, REMOVE 0 / RETAIN 1


class Branch(TypedDict):
  """One task's LoRA branch: a per input group, b per site (key: ``site_key(path)``)."""

  a: dict[str, jax.Array]  # {group: (d_in, r)}, designed and frozen
  b: dict[str, jax.Array]  # {site key: (r, d_out)}, trained on its task only


class InfLoRAState(TypedDict, total=False):
  """InfLoRA's state: a nested dict, as :mod:`clx.checkpoint` stores it (see the module docstring).

  A ``TypedDict`` rather than a ``NamedTuple`` so that the task checkpoints,
  which flatten nested dicts, and the checkpoints already written keep their
  format. ``folded`` exists only with ``fold=True``; ``class_stats`` only for
  :mod:`clx.methods.inflora_ca`.
  """

  heads: dict[str, dict[str, jax.Array]]
  branches: dict[str, Branch]
  memory: dict[str, GroupMemory]
  folded: dict[str, jax.Array]
  class_stats: dict[str, dict[str, jax.Array]]


def memory_summary(state: InfLoRAState) -> dict[str, tuple[int, str]]:
  """``{group: (rank, "remove"|"retain")}`` of an InfLoRA state (logs, reports).

  Args:
    state: an InfLoRA state (its ``memory``).

  Returns:
    ``{group: (rank, kind name)}``.
  """
  return {g: (int(m["rank"]), dualgpm.KIND_NAMES[int(m["kind"])])
          for g, m in state["memory"].items()}


# -- the adapted backbone -------------------------------------------------------------


def branch_adapters(state: InfLoRAState, site_group: Mapping[str, str]) -> dict[str, list]:
  """``{site path: [{"a": a_j[group], "b": b_j[site]}, ...]}`` over the state's branches in
  task order: the adapters every forward sums at each site.

  Args:
    state: an InfLoRA state (``branches``).
    site_group: ``{site path: group key}`` (:func:`site_groups`).

  Returns:
    The adapter lists (empty dict before the first task).
  """
  adapters: dict[str, list] = {}
  for tk in sorted(state["branches"], key=int):
    branch = state["branches"][tk]
    for s, g in site_group.items():
      adapters.setdefault(s, []).append({"a": branch["a"][g], "b": branch["b"][tree_ops.to_key(s)]})
  return adapters


def folded_params(state: InfLoRAState, base: Params, site_group: Mapping[str, str]) -> Params:
  """``base`` with the folded deltas added (``fold=True``), else ``base`` itself.

  Args:
    state: an InfLoRA state (``folded`` ``{site key: (d_in, d_out)}`` with ``fold=True``).
    base: the frozen backbone params.
    site_group: ``{site path: group key}`` of the adapted sites.

  Returns:
    The params (same tree as ``base``).
  """
  params = base
  if "folded" in state:
    for s in site_group:
      kernel = tree_ops.get(params, s)
      params = tree_ops.add(params, s, state["folded"][tree_ops.to_key(s)].astype(kernel.dtype))
  return params


def params_for(state: InfLoRAState, base: Params, site_group: Mapping[str, str]) -> Params:
  """The effective backbone params of an InfLoRA state: W + (folded) + Σ_j a_j b_j per site.

  Pure and jit-able; the forward of ``loss`` and ``predict`` with
  ``lora_compute="merged"`` (the method's ``params_for`` field binds it in both
  modes), exposed so that other code (e.g. :mod:`clx.methods.inflora_ca`, feature
  extraction, notebooks) can run the adapted backbone from a state alone. During
  training the loop's ``combine`` has put the trained b_t into the state, so every
  branch reads its own b.

  Args:
    state: an InfLoRA state (``branches``, optionally ``folded``).
    base: the frozen backbone params.
    site_group: ``{site path: group key}`` (:func:`site_groups`).

  Returns:
    A params pytree like ``base``: at every site W + Σ_j a_j[group] b_j[site].
  """
  params = folded_params(state, base, site_group)
  adapters = branch_adapters(state, site_group)
  if adapters:
    params = lora_ops.apply_adapters(params, adapters, 1.0)
  return params


@functools.lru_cache(maxsize=32)
def _params_for_jit(site_group_items: tuple[tuple[str, str], ...]):
  """One jitted ``(state, base) -> params`` (:func:`params_for`) per site layout."""
  site_group = dict(site_group_items)
  return jax.jit(lambda state, base: params_for(state, base, site_group))


# -- the Gram (representation) pass -------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _accumulate_fn(backbone: Backbone, group_items: tuple[tuple[str, tuple[str, ...]], ...]):
  """Jitted ``(acc, params, x) -> acc``: adds one batch's Gram sums and token counts per group.

  ``acc`` is ``(sums {group: (d, d)}, counts {group: ()}, mismatch ())``; mismatch is
  the largest relative difference seen between a group's members' Gram matrices.
  """

  @functools.partial(jax.jit, donate_argnums=0)
  def accumulate(acc, params, x):
    _, taps = backbone.apply(params, x, taps="gram")
    sums, counts, mismatch = dict(acc[0]), dict(acc[1]), acc[2]
    for g, members in group_items:
      first = taps[members[0]]["gram"]
      for s in members[1:]:
        other = taps[s]["gram"]
        rel = jnp.max(jnp.abs(other - first)) / jnp.maximum(jnp.max(jnp.abs(first)), 1e-30)
        mismatch = jnp.maximum(mismatch, rel)
      sums[g] = sums[g] + first
      counts[g] = counts[g] + taps[members[0]]["count"]
    return sums, counts, mismatch

  return accumulate


def gram_pass(backbone: Backbone, params: Params, batches: Iterable[Mapping[str, Any]],
              groups: Mapping[str, Sequence[str]], *,
              task_index: int | None = None) -> dict[str, jax.Array]:
  """Mean input Gram matrix C = (1/n) Σ_tokens x xᵀ of every input group over a task's data.

  The representation pass of InfLoRA (the official ``cur_matrix``): one forward
  per batch with ``taps="gram"``, summing each group's first member's Gram
  matrix XᵀX (d, d) and token count over every valid token (the backbone
  excludes padding tokens; padded *rows* of a short last batch are cut off).

  Args:
    backbone: the frozen backbone.
    params: the params to run (e.g. :func:`params_for` of the state: every old
      branch active).
    batches: ``{"x": (b, ...), "mask": (b,) optional 0/1}``; padding rows (mask 0)
      sit at the end of a batch, as ``ctx.batches`` and :mod:`clx.methods.passes`
      put them.
    groups: ``{group key: member site paths}`` (:func:`input_groups`); the
      members of a group must read one input (checked: relative difference ≤ 1e-5).
    task_index: named in error messages.

  Returns:
    ``{group key: C (d, d) float32}``. Raises ValueError if a group saw no
    token, its members' Gram matrices differ or C is not finite.
  """
  where = f"task {task_index}: " if task_index is not None else ""
  group_items = tuple((g, tuple(members)) for g, members in groups.items())
  dims = {g: int(np.shape(tree_ops.get(params, members[0]))[0]) for g, members in group_items}
  acc = ({g: jnp.zeros((d, d), jnp.float32) for g, d in dims.items()},
         {g: jnp.zeros((), jnp.float32) for g in dims}, jnp.zeros((), jnp.float32))
  accumulate = _accumulate_fn(backbone, group_items)
  for batch in batches:
    x = batch["x"]
    valid = int(jnp.sum(batch["mask"])) if "mask" in batch else int(np.shape(x)[0])
    if valid == 0:
      continue
    if valid < x.shape[0]:  # padding rows sit at the end of the last batch
      x = x[:valid]
    acc = accumulate(acc, params, x)
  sums, counts, mismatch = acc
  if float(mismatch) > 1e-5:
    raise ValueError(
        f"{backbone.name}: sites grouped as sharing their input have different Gram "
        f"matrices (relative difference {float(mismatch):.2e}); groups: {dict(group_items)}")
  grams = {}
  for g in dims:
    count = float(counts[g])
    if count <= 0:
      raise ValueError(f"{where}the Gram pass saw no valid token for {g!r}")
    gram = sums[g] / count
    if not bool(jnp.all(jnp.isfinite(gram))):
      raise ValueError(f"{where}the input Gram matrix of {g!r} has NaN/Inf")
    grams[g] = gram
  return grams


# -- one input group's design and memory step ------------------------------------------------


def stored(memory: memory_ops.Memory) -> GroupMemory:
  """The state's form of a memory: basis, rank and kind (``scale`` is derived from them).

  Args:
    memory: a :class:`clx.ops.memory.Memory`.

  Returns:
    ``{"basis" (d, d), "rank" (), "kind" ()}``.
  """
  return {"basis": memory.basis, "rank": memory.rank, "kind": memory.kind}


def design(cfg: InfLoRAConfig, memory: memory_ops.Memory, gram: jax.Array) -> jax.Array:
  """Task t's designed down-projection a_t (d, r) for one input group.

  a_t = design_scale · top-r directions of Q C (official) or Q C Q (paper), with Q
  the projector onto the complement of the memory's protected space
  (:func:`clx.ops.dualgpm.design_down_projection`).

  Args:
    cfg: the config (``lora_rank``, ``design_scale``, ``design``).
    memory: the group's memory after task t − 1.
    gram: C (d, d), the group's input Gram matrix on task t with the old branches.

  Returns:
    a_t (d, lora_rank) float32.
  """
  return dualgpm.design_down_projection(
      gram, memory.basis, memory.kind, cfg.lora_rank, memory_rank=memory.rank,
      scale=cfg.design_scale, form=cfg.design).astype(jnp.float32)


def update_memory(cfg: InfLoRAConfig, memory: memory_ops.Memory, gram: jax.Array, task: int,
                  num_tasks: int) -> memory_ops.Memory:
  """One group's memory after task t by ``cfg.memory_rule`` at ε_t = lamb + (lame − lamb)·t/T.

  Args:
    cfg: the config (``lamb``, ``lame``, ``energy``, ``memory``).
    memory: the group's memory after task t − 1.
    gram: C (d, d), the group's input Gram matrix on task t with branch t active.
    task: t.
    num_tasks: T.

  Returns:
    The new memory (:func:`clx.ops.dualgpm.dualgpm_update_fixed`), basis float32.
  """
  eps = dualgpm.task_threshold(task, num_tasks, cfg.lamb, cfg.lame)
  new = cfg.memory_rule.update(memory, gram, eps, first_task=task == 0)
  return new._replace(basis=new.basis.astype(jnp.float32))


def fold_branch(state: InfLoRAState, layout: SiteLayout, task_index: int) -> InfLoRAState:
  """``state`` with branch ``task_index`` folded into ``folded`` (+= a_t b_t per site), dropped.

  Args:
    state: an InfLoRA state with ``folded`` and branch ``task_index``.
    layout: the site layout (sites and their groups).
    task_index: the branch to fold.

  Returns:
    The new state (pure).
  """
  branches = dict(state["branches"])
  branch = branches.pop(str(task_index))
  site_group = layout.site_group
  key = tree_ops.to_key
  folded = {key(s): state["folded"][key(s)] + jnp.matmul(
      branch["a"][site_group[s]], branch["b"][key(s)], precision=_HIGHEST) for s in layout.sites}
  return {**state, "branches": branches, "folded": folded}


# -- the protocol steps (bound by the factory) -------------------------------------------------


class Setup(NamedTuple):
  """What every protocol step of one InfLoRA instance reads: config, backbone, site layout."""

  cfg: InfLoRAConfig
  backbone: Backbone
  layout: SiteLayout


def init(setup: Setup, rng: jax.Array, spec: StreamSpec) -> InfLoRAState:
  """The state before the first task: heads, no branch, an empty memory per group.

  Args:
    setup: the resolved InfLoRA.
    rng: key for the heads.
    spec: the stream.

  Returns:
    ``{"heads", "branches": {}, "memory": {group: empty (d, d)}}`` plus zero ``folded``
    ``{site key: (d_in, d_out)}`` with ``fold=True``.
  """
  mode = heads_lib.mode_for(setup.cfg.head_mode, spec)
  state = {"heads": heads_lib.init_heads(rng, spec, setup.backbone.feature_dim, mode),
           "branches": {},
           "memory": {g: stored(memory_ops.empty(d)) for g, d in setup.layout.group_dim.items()}}
  if setup.cfg.fold:
    state["folded"] = {tree_ops.to_key(s): jnp.zeros(setup.layout.shapes[s], jnp.float32)
                       for s in setup.layout.sites}
  return state


def begin_task(setup: Setup, state: InfLoRAState, ctx: TaskContext) -> InfLoRAState:
  """Gram pass with the old branches, design of a_t per group, b_t = 0, the task's head.

  Args:
    setup: the resolved InfLoRA (options, backbone, site layout).
    state: the state after the previous task.
    ctx: the loop's context for task t (training batches of the Gram pass; ``rng`` folded
      with 0 for the head).

  Returns:
    The state with branch t (``a`` ``{group: (d_in, r)}`` designed, ``b`` ``{site key: (r,
    d_out)}`` zeros) and the task's head.

  Raises:
    ValueError: task t already has a branch.
  """
  t = ctx.task_index
  if str(t) in state["branches"]:
    raise ValueError(f"task {t} already has a branch; begin_task was called twice")
  cfg, layout = setup.cfg, setup.layout
  params = _params_for_jit(tuple(layout.site_group.items()))(state, ctx.base)
  grams = gram_pass(setup.backbone, params, ctx.batches("train", batch_size=cfg.aux_batch_size),
                    layout.groups, task_index=t)
  # The SVDs once, on one device, not once per device of the mesh (passes.on_one_device).
  grams, memories = passes.on_one_device((grams, state["memory"]))
  downs = {g: design(cfg, memory_ops.from_dict(memories[g]), gram) for g, gram in grams.items()}
  ups = {tree_ops.to_key(s): jnp.zeros((cfg.lora_rank, layout.shapes[s][1]), jnp.float32)
         for s in layout.sites}
  heads = heads_lib.add_task_head(state["heads"], jax.random.fold_in(ctx.rng, 0), ctx.spec,
                                  setup.backbone.feature_dim, t,
                                  heads_lib.mode_for(cfg.head_mode, ctx.spec))
  return {**state, "heads": heads,
          "branches": {**state["branches"], str(t): {"a": downs, "b": ups}}}


def trainable(state: InfLoRAState, info: TaskInfo) -> Params:
  """``{"b": {site key: (r, d_out)}, "head": {...}}`` of task ``info.task``.

  Args:
    state: the state after :func:`begin_task`.
    info: ``info.task`` is the task being trained.

  Returns:
    The branch's ``b`` and the task's head (the state's own arrays).
  """
  return {"b": state["branches"][str(info.task)]["b"],
          "head": state["heads"][heads_lib.head_key(state["heads"], info.task)]}


def combine(state: InfLoRAState, params: Params, info: TaskInfo) -> InfLoRAState:
  """The pure write-back of the trained b_t and head into the state.

  Args:
    state: the state before the step.
    params: the trained ``{"b", "head"}``.
    info: ``info.task`` is the task trained.

  Returns:
    The new state.
  """
  branch = {**state["branches"][str(info.task)], "b": params["b"]}
  state = {**state, "branches": {**state["branches"], str(info.task): branch}}
  return heads_lib.with_head(state, params["head"], info.task)


def end_task(setup: Setup, state: InfLoRAState, ctx: TaskContext) -> InfLoRAState:
  """Gram pass with branch t active, memory update per group, optional fold.

  Args:
    setup: the resolved InfLoRA.
    state: the state after training task t.
    ctx: the loop's context for task t (training batches of the second Gram pass).

  Returns:
    The state with every group's memory updated (and branch t folded with ``fold=True``).
  """
  t = ctx.task_index
  cfg, layout = setup.cfg, setup.layout
  eff = _params_for_jit(tuple(layout.site_group.items()))(state, ctx.base)
  grams = gram_pass(setup.backbone, eff, ctx.batches("train", batch_size=cfg.aux_batch_size),
                    layout.groups, task_index=t)
  # Once, on one device; the new memories go back where the old ones lived.
  grams, memories = passes.on_one_device((grams, state["memory"]))
  memory = {**state["memory"], **{
      g: passes.placed_like(
          stored(update_memory(cfg, memory_ops.from_dict(memories[g]), gram, t,
                               ctx.spec.num_tasks)), state["memory"][g])
      for g, gram in grams.items()}}
  state = {**state, "memory": memory}
  return fold_branch(state, layout, t) if cfg.fold else state


def bind(setup: Setup) -> ContinualMethod:
  """The :class:`ContinualMethod` whose steps are the module's functions bound to ``setup``.

  ``loss`` and ``predict`` are the default classification head
  (:mod:`clx.methods.heads`) over :func:`params_for`.

  Args:
    setup: the resolved InfLoRA (config, backbone, site layout).

  Returns:
    The method.

  Raises:
    ValueError: ``lora_compute="factored"`` on a kernel that is not an ``nnx.Linear``'s.
  """
  site_group = setup.layout.site_group

  def effective(state: InfLoRAState, base: Params, info: TaskInfo) -> Params:
    del info  # every branch is active for every task
    return params_for(state, base, site_group)

  forward_params, forward_kwargs = effective, None
  if setup.cfg.lora_compute == "factored":
    setup.backbone.check_factored(setup.layout.sites)  # each adapted kernel: an nnx.Linear's

    # Only task info.task's branch (the one whose b trains) is computed factored; the frozen
    # older branches get no gradient, so merging them costs one small matmul per site and
    # keeps the forward's cost independent of the number of tasks.
    def forward_params(state: InfLoRAState, base: Params, info: TaskInfo) -> Params:
      older = {k: v for k, v in state["branches"].items() if k != str(info.task)}
      adapters = branch_adapters({"branches": older}, site_group)
      params = folded_params(state, base, site_group)
      return lora_ops.apply_adapters(params, adapters, 1.0) if adapters else params

    def forward_kwargs(state: InfLoRAState, info: TaskInfo) -> dict:
      current = state["branches"].get(str(info.task))
      if current is None:  # e.g. folded at end_task: every branch is in forward_params
        return {}
      return {"adapters": branch_adapters({"branches": {str(info.task): current}}, site_group)}

  part = functools.partial
  mode = setup.cfg.head_mode
  return ContinualMethod(
      name=setup.cfg.name, backbone=setup.backbone, init=part(init, setup),
      begin_task=part(begin_task, setup), trainable=trainable,
      loss=heads_lib.classification_loss(setup.backbone, forward_params, combine, head_mode=mode,
                                         forward_kwargs=forward_kwargs),
      combine=combine, end_task=part(end_task, setup),
      predict=heads_lib.classification_predict(setup.backbone, forward_params, head_mode=mode,
                                               forward_kwargs=forward_kwargs),
      params_for=effective,
      lr_schedule=official_lr_schedule if setup.cfg.lr_schedule == "epoch_cosine" else None)


def inflora(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """InfLoRA against the clx protocol (see the module docstring).

  Args:
    backbone: the frozen network (its base params are never trained).
    **kwargs: :class:`InfLoRAConfig` fields (``lora_rank``, ``sites``, ``lamb``, …);
      the old names ``rank``, ``scale``, ``gram_batch_size`` still work (deprecated).

  Returns:
    The method.

  Raises:
    TypeError: an unknown option, or an option under both its old and its new name.
    ValueError: invalid options or sites.
  """
  cfg = config_from_kwargs(InfLoRAConfig, kwargs)
  return bind(Setup(cfg, backbone, site_layout(backbone, cfg.sites, cfg.lora_rank)))


inflora.__signature__ = factory_signature(InfLoRAConfig)


def inflora_b5(backbone: Backbone, *, blocks: int = 5, name: str = "inflora_b5",
               **kwargs: Any) -> ContinualMethod:
  """InfLoRA-b5: branches on the k/v kernels of the first ``blocks`` blocks, plain GPM.

  The blocks are taken in the order of ``backbone.sites["k"]`` (block 0 first).

  Args:
    backbone: the frozen network.
    blocks: how many blocks (from the first) get branches.
    name: registry/run name.
    **kwargs: other :class:`InfLoRAConfig` fields (``memory`` defaults to ``"gpm"``).

  Returns:
    The method.

  Raises:
    ValueError: ``blocks`` is outside [1, number of blocks], or invalid options.
  """
  k_sites, v_sites = backbone.site_paths("k"), backbone.site_paths("v")
  if blocks < 1 or blocks > len(k_sites):
    raise ValueError(f"blocks must lie in [1, {len(k_sites)}], got {blocks}")
  kwargs.setdefault("memory", "gpm")
  sites = tuple(p for pair in zip(k_sites[:blocks], v_sites[:blocks]) for p in pair)
  return inflora(backbone, sites=sites, name=name, **kwargs)


REGISTRY = {"inflora": inflora, "inflora_b5": inflora_b5}
