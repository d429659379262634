"""Adam-NSCL's covariance, null-space projector and update projection vs float64 references."""

import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import null_space


def official_transform(cov, thres):
  """float64 transcription of ``adam_svd.Adam.get_eigens`` + ``get_transforms``."""
  u, s, _ = np.linalg.svd(cov)  # torch.svd(fea_in, some=False): descending singular values
  ind = s <= s[-1] * thres
  basis = u[:, ind]
  transform = basis @ basis.T
  return transform / np.linalg.norm(transform), int(ind.sum())


def test_covariance_terms_match_numpy():
  rng = np.random.default_rng(0)
  dense = rng.standard_normal((7, 5))
  np.testing.assert_allclose(null_space.batch_mean_covariance(jnp.asarray(dense, jnp.float32)),
                             np.outer(dense.mean(0), dense.mean(0)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(null_space.sample_covariance(jnp.asarray(dense, jnp.float32)),
                             dense.T @ dense, rtol=1e-5, atol=1e-5)
  # Conv patches (B, P, D): the patches of the batch-mean image (F.unfold is linear).
  patches = rng.standard_normal((4, 9, 6))
  m = patches.mean(0)
  np.testing.assert_allclose(null_space.batch_mean_covariance(jnp.asarray(patches, jnp.float32)),
                             m.T @ m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("thres", [10.0, 30.0, 1.0])
def test_projector_matches_the_official_transform(thres):
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
  eig = np.array([40.0, 20.0, 9.0, 4.0, 2.5, 0.9, 0.4, 0.2])  # no value at a threshold edge
  cov = (q * eig) @ q.T
  ref, k = official_transform(cov, thres)
  got, got_k = null_space.null_space_projector(jnp.asarray(cov, jnp.float32), thres)
  assert int(got_k) == k == int(np.sum(eig <= eig.min() * thres))
  np.testing.assert_allclose(got, ref, atol=5e-5)  # float32 eigenvectors (gap 0.2 of 40)


def test_update_projection_is_the_official_right_multiplication():
  rng = np.random.default_rng(2)
  p, _ = official_transform(np.cov(rng.standard_normal((6, 30))), 10.0)
  update = rng.standard_normal((6, 4))   # Flax kernel (in, out); torch weight is its transpose
  got = null_space.project_update(jnp.asarray(update, jnp.float32), jnp.asarray(p, jnp.float32))
  np.testing.assert_allclose(got, (update.T @ p).T, rtol=1e-5, atol=1e-6)
  # A conv kernel (kh, kw, C, out) is projected on its flattened (kh·kw·C) input rows.
  conv = rng.standard_normal((1, 2, 3, 5))
  got = null_space.project_update(jnp.asarray(conv, jnp.float32), jnp.asarray(p, jnp.float32))
  np.testing.assert_allclose(got, (p @ conv.reshape(6, 5)).reshape(conv.shape), rtol=1e-5,
                             atol=1e-6)


def test_projected_update_stays_out_of_the_old_input_span():
  """Old inputs in a 3-D subspace of R^10 (+ small noise): x P Δ ≈ 0 for every old x."""
  rng = np.random.default_rng(3)
  span = np.linalg.qr(rng.standard_normal((10, 3)))[0]
  old = rng.standard_normal((200, 3)) * [5.0, 3.0, 2.0] @ span.T + 1e-2 * rng.standard_normal(
      (200, 10))
  cov = null_space.sample_covariance(jnp.asarray(old, jnp.float32))
  p, k = null_space.null_space_projector(cov, 10.0)
  assert int(k) == 7
  delta = rng.standard_normal((10, 4))
  projected = np.asarray(null_space.project_update(jnp.asarray(delta, jnp.float32), p))
  moved = np.linalg.norm(old @ projected) / np.linalg.norm(old @ delta)
  assert moved < 5e-3, moved
  # The projection keeps the complement: a new input orthogonal to the span still moves.
  new = rng.standard_normal((50, 10))
  new -= new @ span @ span.T
  assert np.linalg.norm(new @ projected) > 0.1 * np.linalg.norm(new @ delta) / np.sqrt(7)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="threshold"):
    null_space.null_space_projector(np.eye(3), 0.5)
  with pytest.raises(ValueError, match="square"):
    null_space.null_space_projector(np.zeros((3, 4)), 10.0)
  with pytest.raises(ValueError, match="NaN"):
    null_space.null_space_projector(np.full((2, 2), np.nan), 10.0)
  with pytest.raises(ValueError, match=r"projector must be \(6, 6\)"):
    null_space.project_update(np.zeros((2, 3, 4)), np.eye(3))
