"""PROTEUS: LoRA module composition and parameter-free task retrieval (arXiv 2603.13235).

Sources. The paper (Le, Bui, Hoang & Hoang, ICLR 2026 submission, OpenReview 5nVrMIl7vf)
describes the method; the first author's public code ``Alisia0303/HESTIA``,
``baselines/RanPAC`` (configs, ViT, RanPAC head, ``theories.py``, ``test.py``, ``use_RP.py``)
fixes the defaults. The stored snapshot of that code does not contain the composition forward
pass itself (only its checkpoint names ``Q/V_lora_pool_A/B``, ``W_Q``, ``W_V``,
``new_Q/V_lora_A/B``, and a forward taking ``alpha``), so the composition formula is the
paper's, with the gaps filled as marked [R]. Nothing is copied; clx's own implementation.

Taken from the code:

- LoRA on the q and v projections of every block, output scale 0.1 (``0.1 * (x @ units)``);
  new unit rank ``added_units`` = 4. Factor sides (``models/vision_transformer.py``): the
  code's pool tensors are ``*_lora_pool_B`` (depth, d_in, r) = 0 and ``*_lora_pool_A``
  (depth, d_out, r) ~ N(0, 0.01²), and the forward adds ``x @ (B Aᵀ)``. So the zero factor
  sits on the *input* side and the random one on the *output* side. In clx's Flax layout
  ΔW = a b with a (d_in, r) = the code's B (zero) and b (r, d_out) = the code's Aᵀ (random).
- ``reg_weight`` 0.006 (ℓ1 on the transfer weights), ``alpha`` 0.3: the main configs
  (``imgn-r-seed-15.yml``, ``cifar-100-seed-15.yml``). The main configs set *no*
  orthogonality weight: ``ortho_weight`` defaults to 0. The value 0.004 comes from the
  ablation configs ``imgn-r-seed-15-ortho.yml`` (with lr 5e-4) and ``imgn-r-seed-15-S1.yml``;
  pass ``ortho_weight=0.004`` to run that ablation. The code's orthogonality loss is a
  squared Frobenius norm of a product of factor tensors (``ortho_loss(A, B) = ‖AᵀB‖²_F``).
- Signature: sklearn ``BayesianGaussianMixture`` (Dirichlet process), ``n_components`` 100 and
  concentration 0.01 (CIFAR-100: 20 / 0.1), full covariances; scoring with
  N(μ, Σ + 1e-4·I) (``test.py``).
- RanPAC head: W_rand (d, 10,000) N(0, 1), ReLU, G += HᵀH and Q += HᵀY over tasks, λ from
  10⁻⁸…10⁸ by the MSE on the last 20 % of the current task's features with a fit on the first
  80 %, W_o = (G + λI)⁻¹Q; each test input is classified through its retrieved task's backbone
  with the one global W_o (``use_RP.py``).
- Bound quantities δ, κ, the Eq. (28) threshold (``theories.py``): by default δ is the code's
  (the mean of the n×n matrix ``diff Σ⁻¹ diffᵀ``, i.e. the Mahalanobis distance of the
  cluster mean); clx's per-point mean is an option (see :mod:`clx.ops.retrieval`, which also
  lists where τ and the radicand differ).
- Training (main configs): Adam, lr 1e-3 (ImageNet-R and CIFAR-100; 5e-4 only in the
  ``-ortho`` ablation, 3e-4 in ``-S1``/``-lamdba0``), 20 epochs (5 on CIFAR-100), batch 32,
  gradient clipping 1.0, a fresh optimiser per task. These are loop settings
  (:class:`clx.train.TrainConfig`), not method options.

From the paper, or reconstructed [R]:

- ΔW_k = Σ_{j<k} w_{k,j} B_j A_j + B_k⊥ A_k⊥ (paper), with one w per earlier unit *and per
  site* [R: the shape of ``W_Q``/``W_V`` is not in the snapshot], initialised to
  ``transfer_init`` = 1 [R].
- α multiplies the transfer term: ΔW_k = scale·(α Σ_j w_{k,j} a_j b_j + a_k b_k) [R, on weak
  evidence: the configs only show α passed to the forward (0.3 main, 1.0 in ``-alpha1``,
  ``-lamdba0`` and ``-S1``); a convex blend or a global LoRA scale fits them as well].
  ``alpha=0`` (:func:`proteus_independent`) switches composition off.
- Orthogonality (off by default, as in the main configs): between the new unit's *random,
  output-side* factor and every earlier unit's, Σ_{j<k} ‖b_j b_kᵀ‖²_F (``ortho_factors="b"``,
  default) [R: which tensors the code passes to ``ortho_loss`` is not in the snapshot; its
  random factors are the output-side ``*_lora_pool_A`` (d_out, r), and ‖A_jᵀA_k‖²_F of those
  is ‖b_j b_kᵀ‖²_F in clx's layout]. ``ortho_factors="a"`` constrains the input-side factors
  instead (Σ ‖a_jᵀ a_k‖²_F), ``"ab"`` both.
- Training head: one linear head per task over its own classes (the code masks the other
  classes of a global head to −inf: the same loss).
- k-means (K = 5) + nearest-centroid (L1) retrieval: the ablation the reviewers asked for,
  S-Prompts style.
- Screening (neither paper nor code): see ``route``.

Per task k (sites = the q and v kernels of every block):

1. ``begin_task``: a new unit (a_k (d_in, 4) = 0, b_k (4, d_out) ~ N(0, 0.01²)) and, for
   k > 0, transfer weights w_{k,j} (one per site and earlier unit).
2. Training (the loop's ``ctx.fit``): cross-entropy of the task's own head on
   h_k(x) = backbone(W + ΔW_k)(x), plus ``reg_weight``·Σ|w| plus ``ortho_weight``·Σ_{j<k}‖b_j b_kᵀ‖²
   (0 by default).
   Earlier units are frozen (they are not trainable parameters).
3. ``end_task``: features h_k of the task's training data → signature (DP-GMM, pruned to
   components of weight ≥ ``min_component_weight``, or k-means centroids); with screening,
   a second signature of the *base* backbone's features; RanPAC statistics G, Q updated with
   h_k and W_o re-solved with the λ chosen on the task's held-out 20 %.
4. ``predict`` (class-IL): h_i(x) for every task i at once (all tasks' deltas stacked on a
   leading axis, ``vmap``), log-likelihood under each signature, î = argmax; logits =
   ReLU(h_î(x) W_rand) W_o over the global label space (unseen classes at −1e30;
   ``restrict_head=True`` also masks the classes of other tasks than î). With
   ``screen_top_m = m``: the base features are scored under the base signatures, the m best
   tasks are re-ranked with their adapted features (per-example weights), so a prediction
   costs 1 + m forward passes instead of T. Task-IL (``task_id`` given) uses that task.

State (nested dict, string keys, no '/': site keys escape it as '.'): ``heads`` (training
heads), ``ridge`` (``w_rand``, ``gram``, ``xty``, ``w_out``, ``count``), ``tasks/<k>`` with
``unit``, ``weights`` (k > 0), ``signature``, ``screen`` (with screening), and ``stats/<k>``
(diagnostics). A task's checkpoint therefore holds its composition weights, its new unit, its
signature(s) and the head statistics.

Code shape. :class:`ProteusConfig` (frozen, validated; the old names ``rank``, ``roles``,
``scale``, ``alpha``, ``feature_batch`` are still accepted for ``lora_rank``, ``sites``,
``lora_scale``, ``transfer_alpha``, ``aux_batch_size``) holds the options; :func:`resolve`
binds it to a backbone (:class:`ProteusSetup`); every function is module-level: composition
(:func:`coefficients`, :func:`deltas`, :func:`task_delta_inputs`, :func:`task_deltas`,
:func:`params_with`), features (:func:`task_features`, :func:`all_task_features`,
:func:`features_with`: the task as data, one compilation for every task), the signature fit
(:func:`fit_signature`), retrieval (:func:`route`), the RanPAC head
(:func:`ridge_head_update`, :func:`head_logits`) and the protocol's functions, bound by
:func:`proteus`. :class:`ProteusParts` binds them to one setup for scripts
(``parts.route(state, base, x, T)``).

Retrieval accuracy and the bound's quantities need the test/train data of every task, so
they are computed after a run by :func:`retrieval_report` (see
``experiments/text_proteus.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypedDict

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from clx.methods import _options
from clx.methods import heads as heads_lib
from clx.methods import passes
from clx.methods.base import (Batch, ContinualMethod, Params, StreamSpec, TaskContext, TaskInfo,
                              renamed, to_host)
from clx.models.base import Backbone
from clx.ops import lora as lora_ops
from clx.ops import mixture
from clx.ops import retrieval
from clx.ops import ridge as ridge_ops
from clx.ops import tree as tree_ops

SIGNATURES = ("dpgmm", "kmeans")
# which factors the orthogonality penalty constrains: "b" the random output-side factors (the
# code's random ``*_lora_pool_A``), "a" the input-side ones, "ab" both
ORTHO_FACTORS = ("b", "a", "ab")
_HIGHEST = jax.lax.Precision.HIGHEST
# the old name of tree_ops.to_key, still imported from here (tests, experiments/bench_retrieval.py)
site_key = tree_ops.to_key


# ---------------------------------------------------------------------------------------------
# Configuration and state


@dataclasses.dataclass(frozen=True)
class ProteusConfig:
  """PROTEUS' options, each default written once (the code's main configs; module docstring).

  Attributes:
    lora_rank: rank of each task's new unit (the code's ``added_units`` = 4).
    sites: site roles (``backbone.sites`` keys) or kernel paths (default the q and v kernels).
    lora_scale: output scale of every unit (the code's ``0.1 * (x @ units)``).
    transfer_alpha: α multiplying the transfer term (0.3; 0 switches composition off).
    transfer_init: initial transfer weights w_{k,j}.
    reg_weight: ℓ1 weight on the transfer weights (0.006).
    ortho_weight: orthogonality penalty weight (0, the main configs; 0.004 is the ``-ortho``
      ablation config's).
    ortho_factors: ``"b"`` (the random output-side factors), ``"a"`` or ``"ab"``.
    unit_init_std: std of the new unit's output-side factor (0.01).
    signature: ``"dpgmm"`` or ``"kmeans"``.
    n_components: DP-GMM components (100).
    weight_concentration_prior: DP concentration (0.01).
    covariance_type: DP-GMM covariances (``"full"``).
    max_iter: DP-GMM variational iterations.
    tol: DP-GMM lower-bound tolerance.
    reg_covar: covariance regulariser (1e-4; sklearn's 1e-6 is too small for float32 full
      covariances in d = 384/768).
    min_component_weight: components below this weight are pruned from the signature.
    jitter: the code's scoring jitter (Σ + 1e-4 I).
    max_signature_samples: subsample features to this many before fitting (None: all).
    kmeans_clusters: K of the k-means ablation (5).
    kmeans_metric: its nearest-centroid metric (``"l1"``).
    rp_dim: RanPAC random-projection width M (10,000).
    ridge_grid: λ candidates (10⁻⁸…10⁸).
    ridge_fit_fraction: λ is chosen by the MSE on the rest after fitting on this fraction.
    ridge_with_history: add the earlier statistics to λ's fit part (False, as the code).
    screen_top_m: 0 = exhaustive retrieval; m > 0 re-ranks the m best base-feature candidates.
    screen_covariance_type: covariances of the base-feature (screening) signatures.
    screen_components: their components (None: ``n_components``).
    screen_signatures: fit the screening signatures even with ``screen_top_m = 0``.
    restrict_head: also mask the classes of tasks other than the retrieved one.
    delta_form: the bound's δ: ``"cluster_mean"`` (``theories.py``) or ``"per_point"``.
    aux_batch_size: batch size of the host feature passes.
    task_batch: tasks per ``lax.map`` chunk of the all-task forward (None: all).
    example_batch: screened per-example forward chunk.
    score_batch: screened per-example scoring chunk (each example gathers its candidate's
      (K, d, d) signature).
    verbose: print a line per task.
  """

  lora_rank: int = 4
  sites: tuple[str, ...] = ("q", "v")
  lora_scale: float = 0.1
  transfer_alpha: float = 0.3
  transfer_init: float = 1.0
  reg_weight: float = 0.006
  ortho_weight: float = 0.0
  ortho_factors: str = "b"
  unit_init_std: float = 0.01
  signature: str = "dpgmm"
  n_components: int = 100
  weight_concentration_prior: float = 0.01
  covariance_type: str = "full"
  max_iter: int = 100
  tol: float = 1e-3
  reg_covar: float = 1e-4
  min_component_weight: float = 1e-3
  jitter: float = 1e-4
  max_signature_samples: int | None = None
  kmeans_clusters: int = 5
  kmeans_metric: str = "l1"
  rp_dim: int = 10000
  ridge_grid: tuple[float, ...] = ridge_ops.RIDGE_GRID
  ridge_fit_fraction: float = 0.8
  ridge_with_history: bool = False
  screen_top_m: int = 0
  screen_covariance_type: str = "diag"
  screen_components: int | None = None
  screen_signatures: bool = False
  restrict_head: bool = False
  delta_form: str = "cluster_mean"
  aux_batch_size: int = 256
  task_batch: int | None = None
  example_batch: int = 32
  score_batch: int = 8
  verbose: bool = False

  def __post_init__(self):
    object.__setattr__(self, "sites", tuple(self.sites))
    object.__setattr__(self, "ridge_grid", tuple(float(g) for g in self.ridge_grid))
    if self.signature not in SIGNATURES:
      raise ValueError(f"signature must be one of {SIGNATURES}, got {self.signature!r}")
    if self.ortho_factors not in ORTHO_FACTORS:
      raise ValueError(f"ortho_factors must be one of {ORTHO_FACTORS}, got "
                       f"{self.ortho_factors!r}")
    if self.lora_rank < 1 or self.rp_dim < 1 or self.screen_top_m < 0:
      raise ValueError(f"lora_rank and rp_dim must be >= 1 and screen_top_m >= 0, got "
                       f"lora_rank={self.lora_rank}, rp_dim={self.rp_dim}, "
                       f"screen_top_m={self.screen_top_m}")
    mixture._check_cov_type(self.covariance_type)  # pylint: disable=protected-access
    mixture._check_cov_type(self.screen_covariance_type)  # pylint: disable=protected-access
    if self.delta_form not in retrieval.DELTA_FORMS:
      raise ValueError(f"delta_form must be one of {retrieval.DELTA_FORMS}, got "
                       f"{self.delta_form!r}")
    if not self.sites:
      raise ValueError("sites must name at least one site role or kernel path")

  @property
  def fit_screen(self) -> bool:
    """Whether ``end_task`` fits the base-feature (screening) signatures."""
    return bool(self.screen_top_m) or bool(self.screen_signatures)


# Old spellings, still accepted by the factories so that existing configs keep running.
_LEGACY_NAMES = {"rank": "lora_rank", "roles": "sites", "scale": "lora_scale",
                 "alpha": "transfer_alpha", "feature_batch": "aux_batch_size"}


def _renamed(kwargs: Mapping[str, Any]) -> dict:
  """``kwargs`` with PROTEUS' legacy option names mapped to the current ones."""
  return renamed(dict(kwargs), _LEGACY_NAMES, "proteus")


class ProteusState(TypedDict):
  """PROTEUS' state (a dict, so checkpoints keep their keys; '/' in site keys escaped as '.').

  ``heads``: the training heads; ``ridge``: ``w_rand``, ``gram``, ``xty``, ``w_out``,
  ``count``; ``tasks/<k>``: ``unit`` ({site_key: {a, b}}), ``weights`` (k > 0),
  ``signature``, ``screen`` (with screening); ``stats/<k>``: diagnostics.
  """

  heads: dict
  ridge: dict
  tasks: dict[str, dict]
  stats: dict[str, dict]


class ProteusSetup(NamedTuple):
  """What PROTEUS resolves once from its config and backbone (built by :func:`resolve`).

  Attributes:
    cfg: the options.
    backbone: the frozen backbone.
    sites: the kernel paths adapted, in unit order.
    shapes: ``{site: (d_in, d_out)}``.
    jit_cache: compiled host-pass functions (a cache, not state: results never depend on it).
  """

  cfg: ProteusConfig
  backbone: Backbone
  sites: tuple[str, ...]
  shapes: dict[str, tuple[int, int]]
  jit_cache: dict


def resolve(backbone: Backbone, cfg: ProteusConfig) -> ProteusSetup:
  """Resolve ``cfg.sites`` against ``backbone`` (roles → kernel paths) and check them.

  Args:
    backbone: the frozen backbone whose params hold the sites.
    cfg: the options; ``cfg.sites`` entries are roles (no ``/``, expanded by
      ``backbone.site_paths``) or kernel paths.

  Returns:
    A :class:`ProteusSetup` with the unique site paths in order, their ``(d_in, d_out)`` shapes
    and an empty jit cache.

  Raises:
    ValueError: no site was found, or a site is not a 2-D kernel of the backbone.
  """
  # an entry without '/' is a role (site_paths names the roles it does not know)
  sites = tuple(dict.fromkeys(
      p for s in cfg.sites for p in (backbone.site_paths(s) if "/" not in s else (s,))))
  if not sites:
    raise ValueError(f"{backbone.name}: no sites for {cfg.sites}")
  shapes = {}
  for s in sites:
    try:
      kernel = tree_ops.get(backbone.params, s)
    except (KeyError, TypeError):
      kernel = None
    if np.ndim(kernel) != 2:
      raise ValueError(f"site {s!r} is not a 2-D kernel of {backbone.name}")
    shapes[s] = tuple(np.shape(kernel))
  return ProteusSetup(cfg, backbone, tuple(sites), shapes, {})


def _cached(setup: ProteusSetup, key, make: Callable[[], Callable]) -> Callable:
  """``setup.jit_cache[key]``, made by ``make()`` on first use."""
  if key not in setup.jit_cache:
    setup.jit_cache[key] = make()
  return setup.jit_cache[key]


# ---------------------------------------------------------------------------------------------
# Composition (pure)


def ortho_terms(old: Mapping, new: Mapping, factors: str = "b") -> Any:
  """Orthogonality penalty between one earlier unit and the new one at one site.

  Args:
    old: ``{"a": (d_in, r), "b": (r, d_out)}``, an earlier unit (ΔW = a b).
    new: the new unit, same shapes.
    factors: ``"b"``: ‖b_old b_newᵀ‖²_F (output-side factors); ``"a"``: ‖a_oldᵀ a_new‖²_F
      (input-side factors); ``"ab"``: their sum.

  Returns:
    A scalar (works on jax and NumPy arrays alike).
  """
  total = 0.0
  if "a" in factors:
    total = total + ((old["a"].T @ new["a"]) ** 2).sum()
  if "b" in factors:
    total = total + ((old["b"] @ new["b"].T) ** 2).sum()
  return total


def params_with(base: Params, deltas_t: Mapping[str, jax.Array]) -> Params:
  """``base`` with ``ΔW`` added to the kernels at the given paths (pure).

  Args:
    base: frozen backbone params (nested dict).
    deltas_t: ``{site path: ΔW (d_in, d_out)}``.

  Returns:
    The params a task's examples run through.
  """
  for site, delta in deltas_t.items():
    base = tree_ops.add(base, site, delta.astype(tree_ops.get(base, site).dtype))
  return base


def coefficients(setup: ProteusSetup, state: Mapping, num_tasks: int) -> dict[str, jax.Array]:
  """``{site_key: C (T, T)}``: C[t, j] = α·w_{t,j} (j < t), 1 (j = t), 0 (j > t).

  Args:
    setup: the resolved PROTEUS (its ``cfg.transfer_alpha`` is α).
    state: a state holding ``tasks/<t>/unit`` (and ``weights`` for t > 0) for every t < T.
    num_tasks: T, the number of tasks composed.

  Returns:
    ``{site_key: C (T, T)}`` in the dtype of task 0's ``a`` factors (lower-triangular, unit
    diagonal).
  """
  out = {}
  for s in setup.sites:
    sk = tree_ops.to_key(s)
    dtype = jnp.result_type(state["tasks"]["0"]["unit"][sk]["a"])
    rows = []
    for t in range(num_tasks):
      w = state["tasks"][str(t)].get("weights", {}).get(sk) if t > 0 else None
      row = [setup.cfg.transfer_alpha * jnp.asarray(w, dtype)] if w is not None else []
      row += [jnp.ones((1,), dtype), jnp.zeros((num_tasks - t - 1,), dtype)]
      rows.append(jnp.concatenate(row))
    out[sk] = jnp.stack(rows)
  return out


def deltas(setup: ProteusSetup, state: Mapping, num_tasks: int) -> dict[str, jax.Array]:
  """``{site: ΔW (T, d_in, d_out)}``: Δ_t = scale · Σ_j C[t, j] a_j b_j for every task t.

  Args:
    setup: the resolved PROTEUS (``cfg.lora_scale`` is ``scale``).
    state: a state holding the units (and transfer weights) of tasks < T.
    num_tasks: T, the number of tasks composed.

  Returns:
    ``{site path: ΔW (T, d_in, d_out)}``, row t the composed delta of task t.
  """
  coef = coefficients(setup, state, num_tasks)
  out = {}
  for s in setup.sites:
    sk = tree_ops.to_key(s)
    a = jnp.stack([state["tasks"][str(j)]["unit"][sk]["a"] for j in range(num_tasks)])
    b = jnp.stack([state["tasks"][str(j)]["unit"][sk]["b"] for j in range(num_tasks)])
    out[s] = setup.cfg.lora_scale * jnp.einsum("tj,jdr,jre->tde", coef[sk], a, b,
                                               precision=_HIGHEST)
  return out


def task_delta_inputs(setup: ProteusSetup, state: Mapping, task_index: int, width: int
                      ) -> dict[str, dict[str, jax.Array]]:
  """Task ``task_index``'s units and composition row, zero-padded to ``width`` tasks.

  Every task of a run gets inputs of one shape, so :func:`task_deltas` compiles once per run
  instead of once per task (the state holds one more unit after every task).

  Args:
    setup: the resolved PROTEUS.
    state: the state (units under ``tasks/<j>/unit``, weights under ``tasks/<t>/weights``).
    task_index: t, the task whose ΔW is composed.
    width: rows after padding (> t), e.g. the stream's task count.

  Returns:
    ``{site_key: {"a": (width, d_in, r), "b": (width, r, d_out), "coef": (width,)}}``:
    units 0..t then zeros; ``coef`` is row t of :func:`coefficients` (α·w_{t,j} for j < t,
    1 at j = t) then zeros.

  Raises:
    ValueError: ``width`` ≤ ``task_index``.
  """
  if width <= task_index:
    raise ValueError(f"task_delta_inputs: width {width} must exceed task_index {task_index}")
  pad = width - task_index - 1
  out = {}
  for s in setup.sites:
    sk = tree_ops.to_key(s)
    units = [state["tasks"][str(j)]["unit"][sk] for j in range(task_index + 1)]
    a, b = jnp.stack([u["a"] for u in units]), jnp.stack([u["b"] for u in units])
    dtype = jnp.result_type(a)
    coef = [jnp.ones((1,), dtype)]
    if task_index > 0:
      coef.insert(0, setup.cfg.transfer_alpha
                  * jnp.asarray(state["tasks"][str(task_index)]["weights"][sk], dtype))
    out[sk] = {"a": jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]),
               "b": jnp.concatenate([b, jnp.zeros((pad, *b.shape[1:]), b.dtype)]),
               "coef": jnp.concatenate([*coef, jnp.zeros((pad,), dtype)])}
  return out


