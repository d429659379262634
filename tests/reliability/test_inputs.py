"""Library inputs: bad inputs raise clear errors, no silently wrong values (issue 16, item 12).

References are independent float64 NumPy computations on fresh random inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import merging, metrics, subspace


def _orthonormal(rng, d, k):
  q, _ = np.linalg.qr(rng.normal(size=(d, k)))
  return q


# ---------------------------------------------------------------- subspace


@pytest.mark.parametrize("op", ["project_out", "project_onto"])
def test_projection_rejects_non_orthonormal_basis(op):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 12)).astype(np.float32)
  basis = rng.normal(size=(12, 3)).astype(np.float32)  # not orthonormal
  with pytest.raises(ValueError, match="orthonormal"):
    getattr(subspace, op)(x, basis)
  scaled = 1.01 * _orthonormal(rng, 12, 3).astype(np.float32)  # 2 % off: still wrong
  with pytest.raises(ValueError, match="orthonormal"):
    getattr(subspace, op)(x, scaled)


def test_projection_accepts_orthonormal_and_padded_bases():
  rng = np.random.default_rng(1)
  d, k = 40, 6
  x = rng.normal(size=(7, d)).astype(np.float32)
  m = _orthonormal(rng, d, k)
  padded = np.concatenate([m, np.zeros((d, 3))], axis=1).astype(np.float32)
  expected = x.astype(np.float64) - x.astype(np.float64) @ m @ m.T
  np.testing.assert_allclose(subspace.project_out(x, padded), expected, atol=1e-5)
  np.testing.assert_allclose(subspace.project_out(x.T, m.astype(np.float32), axis=0), expected.T,
                             atol=1e-5)


def test_projection_unchecked_and_jit_paths_stay_available():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 8)).astype(np.float32)
  basis = rng.normal(size=(8, 2)).astype(np.float32)
  expected = x - x @ basis @ basis.T
  got = subspace.project_out(x, basis, check_orthonormal=False)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  jitted = jax.jit(lambda a, b: subspace.project_out(a, b))  # traced: no value checks
  np.testing.assert_allclose(jitted(x, basis), expected, rtol=1e-4, atol=1e-4)


def test_gpm_update_rejects_non_orthonormal_basis():
  rng = np.random.default_rng(3)
  rep = rng.normal(size=(10, 30)).astype(np.float32)
  bad = rng.normal(size=(10, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="orthonormal"):
    subspace.gpm_update(bad, rep, 0.9)
  with pytest.raises(ValueError, match="orthonormal"):
    subspace.gpm_update_fixed(np.pad(bad, ((0, 0), (0, 7))), 3, rep, 0.9)
  good = subspace.gpm_update(None, rep[:, :5], 0.9)
  grown = subspace.gpm_update(good, rep, 0.9)  # its own output passes the check
  np.testing.assert_allclose(np.asarray(grown).T @ np.asarray(grown), np.eye(grown.shape[1]),
                             atol=1e-5)


@pytest.mark.parametrize("where", ["x", "basis"])
def test_projection_rejects_nan_like_gpm_update(where):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(3, 6)).astype(np.float32)
  basis = _orthonormal(rng, 6, 2).astype(np.float32)
  if where == "x":
    x[1, 2] = np.nan
  else:
    basis[0, 0] = np.nan
  with pytest.raises(ValueError, match=f"{where} must be finite"):
    subspace.project_out(x, basis)
  with pytest.raises(ValueError, match="must be finite"):
    subspace.gpm_update(basis if where == "basis" else None, x.T, 0.9)


@pytest.mark.parametrize("axis", [5, -3, 2])
def test_projection_axis_out_of_range_is_a_value_error(axis):
  x = np.ones((3, 4), np.float32)
  with pytest.raises(ValueError, match=f"axis {axis} is out of range"):
    subspace.project_out(x, np.eye(4, 2, dtype=np.float32), axis=axis)


# ---------------------------------------------------------------- became_coefficient


def _trees(rng, step_scale, fisher_scale):
  shapes = {"a": (6, 5), "b": (7,)}
  gp = {k: step_scale * rng.normal(size=s) for k, s in shapes.items()}  # Δθ representable
  hat = {k: gp[k] + step_scale * rng.normal(size=s) for k, s in shapes.items()}
  f_cur = {k: fisher_scale * rng.random(size=s) for k, s in shapes.items()}
  f_old = {k: fisher_scale * rng.random(size=s) for k, s in shapes.items()}
  return gp, hat, f_cur, f_old


def _reference(gp, hat, f_cur, f_old, keys):
  num = sum(float(np.sum(f_cur[k] * (hat[k] - gp[k]) ** 2)) for k in keys)
  den = sum(float(np.sum((f_cur[k] + f_old[k]) * (hat[k] - gp[k]) ** 2)) for k in keys)
  return num / den


def _f32(tree):
  return {k: v.astype(np.float32) for k, v in tree.items()}


@pytest.mark.parametrize("step_scale,fisher_scale", [(1e-2, 1.0), (1e20, 1e30), (1e-20, 1e-30),
                                                     (1e18, 1e5)])
def test_became_coefficient_matches_float64_at_any_magnitude(step_scale, fisher_scale):
  rng = np.random.default_rng(5)
  trees64 = _trees(rng, step_scale, fisher_scale)
  trees32 = [_f32(t) for t in trees64]
  # Reference from the float32 inputs, in float64: the overflow happens in the op.
  ref_trees = [{k: v.astype(np.float64) for k, v in t.items()} for t in trees32]
  lam = float(merging.became_coefficient(*trees32))
  assert 0.0 <= lam <= 1.0
  np.testing.assert_allclose(lam, _reference(*ref_trees, ["a", "b"]), rtol=2e-5)
  per_leaf = merging.became_coefficient(*trees32, per_leaf=True)
  for k in ("a", "b"):
    np.testing.assert_allclose(float(per_leaf[k]), _reference(*ref_trees, [k]), rtol=2e-5)


def test_became_coefficient_float32_extremes_stay_in_unit_interval():
  gp = {"w": np.full((3,), -3e38, np.float32)}
  hat = {"w": np.full((3,), 3e38, np.float32)}
  f_cur = {"w": np.array([3e38, 1.0, 0.0], np.float32)}
  f_old = {"w": np.array([3e38, 0.0, 5.0], np.float32)}
  lam = float(merging.became_coefficient(gp, hat, f_cur, f_old))
  assert lam == pytest.approx((3e38 + 1.0) / (3e38 + 1.0 + 3e38 + 5.0), rel=1e-6)


def test_became_coefficient_mixed_leaf_scales():
  # One leaf at 1e19 steps, one at 1e-3: the small leaf must not vanish from λ
  # when it dominates, nor overflow the large one.
  rng = np.random.default_rng(6)
  gp = {"big": rng.normal(size=4), "small": rng.normal(size=4)}
  hat = {"big": gp["big"] + 1e19 * rng.normal(size=4), "small": gp["small"] + rng.normal(size=4)}
  f_cur = {"big": rng.random(4) * 1e-30, "small": rng.random(4) * 1e10}
  f_old = {"big": rng.random(4) * 1e-30, "small": rng.random(4) * 1e10}
  trees32 = [_f32(t) for t in (gp, hat, f_cur, f_old)]
  ref_trees = [{k: v.astype(np.float64) for k, v in t.items()} for t in trees32]
  lam = float(merging.became_coefficient(*trees32))
  np.testing.assert_allclose(lam, _reference(*ref_trees, ["big", "small"]), rtol=2e-5)


# ---------------------------------------------------------------- summarize


@pytest.mark.parametrize("matrix", [[["90", "x"], ["80", "85"]],
                                    np.array([["90", "0"], ["80", "85"]])])
def test_summarize_rejects_strings_with_a_clear_error(matrix):
  with pytest.raises(ValueError, match="must hold numbers"):
    metrics.summarize(matrix)
  with pytest.raises(ValueError, match="must hold numbers"):
    metrics.summarize_to_floats(matrix)


def test_summarize_reads_json_nulls_above_the_diagonal():
  rng = np.random.default_rng(7)
  a = rng.uniform(0, 100, size=(3, 3))
  rows = [[float(a[t, i]) if i <= t else None for i in range(3)] for t in range(3)]
  got = metrics.summarize_to_floats(rows)
  assert got["acc"] == pytest.approx(a[2].mean())
  assert got["bwt"] == pytest.approx(np.mean(a[2, :2] - np.diag(a)[:2]))
