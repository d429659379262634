"""clx.ops.pca: streaming second moments and PCA, against NumPy float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import pca


def _numpy_pca(x, k):
  mu = x.mean(0)
  cov = (x - mu).T @ (x - mu) / len(x)
  evals, evecs = np.linalg.eigh(cov)
  return mu, cov, evals[::-1][:k], evecs[:, ::-1][:, :k]


def _assert_same_directions(u, v, atol):
  # Up to sign: |uᵢ·vᵢ| = 1 for well-separated eigenvalues.
  np.testing.assert_allclose(np.abs(np.sum(np.asarray(u) * np.asarray(v), 0)), 1.0, atol=atol)


def test_pca_matches_numpy_float64(x64):
  rng = np.random.default_rng(0)
  d, k = 12, 5
  scales = np.linspace(3.0, 0.2, d)  # distinct eigenvalues
  x = rng.normal(size=(500, d)) * scales @ np.linalg.qr(rng.normal(size=(d, d)))[0] + 4.0
  mu, cov, evals, evecs = _numpy_pca(x, k)
  moments = pca.init_moments(d, dtype=jnp.float64)
  for chunk in np.array_split(x, 7):  # batch by batch, as over a data set
    moments = jax.jit(pca.accumulate)(moments, jnp.asarray(chunk))
  got = pca.pca_from_moments(moments, k)
  assert got["components"].dtype == jnp.float64
  np.testing.assert_allclose(got["mean"], mu, rtol=1e-12)
  np.testing.assert_allclose(got["eigenvalues"], evals, rtol=1e-10)
  np.testing.assert_allclose(got["total_variance"], np.trace(cov), rtol=1e-12)
  _assert_same_directions(got["components"], evecs, 1e-9)
  u = np.asarray(got["components"])
  np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-12)
  mean, c = pca.mean_covariance(moments)
  np.testing.assert_allclose(c, cov, atol=1e-12)
  _, c1 = pca.mean_covariance(moments, ddof=1)
  np.testing.assert_allclose(c1, np.cov(x.T), atol=1e-12)


def test_float32_shifted_accumulation_is_accurate_with_large_offset():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4000, 6)) * np.array([2.0, 1.0, 0.5, 0.3, 0.2, 0.1]) + 1000.0
  _, cov, evals, evecs = _numpy_pca(x, 3)
  got = pca.pca(jnp.asarray(x, jnp.float32), 3)  # shift = first row by default
  np.testing.assert_allclose(got["eigenvalues"], evals, rtol=2e-3)
  _assert_same_directions(got["components"], evecs, 1e-3)
  raw = pca.pca(jnp.asarray(x, jnp.float32), 3, shift=jnp.zeros(6))  # Σxxᵀ/N − μμᵀ
  assert np.max(np.abs(np.asarray(raw["eigenvalues"]) - evals)) > np.max(
      np.abs(np.asarray(got["eigenvalues"]) - evals))


def test_weights_mask_rows_and_merge_and_signs():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 10, 4)).astype(np.float32)
  mask = rng.random((3, 10)) < 0.6
  masked = pca.pca(x, 2, weights=mask, shift=jnp.zeros(4))
  direct = pca.pca(x[mask], 2, shift=jnp.zeros(4))
  for key in ("mean", "components", "eigenvalues"):
    np.testing.assert_allclose(masked[key], direct[key], rtol=1e-4, atol=1e-5)
  a = pca.accumulate(pca.init_moments(4), x[0])
  b = pca.accumulate(pca.init_moments(4), x[1:])
  both = pca.accumulate(pca.init_moments(4), x)
  for key in both:
    np.testing.assert_allclose(pca.merge_moments(a, b)[key], both[key], rtol=1e-5, atol=1e-5)
  u = np.asarray(direct["components"])
  assert np.all(u[np.argmax(np.abs(u), 0), np.arange(2)] > 0)  # deterministic signs
  with pytest.raises(ValueError, match="different shifts"):
    pca.merge_moments(a, pca.init_moments(4, shift=jnp.ones(4)))


def test_project_reconstruct_residual():
  rng = np.random.default_rng(3)
  basis = np.linalg.qr(rng.normal(size=(8, 3)))[0].astype(np.float32)
  mean = rng.normal(size=8).astype(np.float32)
  coords = rng.normal(size=(5, 3)).astype(np.float32)
  rows = pca.reconstruct(coords, mean, basis)
  np.testing.assert_allclose(pca.project(rows, mean, basis), coords, atol=1e-5)
  np.testing.assert_allclose(pca.residual_fraction(rows, mean, basis), 0.0, atol=1e-5)
  off = mean + np.linalg.qr(np.concatenate([basis, rng.normal(size=(8, 1))], 1))[0][:, 3]
  np.testing.assert_allclose(pca.residual_fraction(off[None], mean, basis), 1.0, atol=1e-5)


def test_errors_are_named():
  m = pca.init_moments(4)
  with pytest.raises(ValueError, match="k must be an int"):
    pca.pca_from_moments(m, 5)
  with pytest.raises(ValueError, match="dimension 3"):
    pca.accumulate(m, jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="weights must have shape"):
    pca.accumulate(m, jnp.zeros((2, 4)), jnp.ones((3,)))
  with pytest.raises(ValueError, match="moments must be a dict"):
    pca.pca_from_moments({"sum": jnp.zeros(4)}, 1)
  empty = pca.pca_from_moments(m, 2)  # no rows: zeros, no NaN
  assert np.all(np.isfinite(np.asarray(empty["components"])))
  np.testing.assert_array_equal(empty["eigenvalues"], 0.0)