def task_deltas(setup: ProteusSetup, inputs: Mapping[str, Mapping[str, jax.Array]]
                ) -> dict[str, jax.Array]:
  """``{site: ΔW_t (d_in, d_out)}``: Δ_t = scale · Σ_j coef_j a_j b_j (pure, jit-able).

  Args:
    setup: the resolved PROTEUS.
    inputs: :func:`task_delta_inputs` of task t (zero rows add nothing).

  Returns:
    Task t's composed ΔW per site path, the row t of :func:`deltas` up to float rounding.
  """
  out = {}
  for s in setup.sites:
    u = inputs[tree_ops.to_key(s)]
    out[s] = setup.cfg.lora_scale * jnp.einsum("j,jdr,jre->de", u["coef"], u["a"], u["b"],
                                               precision=_HIGHEST)
  return out


def features_with(setup: ProteusSetup, base: Params, deltas_t: Mapping[str, jax.Array],
                  x: jax.Array) -> jax.Array:
  """h(x) ``(n, d)`` through ``base`` + ``deltas_t`` (pure; the task enters as data, so one
  compilation serves every task).

  Args:
    setup: the resolved PROTEUS.
    base: frozen backbone params.
    deltas_t: ``{site path: ΔW (d_in, d_out)}`` (:func:`task_deltas`).
    x: (n, ...) inputs.

  Returns:
    (n, d) features.
  """
  return setup.backbone.apply(params_with(base, deltas_t), x)


