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

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods import sequential
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo
from clx.models.base import Backbone
from clx.ops import sgp as sgp_ops
from clx.ops import subspace
from clx.ops import tree

HEAD_SITE = "head/kernel"


def resolve_thresholds(threshold, sites: Sequence[str]) -> dict[str, float]:
  """Per-site base thresholds from a float, a sequence (site order) or a mapping."""
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


def _check_threshold_values(threshold, increment) -> None:
  """Build-time range check of the thresholds (their count needs the stream's head layout)."""
  values = (list(threshold.values()) if isinstance(threshold, Mapping)
            else [threshold] if isinstance(threshold, (int, float)) else list(threshold))
  bad = [v for v in values
         if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0]
  if bad or not values:
    raise ValueError(f"GPM thresholds must lie in (0, 1], got {threshold!r}")
  if isinstance(increment, bool) or not isinstance(increment, (int, float)) or not 0 <= increment < 1:
    raise ValueError(f"threshold_increment must lie in [0, 1), got {increment!r}")


def project_gradients(grads, memory, sites, *, variant: str):
  """Project ``grads[site]`` (Flax kernels) off each site's memory."""
  for site in sites:
    mem = memory[tree.to_key(site)]
    basis = jnp.where(jnp.arange(mem["basis"].shape[1]) < mem["rank"], mem["basis"], 0.0)
    g = tree.get(grads, site)
    if variant == "sgp":
      g = sgp_ops.scaled_projection_out(g, mem["basis"], mem["rank"], mem["scale"])
    else:
      g = subspace.project_kernel_gradient(g, basis)
    grads = tree.set(grads, site, g)
  return grads


