"""GPM: Gradient Projection Memory (Saha, Garg & Roy, ICLR 2021), and SGP.

After each task, the input space of every projected layer is summarised by a
basis M_l of the span of that layer's inputs (the *representation matrix*
R_l (d_l, n) of ``num_samples`` random training examples), grown with the GPM
energy criterion (:func:`clx.ops.subspace.gpm_update_fixed`). While learning a
new task, each projected kernel gradient is restricted to the orthogonal
complement of the memory (GPM Eq. 4):

    ∇W_l ← (I − M_l M_lᵀ) ∇W_l          (Flax kernels (d_in, d_out): input axis 0)

so the layer's response to old tasks' inputs (which lie in span(M_l)) does not
change. SGP (Saha & Roy, AAAI 2023) replaces the hard projector with an
importance-scaled one, (I − M_l diag(s_l) M_lᵀ), s ∈ [0, 1]
(:func:`clx.ops.sgp.sgp_update_fixed`).

Faithful to the official code (sahagobinda/GPM ``main_pmnist.py``): full
fine-tuning of the network with a fresh optimiser per task, projection of every
layer including the shared output layer, bases from ``num_samples`` (300)
random training samples, per-layer thresholds. The memory is stored zero-padded
to (d, d) with its rank, so the state has a fixed shape (and can be ``vmap``-ed
over seeds). On backbones that support ``grad_projection`` (the MLP) the
projection is applied through the layer inputs in the backward pass, which is
mathematically the same and far cheaper (:mod:`clx.ops.gradient_projection`);
other sites are projected in ``transform_grads``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods import passes
from clx.methods import sequential
from clx.methods.base import (ContinualMethod, Params, State, StreamSpec, TaskContext, TaskInfo,
                              check_positive_int, renamed)
from clx.models.base import Backbone
from clx.ops import memory as memory_ops
from clx.ops import tree

HEAD_SITE = "head/kernel"
FAMILIES = ("gpm", "sgp")

Threshold = float | Sequence[float] | Mapping[str, float]


def _check_threshold_values(threshold: Threshold, increment: float) -> None:
  """Build-time range check of the thresholds (their count needs the stream's head layout)."""
  values = (list(threshold.values()) if isinstance(threshold, Mapping)
            else [threshold] if isinstance(threshold, (int, float)) else list(threshold))
  bad = [v for v in values
         if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0]
  if bad or not values:
    raise ValueError(f"GPM thresholds must lie in (0, 1], got {threshold!r}")
  if isinstance(increment, bool) or not isinstance(increment, (int, float)) or not 0 <= increment < 1:
    raise ValueError(f"threshold_increment must lie in [0, 1), got {increment!r}")


@dataclasses.dataclass(frozen=True)
class GPMConfig:
  """Settings of GPM / SGP (see :func:`gpm` for their meaning); validated on construction."""

  threshold: Threshold = 0.97
  threshold_increment: float = 0.0
  num_samples: int = 300
  sites: tuple[str, ...] | None = None
  project_head: bool = True
  head_bias: bool = False
  head_mode: str | None = None
  memory: str = "gpm"
  scale_coff: float = 10.0
  fast_projection: bool = True
  site_samples: Mapping[str, int] | None = None
  freeze_norm: bool = True

  def __post_init__(self):
    if self.memory not in FAMILIES:
      raise ValueError(f"memory must be 'gpm' or 'sgp', got {self.memory!r}")
    check_positive_int(self.num_samples, "num_samples")
    _check_threshold_values(self.threshold, self.threshold_increment)
    if isinstance(self.scale_coff, bool) or not np.isfinite(self.scale_coff) or self.scale_coff < 0:
      raise ValueError(f"scale_coff (SGP α) must be a finite number >= 0, got {self.scale_coff!r}")
    heads_lib.check_mode(self.head_mode, self.memory)
    if self.sites is not None:
      object.__setattr__(self, "sites", tuple(self.sites))

  def rule(self) -> memory_ops.MemoryRule:
    """The memory rule of the family: :data:`clx.ops.memory.GPM` or ``memory.sgp(scale_coff)``.

    Returns:
      The :class:`clx.ops.memory.MemoryRule` for ``self.memory``.
    """
    return memory_ops.GPM if self.memory == "gpm" else memory_ops.sgp(self.scale_coff)


class GPMState(TypedDict):
  """The state of GPM/SGP (a nested dict, as checkpoints store it).

  Attributes:
    backbone: the fully trained backbone parameters.
    heads: ``{"shared" | str(t): {"kernel"(, "bias")}}``.
    memory: ``{site key: Memory as dict}`` (:func:`clx.ops.memory.as_dict`), (d, d) padded.
    task: () int32, the current task (zero-norm-gradient rule from task 1 on).
  """

  backbone: Params
  heads: dict
  memory: dict[str, dict[str, jax.Array]]
  task: jax.Array


class Setup(NamedTuple):
  """What the pure functions below need besides the state: settings, backbone, layout, rule.

  Attributes:
    cfg: the method's :class:`GPMConfig`.
    backbone: the network.
    body_sites: projected backbone kernels (``/`` paths).
    fast_sites: those projected through their inputs in the backward pass.
    slow_sites: those projected in ``transform_grads`` (convs).
    rule: the :class:`clx.ops.memory.MemoryRule` of the family.
  """

  cfg: GPMConfig
  backbone: Backbone
  body_sites: tuple[str, ...]
  fast_sites: tuple[str, ...]
  slow_sites: tuple[str, ...]
  rule: memory_ops.MemoryRule


def projected_sites(backbone: Backbone, sites: tuple[str, ...] | None) -> tuple[str, ...]:
  """``sites`` (default: every site of the backbone), each checked to exist.

  Args:
    backbone: the network (its ``sites`` and ``params``).
    sites: ``/`` kernel paths, or None for every site of ``backbone.sites``.

  Returns:
    The site paths, in the given (or the backbone's) order.

  Raises:
    ValueError: no site to project. KeyError: a path that is not in the params.
  """
  sites = sites if sites is not None else tuple(p for ps in backbone.sites.values() for p in ps)
  if not sites:
    raise ValueError(f"{backbone.name} exposes no sites to project")
  for site in sites:
    tree.get(backbone.params, site)  # KeyError early for a wrong site path
  return sites


def setup(backbone: Backbone, cfg: GPMConfig) -> Setup:
  """Resolve the projected sites of ``backbone`` under ``cfg`` (errors name a wrong site).

  Args:
    backbone: the network.
    cfg: the options (``sites``, ``fast_projection``, ``site_samples``, ``num_samples``).

  Returns:
    A :class:`Setup`: the projected body sites split into fast (projected through their inputs)
    and slow (projected in ``transform_grads``) ones, and the memory rule.

  Raises:
    ValueError: ``site_samples`` names a site that is not projected or a count outside
      [1, ``num_samples``], or the backbone has no site (from :func:`projected_sites`).
    KeyError: a site path is not in the params.
  """
  body = projected_sites(backbone, cfg.sites)
  fast = tuple(s for s in body if cfg.fast_projection and backbone.projects_through_inputs(s))
  samples = dict(cfg.site_samples or {})
  unknown = sorted(set(samples) - set(body))
  if unknown:
    raise ValueError(f"site_samples names sites {unknown} that are not projected; "
                     f"projected: {list(body)}")
  too_many = {s: k for s, k in samples.items() if not 1 <= k <= cfg.num_samples}
  if too_many:
    raise ValueError(f"site_samples must lie in [1, num_samples={cfg.num_samples}], got {too_many}")
  return Setup(cfg, backbone, body, fast, tuple(s for s in body if s not in fast), cfg.rule())


def resolve_thresholds(threshold: Threshold, sites: Sequence[str]) -> dict[str, float]:
  """Per-site base thresholds from a float, a sequence (site order) or a mapping.

  Args:
    threshold: ε: one float for every site, a sequence in ``sites`` order, or ``{site: ε}``
      (extra keys ignored).
    sites: the projected sites (body sites, then the head).

  Returns:
    ``{site: ε}`` as floats in (0, 1].

  Raises:
    ValueError: a mapping lacks a site, a sequence has the wrong length, or a value is outside
      (0, 1].
  """
  if isinstance(threshold, Mapping):
    missing = [s for s in sites if s not in threshold]
    if missing:
      raise ValueError(f"threshold mapping lacks sites {missing}; sites: {list(sites)}")
    out = {s: float(threshold[s]) for s in sites}
  elif isinstance(threshold, (int, float)):
    out = {s: float(threshold) for s in sites}
  else:
    threshold = list(threshold)
    if len(threshold) != len(sites):
      raise ValueError(f"got {len(threshold)} thresholds for {len(sites)} projected sites {list(sites)}")
    out = dict(zip(sites, map(float, threshold)))
  bad = {s: v for s, v in out.items() if not 0.0 < v <= 1.0}
  if bad:
    raise ValueError(f"GPM thresholds must lie in (0, 1], got {bad}")
  return out


def head_mode(cfg: GPMConfig, spec: StreamSpec) -> str:
  """The head layout in use (``cfg.head_mode`` or the scenario's default).

  Args:
    cfg: the options (``head_mode`` None, ``"per_task"`` or ``"shared"``).
    spec: the stream (its scenario picks the default).

  Returns:
    ``"per_task"`` or ``"shared"``.
  """
  return heads_lib.mode_for(cfg.head_mode, spec)


def memory_sites(su: Setup, spec: StreamSpec) -> tuple[str, ...]:
  """Projected sites: the body's, then the shared head's kernel (``project_head``, shared heads).

  Args:
    su: the setup.
    spec: the stream (decides whether the head is shared).

  Returns:
    The body sites, plus ``HEAD_SITE`` when the shared head is projected.
  """
  head = (HEAD_SITE,) if (su.cfg.project_head and head_mode(su.cfg, spec) == "shared") else ()
  return su.body_sites + head


def _strip_bias(cfg: GPMConfig, heads: dict) -> dict:
  return heads if cfg.head_bias else {k: {"kernel": v["kernel"]} for k, v in heads.items()}


def init(su: Setup, rng: jax.Array, spec: StreamSpec) -> GPMState:
  """Backbone copy, heads, an empty (d, d) memory per projected site, task 0.

  Args:
    su: the setup.
    rng: key for the head initialisation.
    spec: the stream.

  Returns:
    A :class:`GPMState`: a copy of the backbone params, the heads, an empty memory per site of
    :func:`memory_sites` (d = the kernel's input size, or the feature size for the head) and
    ``task`` 0.
  """
  heads = heads_lib.init_heads(rng, spec, su.backbone.feature_dim, head_mode(su.cfg, spec))
  memory = {}
  for site in memory_sites(su, spec):
    d = (su.backbone.feature_dim if site == HEAD_SITE
         else int(np.prod(tree.get(su.backbone.params, site).shape[:-1])))
    memory[tree.to_key(site)] = memory_ops.as_dict(su.rule.init(d))
  return {"backbone": jax.tree.map(jnp.array, su.backbone.params),
          "heads": _strip_bias(su.cfg, heads), "memory": memory,
          "task": jnp.zeros((), jnp.int32)}


def begin_task(su: Setup, state: GPMState, ctx: TaskContext) -> GPMState:
  """Add the task's head (per-task heads) and record the task index.

  Args:
    su: the setup.
    state: the state after the previous task.
    ctx: the loop's context (``task_index``, ``rng`` folded with 0 for the head).

  Returns:
    The state with the task's head added (per-task heads) and ``task`` set.
  """
  heads = heads_lib.add_task_head(state["heads"], jax.random.fold_in(ctx.rng, 0), ctx.spec,
                                  su.backbone.feature_dim, ctx.task_index,
                                  head_mode(su.cfg, ctx.spec))
  return {**state, "heads": _strip_bias(su.cfg, heads),
          "task": jnp.asarray(ctx.task_index, jnp.int32)}


def trainable(state: State, info: TaskInfo) -> Params:
  """``{"backbone", "head"}``: the whole backbone and the current head (full fine-tuning).

  Args:
    state: the current state.
    info: ``info.task`` selects the head.

  Returns:
    ``{"backbone": params, "head": {"kernel"(, "bias")}}``.
  """
  return {"backbone": state["backbone"],
          "head": state["heads"][heads_lib.head_key(state["heads"], info.task)]}


def combine(state: State, params: Params, info: TaskInfo) -> State:
  """Write the trained backbone and current head back into the state.

  Args:
    state: the state before the step.
    params: the trained ``{"backbone", "head"}``.
    info: ``info.task`` selects the head written back.

  Returns:
    The state with both replaced (pure).
  """
  return heads_lib.with_head({**state, "backbone": params["backbone"]}, params["head"], info.task)


def _memory(state: State, site: str) -> memory_ops.Memory:
  return memory_ops.from_dict(state["memory"][tree.to_key(site)])


def grad_projection(su: Setup, state: State, info: TaskInfo) -> dict:
  """``backbone.apply`` arguments projecting the fast sites' gradients through their inputs
  (from the second task on; task 0's memory is empty).

  Args:
    su: the setup (``fast_sites``, ``rule``).
    state: the current state (its memories).
    info: ``info.task``; task 0 projects nothing.

  Returns:
    ``{"grad_projection": {site: through-inputs projection}}``, or ``{}`` for task 0 or no fast
    site.
  """
  if info.task == 0 or not su.fast_sites:
    return {}
  return {"grad_projection": {s: su.rule.through_inputs(_memory(state, s)) for s in su.fast_sites}}


def project_gradients(rule: memory_ops.MemoryRule, grads: Params, memory: Mapping,
                      sites: Sequence[str]) -> Params:
  """``grads`` with the kernel at each site projected by ``rule`` off that site's memory.

  Args:
    rule: the memory rule (GPM: (I − M Mᵀ) g; SGP: (I − M diag(s) Mᵀ) g).
    grads: nested dict holding the kernels' gradients at ``sites``.
    memory: ``{site key: memory dict}``.
    sites: ``/`` paths into ``grads``.

  Returns:
    ``grads`` with those leaves replaced (pure).
  """
  for site in sites:
    mem = memory_ops.from_dict(memory[tree.to_key(site)])
    grads = tree.set(grads, site, rule.project_grad(tree.get(grads, site), mem))
  return grads


def transform_grads(su: Setup, grads: Params, state: State) -> Params:
  """Project what the forward did not: the shared head, and the sites the backbone cannot
  project through its inputs (convs). A zero memory (task 0) is a no-op. From the second
  task on, with ``freeze_norm``, the gradients of every 1-D backbone parameter (batch-norm
  scales and biases) are zeroed, as the official ``train_projected``.

  Args:
    su: the setup (``slow_sites``, ``rule``, ``cfg.freeze_norm``).
    grads: ``{"backbone", "head"}`` gradients.
    state: the current state (``memory``, ``task``).

  Returns:
    The gradients, same tree, projected/zeroed as above (pure).
  """
  memory = state["memory"]
  out = dict(grads)
  if su.slow_sites:
    out["backbone"] = project_gradients(su.rule, grads["backbone"], memory, su.slow_sites)
  if su.cfg.freeze_norm:
    later = state["task"] > 0
    out["backbone"] = jax.tree.map(
        lambda g: jnp.where(later, jnp.zeros_like(g), g) if g.ndim == 1 else g, out["backbone"])
  if tree.to_key(HEAD_SITE) in memory:
    out["head"] = project_gradients(su.rule, {"head": grads["head"]}, memory, (HEAD_SITE,))["head"]
  return out


def representations(su: Setup, params: Params, ctx: TaskContext) -> dict[str, jax.Array]:
  """``{site: R (d, m)}`` from ``num_samples`` random training examples of the task.

  A site's representation holds the inputs (rows; every patch for a conv) of its first
  ``site_samples[site]`` examples, as the official per-layer ``batch_list``; the shared
  head's is the features of all of them.

  Args:
    su: the setup.
    params: backbone params the representation pass runs with.
    ctx: the loop's context (the task's training data, sampled with seed 1).

  Returns:
    ``{site: R (d, m)}``: d the site's input size (patch size for a conv), m the number of
    input rows collected (examples × positions); the head's R is ``(feature_dim, n)``.
  """
  # As the official code (x[r[0:300]]): all examples when the task has fewer.
  sample = ctx.sample(min(su.cfg.num_samples, len(ctx.arrays("train")["y"])), seed=1)
  feats, taps = _taps_fn(su.backbone)(params, jnp.asarray(sample["x"]))
  samples = dict(su.cfg.site_samples or {})
  reps = {s: taps[s][:samples.get(s, len(sample["y"]))].reshape(-1, taps[s].shape[-1]).T
          for s in su.body_sites}
  if HEAD_SITE in memory_sites(su, ctx.spec):
    reps[HEAD_SITE] = feats.T
  return reps


def update_memory(su: Setup, state: GPMState, ctx: TaskContext) -> GPMState:
  """Grow each site's memory from the task's representations (``end_task``), ε_t capped at 1.

  Args:
    su: the setup.
    state: the state after training the task.
    ctx: the loop's context (``task_index`` t, training data).

  Returns:
    The state with every projected site's memory grown with threshold
    min(1, ε + t · ``threshold_increment``).

  Raises:
    ValueError: a representation holds NaN/Inf, or the thresholds are invalid.
  """
  # Once, on one device: with the state replicated over the mesh, the representation pass and
  # each SVD would otherwise run on every device (passes.on_one_device).
  local = passes.on_one_device({"backbone": state["backbone"], "memory": state["memory"]})
  reps = representations(su, local["backbone"], ctx)
  base_eps = resolve_thresholds(su.cfg.threshold, memory_sites(su, ctx.spec))
  memory = dict(state["memory"])
  update = _jitted_update(su.rule)
  for site, rep in reps.items():
    eps = min(1.0, base_eps[site] + su.cfg.threshold_increment * ctx.task_index)
    rep = jnp.asarray(rep, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(rep))):
      raise ValueError(f"task {ctx.task_index}: representation of site {site!r} has NaN/Inf")
    new = update(_memory(local, site), rep, eps, first_task=ctx.task_index == 0)
    key = tree.to_key(site)
    memory[key] = passes.placed_like(memory_ops.as_dict(new), state["memory"][key])
  return {**state, "memory": memory}