def _task_feature_fns(setup: ProteusSetup) -> tuple[Callable, Callable]:
  """The jitted :func:`task_deltas` and :func:`features_with` of ``setup`` (one each)."""
  return (_cached(setup, ("task_deltas",), lambda: jax.jit(functools.partial(task_deltas, setup))),
          _cached(setup, ("features_with",),
                  lambda: jax.jit(functools.partial(features_with, setup))))


def training_adapters(setup: ProteusSetup, state: Mapping, task_index: int, unit: Mapping,
                      weights: Mapping) -> dict:
  """Adapters for ``lora.apply_adapters``: frozen earlier units scaled by α·w, plus the new unit.

  Args:
    setup: the resolved PROTEUS.
    state: the state (earlier units under ``tasks/<j>/unit``).
    task_index: k.
    unit: ``{site_key: {a (d_in, r), b (r, d_out)}}`` the new unit (trained).
    weights: ``{site_key: w (k,)}`` the transfer weights (trained; empty for k = 0).

  Returns:
    ``{site: [stacked earlier units (k, …) with b scaled by α·w, new unit]}``.
  """
  out = {}
  for s in setup.sites:
    sk = tree_ops.to_key(s)
    adapters = []
    if task_index > 0:
      a = jnp.stack([state["tasks"][str(j)]["unit"][sk]["a"] for j in range(task_index)])
      b = jnp.stack([state["tasks"][str(j)]["unit"][sk]["b"] for j in range(task_index)])
      coef = setup.cfg.transfer_alpha * weights[sk]
      adapters.append({"a": jax.lax.stop_gradient(a),
                       "b": jax.lax.stop_gradient(b) * coef[:, None, None]})
    adapters.append(unit[sk])
    out[s] = adapters
  return out