class GPMParts:
  """The pieces of a GPM/SGP method, shared with BECAME (which re-uses them)."""

  def __init__(self, backbone: Backbone, *, threshold, threshold_increment: float,
               num_samples: int, sites, project_head: bool, head_bias: bool, head_mode,
               variant: str, scale_coff: float, fast_projection: bool,
               site_samples: Mapping[str, int] | None = None, freeze_norm: bool = True):
    if variant not in ("gpm", "sgp"):
      raise ValueError(f"variant must be 'gpm' or 'sgp', got {variant!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
      raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    _check_threshold_values(threshold, threshold_increment)
    if isinstance(scale_coff, bool) or not np.isfinite(scale_coff) or scale_coff < 0:
      raise ValueError(f"scale_coff (SGP α) must be a finite number >= 0, got {scale_coff!r}")
    if head_mode not in (None, "shared", "per_task"):
      raise ValueError(f"head_mode must be None, 'shared' or 'per_task', got {head_mode!r}")
    self.backbone = backbone
    self.threshold, self.threshold_increment = threshold, threshold_increment
    self.num_samples, self.variant, self.scale_coff = num_samples, variant, scale_coff
    self.project_head, self.head_bias, self.head_mode = project_head, head_bias, head_mode
    self.body_sites = (tuple(sites) if sites is not None
                       else tuple(p for ps in backbone.sites.values() for p in ps))
    if not self.body_sites:
      raise ValueError(f"{backbone.name} exposes no sites to project")
    for site in self.body_sites:
      tree.get(backbone.params, site)  # KeyError early for a wrong site path
    self.fast_sites = tuple(s for s in self.body_sites
                            if fast_projection and backbone.projects_through_inputs(s))
    self.slow_sites = tuple(s for s in self.body_sites if s not in self.fast_sites)
    self.site_samples = dict(site_samples or {})
    unknown = sorted(set(self.site_samples) - set(self.body_sites))
    if unknown:
      raise ValueError(f"site_samples names sites {unknown} that are not projected; "
                       f"projected: {list(self.body_sites)}")
    too_many = {s: k for s, k in self.site_samples.items() if not 1 <= k <= num_samples}
    if too_many:
      raise ValueError(f"site_samples must lie in [1, num_samples={num_samples}], got {too_many}")
    self.freeze_norm = freeze_norm
    self._projected_loss, self._plain_loss = (
        heads_lib.classification_loss(backbone, sequential.full_params, self.combine,
                                      head_mode=head_mode, forward_kwargs=kwargs)
        for kwargs in (self.grad_projection, None))

  # -- layout -----------------------------------------------------------------
  def mode(self, spec) -> str:
    return self.head_mode or heads_lib.default_mode(spec)

  def sites(self, spec) -> tuple[str, ...]:
    head = (HEAD_SITE,) if (self.project_head and self.mode(spec) == "shared") else ()
    return self.body_sites + head

  def _strip_bias(self, heads):
    return heads if self.head_bias else {k: {"kernel": v["kernel"]} for k, v in heads.items()}

  # -- protocol functions -----------------------------------------------------
  def init(self, rng, spec: StreamSpec):
    heads = heads_lib.init_heads(rng, spec, self.backbone.feature_dim, self.mode(spec))
    memory = {}
    for site in self.sites(spec):
      d = (self.backbone.feature_dim if site == HEAD_SITE
           else int(np.prod(tree.get(self.backbone.params, site).shape[:-1])))
      memory[tree.to_key(site)] = {"basis": jnp.zeros((d, d), jnp.float32),
                                "rank": jnp.zeros((), jnp.int32)}
      if self.variant == "sgp":
        memory[tree.to_key(site)]["scale"] = jnp.zeros((d,), jnp.float32)
    return {"backbone": jax.tree.map(jnp.array, self.backbone.params),
            "heads": self._strip_bias(heads), "memory": memory,
            "task": jnp.zeros((), jnp.int32)}

  def begin_task(self, state, ctx):
    heads = heads_lib.add_task_head(state["heads"], jax.random.fold_in(ctx.rng, 0), ctx.spec,
                                    self.backbone.feature_dim, ctx.task_index, self.mode(ctx.spec))
    return {**state, "heads": self._strip_bias(heads),
            "task": jnp.asarray(ctx.task_index, jnp.int32)}

  def trainable(self, state, info: TaskInfo):
    return {"backbone": state["backbone"],
            "head": state["heads"][heads_lib.head_key(state["heads"], info.task)]}

  def combine(self, state, params, info: TaskInfo):
    return heads_lib.with_head({**state, "backbone": params["backbone"]}, params["head"], info.task)

  def grad_projection(self, state, info: TaskInfo) -> dict:
    """``backbone.apply`` arguments projecting the fast sites' gradients through their
    inputs (from the second task on; none on task 0, whose memory is empty)."""
    if info.task == 0 or not self.fast_sites:
      return {}
    return {"grad_projection": {s: (state["memory"][tree.to_key(s)]["basis"],
                                    state["memory"][tree.to_key(s)].get("scale"))
                                for s in self.fast_sites}}

  def loss(self, params, state, base, batch, rng, info: TaskInfo, project: bool = True):
    """Cross-entropy; with ``project`` (and t > 0) kernel gradients are projected
    through the layer inputs where the backbone supports it."""
    fn = self._projected_loss if project else self._plain_loss
    return fn(params, state, base, batch, rng, info)

  def transform_grads(self, grads, state):
    """Project what the forward did not: the shared head, and the sites the
    backbone cannot project through its inputs (convs). A zero memory (task 0)
    is a no-op. From the second task on, with ``freeze_norm``, the gradients of
    every 1-D backbone parameter (batch-norm scales and biases) are zeroed, as
    the official ``train_projected``."""
    memory = state["memory"]
    out = dict(grads)
    if self.slow_sites:
      out["backbone"] = project_gradients(grads["backbone"], memory, self.slow_sites,
                                          variant=self.variant)
    if self.freeze_norm:
      later = state["task"] > 0
      out["backbone"] = jax.tree.map(
          lambda g: jnp.where(later, jnp.zeros_like(g), g) if g.ndim == 1 else g, out["backbone"])
    if tree.to_key(HEAD_SITE) in memory:
      out["head"] = project_gradients({"head": grads["head"]}, memory, (HEAD_SITE,),
                                      variant=self.variant)["head"]
    return out

  def update_memory(self, state, ctx):
    """Grow each site's memory from ``num_samples`` random training examples."""
    # As the official code (x[r[0:300]]): all examples when the task has fewer.
    sample = ctx.sample(min(self.num_samples, len(ctx.arrays("train")["y"])), seed=1)
    feats, taps = _taps_fn(self.backbone)(state["backbone"], jnp.asarray(sample["x"]))
    # A site's representation: the inputs (rows; patches for a conv) of its first
    # site_samples[site] examples, as the official per-layer batch_list.
    reps = {s: taps[s][:self.site_samples.get(s, len(sample["y"]))]
            .reshape(-1, taps[s].shape[-1]).T for s in self.body_sites}
    if HEAD_SITE in self.sites(ctx.spec):
      reps[HEAD_SITE] = feats.T
    base_eps = resolve_thresholds(self.threshold, self.sites(ctx.spec))
    memory = dict(state["memory"])
    first = ctx.task_index == 0
    for site, rep in reps.items():
      eps = min(1.0, base_eps[site] + self.threshold_increment * ctx.task_index)
      mem = memory[tree.to_key(site)]
      rep = jnp.asarray(rep, jnp.float32)
      if not bool(jnp.all(jnp.isfinite(rep))):
        raise ValueError(f"task {ctx.task_index}: representation of site {site!r} has NaN/Inf")
      if self.variant == "gpm":
        basis, rank = _gpm_update(mem["basis"], mem["rank"], rep, eps,
                                                first_task=first)
        memory[tree.to_key(site)] = {"basis": basis, "rank": rank}
      else:
        basis, rank, scale = _sgp_update(
            mem["basis"], mem["rank"], mem["scale"], rep, eps, scale_coff=self.scale_coff,
            first_task=first)
        memory[tree.to_key(site)] = {"basis": basis, "rank": rank, "scale": scale}
    return {**state, "memory": memory}

  def method(self, name: str, **overrides) -> ContinualMethod:
    fns = dict(init=self.init, begin_task=self.begin_task, trainable=self.trainable,
               loss=self.loss, combine=self.combine, transform_grads=self.transform_grads,
               end_task=self.update_memory, params_for=sequential.full_params,
               predict=heads_lib.classification_predict(self.backbone, sequential.full_params,
                                                        head_mode=self.head_mode),
               diagnostics=lambda state: {"memory_ranks": memory_ranks(state)})
    fns.update(overrides)
    return ContinualMethod(name=name, backbone=self.backbone, **fns)


_gpm_update = jax.jit(subspace.gpm_update_fixed)
_sgp_update = jax.jit(sgp_ops.sgp_update_fixed, static_argnames=("scale_coff",))


@functools.lru_cache(maxsize=16)
def _taps_fn(backbone: Backbone):
  # One jitted function per backbone, so every task's memory update reuses its compilation.
  return jax.jit(lambda params, x: backbone.apply(params, x, taps="inputs"))


def memory_ranks(state) -> dict[str, int]:
  """``{site: rank}`` of a GPM/SGP/BECAME state (for logs and reports)."""
  return {tree.to_path(tree.from_key(k)): int(v["rank"]) for k, v in state["memory"].items()}


def gpm(backbone: Backbone, *, threshold=0.97, threshold_increment: float = 0.0,
        num_samples: int = 300, sites: Sequence[str] | None = None, project_head: bool = True,
        head_bias: bool = False, head_mode: str | None = None, variant: str = "gpm",
        scale_coff: float = 10.0, fast_projection: bool = True,
        site_samples: Mapping[str, int] | None = None, freeze_norm: bool = True,
        name: str | None = None) -> ContinualMethod:
  """GPM (``variant="gpm"``) or SGP (``variant="sgp"``) on every backbone site.

  Args:
    backbone: the network; all of it is trained (GPM is full fine-tuning).
    threshold: ε per projected site: a float, a sequence in site order (the
      backbone's sites, then the shared head), or ``{site: ε}``. The official
      PMNIST setting is ``(0.95, 0.99, 0.99)``.
    threshold_increment: ε_t = ε + t·increment (BECAME's CIFAR schedule
      ``0.97 + 0.003·t``), capped at 1. Departure from the official code: on
      the 20-split that schedule reaches 1.0 at t = 10 and exceeds 1 for
      t = 11…19 (0-based; 10 of the 20 tasks have ε_t ≥ 1). The official
      ``update_GPM``/``update_SGP`` then append every remaining column of the
      residual's U, null directions included, so its M Mᵀ stops being a
      projector (eigenvalues up to 2 measured). clx caps ε at 1 and appends
      only directions that carry energy: the memory stays orthonormal.
    num_samples: training examples per task for the representation matrices.
    sites: kernel paths to project (default: every site of the backbone).
    project_head: also project the shared output layer (official PMNIST);
      per-task heads are never projected (each task owns its head).
    head_bias: whether heads have a bias (the GPM MLP has none).
    head_mode: ``"per_task"``/``"shared"`` (default: shared for the domain
      scenario, per-task otherwise).
    variant: ``"gpm"`` or ``"sgp"`` (importance-scaled projection).
    scale_coff: SGP's importance coefficient α in s = (α+1)σ / (ασ + σ_max).
    fast_projection: project through the layer inputs where the backbone
      supports it (same result, fewer flops).
    site_samples: ``{site: k}``: build that site's representation from the
      first k of the ``num_samples`` examples (official AlexNet: 24 for conv1,
      100 for conv2/3, 125 for the FC layers,
      :func:`clx.models.convnets.alexnet_gpm_samples`). A conv site's
      representation holds every patch of those examples (im2col).
    freeze_norm: from the second task on, zero the gradients of 1-D backbone
      parameters (batch-norm scale/bias), as the official CNN code.
    name: registry/run name (default: the variant).
  """
  parts = GPMParts(backbone, threshold=threshold, threshold_increment=threshold_increment,
                   num_samples=num_samples, sites=sites, project_head=project_head,
                   head_bias=head_bias, head_mode=head_mode, variant=variant,
                   scale_coff=scale_coff, fast_projection=fast_projection,
                   site_samples=site_samples, freeze_norm=freeze_norm)
  return parts.method(name or variant)


def sgp(backbone: Backbone, **kwargs) -> ContinualMethod:
  """SGP: GPM with importance-scaled projection (see :func:`gpm`)."""
  return gpm(backbone, variant="sgp", **kwargs)


REGISTRY = {"gpm": gpm, "sgp": sgp}
