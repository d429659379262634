"""clx.ops.retrieval (scoring, the bound, screening) and clx.ops.ridge (RanPAC head)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import mixture, retrieval, ridge


# ----------------------------------------------------------------------------
# Synthetic tasks: each a 2-component Gaussian mixture, identity "backbone".
# ----------------------------------------------------------------------------

D, T, S, N = 8, 4, 2, 150


def synthetic_tasks(sep: float, seed: int = 0):
  """Cluster means at distance ~``sep`` from each other, unit covariances.

  The same directions and noise are used for every ``sep``, so only the separation
  changes between calls.
  """
  rng = np.random.default_rng(seed)
  dirs = rng.normal(size=(T * S, D))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  means = sep * dirs / math.sqrt(2.0) * 1.0
  noise = rng.normal(size=(T, S, N, D))
  x = means.reshape(T, S, 1, D) + noise                  # (T, S, N, D)
  sigs = [mixture.signature_from_moments(np.full(S, 1.0 / S), means.reshape(T, S, D)[t],
                                         np.ones((S, D)), "diag") for t in range(T)]
  return x, means.reshape(T, S, D), sigs


def retrieval_acc_and_bound(sep: float):
  x, _, sigs = synthetic_tasks(sep)
  stacked = mixture.stack_signatures(sigs)
  test = x.reshape(T, S * N, D)
  correct = 0
  for t in range(T):
    feats = jnp.broadcast_to(jnp.asarray(test[t], jnp.float32), (T, S * N, D))  # h_i = identity
    pred = retrieval.retrieve(retrieval.score_tasks(stacked, feats))
    correct += int(np.sum(np.asarray(pred) == t))
  deltas, passes = [], []
  for t in range(T):
    others = [i for i in range(T) if i != t]
    other_sigs = mixture.stack_signatures([sigs[i] for i in others])
    for s in range(S):
      feats = jnp.broadcast_to(jnp.asarray(x[t, s], jnp.float32), (T - 1, N, D))
      res = retrieval.bound_check(feats, other_sigs, sigs[t]["log_det_cov"][s], num_tasks=T,
                                  total_components=T * S)
      deltas.append(float(res["delta"]))
      passes.append(bool(res["pass"]))
  return 100.0 * correct / (T * S * N), min(deltas), all(passes)


def test_retrieval_is_perfect_when_separated_and_degrades_with_delta_as_the_bound_says():
  seps = [16.0, 8.0, 4.0, 2.0, 1.0, 0.5]
  rows = [retrieval_acc_and_bound(s) for s in seps]
  accs = [r[0] for r in rows]
  deltas = [r[1] for r in rows]
  assert accs[0] == 100.0 and rows[0][2]          # well separated: bound holds, no error
  assert all(np.diff(deltas) < 0)                 # δ shrinks with the separation
  assert all(np.diff(accs) <= 0.5)                # accuracy degrades (up to sampling noise)
  assert accs[-1] < 80.0 and not rows[-1][2]      # close clusters: bound fails, errors
  for acc, _, ok in rows:                         # where δ > threshold, error ≤ ε = 1 %
    if ok:
      assert acc >= 99.0


def _random_full_signatures(rng, t, k, d, scale=1.0):
  """``t`` stacked full-covariance signatures of ``k`` components, and their (t, k, d, d) Σ."""
  means = rng.normal(size=(t, k, d)) * 2
  root = rng.normal(size=(t, k, d, d))
  covs = scale * (root @ np.swapaxes(root, -1, -2) / d + 0.3 * np.eye(d))
  sigs = mixture.stack_signatures([mixture.signature_from_moments(np.ones(k) / k, means[i],
                                                                  covs[i], "full")
                                   for i in range(t)])
  return sigs, means, covs


def _delta_theories_reference(feats, means, covs):
  """theories.py's δ in float64 NumPy: for each other task's component, ``diff = x − μ`` as an
  (n, d) block, the mean of the n×n matrix ``diff Σ⁻¹ diffᵀ``, over d, minus 1; the min."""
  d = feats.shape[-1]
  vals = []
  for i in range(feats.shape[0]):
    for s in range(means.shape[1]):
      diff = feats[i] - means[i, s]
      vals.append(np.mean(diff @ np.linalg.inv(covs[i, s]) @ diff.T) / d - 1)
  return min(vals)


def _delta_per_point_reference(feats, means, covs):
  d = feats.shape[-1]
  vals = []
  for i in range(feats.shape[0]):
    for s in range(means.shape[1]):
      diff = feats[i] - means[i, s]
      vals.append(np.mean(np.einsum("nd,de,ne->n", diff, np.linalg.inv(covs[i, s]), diff)) / d - 1)
  return min(vals)


def test_delta_forms_match_float64_references(x64):
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(2, 30, 5))
  sigs, means, covs = _random_full_signatures(rng, 2, 3, 5)
  f = jnp.asarray(feats)
  code = _delta_theories_reference(feats, means, covs)
  per_point = _delta_per_point_reference(feats, means, covs)
  np.testing.assert_allclose(float(retrieval.cluster_separation(f, sigs)), code, rtol=1e-9)
  np.testing.assert_allclose(float(retrieval.cluster_separation(f, sigs, delta_form="per_point")),
                             per_point, rtol=1e-9)
  # the two forms differ by tr(Σ⁻¹ S)/d > 0 (S the points' biased covariance)
  assert per_point > code + 0.1
  with pytest.raises(ValueError, match="delta_form"):
    retrieval.cluster_separation(f, sigs, delta_form="mean")
  # diagonal signatures, the same two references
  dcov = rng.uniform(0.5, 2.0, size=(2, 2, 5))
  dmeans = rng.normal(size=(2, 2, 5)) * 2
  dsigs = mixture.stack_signatures([mixture.signature_from_moments(np.ones(2) / 2, dmeans[i],
                                                                   dcov[i], "diag")
                                    for i in range(2)])
  full = np.einsum("tkd,de->tkde", dcov, np.eye(5))
  np.testing.assert_allclose(float(retrieval.cluster_separation(f, dsigs)),
                             _delta_theories_reference(feats, dmeans, full), rtol=1e-9)
  np.testing.assert_allclose(float(retrieval.cluster_separation(f, dsigs, delta_form="per_point")),
                             _delta_per_point_reference(feats, dmeans, full), rtol=1e-9)
  # κ: smallest log-det difference to the other clusters; σ²: largest unbiased variance
  np.testing.assert_allclose(float(retrieval.log_det_ratio(0.3, dsigs["log_det_cov"])),
                             np.log(dcov).sum(-1).min() - 0.3, rtol=1e-9)
  np.testing.assert_allclose(float(retrieval.max_feature_variance(f)),
                             feats.var(1, ddof=1).max(), rtol=1e-9)


def test_delta_forms_disagree_against_a_tight_component(x64):
  """Points spread around a component 20x tighter than they are: the per-point δ is large
  (each point is far in the tight metric), the code's cluster-mean δ is ≈ −1 (their mean sits
  on the component's mean). This is the overfit regime of full covariances with n < d."""
  rng = np.random.default_rng(2)
  d, n = 6, 400
  mu = rng.normal(size=d)
  pts = mu + rng.normal(size=(n, d))
  sig = mixture.stack_signatures([mixture.signature_from_moments(
      np.ones(1), mu[None], (np.eye(d) / 20.0)[None], "full")])
  f = jnp.asarray(pts[None])
  cm = float(retrieval.cluster_separation(f, sig))
  pp = float(retrieval.cluster_separation(f, sig, delta_form="per_point"))
  np.testing.assert_allclose(cm, _delta_theories_reference(pts[None], mu[None, None],
                                                           (np.eye(d) / 20)[None, None]), rtol=1e-9)
  assert cm < -0.5 and pp > 15.0, (cm, pp)