def ortho_penalty(setup: ProteusSetup, state: Mapping, task_index: int, unit: Mapping
                  ) -> jax.Array:
  """Σ_sites Σ_{j<k} ``ortho_terms(unit_j, unit_k)``, earlier units held constant (scalar).

  Args:
    setup: the resolved PROTEUS (``cfg.ortho_factors`` picks the factors).
    state: a state holding the units of tasks < ``task_index``.
    task_index: k, the task whose unit is being trained.
    unit: the new unit ``{site_key: {"a": (d_in, r), "b": (r, d_out)}}``.

  Returns:
    A float32 scalar (0 for k = 0); gradients reach ``unit`` only.
  """
  total = jnp.zeros((), jnp.float32)
  for s in setup.sites:
    sk = tree_ops.to_key(s)
    for j in range(task_index):
      old = jax.lax.stop_gradient(state["tasks"][str(j)]["unit"][sk])
      total = total + ortho_terms(old, unit[sk], setup.cfg.ortho_factors)
  return total


def l1_penalty(weights: Params) -> jax.Array:
  """Σ |w| over every transfer weight (scalar float32; 0 for none).

  Args:
    weights: a pytree of transfer weights (``{site_key: w (k,)}``); may be empty.

  Returns:
    Σ |w| as a float32 scalar.
  """
  leaves = jax.tree.leaves(weights)
  return sum((jnp.sum(jnp.abs(w)) for w in leaves), jnp.zeros((), jnp.float32))


# ---------------------------------------------------------------------------------------------
# Features and retrieval (pure, jit-able)


def task_features(setup: ProteusSetup, state: Mapping, base: Params, x: jax.Array, task_index: int,
                  num_tasks: int | None = None) -> jax.Array:
  """h_t(x): features ``(n, d)`` under task ``task_index``'s composed adapters.

  Args:
    setup: the resolved PROTEUS.
    state: a state holding the units (and weights) of tasks < ``num_tasks``.
    base: frozen backbone params.
    x: ``(n, …)`` inputs.
    task_index: t, the task whose composed ΔW is added.
    num_tasks: tasks to compose (default ``task_index + 1``; any value > ``task_index`` gives the
      same ΔW_t since C is lower-triangular).

  Returns:
    ``(n, d)`` backbone features of ``x`` under ``base`` + ΔW_t.
  """
  num_tasks = task_index + 1 if num_tasks is None else num_tasks
  d_all = deltas(setup, state, num_tasks)
  return setup.backbone.apply(params_with(base, {s: d[task_index] for s, d in d_all.items()}), x)


def all_task_features(setup: ProteusSetup, state: Mapping, base: Params, x: jax.Array,
                      num_tasks: int
                      ) -> jax.Array:
  """h_i(x) for every task i < ``num_tasks`` at once, ``(T, n, d)`` (``lax.map`` over tasks).

  Args:
    setup: the resolved PROTEUS (``cfg.task_batch`` tasks are mapped at once; 0/None: all).
    state: a state holding the units (and weights) of tasks < ``num_tasks``.
    base: frozen backbone params.
    x: ``(n, …)`` inputs.
    num_tasks: T.

  Returns:
    ``(T, n, d)``: row i the features of ``x`` under task i's adapted backbone.
  """
  d_all = deltas(setup, state, num_tasks)

  def one(d_t):
    return setup.backbone.apply(params_with(base, d_t), x)

  batch = setup.cfg.task_batch or num_tasks
  return jax.lax.map(one, d_all, batch_size=min(batch, num_tasks))


def per_example_features(setup: ProteusSetup, state: Mapping, base: Params, x: jax.Array,
                         task_ids: jax.Array, num_tasks: int) -> jax.Array:
  """h_{task_ids[i]}(x_i) with a different task per example, ``(n, d)``.

  Every example gets its own merged weights (gathered from the precomputed deltas), in
  chunks of ``example_batch`` examples to bound memory.

  Args:
    setup: the resolved PROTEUS (``cfg.example_batch`` examples per ``lax.map`` chunk).
    state: a state holding the units (and weights) of tasks < ``num_tasks``.
    base: frozen backbone params.
    x: ``(n, …)`` inputs.
    task_ids: ``(n,)`` int task index per example, each < ``num_tasks``.
    num_tasks: T, the number of tasks composed.

  Returns:
    ``(n, d)``: row i the features of ``x[i]`` under task ``task_ids[i]``'s backbone.
  """
  d_all = deltas(setup, state, num_tasks)

  def one(args):
    xi, ti = args
    d_t = {s: d[ti] for s, d in d_all.items()}
    return setup.backbone.apply(params_with(base, d_t), xi[None])[0]

  return jax.lax.map(one, (x, task_ids), batch_size=min(setup.cfg.example_batch, x.shape[0]))


def stacked_signatures(state: Mapping, num_tasks: int, field: str = "signature") -> dict:
  """The first ``num_tasks`` tasks' signatures stacked on a leading task axis.

  Args:
    state: a state holding ``tasks/<t>/<field>`` for every t < ``num_tasks``.
    num_tasks: T.
    field: ``"signature"`` (adapted features) or ``"screen"`` (base features).

  Returns:
    The signature dict of :func:`clx.ops.mixture.stack_signatures`: every array with a leading
    ``(T, …)`` axis, components padded to the largest.
  """
  return mixture.stack_signatures([state["tasks"][str(t)][field] for t in range(num_tasks)])


