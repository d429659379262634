"""Parameter-free task retrieval from feature signatures, its bound, and screening.

PROTEUS (arXiv 2603.13235) keeps one signature per task (a mixture model of the
task-adapted backbone's features, :mod:`clx.ops.mixture`). A test input x is passed through
every task's adapted backbone, h_i(x), and the task whose signature gives the highest
log-likelihood is retrieved:

    î(x) = argmax_i log p_i(h_i(x)),   p_i = Σ_s π_{i,s} N(μ_{i,s}, Σ_{i,s})

(:func:`score_tasks` on features stacked ``(T, n, d)``; :func:`score_shared` when one
feature set is scored under every signature). k-means signatures score by minus the distance
to the nearest centroid (:func:`clx.ops.mixture.nearest_centroid_score`).

**The bound** (Theorems 3.4/3.5 of the paper, as checked by the authors' ``theories.py``,
``Alisia0303/HESTIA/baselines/RanPAC``). For the data D_{t,s} of cluster s of task t:

- separation δ = min over other tasks i ≠ t and their clusters s' of ``m_{i,s'} / d − 1``
  (:func:`cluster_separation`), where, by default (``delta_form="cluster_mean"``, the code's),
  m is the mean of the n×n matrix ``diff Σ⁻¹ diffᵀ`` with ``diff`` the (n, d) block of
  h_i(x) − μ_{i,s'} over x ∈ D_{t,s}, i.e. the squared Mahalanobis distance of the cluster's
  mean point: m = (h̄ − μ)ᵀ Σ⁻¹ (h̄ − μ), h̄ = mean_x h_i(x). With ``delta_form="per_point"``
  (clx's earlier form, an option) m is the mean of the points' own distances,
  mean_x (h_i(x) − μ)ᵀ Σ⁻¹ (h_i(x) − μ) = cluster-mean form + tr(Σ⁻¹ S) with S the points'
  biased covariance. For the component's own points the per-point form is ≈ 0 and the
  cluster-mean form ≈ −1; against a component much tighter than the points the per-point
  form can be large while the cluster-mean form stays near −1;
- log-determinant ratio κ = min_{i ≠ t, s'} ``log det Σ_{i,s'} − log det Σ_{t,s}``
  (:func:`log_det_ratio`);
- σ² = max over i ≠ t of the largest per-dimension (unbiased) variance of h_i(D_{t,s})
  (:func:`max_feature_variance`);
- N = (m − 1)·Σ_i τ_i + 1 for m tasks with τ_i clusters each, ε the target error (0.01);
- threshold = (2/d)·max(¼(M + √(M² − 24 d σ² κ)) − κ,  log((N/ε)(√(1 + 4d/log(N/ε)) + 1))),
  M = 3dσ² − κ (:func:`bound_threshold`, the code's "Eq. (28)").

The guarantee reads: if δ > threshold for every cluster, the retrieval error is at most ε.
Where clx differs from ``theories.py``: Σ⁻¹ is that of the signature (Σ + jitter·I; the code
inverts the stored covariance); d is the true feature dimension (the code hard-codes 768);
τ_i counts the *effective*
components of each signature (the code passes the configured ``n_components`` for every
task); a negative radicand M² − 24dσ²κ is clamped at 0 (the code's ``torch.sqrt`` would
return NaN). The code checks the bound on the *training* points of each cluster; evaluating
the same quantities on held-out points (as :meth:`clx.methods.proteus.ProteusParts.
retrieval_report` also does) shows whether the fitted clusters describe unseen data at all.

**Screening** (beyond the paper, which runs the backbone once per task): score x's *base*
backbone features under per-task base-feature signatures (one forward pass), keep the top-m
candidate tasks (:func:`top_candidates`), and run only those tasks' adapters to re-rank them
(:func:`rerank`). Forward passes per input fall from T to 1 + m
(:func:`forward_passes`); :func:`candidate_recall` measures how often the true task survives
the screen.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from clx.ops import mixture

Array = jax.Array


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------


def signature_kind(signature: dict) -> str:
  """``"mixture"`` (plug-in Gaussian mixture) or ``"centroids"`` (k-means).

  Args:
    signature: a signature dict (:mod:`clx.ops.mixture`).

  Returns:
    ``"mixture"`` (has ``log_weights``) or ``"centroids"`` (has ``centers``).

  Raises:
    ValueError: neither field is present.
  """
  if "log_weights" in signature:
    return "mixture"
  if "centers" in signature:
    return "centroids"
  raise ValueError(f"not a signature (fields {sorted(signature)})")


def score(signature: dict, feats: Array, *, metric: str = "l1") -> Array:
  """Score ``(n,)`` of features ``(n, d)`` under one signature (higher = more likely).

  Args:
    signature: one task's signature (mixture or centroids).
    feats: (n, d) features.
    metric: ``"l1"`` or ``"l2"``, the distance of centroid signatures (ignored for mixtures).

  Returns:
    (n,) log-likelihood log p(f) under a mixture, or the negated nearest-centroid distance.

  Raises:
    ValueError: ``signature`` is neither kind, or an unknown ``metric``.
  """
  if signature_kind(signature) == "mixture":
    return mixture.signature_log_prob(signature, feats)
  return mixture.nearest_centroid_score(signature["centers"], feats, metric,
                                        signature.get("valid"))


def score_tasks(signatures: dict, feats: Array, *, metric: str = "l1") -> Array:
  """Scores ``(n, T)``: task i's features ``feats[i]`` under task i's signature.

  Args:
    signatures: signatures stacked on a leading task axis
      (:func:`clx.ops.mixture.stack_signatures`).
    feats: ``(T, n, d)``, h_i(x) for every task i.
    metric: distance of centroid signatures.

  Returns:
    (n, T) S with S[j, i] the score of h_i(x_j) under signature i.

  Raises:
    AssertionError: ``feats`` is not 3-D (chex).
  """
  shapes = "score_tasks(feats (T, n, d))"
  chex.assert_rank(feats, 3, custom_message=shapes)
  out = jax.vmap(lambda sig, f: score(sig, f, metric=metric))(signatures, feats)
  return out.T


def score_shared(signatures: dict, feats: Array, *, metric: str = "l1") -> Array:
  """Scores ``(n, T)`` of one feature set ``(n, d)`` under every stacked signature.

  Args:
    signatures: signatures stacked on a leading task axis T.
    feats: (n, d), one feature per input (e.g. the base backbone's).
    metric: distance of centroid signatures.

  Returns:
    (n, T) scores, column i under signature i.

  Raises:
    AssertionError: ``feats`` is not 2-D (chex).
  """
  shapes = "score_shared(feats (n, d))"
  chex.assert_rank(feats, 2, custom_message=shapes)
  out = jax.vmap(lambda sig: score(sig, feats, metric=metric))(signatures)
  return out.T


def retrieve(scores: Array) -> Array:
  """``argmax`` task per row of ``(n, T)`` scores, int32.

  Args:
    scores: (n, T), higher = more likely.

  Returns:
    (n,) int32 î = argmax_i scores[:, i] (ties: the lowest index).

  Raises:
    AssertionError: ``scores`` is not 2-D (chex).
  """
  shapes = "retrieve(scores (n, T))"
  chex.assert_rank(scores, 2, custom_message=shapes)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def retrieval_accuracy(predicted: Array, true: Array) -> Array:
  """Share of rows whose retrieved task is the true one.

  Args:
    predicted: (n,) retrieved task ids.
    true: (n,) true task ids.

  Returns:
    () float32 in [0, 1].
  """
  return jnp.mean((jnp.asarray(predicted) == jnp.asarray(true)).astype(jnp.float32))


# ----------------------------------------------------------------------------
# Screening
# ----------------------------------------------------------------------------


def top_candidates(scores: Array, m: int) -> Array:
  """Indices ``(n, m)`` of the m best-scoring tasks, best first.

  Args:
    scores: (n, T) first-stage scores.
    m: number of candidates, 1 ≤ m ≤ T (static).

  Returns:
    (n, m) int32 task ids, in descending score.

  Raises:
    ValueError: m outside [1, T].
    AssertionError: ``scores`` is not 2-D (chex).
  """
  shapes = "top_candidates(scores (n, T))"
  chex.assert_rank(scores, 2, custom_message=shapes)
  if not 1 <= m <= scores.shape[-1]:
    raise ValueError(f"m must be in [1, {scores.shape[-1]}], got {m}")
  return jax.lax.top_k(scores, m)[1].astype(jnp.int32)


def rerank(candidates: Array, candidate_scores: Array) -> Array:
  """The candidate with the best second-stage score: ``(n,)`` task ids.

  Args:
    candidates: (n, m) candidate task ids.
    candidate_scores: (n, m) second-stage scores of those candidates.

  Returns:
    (n,) ids candidates[j, argmax_k candidate_scores[j, k]].

  Raises:
    AssertionError: mismatched shapes (chex).
  """
  shapes = "rerank(candidates (n, m), candidate_scores (n, m))"
  chex.assert_rank(candidates, 2, custom_message=shapes)
  chex.assert_equal_shape([candidates, candidate_scores], custom_message=shapes)
  best = jnp.argmax(candidate_scores, axis=-1)
  return jnp.take_along_axis(candidates, best[:, None], axis=-1)[:, 0]


def candidate_recall(candidates: Array, true: Array) -> Array:
  """Share of rows whose true task is among their candidates.

  Args:
    candidates: (n, m) candidate task ids.
    true: (n,) true task ids.

  Returns:
    () float32 in [0, 1].
  """
  return jnp.mean(jnp.any(candidates == jnp.asarray(true)[:, None], axis=-1).astype(jnp.float32))


def forward_passes(num_tasks: int, m: int | None = None) -> int:
  """Backbone forward passes per input: T (exhaustive) or 1 + m (screened).

  Args:
    num_tasks: T.
    m: candidates re-ranked (screened), or None/0 for exhaustive retrieval.

  Returns:
    T, or 1 + min(m, T).
  """
  return num_tasks if not m else 1 + min(m, num_tasks)


# ----------------------------------------------------------------------------
# Bound quantities
# ----------------------------------------------------------------------------


DELTA_FORMS = ("cluster_mean", "per_point")


def _check_delta_form(delta_form: str) -> None:
  if delta_form not in DELTA_FORMS:
    raise ValueError(f"delta_form must be one of {DELTA_FORMS}, got {delta_form!r}")


def cluster_separation(feats: Array, signatures: dict, valid: Array | None = None,
                       delta_form: str = "cluster_mean") -> Array:
  """δ of one cluster's data against other tasks' clusters.

  Args:
    feats: ``(T', n, d)``: the cluster's points under each other task's backbone, h_i(x).
    signatures: the other tasks' mixture signatures stacked ``(T', K, ...)``.
    valid: ``(T', K)`` bool mask of real components (default: log-weight > −1e29).
    delta_form: ``"cluster_mean"`` (``theories.py``: mean of the n×n matrix
      ``diff Σ⁻¹ diffᵀ`` = maha² of the mean point) or ``"per_point"`` (mean of the points'
      own maha²).

  Returns:
    ``min_{i,s} maha²(mean_x h_i(x); μ_{i,s}, Σ_{i,s}) / d − 1`` (cluster_mean) or
    ``min_{i,s} mean_x maha²(h_i(x); μ_{i,s}, Σ_{i,s}) / d − 1`` (per_point).
  """
  _check_delta_form(delta_form)
  d = feats.shape[-1]

  def per_task(sig, f):
    cov_type = mixture.signature_covariance_type(sig)
    if delta_form == "cluster_mean":
      f = jnp.mean(f, axis=0, keepdims=True)
    return jnp.mean(mixture.mahalanobis_sq(f, sig["means"], sig["prec_chol"], cov_type), axis=0)

  mean_maha = jax.vmap(per_task)(signatures, feats)  # (T', K)
  if valid is None:
    valid = signatures["log_weights"] > 0.1 * mixture.LOG_ZERO
  return jnp.min(jnp.where(valid, mean_maha, jnp.inf)) / d - 1.0


def log_det_ratio(own_log_det: Array, other_log_dets: Array, valid: Array | None = None) -> Array:
  """κ = min over other clusters of ``log det Σ_{i,s} − log det Σ_{t,s0}``.

  Args:
    own_log_det: () log det Σ_{t,s0} of the cluster's own component.
    other_log_dets: (T', K) log det Σ_{i,s} of the other tasks' components.
    valid: (T', K) bool mask of real components, or None for all.

  Returns:
    () κ (Inf when no component is valid).
  """
  diff = other_log_dets - own_log_det
  if valid is not None:
    diff = jnp.where(valid, diff, jnp.inf)
  return jnp.min(diff)


def max_feature_variance(feats: Array) -> Array:
  """σ² = max over tasks and dimensions of the unbiased variance over points, ``feats (T', n, d)``.

  A single point has no variance; the code then takes its largest coordinate, as here.

  Args:
    feats: (T', n, d) a cluster's n points under T' backbones.

  Returns:
    () σ² = max_{i, k} Var_j feats[i, j, k] (ddof 1); for n = 1, max feats.
  """
  if feats.shape[1] == 1:
    return jnp.max(feats)
  return jnp.max(jnp.var(feats, axis=1, ddof=1))


def bound_threshold(d: int, sigma2: float | Array, kappa: float | Array, num_tasks: int,
                    total_components: int, epsilon: float = 0.01) -> Array:
  """The separation δ must exceed for retrieval error ≤ ε (the code's Eq. (28)).

  Args:
    d: feature dimension.
    sigma2: σ² from :func:`max_feature_variance`.
    kappa: κ from :func:`log_det_ratio`.
    num_tasks: m.
    total_components: Σ_i τ_i over all m tasks.
    epsilon: target retrieval error.

  Returns:
    the threshold, a float32 scalar (broadcast over ``sigma2`` / ``kappa``).
  """
  n_term = (num_tasks - 1) * total_components + 1
  log_ne = math.log(n_term / epsilon)
  second = math.log((n_term / epsilon) * (math.sqrt(1.0 + 4.0 * d / log_ne) + 1.0))
  sigma2 = jnp.asarray(sigma2, jnp.float32)
  kappa = jnp.asarray(kappa, jnp.float32)
  big_m = 3.0 * d * sigma2 - kappa
  radicand = jnp.maximum(big_m ** 2 - 24.0 * d * sigma2 * kappa, 0.0)
  first = 0.25 * (big_m + jnp.sqrt(radicand)) - kappa
  return 2.0 * jnp.maximum(first, second) / d


def bound_check(cluster_feats_other: Array, other_signatures: dict, own_log_det: Array, *,
                num_tasks: int, total_components: int, epsilon: float = 0.01,
                valid: Array | None = None, delta_form: str = "cluster_mean") -> dict[str, Array]:
  """All bound quantities of one cluster: ``delta``, ``kappa``, ``sigma2``, ``threshold``, ``pass``.

  Args:
    cluster_feats_other: ``(T', n, d)`` the cluster's points under the other tasks' backbones.
    other_signatures: those tasks' mixture signatures, stacked.
    own_log_det: log det Σ of the cluster's own component.
    num_tasks, total_components, epsilon: see :func:`bound_threshold`.
    valid: ``(T', K)`` mask of real components.
    delta_form: see :func:`cluster_separation`.

  Returns:
    ``{"delta": δ, "kappa": κ, "sigma2": σ², "threshold": τ, "pass": δ > τ}``, () arrays.
  """
  if valid is None:
    valid = other_signatures["log_weights"] > 0.1 * mixture.LOG_ZERO
  delta = cluster_separation(cluster_feats_other, other_signatures, valid, delta_form)
  kappa = log_det_ratio(own_log_det, other_signatures["log_det_cov"], valid)
  sigma2 = max_feature_variance(cluster_feats_other)
  threshold = bound_threshold(cluster_feats_other.shape[-1], sigma2, kappa, num_tasks,
                              total_components, epsilon)
  return {"delta": delta, "kappa": kappa, "sigma2": sigma2, "threshold": threshold,
          "pass": delta > threshold}


def cluster_bounds(feats_other: Array, labels: Array, own_log_dets: Array, other_signatures: dict,
                   *, num_tasks: int, total_components: int, epsilon: float = 0.01,
                   valid: Array | None = None, delta_form: str = "cluster_mean"
                   ) -> dict[str, Array]:
  """:func:`bound_check` for every cluster of one task at once (masked, one compile).

  Args:
    feats_other: ``(T', n, d)`` the task's sample under each other task's backbone.
    labels: ``(n,)`` cluster of each sample point (its own signature's components).
    own_log_dets: ``(K,)`` log det Σ of the task's own components (K clusters).
    other_signatures: the other tasks' mixture signatures, stacked ``(T', K', ...)``.
    num_tasks, total_components, epsilon: see :func:`bound_threshold`.
    valid: ``(T', K')`` mask of real components of the other tasks.
    delta_form: ``"cluster_mean"`` (``delta``, the code's) or ``"per_point"``; both forms are
      returned as ``delta_cluster_mean`` and ``delta_per_point``, ``delta``/``pass`` follow
      ``delta_form``.

  Returns:
    Per cluster ``(K,)``: ``count``, ``delta``, ``delta_cluster_mean``, ``delta_per_point``,
    ``kappa``, ``sigma2``, ``threshold``, ``pass`` (clusters with fewer than 2 points have
    ``pass`` False and NaN entries).
  """
  _check_delta_form(delta_form)
  k = own_log_dets.shape[0]
  d = feats_other.shape[-1]
  if valid is None:
    valid = other_signatures["log_weights"] > 0.1 * mixture.LOG_ZERO
  masks = jax.nn.one_hot(labels, k, dtype=feats_other.dtype).T          # (K, n)
  counts = jnp.sum(masks, axis=1)                                         # (K,)

  def maha(sig, f):
    cov_type = mixture.signature_covariance_type(sig)
    return mixture.mahalanobis_sq(f, sig["means"], sig["prec_chol"], cov_type)  # (n, K')

  m = jax.vmap(maha)(other_signatures, feats_other)                      # (T', n, K')
  mean_m = jnp.einsum("cn,tnk->ctk", masks, m) / jnp.maximum(counts, 1.0)[:, None, None]
  mean_f = jnp.einsum("cn,tnd->ctd", masks, feats_other) / jnp.maximum(counts, 1.0)[:, None, None]
  # maha² of each cluster's mean point under each other component: (K, T', K')
  m_of_mean = jnp.swapaxes(jax.vmap(maha)(other_signatures, jnp.swapaxes(mean_f, 0, 1)), 0, 1)

  def min_over_others(v):
    return jnp.min(jnp.where(valid[None], v, jnp.inf), axis=(1, 2)) / d - 1.0

  delta_pp, delta_cm = min_over_others(mean_m), min_over_others(m_of_mean)
  delta = delta_cm if delta_form == "cluster_mean" else delta_pp
  diff = other_signatures["log_det_cov"][None] - own_log_dets[:, None, None]
  kappa = jnp.min(jnp.where(valid[None], diff, jnp.inf), axis=(1, 2))
  sq = jnp.einsum("cn,tnd->ctd", masks, feats_other ** 2)
  var = jnp.maximum(sq - counts[:, None, None] * mean_f ** 2, 0.0) \
      / jnp.maximum(counts - 1.0, 1.0)[:, None, None]
  sigma2 = jnp.max(var, axis=(1, 2))
  threshold = jax.vmap(lambda s2, kp: bound_threshold(d, s2, kp, num_tasks, total_components,
                                                      epsilon))(sigma2, kappa)
  ok = counts >= 2
  nan = jnp.full_like(delta, jnp.nan)
  return {"count": counts, "delta": jnp.where(ok, delta, nan),
          "delta_cluster_mean": jnp.where(ok, delta_cm, nan),
          "delta_per_point": jnp.where(ok, delta_pp, nan), "kappa": jnp.where(ok, kappa, nan),
          "sigma2": jnp.where(ok, sigma2, nan), "threshold": jnp.where(ok, threshold, nan),
          "pass": jnp.logical_and(ok, delta > threshold)}


__all__ = ["DELTA_FORMS", "bound_check", "cluster_bounds", "bound_threshold", "candidate_recall", "cluster_separation",
           "forward_passes", "log_det_ratio", "max_feature_variance", "rerank", "retrieval_accuracy",
           "retrieve", "score", "score_shared", "score_tasks", "signature_kind", "top_candidates"]