@pytest.mark.parametrize("delta_form", ["cluster_mean", "per_point"])
def test_cluster_bounds_equal_bound_check_per_cluster(delta_form):
  x, _, sigs = synthetic_tasks(6.0, seed=3)
  t = 1
  others = [i for i in range(T) if i != t]
  other_sigs = mixture.stack_signatures([sigs[i] for i in others])
  pts = x[t].reshape(S * N, D)
  labels = np.repeat(np.arange(S), N)
  labels[:3] = 1                              # a few points in the other cluster
  feats = jnp.broadcast_to(jnp.asarray(pts, jnp.float32), (T - 1, S * N, D))
  allc = retrieval.cluster_bounds(feats, jnp.asarray(labels), sigs[t]["log_det_cov"], other_sigs,
                                  num_tasks=T, total_components=T * S, delta_form=delta_form)
  for c in range(S):
    one = retrieval.bound_check(feats[:, labels == c], other_sigs, sigs[t]["log_det_cov"][c],
                                num_tasks=T, total_components=T * S, delta_form=delta_form)
    for k in ("delta", "kappa", "sigma2", "threshold"):
      np.testing.assert_allclose(allc[k][c], one[k], rtol=2e-4, err_msg=k)
    assert bool(allc["pass"][c]) == bool(one["pass"])
    # both forms are always reported
    for form in retrieval.DELTA_FORMS:
      other = retrieval.cluster_separation(feats[:, labels == c], other_sigs, delta_form=form)
      np.testing.assert_allclose(allc[f"delta_{form}"][c], other, rtol=2e-4, err_msg=form)
  assert list(np.asarray(allc["count"])) == [N - 3, N + 3]


@pytest.mark.parametrize("sigma2,kappa", [(0.5, 0.0), (2.0, -3.0), (0.01, 4.0)])
def test_bound_threshold_is_the_codes_eq_28(sigma2, kappa):
  d, m, taus, eps = 768, 10, [100] * 10, 0.01
  n = (m - 1) * sum(taus) + 1
  sec = math.log((n / eps) * (math.sqrt(1 + 4 * d / math.log(n / eps)) + 1))
  big_m = 3 * d * sigma2 - kappa
  first = 0.25 * (big_m + math.sqrt(max(big_m ** 2 - 24 * d * sigma2 * kappa, 0.0))) - kappa
  ref = max(first, sec) * 2 / d
  np.testing.assert_allclose(float(retrieval.bound_threshold(d, sigma2, kappa, m, sum(taus), eps)),
                             ref, rtol=1e-5)