@functools.lru_cache(maxsize=16)
def _jitted_update(rule: memory_ops.MemoryRule):
  # One jitted update per rule, so every task and site of a run reuses its compilations.
  return jax.jit(rule.update)


@functools.lru_cache(maxsize=16)
def _taps_fn(backbone: Backbone):
  # One jitted function per backbone, so every task's memory update reuses its compilation.
  return jax.jit(lambda params, x: backbone.apply(params, x, taps="inputs"))


def memory_ranks(state: State) -> dict[str, int]:
  """``{site: rank}`` of a GPM/SGP/BECAME state (for logs and reports).

  Args:
    state: a state with ``memory`` ``{site key: memory dict}``.

  Returns:
    ``{site path: number of memory columns}``.
  """
  return {tree.to_path(tree.from_key(k)): int(v["rank"]) for k, v in state["memory"].items()}


def method(su: Setup, name: str, **overrides: Any) -> ContinualMethod:
  """The :class:`ContinualMethod` of a GPM setup; ``overrides`` replace protocol fields (BECAME).

  Args:
    su: the setup.
    name: the method's name.
    **overrides: :class:`ContinualMethod` fields replacing GPM's (e.g. BECAME's ``end_task``).

  Returns:
    The method (full fine-tuning, gradients projected off the memories).
  """
  params_for = sequential.full_params
  loss = heads_lib.classification_loss(su.backbone, params_for, combine,
                                       head_mode=su.cfg.head_mode,
                                       forward_kwargs=functools.partial(grad_projection, su))
  fns = dict(init=functools.partial(init, su), begin_task=functools.partial(begin_task, su),
             trainable=trainable, loss=loss, combine=combine,
             transform_grads=functools.partial(transform_grads, su),
             end_task=functools.partial(update_memory, su), params_for=params_for,
             predict=heads_lib.classification_predict(su.backbone, params_for,
                                                      head_mode=su.cfg.head_mode),
             diagnostics=lambda state: {"memory_ranks": memory_ranks(state)})
  return ContinualMethod(name=name, backbone=su.backbone, **{**fns, **overrides})


