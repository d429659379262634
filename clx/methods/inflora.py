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
3. ``end_task``: a second Gram pass, now with branch t included, updates each
   memory with DualGPM (or plain GPM, ``variant="gpm"``) at threshold
   ε_t = lamb + (lame − lamb)·t/T.
4. Prediction: every branch active; class-IL logits are the concatenation of
   all seen heads; the loop masks them to one task's classes for task-IL.

Why it protects old tasks: for any input x in a memory's protected space,
x a_t = 0. So x W_t = x W_{t−1} whatever b_t becomes. Old tasks' inputs lie
there up to the energy threshold.

State (nested dict; keys never contain '/'; site paths are escaped with '.')::

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
  paper. Option: ``scale`` (use 1.0 for the paper).
* Energy criterion: the code squares the singular values of the Gram matrix,
  i.e. it uses σ⁴ of the representation; the paper uses σ². Option:
  ``energy="official"|"paper"`` (see :mod:`clx.ops.dualgpm`).
* Memory: the code uses DualGPM (remove/retain with the d/2 switch). InfLoRA-b5
  and DomainNet use plain GPM. Option: ``variant="dual"|"gpm"``. b5 adapts only
  the first 5 blocks: pass those kernel paths as ``sites``.
* First-task corner case: when the first task keeps r ≥ d/2 directions, the
  code stores U[:, :r] labelled 'retain' (the wrong subspace) and then fails
  its own assert. clx stores the complement U[:, r:]. The other numerical
  differences are listed in :mod:`clx.ops.dualgpm`.
* Input matrix: the code's Gram pass uses the training loader *with training
  augmentations* and all 197 ViT tokens. clx uses the task's training split as
  the loop serves it (no augmentation) and every valid token the backbone
  reports (padding excluded for text).
* Optimiser and schedule (Adam, ``inflora_cosine``, epochs, batch size) are the
  run's TrainConfig. ``loop.TrainConfig(schedule="inflora_cosine")`` is the
  official per-epoch cosine. The heads are PyTorch-default ``nn.Linear``, as in
  the code.

``params_for(state, base, site_groups(backbone, sites))`` is the adapted
backbone of a state (W + Σ_j a_j b_j at every site), the forward ``loss`` and
``predict`` use; other code (e.g. :mod:`clx.methods.inflora_ca`) runs it from a
state alone. InfLoRA+CA (classifier alignment) is :mod:`clx.methods.inflora_ca`.

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

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo, identity_grads, site_key
from clx.methods.base import get_path as _get
from clx.models.base import Backbone
from clx.ops import dualgpm
from clx.ops import lora as lora_ops

_HIGHEST = jax.lax.Precision.HIGHEST
_SHARED_INPUT_ROLES = ("q", "k", "v")
VARIANTS = ("dual", "gpm")


def _add_at(tree, path: str, delta):
  """``tree`` with ``delta`` added to the leaf at ``path`` (copies only the path)."""
  head, _, rest = path.partition("/")
  if not rest:
    return {**tree, head: tree[head] + delta.astype(jnp.result_type(tree[head]))}
  return {**tree, head: _add_at(tree[head], rest, delta)}