def test_screening_candidates_rerank_and_cost():
  scores = jnp.asarray([[0.1, 0.9, 0.5, 0.3], [2.0, -1.0, 1.5, 0.0]])
  cands = retrieval.top_candidates(scores, 2)
  np.testing.assert_array_equal(cands, [[1, 2], [0, 2]])
  np.testing.assert_allclose(float(retrieval.candidate_recall(cands, jnp.asarray([2, 3]))), 0.5)
  # second stage prefers the second candidate of row 0
  np.testing.assert_array_equal(retrieval.rerank(cands, jnp.asarray([[0.0, 1.0], [3.0, 1.0]])),
                                [2, 0])
  # with m = T the screen keeps every task, so re-ranking equals exhaustive retrieval
  full = retrieval.top_candidates(scores, 4)
  np.testing.assert_array_equal(
      retrieval.rerank(full, jnp.take_along_axis(scores, full, 1)), retrieval.retrieve(scores))
  assert retrieval.forward_passes(50) == 50 and retrieval.forward_passes(50, 3) == 4
  with pytest.raises(ValueError, match="m must be"):
    retrieval.top_candidates(scores, 5)


def test_centroid_signatures_score_and_retrieve():
  x, means, _ = synthetic_tasks(40.0, seed=2)
  sigs = mixture.stack_signatures([{"centers": jnp.asarray(means[t], jnp.float32)}
                                   for t in range(T)])
  feats = jnp.asarray(x[1].reshape(-1, D), jnp.float32)
  pred = retrieval.retrieve(retrieval.score_shared(sigs, feats, metric="l2"))
  assert float(retrieval.retrieval_accuracy(pred, jnp.ones_like(pred))) == 1.0


# ----------------------------------------------------------------------------
# RanPAC head
# ----------------------------------------------------------------------------


def code_ridge(features, y, ridges):
  """The code's optimise_ridge_parameter in NumPy (first 80 % fit, last 20 % MSE)."""
  n_fit = int(features.shape[0] * 0.8)
  q = features[:n_fit].T @ y[:n_fit]
  g = features[:n_fit].T @ features[:n_fit]
  losses = []
  for lam in ridges:
    wo = np.linalg.solve(g + lam * np.eye(g.shape[0]), q).T
    losses.append(np.mean((features[n_fit:] @ wo.T - y[n_fit:]) ** 2))
  return ridges[int(np.argmin(losses))], np.array(losses)


def test_select_ridge_and_solve_match_the_code(x64):
  rng = np.random.default_rng(3)
  w_rand = ridge.random_projection(jax.random.PRNGKey(0), 6, 40, jnp.float64)
  assert w_rand.shape == (6, 40)
  f = rng.normal(size=(50, 6))
  labels = (f[:, 0] + 0.3 * rng.normal(size=50) > 0).astype(int) + 2 * (f[:, 1] > 0)
  h = np.asarray(ridge.project(jnp.asarray(f), w_rand))
  np.testing.assert_allclose(h, np.maximum(f @ np.asarray(w_rand), 0), rtol=1e-12)
  y = np.eye(4)[labels]
  grid = 10.0 ** np.arange(-8, 9)
  lam, losses = ridge.select_ridge(h, y, grid=tuple(grid))
  ref_lam, ref_losses = code_ridge(h, y, grid)
  assert lam == ref_lam
  # the near-singular end of the grid (λ ≤ 1e-4) is ill-conditioned; compare the rest
  np.testing.assert_allclose(np.asarray(losses)[grid >= 1e-3], ref_losses[grid >= 1e-3], rtol=1e-6)
  stats = ridge.init_statistics(40, 4, jnp.float64)
  stats = ridge.accumulate(stats, jnp.asarray(h[:20]), jnp.asarray(y[:20]))
  stats = ridge.accumulate(stats, jnp.asarray(h[20:]), jnp.asarray(y[20:]),
                           mask=jnp.asarray(np.r_[np.ones(25), np.zeros(5)]))
  keep = np.r_[np.ones(45, bool), np.zeros(5, bool)]
  np.testing.assert_allclose(stats["gram"], h[keep].T @ h[keep], rtol=1e-12)
  np.testing.assert_allclose(stats["xty"], h[keep].T @ y[keep], rtol=1e-12)
  assert int(stats["count"]) == 45
  wo = ridge.solve(stats["gram"], stats["xty"], lam)
  np.testing.assert_allclose(wo, np.linalg.solve(stats["gram"] + lam * np.eye(40), stats["xty"]),
                             rtol=1e-8)
  np.testing.assert_allclose(ridge.logits(jnp.asarray(f), w_rand, wo), h @ np.asarray(wo),
                             rtol=1e-10)
  with pytest.raises(ValueError, match="fit_fraction"):
    ridge.select_ridge(h[:1], y[:1])