def plain_loss(su: Setup) -> Callable:
  """The loss without projection through inputs (BECAME's stage 2, ablations).

  Args:
    su: the setup (backbone, ``cfg.head_mode``).

  Returns:
    A loss function ``(params, state, base, batch, rng, info) -> (loss, metrics)``.
  """
  return heads_lib.classification_loss(su.backbone, sequential.full_params, combine,
                                       head_mode=su.cfg.head_mode)


def gpm(backbone: Backbone, *, memory: str | None = None, name: str | None = None,
        **kwargs: Any) -> ContinualMethod:
  """GPM (``memory="gpm"``) or SGP (``memory="sgp"``) on every backbone site.

  Args:
    backbone: the network; all of it is trained (GPM is full fine-tuning).
    memory: ``"gpm"`` or ``"sgp"`` (importance-scaled projection): the memory rule
      (``variant=`` is its old name, accepted with a DeprecationWarning).
    name: registry/run name (default: ``memory``).
    **kwargs: :class:`GPMConfig` fields:

      - threshold: ε per projected site: a float, a sequence in site order (the
        backbone's sites, then the shared head), or ``{site: ε}``. The official
        PMNIST setting is ``(0.95, 0.99, 0.99)``.
      - threshold_increment: ε_t = ε + t·increment (BECAME's CIFAR schedule
        ``0.97 + 0.003·t``), capped at 1. Departure from the official code: on
        the 20-split that schedule reaches 1.0 at t = 10 and exceeds 1 for
        t = 11…19 (0-based; 10 of the 20 tasks have ε_t ≥ 1). The official
        ``update_GPM``/``update_SGP`` then append every remaining column of the
        residual's U, null directions included, so its M Mᵀ stops being a
        projector (eigenvalues up to 2 measured). clx caps ε at 1 and appends
        only directions that carry energy: the memory stays orthonormal.
      - num_samples: training examples per task for the representation matrices.
      - sites: kernel paths to project (default: every site of the backbone).
      - project_head: also project the shared output layer (official PMNIST);
        per-task heads are never projected (each task owns its head).
      - head_bias: whether heads have a bias (the GPM MLP has none).
      - head_mode: ``"per_task"``/``"shared"`` (default: shared for the domain
        scenario, per-task otherwise).
      - scale_coff: SGP's importance coefficient α in s = (α+1)σ / (ασ + σ_max).
      - fast_projection: project through the layer inputs where the backbone
        supports it (same result, fewer flops).
      - site_samples: ``{site: k}``: build that site's representation from the
        first k of the ``num_samples`` examples (official AlexNet: 24 for conv1,
        100 for conv2/3, 125 for the FC layers,
        :func:`clx.models.convnets.alexnet_gpm_samples`). A conv site's
        representation holds every patch of those examples (im2col).
      - freeze_norm: from the second task on, zero the gradients of 1-D backbone
        parameters (batch-norm scale/bias), as the official CNN code.

  Returns:
    The method, named ``name`` or ``memory``.

  Raises:
    TypeError: both ``variant`` and ``memory`` were given.
    ValueError: invalid options (:class:`GPMConfig`, :func:`setup`).
  """
  if "variant" in kwargs:  # with memory= too: renamed's TypeError (memory=None is unset)
    given = {**kwargs, **({"memory": memory} if memory is not None else {})}
    memory = renamed(given, {"variant": "memory"}, "gpm").pop("memory")
    kwargs = {k: v for k, v in kwargs.items() if k != "variant"}
  memory = "gpm" if memory is None else memory
  return method(setup(backbone, GPMConfig(memory=memory, **kwargs)), name or memory)


def sgp(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """SGP: GPM with importance-scaled projection (see :func:`gpm`).

  Args:
    backbone: the network (all of it is trained).
    **kwargs: :func:`gpm`'s keyword arguments other than ``memory``.

  Returns:
    The method (named ``"sgp"`` unless ``name`` is given).
  """
  return gpm(backbone, memory="sgp", **kwargs)


REGISTRY = {"gpm": gpm, "sgp": sgp}