def resolve_sites(backbone: Backbone, sites: str | Sequence[str]) -> tuple[str, ...]:
  """Kernel paths from roles (``"k"``, ``"v"``, …) and/or explicit kernel paths."""
  sites = (sites,) if isinstance(sites, str) else tuple(sites)
  if not sites:
    raise ValueError("inflora needs at least one site")
  out: list[str] = []
  for entry in sites:
    if entry in backbone.sites:
      paths = backbone.sites[entry]
    else:
      try:
        kernel = _get(backbone.params, entry)
      except (KeyError, TypeError):
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

  By the backbone contract the q, k and v kernels of one attention block read
  one array (``bert``/``vit``: the block's hidden states / ``norm1`` output),
  so they form one group keyed ``<block>.<member+member>``. Any other site is
  its own group keyed by its escaped path. The Gram pass checks that the
  members' Gram matrices really agree.
  """
  shared = {p for role in _SHARED_INPUT_ROLES for p in backbone.sites.get(role, ())}
  buckets: dict[tuple[str, bool], list[str]] = {}
  for site in sites:
    parts = site.rsplit("/", 2)
    if site in shared and len(parts) == 3:
      buckets.setdefault((parts[0], True), []).append(site)
    else:
      buckets.setdefault((site, False), []).append(site)
  groups = {}
  for (parent, is_shared), members in buckets.items():
    if is_shared:
      key = site_key(parent) + "." + "+".join(m.rsplit("/", 2)[1] for m in members)
    else:
      key = site_key(parent)
    groups[key] = tuple(members)
  return groups


def memory_summary(state) -> dict[str, tuple[int, str]]:
  """``{group: (rank, "remove"|"retain")}`` of an InfLoRA state (logs, reports)."""
  return {g: (int(m["rank"]), dualgpm.KIND_NAMES[int(m["kind"])])
          for g, m in state["memory"].items()}


def site_groups(backbone: Backbone, sites: str | Sequence[str]) -> dict[str, str]:
  """``{site path: group key}`` of the kernels ``sites`` resolves to (see :func:`input_groups`)."""
  groups = input_groups(backbone, resolve_sites(backbone, sites))
  return {s: g for g, members in groups.items() for s in members}


def params_for(state, base, site_group: dict[str, str], *, current_b=None, task_index=None):
  """The effective backbone params of an InfLoRA state: W + (folded) + Σ_j a_j b_j per site.

  Pure and jit-able; the same forward :func:`inflora`'s ``loss`` and ``predict``
  use, exposed so that other code (e.g. :mod:`clx.methods.inflora_ca`, feature
  extraction) can run the adapted backbone from a state alone.

  Args:
    state: an InfLoRA state (``branches``, optionally ``folded``).
    base: the frozen backbone params.
    site_group: ``{site path: group key}`` (:func:`site_groups`).
    current_b: if given, replaces branch ``task_index``'s ``b`` (training).
    task_index: the branch ``current_b`` belongs to.

  Returns:
    A params pytree like ``base``: at every site W + Σ_j a_j[group] b_j[site].
  """
  adapters: dict[str, list] = {}
  for tk in sorted(state["branches"], key=int):
    branch = state["branches"][tk]
    ups = current_b if (current_b is not None and int(tk) == task_index) else branch["b"]
    for s, g in site_group.items():
      adapters.setdefault(s, []).append({"a": branch["a"][g], "b": ups[site_key(s)]})
  params = base
  if "folded" in state:
    for s in site_group:
      params = _add_at(params, s, state["folded"][site_key(s)])
  if adapters:
    params = lora_ops.apply_adapters(params, adapters, 1.0)
  return params


def inflora(backbone: Backbone, *, rank: int = 10, sites: str | Sequence[str] = ("k", "v"),
            lamb: float = 0.95, lame: float = 1.0, scale: float = dualgpm.DEFAULT_SCALE,
            energy: str = "official", design: str = "official", variant: str = "dual",
            head_mode: str | None = None, fold: bool = False, gram_batch_size: int | None = None,
            name: str = "inflora") -> ContinualMethod:
  """InfLoRA against the clx protocol (see the module docstring).

  Args:
    backbone: the frozen network (its base params are never trained).
    rank: r, the rank of every task's branch (official 10; 30 on DomainNet).
    sites: site roles (e.g. ``("k", "v")``, official) and/or kernel paths.
    lamb: ε at the first task (0.95 CIFAR/DomainNet, 0.98 ImageNet-R).
    lame: ε_t = lamb + (lame − lamb)·t/T (1.0 in every official config).
    scale: factor on the designed a (official 1/√3; the paper has 1.0).
    energy: ``"official"`` (σ⁴ of the representation) or ``"paper"`` (σ²).
    design: ``"official"`` (SVD of (I − M Mᵀ) C) or ``"paper"`` (of (I − M Mᵀ) H).
    variant: ``"dual"`` (DualGPM, official InfLoRA) or ``"gpm"`` (b5/DomainNet).
    head_mode: ``"per_task"``/``"shared"`` (default: shared for domain-IL).
    fold: fold finished branches into one dense delta per site.
    gram_batch_size: batch size of the Gram passes (default: the run's
      eval batch size).
    name: registry/run name.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  if energy not in dualgpm.ENERGIES:
    raise ValueError(f"energy must be one of {sorted(dualgpm.ENERGIES)}, got {energy!r}")
  if design not in dualgpm.FORMS:
    raise ValueError(f"design must be one of {sorted(dualgpm.FORMS)}, got {design!r}")
  if not 0.0 < lamb <= 1.0 or not 0.0 < lame <= 1.0:
    raise ValueError(f"lamb and lame must lie in (0, 1], got {lamb} and {lame}")
  if not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  if not math.isfinite(scale) or scale == 0:
    raise ValueError(f"scale must be finite and non-zero, got {scale}")
  site_paths = resolve_sites(backbone, sites)
  groups = input_groups(backbone, site_paths)
  shapes = {s: tuple(np.shape(_get(backbone.params, s))) for s in site_paths}
  group_dim = {}
  for g, members in groups.items():
    dims = {shapes[s][0] for s in members}
    if len(dims) != 1:
      raise ValueError(f"sites {members} share an input but have input dims {sorted(dims)}")
    group_dim[g] = dims.pop()
  for s, (d_in, d_out) in shapes.items():
    if rank > min(d_in, d_out):
      raise ValueError(f"rank {rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {s!r}")
  site_group = {s: g for g, members in groups.items() for s in members}
  dual = variant == "dual"

  def mode_for(spec: StreamSpec) -> str:
    return head_mode or heads_lib.default_mode(spec)

  def head_key(state, task_index: int) -> str:
    return "shared" if "shared" in state["heads"] else str(task_index)

  # -- forward --------------------------------------------------------------
  def effective_params(state, base, current_b=None, task_index=None):
    """base (+ folded) + Σ_j a_j b_j at every site; ``current_b`` replaces b_t."""
    return params_for(state, base, site_group, current_b=current_b, task_index=task_index)

  effective_jit = jax.jit(effective_params)

  @functools.partial(jax.jit, donate_argnums=0)
  def accumulate(acc, params, x):
    _, taps = backbone.apply(params, x, taps="gram")
    sums, counts, mismatch = dict(acc[0]), dict(acc[1]), acc[2]
    for g, members in groups.items():
      first = taps[members[0]]["gram"]
      for s in members[1:]:
        other = taps[s]["gram"]
        rel = jnp.max(jnp.abs(other - first)) / jnp.maximum(jnp.max(jnp.abs(first)), 1e-30)
        mismatch = jnp.maximum(mismatch, rel)
      sums[g] = sums[g] + first
      counts[g] = counts[g] + taps[members[0]]["count"]
    return sums, counts, mismatch

  def gram_pass(params, ctx) -> dict[str, jax.Array]:
    """Mean input Gram matrix C (d, d) of every group over the task's training split."""
    acc = ({g: jnp.zeros((d, d), jnp.float32) for g, d in group_dim.items()},
           {g: jnp.zeros((), jnp.float32) for g in groups}, jnp.zeros((), jnp.float32))
    for batch in ctx.batches("train", batch_size=gram_batch_size):
      x = batch["x"]
      valid = int(jnp.sum(batch["mask"]))
      if valid == 0:
        continue
      if valid < x.shape[0]:  # padding rows sit at the end of the last batch
        x = x[:valid]
      acc = accumulate(acc, params, x)
    sums, counts, mismatch = acc
    if float(mismatch) > 1e-5:
      raise ValueError(
          f"{backbone.name}: sites grouped as sharing their input have different Gram "
          f"matrices (relative difference {float(mismatch):.2e}); groups: {groups}")
    grams = {}
    for g in groups:
      count = float(counts[g])
      if count <= 0:
        raise ValueError(f"task {ctx.task_index}: the Gram pass saw no valid token for {g!r}")
      gram = sums[g] / count
      if not bool(jnp.all(jnp.isfinite(gram))):
        raise ValueError(f"task {ctx.task_index}: the input Gram matrix of {g!r} has NaN/Inf")
      grams[g] = gram
    return grams

  # -- protocol -------------------------------------------------------------
  def init(rng, spec: StreamSpec):
    state = {"heads": heads_lib.init_heads(rng, spec, backbone.feature_dim, mode_for(spec)),
             "branches": {},
             "memory": {g: {"basis": jnp.zeros((d, d), jnp.float32),
                            "rank": jnp.zeros((), jnp.int32),
                            "kind": jnp.full((), dualgpm.REMOVE, jnp.int32)}
                        for g, d in group_dim.items()}}
    if fold:
      state["folded"] = {site_key(s): jnp.zeros(shapes[s], jnp.float32) for s in site_paths}
    return state

  def begin_task(state, ctx):
    t = ctx.task_index
    if str(t) in state["branches"]:
      raise ValueError(f"task {t} already has a branch; begin_task was called twice")
    grams = gram_pass(effective_jit(state, ctx.base), ctx)
    downs = {}
    for g, gram in grams.items():
      mem = state["memory"][g]
      downs[g] = dualgpm.design_down_projection(
          gram, mem["basis"], mem["kind"], rank, memory_rank=mem["rank"], scale=scale,
          form=design).astype(jnp.float32)
    ups = {site_key(s): jnp.zeros((rank, shapes[s][1]), jnp.float32) for s in site_paths}
    heads = heads_lib.add_task_head(state["heads"], jax.random.fold_in(ctx.rng, 0), ctx.spec,
                                    backbone.feature_dim, t, mode_for(ctx.spec))
    return {**state, "heads": heads,
            "branches": {**state["branches"], str(t): {"a": downs, "b": ups}}}

  def trainable(state, info: TaskInfo):
    task_index = info.task
    return {"b": state["branches"][str(task_index)]["b"],
            "head": state["heads"][head_key(state, task_index)]}

  def write_back(state, params, task_index):
    branch = {**state["branches"][str(task_index)], "b": params["b"]}
    heads = {**state["heads"], head_key(state, task_index): params["head"]}
    return {**state, "heads": heads, "branches": {**state["branches"], str(task_index): branch}}

  def combine(state, params, info: TaskInfo):
    return write_back(state, params, info.task)

  def loss(params, state, base, batch, rng, info: TaskInfo):
    del rng
    task_index, spec = info.task, info.spec
    eff = effective_params(state, base, current_b=params["b"], task_index=task_index)
    feats = backbone.apply(eff, batch["x"])
    heads = {**state["heads"], head_key(state, task_index): params["head"]}
    logits, labels = heads_lib.train_logits_and_labels(heads, feats, batch["y"], spec,
                                                       task_index, mode_for(spec))
    value = heads_lib.masked_cross_entropy(logits, labels, batch["mask"])
    return value, {"accuracy": heads_lib.masked_accuracy(logits, labels, batch["mask"])}

  def end_task(state, ctx):  # the loop has combined the trained params into the state
    t = ctx.task_index
    grams = gram_pass(effective_jit(state, ctx.base), ctx)
    eps = dualgpm.task_threshold(t, ctx.spec.num_tasks, lamb, lame)
    memory = dict(state["memory"])
    for g, gram in grams.items():
      mem = memory[g]
      basis, new_rank, kind = dualgpm.dualgpm_update_fixed(
          mem["basis"], mem["rank"], mem["kind"], gram, eps, first_task=t == 0,
          energy=energy, dual=dual)
      memory[g] = {"basis": basis.astype(jnp.float32), "rank": new_rank, "kind": kind}
    state = {**state, "memory": memory}
    if fold:
      branches = dict(state["branches"])
      branch = branches.pop(str(t))
      folded = {site_key(s): state["folded"][site_key(s)] + jnp.matmul(
          branch["a"][site_group[s]], branch["b"][site_key(s)], precision=_HIGHEST)
                for s in site_paths}
      state = {**state, "branches": branches, "folded": folded}
    return state

  def predict(state, base, x, info: TaskInfo):
    # one network for every task; the loop masks task-IL logits (info.task_id unused)
    current_task, spec = info.task, info.spec
    feats = backbone.apply(effective_params(state, base), x)
    return heads_lib.global_logits(state["heads"], feats, spec, mode_for(spec), current_task)

  return ContinualMethod(name=name, backbone=backbone, init=init, begin_task=begin_task,
                         trainable=trainable, loss=loss, combine=combine,
                         transform_grads=identity_grads, end_task=end_task, predict=predict,
                         params_for=lambda state, base, info: effective_params(state, base))


def inflora_b5(backbone: Backbone, *, blocks: int = 5, name: str = "inflora_b5",
               **kwargs) -> ContinualMethod:
  """InfLoRA-b5: branches on the k/v kernels of the first ``blocks`` blocks, plain GPM.

  The blocks are taken in the order of ``backbone.sites["k"]`` (block 0 first).
  """
  k_sites, v_sites = backbone.site_paths("k"), backbone.site_paths("v")
  if blocks < 1 or blocks > len(k_sites):
    raise ValueError(f"blocks must lie in [1, {len(k_sites)}], got {blocks}")
  kwargs.setdefault("variant", "gpm")
  sites = tuple(p for pair in zip(k_sites[:blocks], v_sites[:blocks]) for p in pair)
  return inflora(backbone, sites=sites, name=name, **kwargs)


REGISTRY = {"inflora": inflora, "inflora_b5": inflora_b5}