def route(setup: ProteusSetup, state: Mapping, base: Params, x: jax.Array, num_tasks: int,
          screen_top_m: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PROTEUS' retrieval: a task per example, its features and the scores.

  Exhaustive: every task's features ``h_i(x)``, scored under its own signature, î = argmax.
  Screened (``0 < m < T``): the base features scored under the base signatures pick m
  candidates per example, re-ranked with their adapted features.

  Args:
    setup: the resolved PROTEUS.
    state: a state holding ``signature`` (and ``screen``) for tasks < ``num_tasks``.
    base: frozen backbone params.
    x: ``(n, …)`` inputs.
    num_tasks: T.
    screen_top_m: overrides ``cfg.screen_top_m``.

  Returns:
    ``(task ids (n,), their features (n, d), scores (n, T) or (n, m))``.
  """
  m = setup.cfg.screen_top_m if screen_top_m is None else screen_top_m
  metric = setup.cfg.kmeans_metric
  sigs = stacked_signatures(state, num_tasks)
  if m and m < num_tasks:
    screen = stacked_signatures(state, num_tasks, "screen")
    base_feats = setup.backbone.apply(base, x)
    cands = retrieval.top_candidates(retrieval.score_shared(screen, base_feats, metric=metric),
                                     m)
    feats_c, scores_c = [], []
    for c in range(m):
      f = per_example_features(setup, state, base, x, cands[:, c], num_tasks)

      def one(args):
        fi, ti = args
        sig = jax.tree.map(lambda a: a[ti], sigs)  # pylint: disable=cell-var-from-loop
        return retrieval.score(sig, fi[None], metric=metric)[0]

      # each example gathers its candidate's signature: chunks of score_batch examples
      scores_c.append(jax.lax.map(one, (f, cands[:, c]),
                                  batch_size=min(setup.cfg.score_batch, x.shape[0])))
      feats_c.append(f)
    scores = jnp.stack(scores_c, axis=1)
    best = jnp.argmax(scores, axis=1)
    chosen = jnp.take_along_axis(cands, best[:, None], axis=1)[:, 0]
    feats = jnp.stack(feats_c, axis=0)[best, jnp.arange(x.shape[0])]
    return chosen, feats, scores
  feats_all = all_task_features(setup, state, base, x, num_tasks)
  scores = retrieval.score_tasks(sigs, feats_all, metric=metric)
  chosen = retrieval.retrieve(scores)
  return chosen, feats_all[chosen, jnp.arange(x.shape[0])], scores


def head_logits(cfg: ProteusConfig, state: Mapping, feats: jax.Array, spec: StreamSpec,
                current_task: int, tasks: jax.Array | None = None) -> jax.Array:
  """RanPAC logits ``(n, C)`` over the seen classes (others at NEG_INF).

  With ``tasks`` (n,) and ``restrict_head`` only the retrieved task's classes stay.

  Args:
    cfg: the options (``restrict_head``).
    state: a state holding ``ridge`` (``w_rand`` (d, M), ``w_out`` (M, C)).
    feats: ``(n, d)`` backbone features.
    spec: the stream (``num_classes`` C, ``task_classes``).
    current_task: the last trained task; classes of tasks ≤ it count as seen.
    tasks: ``(n,)`` int retrieved task per example, or None.

  Returns:
    ``(n, C)`` float logits, unseen (or, restricted, other-task) classes at ``NEG_INF``.
  """
  r = state["ridge"]
  logits = ridge_ops.logits(feats, r["w_rand"], r["w_out"])
  seen = np.zeros(spec.num_classes, bool)
  for c in spec.task_classes[:current_task + 1]:
    seen[list(c)] = True
  mask = jnp.broadcast_to(jnp.asarray(seen), logits.shape)
  if tasks is not None and cfg.restrict_head:
    table = np.zeros((current_task + 1, spec.num_classes), bool)
    for i in range(current_task + 1):
      table[i, list(spec.task_classes[i])] = True
    mask = jnp.logical_and(mask, jnp.asarray(table)[tasks])
  return jnp.where(mask, logits, heads_lib.NEG_INF)


# ---------------------------------------------------------------------------------------------
# Signatures and the RanPAC head (host)


def fit_signature(cfg: ProteusConfig, feats: np.ndarray, key: jax.Array, *,
                  covariance_type: str | None = None, n_components: int | None = None,
                  signature: str | None = None) -> tuple[dict, dict]:
  """PROTEUS' signature fit: a DP-GMM (or k-means centroids) of one task's features.

  Args:
    cfg: the options (``signature``, DP-GMM and k-means settings).
    feats: ``(n, d)`` features (subsampled to ``max_signature_samples`` first).
    key: PRNG key of the fit.
    covariance_type, n_components, signature: override the configured ones (ablations).

  Returns:
    ``(signature, {"components", "n_iter", "converged"})``; raises ``FloatingPointError``
    when a DP-GMM signature is not finite.
  """
  feats = np.asarray(feats, np.float32)
  if cfg.max_signature_samples and feats.shape[0] > cfg.max_signature_samples:
    idx = np.random.default_rng(0).choice(feats.shape[0], cfg.max_signature_samples, False)
    feats = feats[np.sort(idx)]
  if (signature or cfg.signature) == "kmeans":
    sig = mixture.centroid_signature(feats, cfg.kmeans_clusters, key=key)
    return sig, {"components": int(sig["centers"].shape[0]), "n_iter": 0, "converged": True}
  cov_type = covariance_type or cfg.covariance_type
  k = int(min(n_components or cfg.n_components, feats.shape[0]))
  params = mixture.fit_dpgmm(feats, n_components=k, covariance_type=cov_type,
                             weight_concentration_prior=cfg.weight_concentration_prior,
                             reg_covar=cfg.reg_covar, max_iter=cfg.max_iter, tol=cfg.tol, key=key)
  sig = mixture.to_signature(params, cov_type, min_weight=cfg.min_component_weight,
                             jitter=cfg.jitter)
  if not all(bool(jnp.all(jnp.isfinite(v))) for v in sig.values()):
    raise FloatingPointError(
        f"the {cov_type} DP-GMM signature of {feats.shape} features is not finite; raise "
        "reg_covar or use covariance_type='diag'")
  return sig, {"components": int(sig["means"].shape[0]), "n_iter": int(params["n_iter"]),
               "converged": bool(params["converged"])}


_project = jax.jit(ridge_ops.project)


@jax.jit
def _ridge_update(r, h, yy, lam):
  stats = ridge_ops.accumulate({"gram": r["gram"], "xty": r["xty"], "count": r["count"]}, h, yy)
  return {**stats, "w_out": ridge_ops.solve(stats["gram"], stats["xty"], lam)}


def ridge_head_update(cfg: ProteusConfig, ridge_state: Mapping, feats: ArrayLike, y: ArrayLike,
                      num_classes: int,
                      task_index: int) -> tuple[dict, float]:
  """The RanPAC head after one more task (host; also used by the head-matched baselines).

  λ is chosen on this task's features alone (fit on a shuffled 80 %, MSE on the other 20 %,
  as ``optimise_ridge_parameter``; with ``ridge_with_history`` the earlier statistics are
  added to the fit part), then G += HᵀH, Q += HᵀY with H = ReLU(feats W_rand) and
  W_o = (G + λI)⁻¹Q.

  Args:
    cfg: the options (``ridge_grid``, ``ridge_fit_fraction``, ``ridge_with_history``).
    ridge_state: ``{"w_rand" (d, M), "gram" (M, M), "xty" (M, C), "count", "w_out" (M, C)}``.
    feats: ``(n, d)`` the task's training features.
    y: ``(n,)`` their global labels.
    num_classes: C.
    task_index: seeds the 80/20 shuffle.

  Returns:
    ``(new ridge state, λ)``.
  """
  # Once, on one device: with the state on the mesh, the λ search's M x M solves would
  # otherwise run on every device (8 x on 8 simulated devices; passes.on_one_device).
  r = passes.on_one_device(dict(ridge_state))
  h = _project(jnp.asarray(feats), r["w_rand"])
  yy = jax.nn.one_hot(jnp.asarray(y), num_classes, dtype=h.dtype)
  perm = np.random.default_rng([task_index, 7]).permutation(h.shape[0])
  lam, _ = ridge_ops.select_ridge(
      h[perm], yy[perm], grid=cfg.ridge_grid, fit_fraction=cfg.ridge_fit_fraction,
      base_gram=r["gram"] if cfg.ridge_with_history else None,
      base_xty=r["xty"] if cfg.ridge_with_history else None)
  new = {**r, **_ridge_update(r, h, yy, jnp.asarray(lam, h.dtype))}
  return passes.placed_like(new, dict(ridge_state)), lam


def collect_features(ctx: TaskContext, fn: Callable, *args: Any, batch_size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """``fn(*args, x)`` over the current task's training data, padding dropped (host).

  Args:
    ctx: the loop's task context (its ``"train"`` batches are read, unshuffled).
    fn: a function ``fn(*args, x) -> (b, d)`` features of a batch.
    *args: the leading arguments of ``fn``.
    batch_size: examples per batch.

  Returns:
    ``(features (n, d), global labels (n,))`` as NumPy arrays.
  """
  feats, ys = [], []
  for batch in ctx.batches("train", batch_size=batch_size):
    # to_host: data-sharded batches span every process on multi-host runs.
    f = to_host(fn(*args, batch["x"]))
    keep = to_host(batch["mask"]) > 0
    feats.append(f[keep])
    ys.append(to_host(batch["y"])[keep])
  return np.concatenate(feats), np.concatenate(ys)


# ---------------------------------------------------------------------------------------------
# The protocol's functions (bound to a setup by :func:`proteus`)


def init(setup: ProteusSetup, rng: jax.Array, spec: StreamSpec) -> ProteusState:
  """No tasks yet; the RanPAC projection W_rand (fold 17 of ``rng``) and zero statistics.

  Args:
    setup: the resolved PROTEUS (``cfg.rp_dim`` M, ``backbone.feature_dim`` d).
    rng: the method's key.
    spec: the stream (``num_classes`` C).

  Returns:
    A :class:`ProteusState` with no heads, tasks or stats, and ``ridge`` holding ``w_rand``
    (d, M), zero ``gram`` (M, M), ``xty`` (M, C), ``count`` and ``w_out`` (M, C).
  """
  cfg = setup.cfg
  w_rand = ridge_ops.random_projection(jax.random.fold_in(rng, 17), setup.backbone.feature_dim,
                                       cfg.rp_dim)
  stats = ridge_ops.init_statistics(cfg.rp_dim, spec.num_classes)
  return {"heads": {}, "tasks": {}, "stats": {},
          "ridge": {"w_rand": w_rand, "gram": stats["gram"], "xty": stats["xty"],
                    "count": stats["count"],
                    "w_out": jnp.zeros((cfg.rp_dim, spec.num_classes), jnp.float32)}}


def new_unit(setup: ProteusSetup, key: jax.Array, task_index: int) -> dict:
  """A new unit per site, as the code: input-side a (d_in, r) = 0, output-side b (r, d_out)
  ~ N(0, std²) (the code's ``*_lora_pool_B`` = 0 and ``*_lora_pool_A`` random).

  Args:
    setup: the resolved PROTEUS (``cfg.lora_rank`` r, ``cfg.unit_init_std`` std, the site shapes).
    key: a key; the draw uses ``fold_in(key, task_index)``.
    task_index: the task the unit belongs to.

  Returns:
    ``{site_key: {"a": (d_in, r) zeros, "b": (r, d_out)}}`` in float32.
  """
  rank = setup.cfg.lora_rank
  sizes = [rank * setup.shapes[s][1] for s in setup.sites]
  # one draw for all sites (one compiled shape), split on the host
  draws = np.asarray(jax.random.normal(jax.random.fold_in(key, task_index), (sum(sizes),),
                                       jnp.float32))
  unit, offset = {}, 0
  for s, size in zip(setup.sites, sizes):
    d_in, d_out = setup.shapes[s]
    b = setup.cfg.unit_init_std * draws[offset:offset + size].reshape(rank, d_out)
    unit[tree_ops.to_key(s)] = {"a": jnp.zeros((d_in, rank), jnp.float32),
                         "b": jnp.asarray(b, jnp.float32)}
    offset += size
  return unit


def begin_task(setup: ProteusSetup, state: ProteusState, ctx: TaskContext) -> ProteusState:
  """Add the task's head, its new unit and (k > 0) its transfer weights.

  Args:
    setup: the resolved PROTEUS.
    state: the state after task k - 1 (or :func:`init`).
    ctx: the loop's context for task k = ``ctx.task_index`` (its ``rng`` is folded with 0 for
      the head, 1 for the unit).

  Returns:
    The state with ``heads/<k>`` and ``tasks/<k>`` = ``{"unit", "weights"}`` (weights
    ``{site_key: (k,)}`` filled with ``cfg.transfer_init``; none for k = 0).
  """
  t = ctx.task_index
  heads = heads_lib.add_task_head(state["heads"], jax.random.fold_in(ctx.rng, 0), ctx.spec,
                                  setup.backbone.feature_dim, t, "per_task")
  entry = {"unit": new_unit(setup, jax.random.fold_in(ctx.rng, 1), t)}
  if t > 0:
    entry["weights"] = {tree_ops.to_key(s): jnp.full((t,), setup.cfg.transfer_init, jnp.float32)
                        for s in setup.sites}
  return {**state, "heads": heads, "tasks": {**state["tasks"], str(t): entry}}


def trainable(setup: ProteusSetup, state: ProteusState, info: TaskInfo) -> dict:
  """Task ``info.task``'s new unit, head and (k > 0) transfer weights.

  Args:
    setup: unused (the signature of a method function).
    state: the state after :func:`begin_task`.
    info: ``info.task`` is k, the task being trained.

  Returns:
    ``{"unit", "head"}`` plus ``"weights"`` for k > 0 (the state's own arrays).
  """
  del setup
  task_index = info.task
  entry = state["tasks"][str(task_index)]
  params = {"unit": entry["unit"], "head": state["heads"][str(task_index)]}
  if task_index > 0:
    params["weights"] = entry["weights"]
  return params


def combine(setup: ProteusSetup, state: ProteusState, params: Mapping, info: TaskInfo
            ) -> ProteusState:
  """The pure write-back of task ``info.task``'s trained unit, weights and head.

  Args:
    setup: unused (the signature of a method function).
    state: the state before the step.
    params: the trained ``{"unit", "head", "weights" (k > 0)}`` of :func:`trainable`.
    info: ``info.task`` is k.

  Returns:
    ``state`` with ``tasks/<k>`` unit/weights and ``heads/<k>`` replaced.
  """
  del setup
  task_index = info.task
  entry = dict(state["tasks"][str(task_index)])
  entry["unit"] = params["unit"]
  if task_index > 0:
    entry["weights"] = params["weights"]
  return {**state, "heads": {**state["heads"], str(task_index): params["head"]},
          "tasks": {**state["tasks"], str(task_index): entry}}


def loss(setup: ProteusSetup, params: Params, state: ProteusState, base: Params, batch: Batch,
         rng: jax.Array, info: TaskInfo) -> tuple[jax.Array, dict]:
  """CE of the task's own head on h_k + ``reg_weight``·Σ|w| + ``ortho_weight``·ortho.

  Args:
    setup: the resolved PROTEUS.
    params: the trainables of :func:`trainable`.
    state: the current state (earlier units and heads, frozen).
    base: frozen backbone params.
    batch: ``{"x" (b, …), "y" (b,) global labels, "mask" (b,)}``.
    rng: unused (no dropout).
    info: ``info.task`` is k, ``info.spec`` the stream.

  Returns:
    ``(total loss scalar, {"accuracy", "ce", "l1", "ortho"})``.
  """
  del rng
  cfg = setup.cfg
  task_index, spec = info.task, info.spec
  weights = params.get("weights", {})
  adapters = training_adapters(setup, state, task_index, params["unit"], weights)
  feats = setup.backbone.apply(lora_ops.apply_adapters(base, adapters, cfg.lora_scale),
                               batch["x"])
  heads = {**state["heads"], str(task_index): params["head"]}
  logits, labels = heads_lib.train_logits_and_labels(heads, feats, batch["y"], spec, task_index,
                                                     "per_task")
  ce = heads_lib.masked_cross_entropy(logits, labels, batch["mask"])
  l1 = l1_penalty(weights)
  ortho = ortho_penalty(setup, state, task_index, params["unit"])
  total = ce + cfg.reg_weight * l1 + cfg.ortho_weight * ortho
  return total, {"accuracy": heads_lib.masked_accuracy(logits, labels, batch["mask"]),
                 "ce": ce, "l1": l1, "ortho": ortho}


def _task_stats(cfg: ProteusConfig, state: ProteusState, params: Mapping, t: int, fit: dict,
                lam: float, num_features: int, t0: float) -> dict:
  """The diagnostics ``end_task`` stores for task ``t`` (host)."""
  host = jax.device_get({"unit": params["unit"], "weights": params.get("weights", {}),
                         "pool": [state["tasks"][str(j)]["unit"] for j in range(t)]})
  l1 = float(sum(np.abs(w).sum() for w in jax.tree.leaves(host["weights"])))
  ortho = float(sum(ortho_terms(old[k], host["unit"][k], cfg.ortho_factors)
                    for old in host["pool"] for k in host["unit"]))
  mean_w = (float(np.mean([np.mean(w) for w in jax.tree.leaves(host["weights"])]))
            if t > 0 else 0.0)
  if cfg.verbose:
    print(f"proteus task {t}: {fit['components']} components ({fit['n_iter']} iters), "
          f"ridge {lam:g}, mean w {mean_w:.3f}, ortho {ortho:.3g}", flush=True)
  return {"components": jnp.asarray(fit["components"], jnp.int32),
          "fit_iters": jnp.asarray(fit["n_iter"], jnp.int32),
          "fit_converged": jnp.asarray(fit["converged"]),
          "ridge": jnp.asarray(lam, jnp.float32),
          "num_features": jnp.asarray(num_features, jnp.int32),
          "l1": jnp.asarray(l1, jnp.float32), "ortho": jnp.asarray(ortho, jnp.float32),
          "mean_weight": jnp.asarray(mean_w, jnp.float32),
          "end_task_s": jnp.asarray(time.perf_counter() - t0, jnp.float32)}


def end_task(setup: ProteusSetup, state: ProteusState, ctx: TaskContext) -> ProteusState:
  """The task's signature(s) and the RanPAC head update (host passes, on the combined state).

  Args:
    setup: the resolved PROTEUS.
    state: the state after training, the trained parameters combined in.
    ctx: the loop's context for task k (training data, base params, rng folded with 2).

  Returns:
    The state with ``tasks/<k>`` ``signature`` (and ``screen``), the updated ``ridge`` and
    ``stats/<k>``.
  """
  t, cfg = ctx.task_index, setup.cfg
  t0 = time.perf_counter()
  params = trainable(setup, state, ctx.info)  # as trained: the loop has combined them
  entry = dict(state["tasks"][str(t)])
  # The task enters as data (its ΔW, composed from inputs padded to the stream's task count):
  # one compilation of the backbone's forward for the whole run, not one per task.
  deltas_fn, feat_fn = _task_feature_fns(setup)
  deltas_t = deltas_fn(task_delta_inputs(setup, state, t, ctx.spec.num_tasks))
  feats, y = collect_features(ctx, feat_fn, ctx.base, deltas_t, batch_size=cfg.aux_batch_size)
  key = jax.random.fold_in(ctx.rng, 2)
  entry["signature"], fit = fit_signature(cfg, feats, key)
  if cfg.fit_screen:
    base_fn = _cached(setup, ("base_features",),
                      lambda: jax.jit(lambda b, x: setup.backbone.apply(b, x)))
    base_feats, _ = collect_features(ctx, base_fn, ctx.base, batch_size=cfg.aux_batch_size)
    entry["screen"], _ = fit_signature(cfg, base_feats, jax.random.fold_in(key, 1),
                                       covariance_type=cfg.screen_covariance_type,
                                       n_components=cfg.screen_components)
  ridge_state, lam = ridge_head_update(cfg, state["ridge"], feats, y, ctx.spec.num_classes, t)
  stats = _task_stats(cfg, state, params, t, fit, lam, feats.shape[0], t0)
  return {**state, "tasks": {**state["tasks"], str(t): entry}, "ridge": ridge_state,
          "stats": {**state["stats"], str(t): stats}}


def params_for(setup: ProteusSetup, state: ProteusState, base: Params, info: TaskInfo) -> Params:
  """Task ``info.task``'s backbone parameters: ``base`` + its composed ΔW at every site.

  The backbone a task-IL example of task ``info.task`` runs through (class-IL routes each
  example to its retrieved task's parameters: :func:`route`).

  Args:
    setup: the resolved PROTEUS.
    state: a state holding the units (and weights) of tasks ≤ ``info.task``.
    base: frozen backbone params.
    info: ``info.task`` is the task whose parameters are built.

  Returns:
    ``base`` with ΔW_task added at every site (same tree).
  """
  d_all = deltas(setup, state, info.task + 1)
  return params_with(base, {s: d[info.task] for s, d in d_all.items()})


def predict(setup: ProteusSetup, state: ProteusState, base: Params, x: jax.Array,
            info: TaskInfo) -> jax.Array:
  """Global logits ``(n, C)`` through the given task's or each example's retrieved backbone.

  ``info.task`` is the last trained task, ``info.task_id`` the test task (task-IL) or None.

  Args:
    setup: the resolved PROTEUS.
    state: the state after task ``info.task``.
    base: frozen backbone params.
    x: ``(n, …)`` inputs.
    info: ``info.task`` the last trained task, ``info.task_id`` the task-IL test task or None.

  Returns:
    ``(n, C)`` global logits (see :func:`head_logits`).
  """
  current_task, task_id, spec = info.task, info.task_id, info.spec
  num_tasks = current_task + 1
  if task_id is not None:
    feats = task_features(setup, state, base, x, task_id, num_tasks)
    return head_logits(setup.cfg, state, feats, spec, current_task)
  tasks, feats, _ = route(setup, state, base, x, num_tasks)
  return head_logits(setup.cfg, state, feats, spec, current_task, tasks)


def diagnostics(setup: ProteusSetup, state: ProteusState) -> dict:
  """``{"tasks": {k: the stats end_task stored}}`` as JSON-able numbers.

  Args:
    setup: unused (the signature of a method function).
    state: the state (its ``stats``).

  Returns:
    ``{"tasks": {task key: {stat name: Python number or bool}}}``, tasks in order.
  """
  del setup
  out = {}
  for t, s in sorted(state.get("stats", {}).items(), key=lambda kv: int(kv[0])):
    out[t] = {k: (v.item() if hasattr(v, "item") else v) for k, v in s.items()}
    out[t] = {k: (bool(v) if isinstance(v, (bool, np.bool_)) else v) for k, v in out[t].items()}
  return {"tasks": out}


# ---------------------------------------------------------------------------------------------
# Reports (host, need the data)


def _in_batches(x_all: np.ndarray, fn: Callable, batch_size: int) -> np.ndarray:
  """``fn`` over ``x_all`` in zero-padded batches of ``batch_size`` rows (one compilation),
  padding dropped; outputs ``(..., n, d)`` are joined on axis −2."""
  parts = []
  for s in range(0, len(x_all), batch_size):
    x, n = _padded(x_all[s:s + batch_size], batch_size)
    parts.append(np.asarray(fn(x))[..., :n, :])
  return np.concatenate(parts, axis=-2)


def bound_quantities(sigs: Sequence[Mapping], t: int, feats_all: np.ndarray,
                     bounds_fn: Callable, *, total_components: int, epsilon: float,
                     delta_form: str) -> dict:
  """The retrieval bound's quantities of task ``t``'s points under every task's backbone.

  Args:
    sigs: the T tasks' DP-GMM signatures.
    t: the task whose points are checked.
    feats_all: ``(T, n, d)`` task t's points under every task's adapted backbone.
    bounds_fn: jitted :func:`clx.ops.retrieval.cluster_bounds` (``delta_form`` bound).
    total_components: Σ components over the T signatures.
    epsilon: the bound's target error.
    delta_form: ``"cluster_mean"`` or ``"per_point"`` (the headline ``delta_self``).

  Returns:
    ``delta_min``, ``kappa_min``, ``threshold_max``, ``clusters``, ``clusters_pass``,
    ``delta_form``, ``delta_self`` and both forms' ``delta_min_<form>``,
    ``clusters_pass_<form>``, ``delta_self_<form>`` (see :func:`retrieval_report`).
  """
  T = len(sigs)
  own = feats_all[t]
  labels = jnp.argmax(mixture.component_log_prob(sigs[t], jnp.asarray(own)), 1)
  others = [i for i in range(T) if i != t]
  res = jax.device_get(bounds_fn(
      jnp.asarray(feats_all[others]), labels, sigs[t]["log_det_cov"],
      mixture.stack_signatures([sigs[i] for i in others]), num_tasks=T,
      total_components=total_components, epsilon=float(epsilon)))
  cov_type = mixture.signature_covariance_type(sigs[t])
  d = own.shape[-1]
  maha = np.asarray(mixture.mahalanobis_sq(jnp.asarray(own), sigs[t]["means"],
                                           sigs[t]["prec_chol"], cov_type))
  ok = res["count"] >= 2
  pick = (lambda v, f: float(f(v[ok])) if ok.any() else math.nan)
  # own-component separation, both forms: per point (mean of each point's distance to its
  # nearest own component) and cluster mean (each cluster's mean point to its component)
  labels_np = np.asarray(labels)
  own_cm = []
  for c in np.flatnonzero(ok):
    mean_c = own[labels_np == c].mean(0, keepdims=True)
    own_cm.append(float(np.asarray(mixture.mahalanobis_sq(
        jnp.asarray(mean_c), sigs[t]["means"][c:c + 1], sigs[t]["prec_chol"][c:c + 1],
        cov_type))[0, 0]) / d - 1.0)
  ths = res["threshold"]
  out = {"delta_min": pick(res["delta"], np.min), "kappa_min": pick(res["kappa"], np.min),
         "threshold_max": pick(ths, np.max), "clusters": int(ok.sum()),
         "clusters_pass": int(np.sum(res["pass"])), "delta_form": delta_form,
         "delta_self": (float(np.mean(own_cm)) if own_cm else math.nan)
         if delta_form == "cluster_mean" else float(np.mean(maha.min(1))) / d - 1.0}
  for form in retrieval.DELTA_FORMS:
    dv = np.asarray(res[f"delta_{form}"])
    out[f"delta_min_{form}"] = pick(dv, np.min)
    out[f"clusters_pass_{form}"] = int(np.sum(ok & (dv > np.asarray(ths))))
  out["delta_self_per_point"] = float(np.mean(maha.min(1))) / d - 1.0
  out["delta_self_cluster_mean"] = float(np.mean(own_cm)) if own_cm else math.nan
  return out


def retrieval_report(setup: ProteusSetup, state: Mapping, base: Params, stream: Any, *,
                     upto: int | None = None,
                     batch_size: int = 128, screen_m: Sequence[int] = (),
                     ablations: dict | None = None, bound_samples: int = 256,
                     epsilon: float = 0.01) -> dict:
  """Retrieval accuracy, accuracy and the bound's quantities per task, after task ``upto``.

  Args:
    setup: the resolved PROTEUS that produced ``state``.
    state: the method state after task ``upto`` (default: the last task).
    base: the frozen backbone params.
    stream: the task stream (train splits for the ablation signatures and the bound's
      clusters, test splits for everything measured).
    batch_size: evaluation batch size (batches are padded to it: one compilation).
    screen_m: also measure screened retrieval with these m (needs ``screen`` signatures:
      build the method with ``screen_top_m > 0`` or ``screen_signatures=True``).
    ablations: ``{name: fit_signature overrides}`` of other signatures to fit on the same
      adapted features and compare, e.g. ``{"kmeans": {"signature": "kmeans"},
      "diag": {"covariance_type": "diag"}}``.
    bound_samples: training examples per task used for the bound's clusters (train side).
    epsilon: the bound's target error.

  Returns:
    ``{"tasks": [per task], "mean": {...}}``. Per task: ``retrieval_acc``, ``acc`` (with the
    retrieved task), ``oracle_acc`` (with the true task), ``screen`` {m: retrieval},
    ``ablations`` {name: {retrieval_acc, acc}} (all in %), and for DP-GMM signatures with
    T > 1 ``bound_train``/``bound_test``: ``delta_min``, ``kappa_min``, ``threshold_max``,
    ``clusters``, ``clusters_pass`` and ``delta_self`` (the same separation of the task's
    points from their *own* nearest component: ≈ 0 (per point) / ≈ −1 (cluster mean) when
    the clusters describe the points, ≫ 0 when they do not, e.g. held-out points of an
    overfitted covariance), all under ``delta_form``; and both forms explicitly:
    ``delta_min_<form>``, ``clusters_pass_<form>``, ``delta_self_<form>`` for
    form in (``cluster_mean``, ``per_point``).
  """
  spec = StreamSpec.from_stream(stream)
  T = len(stream.tasks) if upto is None else upto + 1
  ablations = dict(ablations or {})
  all_fn = _cached(setup, ("all_feats", T), lambda: jax.jit(
      lambda st, b, x: all_task_features(setup, st, b, x, T)))
  head_fn = _cached(setup, ("heads", T, spec), lambda: jax.jit(
      lambda st, f, tasks: jnp.argmax(head_logits(setup.cfg, st, f, spec, T - 1, tasks), -1)))
  screen_fns = {m: _cached(setup, ("screen_route", m, T), lambda m=m: jax.jit(
      lambda st, b, x: route(setup, st, b, x, T, screen_top_m=m)[0])) for m in screen_m}
  bounds_fn = jax.jit(functools.partial(retrieval.cluster_bounds, delta_form=setup.cfg.delta_form),
                      static_argnames=("num_tasks", "total_components", "epsilon"))

  sigs = [state["tasks"][str(t)]["signature"] for t in range(T)]
  stacked = mixture.stack_signatures(sigs)
  with_bound = setup.cfg.signature == "dpgmm" and T > 1
  total_components = sum(int(s["means"].shape[0]) for s in sigs)

  def bound(t, feats_all):
    return bound_quantities(sigs, t, feats_all, bounds_fn, total_components=total_components,
                            epsilon=epsilon, delta_form=setup.cfg.delta_form)

  def feats_of(x_all, fn):
    return _in_batches(x_all, fn, batch_size)

  # Train side: ablation signatures (all training data, own backbone) and the bound.
  abl_sigs = {name: [] for name in ablations}
  deltas_fn, feat_fn = _task_feature_fns(setup)  # one compilation for every (t, T)
  bound_train = []
  for t in range(T):
    split = stream.tasks[t].train
    if ablations:
      own_deltas = deltas_fn(task_delta_inputs(setup, state, t, T))
      own = feats_of(np.asarray(split.x),
                     lambda x, own_deltas=own_deltas: feat_fn(base, own_deltas, x))
      for name, over in ablations.items():
        abl_sigs[name].append(fit_signature(setup.cfg, own, jax.random.PRNGKey(t), **over)[0])
    if with_bound:
      idx = np.sort(np.random.default_rng([t, 11]).choice(
          len(split), min(bound_samples, len(split)), False))
      bound_train.append(bound(t, feats_of(np.asarray(split.x[idx]),
                                           lambda x: all_fn(state, base, x))))
  abl_stacked = {name: mixture.stack_signatures(v) for name, v in abl_sigs.items()}

  rows = []
  for i in range(T):
    split = stream.tasks[i].test
    y = np.asarray(split.y)
    feats_all = feats_of(np.asarray(split.x), lambda x: all_fn(state, base, x))  # (T, n, d)
    fa = jnp.asarray(feats_all)
    n = len(y)
    idx = jnp.arange(n)

    def retrieve_and_classify(sig_stack):
      chosen = retrieval.retrieve(retrieval.score_tasks(sig_stack, fa,
                                                        metric=setup.cfg.kmeans_metric))
      pred = np.asarray(head_fn(state, fa[chosen, idx], chosen))
      return (100.0 * float(np.mean(np.asarray(chosen) == i)), 100.0 * float(np.mean(pred == y)))

    retr, acc = retrieve_and_classify(stacked)
    oracle = np.asarray(head_fn(state, fa[i], jnp.full((n,), i, jnp.int32)))
    row = {"task": i, "retrieval_acc": retr, "acc": acc,
           "oracle_acc": 100.0 * float(np.mean(oracle == y)), "screen": {}, "ablations": {}}
    for m, fn in screen_fns.items():
      chosen = feats_of(np.asarray(split.x), lambda x: fn(state, base, x)[:, None])[:, 0]
      row["screen"][str(m)] = 100.0 * float(np.mean(chosen == i))
    for name, st in abl_stacked.items():
      r, a = retrieve_and_classify(st)
      row["ablations"][name] = {"retrieval_acc": r, "acc": a}
    if with_bound:
      row["bound_train"] = bound_train[i]
      row["bound_test"] = bound(i, feats_all)
    rows.append(row)
  mean = {k: float(np.mean([r[k] for r in rows])) for k in ("retrieval_acc", "acc", "oracle_acc")}
  for m in screen_m:
    mean[f"screen_{m}"] = float(np.mean([r["screen"][str(m)] for r in rows]))
  for name in ablations:
    for k in ("retrieval_acc", "acc"):
      mean[f"{name}_{k}"] = float(np.mean([r["ablations"][name][k] for r in rows]))
  return {"tasks": rows, "mean": mean}


def _padded(x, size: int) -> tuple[jax.Array, int]:
  """``x`` padded with zero rows to ``size`` rows (one compiled shape), and its real length."""
  x = np.asarray(x)
  n = x.shape[0]
  if n < size:
    x = np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])
  return jnp.asarray(x), n


# ---------------------------------------------------------------------------------------------
# Factories


# Module functions that take the setup (or its config) first: ProteusParts binds them.
_SETUP_FUNCTIONS = ("coefficients", "deltas", "task_delta_inputs", "task_deltas",
                    "training_adapters", "ortho_penalty", "task_features", "features_with", "all_task_features", "per_example_features", "route",
                    "init", "new_unit", "begin_task", "trainable", "combine", "loss", "end_task",
                    "params_for", "predict", "diagnostics", "retrieval_report")
_CONFIG_FUNCTIONS = ("fit_signature", "ridge_head_update", "head_logits")


class ProteusParts:
  """A :class:`ProteusConfig` resolved against a backbone, with this module's functions bound.

  Kept so notebooks, experiments and tests can write ``parts.route(state, base, x, T)``,
  ``parts.fit_signature(feats, key)`` or ``parts.alpha`` (legacy option names are read
  through :data:`_LEGACY_NAMES`); every function is the module-level one, nothing is stored
  besides the setup.
  """

  def __init__(self, backbone: Backbone, **kwargs: Any):
    self.setup = resolve(backbone, ProteusConfig(**_renamed(kwargs)))
    self.cfg, self.backbone = self.setup.cfg, backbone
    self.sites, self.shapes = self.setup.sites, self.setup.shapes

  def __getattr__(self, name: str):
    if name in ("setup", "cfg"):  # not yet set (e.g. while unpickling)
      raise AttributeError(name)
    if name in _SETUP_FUNCTIONS:
      return functools.partial(globals()[name], self.setup)
    if name in _CONFIG_FUNCTIONS:
      return functools.partial(globals()[name], self.cfg)
    if name in ("stacked_signatures", "l1_penalty", "params_with", "_params_with"):
      return globals()[name.lstrip("_")]
    field = _LEGACY_NAMES.get(name, name)
    if field in self.cfg.__dataclass_fields__ or field == "fit_screen":
      return getattr(self.cfg, field)
    raise AttributeError(f"ProteusParts has no attribute {name!r}")

  def method(self, name: str = "proteus") -> ContinualMethod:
    """The :class:`ContinualMethod` over this setup.

    Args:
      name: the method's registry/run name.

    Returns:
      A :class:`ContinualMethod` whose functions are this module's, bound to ``self.setup``.
    """
    return _method(self.setup, name)


def _method(setup: ProteusSetup, name: str) -> ContinualMethod:
  bind = functools.partial
  return ContinualMethod(
      name=name, backbone=setup.backbone, init=bind(init, setup),
      begin_task=bind(begin_task, setup), trainable=bind(trainable, setup),
      loss=bind(loss, setup), combine=bind(combine, setup), end_task=bind(end_task, setup),
      predict=bind(predict, setup), params_for=bind(params_for, setup),
      diagnostics=bind(diagnostics, setup))


def proteus(backbone: Backbone, *, name: str = "proteus", **kwargs: Any) -> ContinualMethod:
  """PROTEUS with the code's defaults (see the module docstring and :class:`ProteusConfig`).

  Args:
    backbone: the frozen backbone (sites with roles ``q`` and ``v`` by default).
    name: registry/run name.
    **kwargs: :class:`ProteusConfig` fields; the old names ``rank``, ``roles``, ``scale``,
      ``alpha``, ``feature_batch`` are accepted for ``lora_rank``, ``sites``, ``lora_scale``,
      ``transfer_alpha``, ``aux_batch_size``.

  Returns:
    The method; its functions are this module's, bound to :func:`resolve`'s result.
  """
  return _method(resolve(backbone, ProteusConfig(**_renamed(kwargs))), name)


def proteus_kmeans(backbone: Backbone, *, name: str = "proteus_kmeans", **kwargs: Any
                   ) -> ContinualMethod:
  """The k-means + nearest-centroid retrieval ablation (K = 5, L1).

  Args:
    backbone: the frozen backbone.
    name: registry/run name.
    **kwargs: :class:`ProteusConfig` fields (and the old names :func:`proteus` accepts);
      ``signature`` defaults to ``"kmeans"``.

  Returns:
    The method (see :func:`proteus`).
  """
  return proteus(backbone, name=name, **{"signature": "kmeans", **kwargs})


def proteus_independent(backbone: Backbone, *, name: str = "proteus_independent",
                        **kwargs: Any) -> ContinualMethod:
  """PROTEUS without composition: α = 0, so ΔW_k = scale·a_k b_k (independent units), with the
  same signatures, retrieval and RanPAC head (the ablation that isolates composition).

  Args:
    backbone: the frozen backbone.
    name: registry/run name.
    **kwargs: :class:`ProteusConfig` fields (and the old names :func:`proteus` accepts);
      ``transfer_alpha`` defaults to 0.

  Returns:
    The method (see :func:`proteus`).

  Raises:
    TypeError: an option was given under both its old and its new name.
  """
  kwargs = _renamed(kwargs)
  kwargs.setdefault("transfer_alpha", 0.0)
  return proteus(backbone, name=name, **kwargs)


for _factory in (proteus, proteus_kmeans, proteus_independent):
  _options.config_signature(_factory, ProteusConfig, _LEGACY_NAMES)

REGISTRY = {"proteus": proteus, "proteus_kmeans": proteus_kmeans,
            "proteus_independent": proteus_independent}
