"""clx.ops.mixture against sklearn (reference only), SciPy and NumPy in float64."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture

from clx.ops import mixture


def blobs(seed=0, n=60, d=4, k=3, spread=5.0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(k, d)) * spread
  return np.concatenate([rng.normal(size=(n, d)) * (0.5 + i) + centers[i] for i in range(k)])


def sklearn_bgm(x, resp, **kwargs):
  """sklearn's BayesianGaussianMixture started from the given responsibilities."""

  class FromResp(BayesianGaussianMixture):
    def _initialize_parameters(self, X, random_state, xp=None):
      self._initialize(X, resp)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    return FromResp(n_components=resp.shape[1], **kwargs).fit(x)


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_dpgmm_matches_sklearn_update_by_update(x64, cov):
  x = blobs()
  resp = np.eye(6)[np.random.default_rng(1).integers(0, 6, len(x))]
  # a few updates without convergence, then to convergence (same compiled loop)
  for max_iter, tol in [(5, 0.0), (300, 1e-3)]:
    _compare_with_sklearn(x, resp, cov, max_iter, tol)


def _compare_with_sklearn(x, resp, cov, max_iter, tol):
  ref = sklearn_bgm(x, resp, covariance_type=cov, weight_concentration_prior=0.01,
                    max_iter=max_iter, tol=tol)
  ours = mixture.fit_dpgmm(x, covariance_type=cov, weight_concentration_prior=0.01,
                           max_iter=max_iter, tol=tol, init_resp=resp)
  assert int(ours["n_iter"]) == ref.n_iter_
  assert bool(ours["converged"]) == ref.converged_
  np.testing.assert_allclose(ours["weights"], ref.weights_, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(ours["means"], ref.means_, rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(ours["covariances"], ref.covariances_, rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(ours["prec_chol"], ref.precisions_cholesky_, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(ours["dof"], ref.degrees_of_freedom_, rtol=1e-12)
  np.testing.assert_allclose(ours["mean_precision"], ref.mean_precision_, rtol=1e-12)
  np.testing.assert_allclose(ours["alpha"], ref.weight_concentration_[0], rtol=1e-12)
  np.testing.assert_allclose(ours["beta"], ref.weight_concentration_[1], rtol=1e-12)
  np.testing.assert_allclose(float(ours["lower_bound"]), ref.lower_bound_, rtol=1e-10)
  xq = x[::7] + 0.3
  np.testing.assert_allclose(mixture.dpgmm_score_samples(ours, jnp.asarray(xq), cov),
                             ref.score_samples(xq), rtol=1e-9)
  np.testing.assert_array_equal(mixture.dpgmm_predict(ours, jnp.asarray(xq), cov), ref.predict(xq))


def test_dpgmm_prunes_to_the_true_number_of_clusters():
  x = blobs(seed=3, n=80, spread=8.0)
  fit = mixture.fit_dpgmm(x.astype(np.float32), n_components=10, covariance_type="diag",
                          weight_concentration_prior=0.01, key=jax.random.PRNGKey(0))
  assert int(np.sum(np.asarray(fit["weights"]) > 0.02)) == 3
  sig = mixture.to_signature(fit, "diag", min_weight=0.02)
  assert sig["means"].shape[0] == 3
  np.testing.assert_allclose(np.exp(sig["log_weights"]).sum(), 1.0, rtol=1e-5)


def test_float32_default_priors_match_sklearn_defaults(x64):
  x = blobs(seed=2)
  pri = mixture.default_priors(jnp.asarray(x), 7, "full")
  np.testing.assert_allclose(pri["covariance"], np.cov(x.T), rtol=1e-12)
  np.testing.assert_allclose(pri["mean"], x.mean(0), rtol=1e-12)
  assert float(pri["weight_concentration"]) == pytest.approx(1 / 7)
  assert float(pri["dof"]) == x.shape[1]
  np.testing.assert_allclose(mixture.default_priors(jnp.asarray(x), 7, "diag")["covariance"],
                             x.var(0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_plugin_log_likelihood_matches_scipy(x64, cov):
  rng = np.random.default_rng(4)
  k, d = 3, 5
  w = rng.dirichlet(np.ones(k))
  means = rng.normal(size=(k, d)) * 3
  if cov == "full":
    a = rng.normal(size=(k, d, d))
    covs = a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(d)
    dense = covs + 1e-4 * np.eye(d)
  else:
    covs = rng.uniform(0.3, 2.0, size=(k, d))
    dense = np.stack([np.diag(c + 1e-4) for c in covs])
  sig = mixture.signature_from_moments(w, means, covs, cov, jitter=1e-4)
  x = rng.normal(size=(11, d)) * 3
  comp = np.stack([scipy.stats.multivariate_normal(means[j], dense[j]).logpdf(x)
                   for j in range(k)], 1) + np.log(w)
  np.testing.assert_allclose(mixture.component_log_prob(sig, jnp.asarray(x)), comp, rtol=1e-10)
  np.testing.assert_allclose(mixture.signature_log_prob(sig, jnp.asarray(x)),
                             scipy.special.logsumexp(comp, axis=1), rtol=1e-10)
  np.testing.assert_allclose(sig["log_det_cov"], np.linalg.slogdet(dense)[1], rtol=1e-10)
  maha = np.stack([np.einsum("nd,de,ne->n", x - means[j], np.linalg.inv(dense[j]), x - means[j])
                   for j in range(k)], 1)
  np.testing.assert_allclose(
      mixture.mahalanobis_sq(jnp.asarray(x), sig["means"], sig["prec_chol"], cov), maha,
      rtol=1e-8)
  # Padding adds inert components; stacking keeps each task's density.
  padded = mixture.pad_signature(sig, 6)
  np.testing.assert_allclose(mixture.signature_log_prob(padded, jnp.asarray(x)),
                             mixture.signature_log_prob(sig, jnp.asarray(x)), rtol=1e-12)
  other = mixture.signature_from_moments(w[:1] / w[0], means[:1], covs[:1], cov)
  stacked = mixture.stack_signatures([sig, other])
  assert stacked["means"].shape == (2, k, d)
  np.testing.assert_allclose(
      mixture.signature_log_prob(jax.tree.map(lambda a: a[1], stacked), jnp.asarray(x)),
      mixture.signature_log_prob(other, jnp.asarray(x)), rtol=1e-12)


def test_lloyd_matches_sklearn_from_the_same_init(x64):
  x = blobs(seed=5, k=4, spread=2.0)
  init = x[[0, 1, 2, 3]]
  ref = KMeans(4, init=init, n_init=1, algorithm="lloyd", tol=1e-4, max_iter=300).fit(x)
  centers, labels, inertia = mixture.kmeans(x, 4, init=init)
  np.testing.assert_allclose(centers, ref.cluster_centers_, rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(labels, ref.labels_)
  np.testing.assert_allclose(float(inertia), ref.inertia_, rtol=1e-9)


def test_kmeans_plusplus_finds_separated_clusters_and_centroid_scores():
  x = blobs(seed=6, spread=20.0).astype(np.float32)
  centers, labels, _ = mixture.kmeans(x, 3, key=jax.random.PRNGKey(3))
  truth = np.repeat(np.arange(3), 60)
  # every true cluster maps to exactly one k-means label
  assert all(len(np.unique(np.asarray(labels)[truth == c])) == 1 for c in range(3))
  assert len(np.unique(np.asarray(labels))) == 3
  q = x[::9]
  for metric, dist in [("l1", lambda a, c: np.abs(a[:, None] - c[None]).sum(-1)),
                       ("l2", lambda a, c: np.sqrt(((a[:, None] - c[None]) ** 2).sum(-1)))]:
    ref = -dist(q, np.asarray(centers)).min(1)
    np.testing.assert_allclose(mixture.nearest_centroid_score(centers, jnp.asarray(q), metric),
                               ref, rtol=1e-4, atol=1e-3)
  sig = mixture.pad_centroids({"centers": centers}, 5)
  np.testing.assert_allclose(
      mixture.nearest_centroid_score(sig["centers"], jnp.asarray(q), "l1", sig["valid"]),
      mixture.nearest_centroid_score(centers, jnp.asarray(q), "l1"), rtol=1e-6)


def test_bad_arguments():
  with pytest.raises(ValueError, match="covariance_type"):
    mixture.fit_dpgmm(np.zeros((5, 2)), covariance_type="tied")
  with pytest.raises(ValueError, match="k must be"):
    mixture.kmeans(np.zeros((3, 2)), 4)
  with pytest.raises(ValueError, match="cannot pad"):
    mixture.pad_signature(mixture.signature_from_moments(np.ones(2) / 2, np.zeros((2, 2)),
                                                         np.ones((2, 2)), "diag"), 1)
