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

Retrieval accuracy and the bound's quantities need the test/train data of every task, so
they are computed after a run by :meth:`ProteusParts.retrieval_report` (see
``experiments/text_proteus.py``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods.base import (ContinualMethod, StreamSpec, TaskInfo, identity_grads, site_key,
                              to_host)
from clx.models.base import Backbone
from clx.ops import lora as lora_ops
from clx.ops import mixture
from clx.ops import retrieval
from clx.ops import ridge as ridge_ops

SIGNATURES = ("dpgmm", "kmeans")
# which factors the orthogonality penalty constrains: "b" the random output-side factors (the
# code's random ``*_lora_pool_A``), "a" the input-side ones, "ab" both
ORTHO_FACTORS = ("b", "a", "ab")


def ortho_terms(old: dict, new: dict, factors: str = "b"):
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


def _with_kernels(params, kernels: dict):
  """``params`` with the kernels at the given paths replaced (pure)."""
  flat = lora_ops.flatten_paths(params)
  flat.update(kernels)
  return lora_ops.unflatten_paths(flat)


class ProteusParts:
  """Configuration and functions of a PROTEUS method (see :func:`proteus`)."""

  def __init__(self, backbone: Backbone, *, rank: int = 4, roles: Sequence[str] = ("q", "v"),
               sites: Sequence[str] | None = None, scale: float = 0.1, alpha: float = 0.3,
               transfer_init: float = 1.0, reg_weight: float = 0.006,
               ortho_weight: float = 0.0, ortho_factors: str = "b",
               unit_init_std: float = 0.01, signature: str = "dpgmm", n_components: int = 100,
               weight_concentration_prior: float = 0.01, covariance_type: str = "full",
               max_iter: int = 100, tol: float = 1e-3, reg_covar: float = 1e-4,
               min_component_weight: float = 1e-3, jitter: float = 1e-4,
               max_signature_samples: int | None = None, kmeans_clusters: int = 5,
               kmeans_metric: str = "l1", rp_dim: int = 10000,
               ridge_grid: Sequence[float] = ridge_ops.RIDGE_GRID,
               ridge_fit_fraction: float = 0.8, ridge_with_history: bool = False,
               screen_top_m: int = 0, screen_covariance_type: str = "diag",
               screen_components: int | None = None, screen_signatures: bool = False,
               restrict_head: bool = False, delta_form: str = "cluster_mean",
               feature_batch: int = 256, task_batch: int | None = None,
               example_batch: int = 32, score_batch: int = 8, verbose: bool = False):
    if signature not in SIGNATURES:
      raise ValueError(f"signature must be one of {SIGNATURES}, got {signature!r}")
    if ortho_factors not in ORTHO_FACTORS:
      raise ValueError(f"ortho_factors must be one of {ORTHO_FACTORS}, got {ortho_factors!r}")
    if rank < 1 or rp_dim < 1 or screen_top_m < 0:
      raise ValueError(f"rank and rp_dim must be >= 1 and screen_top_m >= 0, got rank={rank}, "
                       f"rp_dim={rp_dim}, screen_top_m={screen_top_m}")
    mixture._check_cov_type(covariance_type)
    mixture._check_cov_type(screen_covariance_type)
    if delta_form not in retrieval.DELTA_FORMS:
      raise ValueError(f"delta_form must be one of {retrieval.DELTA_FORMS}, got {delta_form!r}")
    self.delta_form = delta_form
    self.backbone = backbone
    self.sites = tuple(sites) if sites is not None else backbone.site_paths(tuple(roles))
    if not self.sites:
      raise ValueError(f"{backbone.name}: no sites for roles {roles}")
    flat = lora_ops.flatten_paths(backbone.params)
    for s in self.sites:
      if s not in flat or np.ndim(flat[s]) != 2:
        raise ValueError(f"site {s!r} is not a 2-D kernel of {backbone.name}")
    self.shapes = {s: tuple(np.shape(flat[s])) for s in self.sites}
    self.rank, self.scale, self.alpha = int(rank), float(scale), float(alpha)
    self.transfer_init, self.reg_weight = float(transfer_init), float(reg_weight)
    self.ortho_weight, self.ortho_factors = float(ortho_weight), ortho_factors
    self.unit_init_std = float(unit_init_std)
    self.signature, self.n_components = signature, int(n_components)
    self.weight_concentration_prior = weight_concentration_prior
    self.covariance_type, self.max_iter, self.tol = covariance_type, int(max_iter), float(tol)
    self.reg_covar, self.min_component_weight = float(reg_covar), float(min_component_weight)
    self.jitter, self.max_signature_samples = float(jitter), max_signature_samples
    self.kmeans_clusters, self.kmeans_metric = int(kmeans_clusters), kmeans_metric
    self.rp_dim, self.ridge_grid = int(rp_dim), tuple(float(g) for g in ridge_grid)
    self.ridge_fit_fraction, self.ridge_with_history = float(ridge_fit_fraction), ridge_with_history
    self.screen_top_m, self.screen_covariance_type = int(screen_top_m), screen_covariance_type
    self.screen_components = screen_components
    self.fit_screen = bool(screen_top_m) or bool(screen_signatures)
    self.restrict_head, self.feature_batch = restrict_head, int(feature_batch)
    self.task_batch, self.example_batch = task_batch, int(example_batch)
    self.score_batch = int(score_batch)
    self.verbose = verbose
    self._jit_cache: dict = {}

  # -- composition ------------------------------------------------------------
  def coefficients(self, state, num_tasks: int) -> dict[str, jax.Array]:
    """``{site_key: C (T, T)}``: C[t, j] = α·w_{t,j} (j < t), 1 (j = t), 0 (j > t)."""
    out = {}
    for s in self.sites:
      sk = site_key(s)
      dtype = jnp.result_type(state["tasks"]["0"]["unit"][sk]["a"])
      rows = []
      for t in range(num_tasks):
        w = state["tasks"][str(t)].get("weights", {}).get(sk) if t > 0 else None
        row = [self.alpha * jnp.asarray(w, dtype)] if w is not None else []
        row += [jnp.ones((1,), dtype), jnp.zeros((num_tasks - t - 1,), dtype)]
        rows.append(jnp.concatenate(row))
      out[sk] = jnp.stack(rows)
    return out

  def deltas(self, state, num_tasks: int) -> dict[str, jax.Array]:
    """``{site: ΔW (T, d_in, d_out)}``, every task's composed delta (scale included)."""
    coef = self.coefficients(state, num_tasks)
    out = {}
    for s in self.sites:
      sk = site_key(s)
      a = jnp.stack([state["tasks"][str(j)]["unit"][sk]["a"] for j in range(num_tasks)])
      b = jnp.stack([state["tasks"][str(j)]["unit"][sk]["b"] for j in range(num_tasks)])
      # Δ_t = scale · Σ_j C[t, j] a_j b_j
      out[s] = self.scale * jnp.einsum("tj,jdr,jre->tde", coef[sk], a, b,
                                       precision=jax.lax.Precision.HIGHEST)
    return out

  def _params_with(self, base, deltas_t: dict):
    flat = lora_ops.flatten_paths(base)
    return _with_kernels(base, {s: flat[s] + d.astype(flat[s].dtype) for s, d in deltas_t.items()})

  def training_adapters(self, state, task_index: int, unit, weights) -> dict:
    """Adapters for ``lora.apply_adapters``: frozen earlier units scaled by α·w, plus the new unit."""
    out = {}
    for s in self.sites:
      sk = site_key(s)
      adapters = []
      if task_index > 0:
        a = jnp.stack([state["tasks"][str(j)]["unit"][sk]["a"] for j in range(task_index)])
        b = jnp.stack([state["tasks"][str(j)]["unit"][sk]["b"] for j in range(task_index)])
        coef = self.alpha * weights[sk]
        adapters.append({"a": jax.lax.stop_gradient(a),
                         "b": jax.lax.stop_gradient(b) * coef[:, None, None]})
      adapters.append(unit[sk])
      out[s] = adapters
    return out

  def ortho_penalty(self, state, task_index: int, unit) -> jax.Array:
    """Σ_sites Σ_{j<k} ‖b_j b_kᵀ‖²_F (``ortho_factors="b"``; ``"a"``: ‖a_jᵀ a_k‖²_F; ``"ab"``:
    both), earlier units held constant."""
    total = jnp.zeros((), jnp.float32)
    for s in self.sites:
      sk = site_key(s)
      for j in range(task_index):
        old = jax.lax.stop_gradient(state["tasks"][str(j)]["unit"][sk])
        total = total + ortho_terms(old, unit[sk], self.ortho_factors)
    return total

  @staticmethod
  def l1_penalty(weights) -> jax.Array:
    leaves = jax.tree.leaves(weights)
    return sum((jnp.sum(jnp.abs(w)) for w in leaves), jnp.zeros((), jnp.float32))

  # -- features ---------------------------------------------------------------
  def task_features(self, state, base, x, task_index: int, num_tasks: int | None = None):
    """h_t(x): features ``(n, d)`` under task ``task_index``'s composed adapters."""
    num_tasks = task_index + 1 if num_tasks is None else num_tasks
    deltas = self.deltas(state, num_tasks)
    return self.backbone.apply(self._params_with(base, {s: d[task_index] for s, d in deltas.items()}), x)

  def all_task_features(self, state, base, x, num_tasks: int):
    """h_i(x) for every task i < ``num_tasks`` at once, ``(T, n, d)`` (vmap over tasks)."""
    deltas = self.deltas(state, num_tasks)

    def one(d_t):
      return self.backbone.apply(self._params_with(base, d_t), x)

    batch = self.task_batch or num_tasks
    return jax.lax.map(one, deltas, batch_size=min(batch, num_tasks))

  def per_example_features(self, state, base, x, task_ids, num_tasks: int):
    """h_{task_ids[i]}(x_i) with a different task per example, ``(n, d)``.

    Every example gets its own merged weights (gathered from the precomputed deltas), in
    chunks of ``example_batch`` examples to bound memory.
    """
    deltas = self.deltas(state, num_tasks)

    def one(args):
      xi, ti = args
      d_t = {s: d[ti] for s, d in deltas.items()}
      return self.backbone.apply(self._params_with(base, d_t), xi[None])[0]

    return jax.lax.map(one, (x, task_ids), batch_size=min(self.example_batch, x.shape[0]))

  # -- signatures -------------------------------------------------------------
  def stacked_signatures(self, state, num_tasks: int, field: str = "signature"):
    return mixture.stack_signatures([state["tasks"][str(t)][field] for t in range(num_tasks)])

  def _score_one(self, sig, f):
    return retrieval.score(sig, f, metric=self.kmeans_metric)

  def route(self, state, base, x, num_tasks: int, screen_top_m: int | None = None):
    """Retrieve a task per example: ``(task ids (n,), their features (n, d), scores)``.

    ``scores`` is ``(n, T)`` (exhaustive) or ``(n, m)`` over the candidates (screened).
    """
    m = self.screen_top_m if screen_top_m is None else screen_top_m
    sigs = self.stacked_signatures(state, num_tasks)
    if m and m < num_tasks:
      screen = self.stacked_signatures(state, num_tasks, "screen")
      base_feats = self.backbone.apply(base, x)
      cands = retrieval.top_candidates(retrieval.score_shared(screen, base_feats,
                                                              metric=self.kmeans_metric), m)
      feats_c, scores_c = [], []
      for c in range(m):
        f = self.per_example_features(state, base, x, cands[:, c], num_tasks)

        def one(args):
          fi, ti = args
          sig = jax.tree.map(lambda a: a[ti], sigs)
          return self._score_one(sig, fi[None])[0]

        # each example gathers its candidate's signature: chunks of score_batch examples
        scores_c.append(jax.lax.map(one, (f, cands[:, c]),
                                    batch_size=min(self.score_batch, x.shape[0])))
        feats_c.append(f)
      scores = jnp.stack(scores_c, axis=1)
      best = jnp.argmax(scores, axis=1)
      chosen = jnp.take_along_axis(cands, best[:, None], axis=1)[:, 0]
      feats = jnp.stack(feats_c, axis=0)[best, jnp.arange(x.shape[0])]
      return chosen, feats, scores
    feats_all = self.all_task_features(state, base, x, num_tasks)
    scores = retrieval.score_tasks(sigs, feats_all, metric=self.kmeans_metric)
    chosen = retrieval.retrieve(scores)
    return chosen, feats_all[chosen, jnp.arange(x.shape[0])], scores

  # -- protocol ---------------------------------------------------------------
  def init(self, rng, spec: StreamSpec):
    k_rp = jax.random.fold_in(rng, 17)
    w_rand = ridge_ops.random_projection(k_rp, self.backbone.feature_dim, self.rp_dim)
    stats = ridge_ops.init_statistics(self.rp_dim, spec.num_classes)
    return {"heads": {}, "tasks": {}, "stats": {},
            "ridge": {"w_rand": w_rand, "gram": stats["gram"], "xty": stats["xty"],
                      "count": stats["count"],
                      "w_out": jnp.zeros((self.rp_dim, spec.num_classes), jnp.float32)}}

  def new_unit(self, key, task_index: int) -> dict:
    """A new unit per site, as the code: input-side a (d_in, r) = 0, output-side b (r, d_out)
    ~ N(0, std²) (the code's ``*_lora_pool_B`` = 0 and ``*_lora_pool_A`` random)."""
    sizes = [self.rank * self.shapes[s][1] for s in self.sites]
    # one draw for all sites (one compiled shape), split on the host
    draws = np.asarray(jax.random.normal(jax.random.fold_in(key, task_index), (sum(sizes),),
                                         jnp.float32))
    unit, offset = {}, 0
    for s, size in zip(self.sites, sizes):
      d_in, d_out = self.shapes[s]
      b = self.unit_init_std * draws[offset:offset + size].reshape(self.rank, d_out)
      unit[site_key(s)] = {"a": jnp.zeros((d_in, self.rank), jnp.float32),
                           "b": jnp.asarray(b, jnp.float32)}
      offset += size
    return unit

  def begin_task(self, state, ctx):
    t = ctx.task_index
    heads = heads_lib.add_task_head(state["heads"], jax.random.fold_in(ctx.rng, 0), ctx.spec,
                                    self.backbone.feature_dim, t, "per_task")
    entry = {"unit": self.new_unit(jax.random.fold_in(ctx.rng, 1), t)}
    if t > 0:
      entry["weights"] = {site_key(s): jnp.full((t,), self.transfer_init, jnp.float32)
                          for s in self.sites}
    tasks = {**state["tasks"], str(t): entry}
    return {**state, "heads": heads, "tasks": tasks}

  def trainable(self, state, info: TaskInfo):
    task_index = info.task
    entry = state["tasks"][str(task_index)]
    params = {"unit": entry["unit"], "head": state["heads"][str(task_index)]}
    if task_index > 0:
      params["weights"] = entry["weights"]
    return params

  def loss(self, params, state, base, batch, rng, info: TaskInfo):
    del rng
    task_index, spec = info.task, info.spec
    weights = params.get("weights", {})
    adapters = self.training_adapters(state, task_index, params["unit"], weights)
    feats = self.backbone.apply(lora_ops.apply_adapters(base, adapters, self.scale), batch["x"])
    heads = {**state["heads"], str(task_index): params["head"]}
    logits, labels = heads_lib.train_logits_and_labels(heads, feats, batch["y"], spec, task_index,
                                                       "per_task")
    ce = heads_lib.masked_cross_entropy(logits, labels, batch["mask"])
    l1 = self.l1_penalty(weights)
    ortho = self.ortho_penalty(state, task_index, params["unit"])
    total = ce + self.reg_weight * l1 + self.ortho_weight * ortho
    return total, {"accuracy": heads_lib.masked_accuracy(logits, labels, batch["mask"]),
                   "ce": ce, "l1": l1, "ortho": ortho}

  def _jitted(self, name, fn, **static):
    key = (name, tuple(sorted(static.items())))
    if key not in self._jit_cache:
      self._jit_cache[key] = jax.jit(functools.partial(fn, **static))
    return self._jit_cache[key]

  def _collect(self, ctx, fn, *args):
    """Apply ``fn(*args, x)`` over the current task's training data; host ``(feats, y)``."""
    feats, ys = [], []
    for batch in ctx.batches("train", batch_size=self.feature_batch):
      # to_host: data-sharded batches span every process on multi-host runs.
      f = to_host(fn(*args, batch["x"]))
      keep = to_host(batch["mask"]) > 0
      feats.append(f[keep])
      ys.append(to_host(batch["y"])[keep])
    return np.concatenate(feats), np.concatenate(ys)

  def fit_signature(self, feats: np.ndarray, key, *, covariance_type: str | None = None,
                    n_components: int | None = None, signature: str | None = None
                    ) -> tuple[dict, dict]:
    """A signature of features ``(n, d)`` and its fit statistics (``signature`` and
    ``covariance_type``/``n_components`` override the configured ones, for ablations)."""
    feats = np.asarray(feats, np.float32)
    if self.max_signature_samples and feats.shape[0] > self.max_signature_samples:
      idx = np.random.default_rng(0).choice(feats.shape[0], self.max_signature_samples, False)
      feats = feats[np.sort(idx)]
    if (signature or self.signature) == "kmeans":
      sig = mixture.centroid_signature(feats, self.kmeans_clusters, key=key)
      return sig, {"components": int(sig["centers"].shape[0]), "n_iter": 0, "converged": True}
    cov_type = covariance_type or self.covariance_type
    k = int(min(n_components or self.n_components, feats.shape[0]))
    params = mixture.fit_dpgmm(feats, n_components=k, covariance_type=cov_type,
                               weight_concentration_prior=self.weight_concentration_prior,
                               reg_covar=self.reg_covar, max_iter=self.max_iter, tol=self.tol,
                               key=key)
    sig = mixture.to_signature(params, cov_type, min_weight=self.min_component_weight,
                               jitter=self.jitter)
    if not all(bool(jnp.all(jnp.isfinite(v))) for v in sig.values()):
      raise FloatingPointError(
          f"the {cov_type} DP-GMM signature of {feats.shape} features is not finite; raise "
          "reg_covar or use covariance_type='diag'")
    return sig, {"components": int(sig["means"].shape[0]), "n_iter": int(params["n_iter"]),
                 "converged": bool(params["converged"])}

  def combine(self, state, params, info: TaskInfo):
    """Write the trained unit, transfer weights (t > 0) and head of task ``info.task`` back."""
    t = info.task
    entry = dict(state["tasks"][str(t)])
    entry["unit"] = params["unit"]
    if t > 0:
      entry["weights"] = params["weights"]
    return {**state, "heads": {**state["heads"], str(t): params["head"]},
            "tasks": {**state["tasks"], str(t): entry}}

  def end_task(self, state, ctx):
    t = ctx.task_index
    t0 = time.perf_counter()
    params = self.trainable(state, ctx.info)  # combined by the loop
    entry = dict(state["tasks"][str(t)])
    base = ctx.base

    feat_fn = self._jitted("task_features", self.task_features, task_index=t)
    feats, y = self._collect(ctx, feat_fn, state, base)
    key = jax.random.fold_in(ctx.rng, 2)
    sig, fit = self.fit_signature(feats, key)
    entry["signature"] = sig
    if self.fit_screen:
      base_fn = self._jitted("base_features", lambda b, x: self.backbone.apply(b, x))
      base_feats, _ = self._collect(ctx, base_fn, base)
      entry["screen"], _ = self.fit_signature(
          base_feats, jax.random.fold_in(key, 1), covariance_type=self.screen_covariance_type,
          n_components=self.screen_components)

    ridge_state, lam = self.ridge_head_update(state["ridge"], feats, y, ctx.spec.num_classes, t)

    host = jax.device_get({"unit": params["unit"], "weights": params.get("weights", {}),
                           "pool": [state["tasks"][str(j)]["unit"] for j in range(t)]})
    l1 = float(sum(np.abs(w).sum() for w in jax.tree.leaves(host["weights"])))
    ortho = float(sum(ortho_terms(old[k], host["unit"][k], self.ortho_factors)
                      for old in host["pool"] for k in host["unit"]))
    mean_w = (float(np.mean([np.mean(w) for w in jax.tree.leaves(host["weights"])]))
              if t > 0 else 0.0)
    task_stats = {"components": jnp.asarray(fit["components"], jnp.int32),
                  "fit_iters": jnp.asarray(fit["n_iter"], jnp.int32),
                  "fit_converged": jnp.asarray(fit["converged"]),
                  "ridge": jnp.asarray(lam, jnp.float32),
                  "num_features": jnp.asarray(feats.shape[0], jnp.int32),
                  "l1": jnp.asarray(l1, jnp.float32), "ortho": jnp.asarray(ortho, jnp.float32),
                  "mean_weight": jnp.asarray(mean_w, jnp.float32),
                  "end_task_s": jnp.asarray(time.perf_counter() - t0, jnp.float32)}
    if self.verbose:
      print(f"proteus task {t}: {fit['components']} components ({fit['n_iter']} iters), "
            f"ridge {lam:g}, mean w {mean_w:.3f}, ortho {ortho:.3g}", flush=True)
    return {**state, "tasks": {**state["tasks"], str(t): entry}, "ridge": ridge_state,
            "stats": {**state["stats"], str(t): task_stats}}

  def ridge_head_update(self, ridge_state: dict, feats, y, num_classes: int, task_index: int
                        ) -> tuple[dict, float]:
    """The RanPAC head after one more task (host; also used by the head-matched baselines).

    λ is chosen on this task's features alone (fit on a shuffled 80 %, MSE on the other 20 %,
    as ``optimise_ridge_parameter``; with ``ridge_with_history`` the earlier statistics are
    added to the fit part), then G += HᵀH, Q += HᵀY with H = ReLU(feats W_rand) and
    W_o = (G + λI)⁻¹Q.

    Args:
      ridge_state: ``{"w_rand" (d, M), "gram" (M, M), "xty" (M, C), "count", "w_out" (M, C)}``.
      feats: ``(n, d)`` the task's training features.
      y: ``(n,)`` their global labels.
      num_classes: C.
      task_index: seeds the 80/20 shuffle.

    Returns:
      ``(new ridge state, λ)``.
    """
    r = ridge_state
    h = _project(jnp.asarray(feats), r["w_rand"])
    yy = jax.nn.one_hot(jnp.asarray(y), num_classes, dtype=h.dtype)
    perm = np.random.default_rng([task_index, 7]).permutation(h.shape[0])
    lam, _ = ridge_ops.select_ridge(
        h[perm], yy[perm], grid=self.ridge_grid, fit_fraction=self.ridge_fit_fraction,
        base_gram=r["gram"] if self.ridge_with_history else None,
        base_xty=r["xty"] if self.ridge_with_history else None)
    return {**r, **_ridge_update(r, h, yy, jnp.asarray(lam, h.dtype))}, lam

  def head_logits(self, state, feats, spec: StreamSpec, current_task: int, tasks=None):
    r = state["ridge"]
    logits = ridge_ops.logits(feats, r["w_rand"], r["w_out"])
    seen = np.zeros(spec.num_classes, bool)
    for c in spec.task_classes[:current_task + 1]:
      seen[list(c)] = True
    mask = jnp.broadcast_to(jnp.asarray(seen), logits.shape)
    if tasks is not None and self.restrict_head:
      table = np.zeros((current_task + 1, spec.num_classes), bool)
      for i in range(current_task + 1):
        table[i, list(spec.task_classes[i])] = True
      mask = jnp.logical_and(mask, jnp.asarray(table)[tasks])
    return jnp.where(mask, logits, heads_lib.NEG_INF)

  def predict(self, state, base, x, info: TaskInfo):
    current_task, task_id, spec = info.task, info.task_id, info.spec
    num_tasks = current_task + 1
    if task_id is not None:
      feats = self.task_features(state, base, x, task_id, num_tasks)
      return self.head_logits(state, feats, spec, current_task)
    tasks, feats, _ = self.route(state, base, x, num_tasks)
    return self.head_logits(state, feats, spec, current_task, tasks)

  def diagnostics(self, state) -> dict:
    out = {}
    for t, s in sorted(state.get("stats", {}).items(), key=lambda kv: int(kv[0])):
      out[t] = {k: (v.item() if hasattr(v, "item") else v) for k, v in s.items()}
      out[t] = {k: (bool(v) if isinstance(v, (bool, np.bool_)) else v) for k, v in out[t].items()}
    return {"tasks": out}

  def method(self, name: str = "proteus") -> ContinualMethod:
    return ContinualMethod(name=name, backbone=self.backbone, init=self.init,
                           begin_task=self.begin_task, trainable=self.trainable, loss=self.loss,
                           combine=self.combine, transform_grads=identity_grads,
                           end_task=self.end_task,
                           predict=self.predict, diagnostics=self.diagnostics)

  # -- reports (host, need the data) -------------------------------------------
  def _cached(self, key, make):
    if key not in self._jit_cache:
      self._jit_cache[key] = make()
    return self._jit_cache[key]

  def retrieval_report(self, state, base, stream, *, upto: int | None = None,
                       batch_size: int = 128, screen_m: Sequence[int] = (),
                       ablations: dict | None = None, bound_samples: int = 256,
                       epsilon: float = 0.01) -> dict:
    """Retrieval accuracy, accuracy and the bound's quantities per task, after task ``upto``.

    Args:
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
    all_fn = self._cached(("all_feats", T), lambda: jax.jit(
        lambda st, b, x: self.all_task_features(st, b, x, T)))
    head_fn = self._cached(("heads", T, spec), lambda: jax.jit(
        lambda st, f, tasks: jnp.argmax(self.head_logits(st, f, spec, T - 1, tasks), -1)))
    screen_fns = {m: self._cached(("screen_route", m, T), lambda m=m: jax.jit(
        lambda st, b, x: self.route(st, b, x, T, screen_top_m=m)[0])) for m in screen_m}
    bounds_fn = jax.jit(functools.partial(retrieval.cluster_bounds, delta_form=self.delta_form),
                        static_argnames=("num_tasks", "total_components", "epsilon"))

    def feats_of(x_all, fn):
      parts = []
      for s in range(0, len(x_all), batch_size):
        x, n = _padded(x_all[s:s + batch_size], batch_size)
        parts.append(np.asarray(fn(x))[..., :n, :])
      return np.concatenate(parts, axis=-2)

    sigs = [state["tasks"][str(t)]["signature"] for t in range(T)]
    stacked = mixture.stack_signatures(sigs)
    with_bound = self.signature == "dpgmm" and T > 1
    total_components = sum(int(s["means"].shape[0]) for s in sigs)

    def bound(t, feats_all):
      """Bound quantities of task t from its points under every backbone (T, n, d)."""
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
             "clusters_pass": int(np.sum(res["pass"])), "delta_form": self.delta_form,
             "delta_self": (float(np.mean(own_cm)) if own_cm else math.nan)
             if self.delta_form == "cluster_mean" else float(np.mean(maha.min(1))) / d - 1.0}
      for form in retrieval.DELTA_FORMS:
        dv = np.asarray(res[f"delta_{form}"])
        out[f"delta_min_{form}"] = pick(dv, np.min)
        out[f"clusters_pass_{form}"] = int(np.sum(ok & (dv > np.asarray(ths))))
      out["delta_self_per_point"] = float(np.mean(maha.min(1))) / d - 1.0
      out["delta_self_cluster_mean"] = float(np.mean(own_cm)) if own_cm else math.nan
      return out

    # Train side: ablation signatures (all training data, own backbone) and the bound.
    abl_sigs = {name: [] for name in ablations}
    bound_train = []
    for t in range(T):
      split = stream.tasks[t].train
      if ablations:
        own_fn = self._cached(("own", t, T), lambda t=t: jax.jit(
            lambda st, b, x: self.task_features(st, b, x, t, T)))
        own = feats_of(np.asarray(split.x), lambda x: own_fn(state, base, x))
        for name, over in ablations.items():
          abl_sigs[name].append(self.fit_signature(own, jax.random.PRNGKey(t), **over)[0])
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
        chosen = retrieval.retrieve(retrieval.score_tasks(sig_stack, fa, metric=self.kmeans_metric))
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


_project = jax.jit(ridge_ops.project)


@jax.jit
def _ridge_update(r, h, yy, lam):
  stats = ridge_ops.accumulate({"gram": r["gram"], "xty": r["xty"], "count": r["count"]}, h, yy)
  return {**stats, "w_out": ridge_ops.solve(stats["gram"], stats["xty"], lam)}


def _padded(x, size: int):
  """``x`` padded with zero rows to ``size`` rows (one compiled shape), and its real length."""
  x = np.asarray(x)
  n = x.shape[0]
  if n < size:
    x = np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])
  return jnp.asarray(x), n


def proteus(backbone: Backbone, *, name: str = "proteus", **kwargs) -> ContinualMethod:
  """PROTEUS with the code's defaults (see the module docstring and :class:`ProteusParts`).

  Args:
    backbone: the frozen backbone (sites with roles ``q`` and ``v``).
    name: registry/run name.
    **kwargs: :class:`ProteusParts` options: ``rank`` (4), ``roles`` (q, v), ``scale`` (0.1),
      ``alpha`` (0.3; 0 switches composition off: independent units), ``transfer_init`` (1),
      ``reg_weight`` (0.006), ``ortho_weight`` (0, the main configs; 0.004 is the ``-ortho``
      ablation config's), ``ortho_factors`` ("b": the random output-side factors; "a", "ab"),
      ``unit_init_std`` (0.01, the output-side factor's std), ``signature``
      ("dpgmm" | "kmeans"), ``n_components`` (100), ``weight_concentration_prior`` (0.01),
      ``covariance_type`` ("full"), ``max_iter`` (100), ``tol`` (1e-3), ``reg_covar``
      (1e-4; sklearn's 1e-6 is too small for float32 full covariances in d = 384/768),
      ``min_component_weight`` (1e-3), ``jitter`` (1e-4, the code's scoring jitter),
      ``max_signature_samples``, ``kmeans_clusters`` (5), ``kmeans_metric`` ("l1"),
      ``rp_dim`` (10,000), ``ridge_grid`` (10⁻⁸…10⁸), ``ridge_fit_fraction`` (0.8),
      ``ridge_with_history`` (False: λ from the current task only, as the code),
      ``delta_form`` ("cluster_mean": the bound's δ as ``theories.py``; "per_point"),
      ``screen_top_m`` (0 = exhaustive), ``screen_covariance_type`` ("diag"),
      ``screen_components``, ``screen_signatures`` (fit the base-feature signatures even
      with ``screen_top_m = 0``, for measuring screening later), ``restrict_head`` (False),
      ``feature_batch``, ``task_batch`` (tasks per vmap chunk, default all),
      ``example_batch`` (screened per-example forward chunk), ``score_batch`` (screened
      per-example scoring chunk: each example gathers its candidate's (K, d, d) signature),
      ``verbose``.
  """
  return ProteusParts(backbone, **kwargs).method(name)


def proteus_kmeans(backbone: Backbone, *, name: str = "proteus_kmeans", **kwargs) -> ContinualMethod:
  """The k-means + nearest-centroid retrieval ablation (K = 5, L1)."""
  kwargs.setdefault("signature", "kmeans")
  return ProteusParts(backbone, **kwargs).method(name)


def proteus_independent(backbone: Backbone, *, name: str = "proteus_independent",
                        **kwargs) -> ContinualMethod:
  """PROTEUS without composition: α = 0, so ΔW_k = scale·a_k b_k (independent units), with the
  same signatures, retrieval and RanPAC head (the ablation that isolates composition)."""
  kwargs.setdefault("alpha", 0.0)
  return ProteusParts(backbone, **kwargs).method(name)


REGISTRY = {"proteus": proteus, "proteus_kmeans": proteus_kmeans,
            "proteus_independent": proteus_independent}
