"""clx.ops.subspace against float64 NumPy/SciPy references and properties."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from clx.ops import subspace

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------


def official_update_gpm(feature, activation, threshold):
  """Literal float64 port of one layer of sahagobinda/GPM `update_GPM`."""
  if feature is None:  # "if not feature_list": after the first task
    u, s, _ = np.linalg.svd(activation, full_matrices=False)
    sval_total = (s**2).sum()
    sval_ratio = (s**2) / sval_total
    r = np.sum(np.cumsum(sval_ratio) < threshold)
    return u[:, 0:r]
  _, s1, _ = np.linalg.svd(activation, full_matrices=False)
  sval_total = (s1**2).sum()
  act_hat = activation - np.dot(np.dot(feature, feature.T), activation)
  u, s, _ = np.linalg.svd(act_hat, full_matrices=False)
  sval_hat = (s**2).sum()
  sval_ratio = (s**2) / sval_total
  accumulated_sval = (sval_total - sval_hat) / sval_total
  r = 0
  for ii in range(sval_ratio.shape[0]):
    if accumulated_sval < threshold:
      accumulated_sval += sval_ratio[ii]
      r += 1
    else:
      break
  if r == 0:
    return feature
  ui = np.hstack((feature, u[:, 0:r]))
  if ui.shape[1] > ui.shape[0]:
    return ui[:, 0 : ui.shape[0]]
  return ui


def reference_energy_rank(s, threshold, inclusive):
  ratio = s**2 / np.sum(s**2)
  cumulative = 0.0
  for k, value in enumerate(ratio):
    cumulative += value
    if cumulative >= threshold:
      return k + 1 if inclusive else k
  return len(s)


def random_orthonormal(rng, d, k):
  q, _ = np.linalg.qr(rng.normal(size=(d, k)))
  return q


def representation(rng, directions, n, noise=1e-3):
  """R = D diag(scales) G + noise: low rank with a small full-rank tail."""
  k = directions.shape[1]
  scales = np.sort(rng.uniform(0.3, 3.0, size=k))[::-1]
  return directions @ (scales[:, None] * rng.normal(size=(k, n))) + noise * (
      rng.normal(size=(directions.shape[0], n))
  )


def task_sequence(seed, d, n, new_ranks, old_mix=2):
  """Representations whose new directions are fresh and old ones reused.

  A new rank of 0 yields None: the test then builds a task inside the span
  of the memory kept so far, which must take the r == 0 "skip" branch.
  """
  rng = np.random.default_rng(seed)
  seen = np.zeros((d, 0))
  tasks = []
  for new_rank in new_ranks:
    if new_rank == 0:
      tasks.append(None)
      continue
    fresh = rng.normal(size=(d, new_rank))
    reuse = seen[:, : min(old_mix, seen.shape[1])]
    tasks.append(representation(rng, np.hstack([fresh, reuse]), n))
    seen = scipy.linalg.orth(np.hstack([seen, fresh]))
  return tasks


def inside_span(seed, basis, n):
  rng = np.random.default_rng(seed)
  return basis @ rng.normal(size=(basis.shape[1], n))


def assert_same_span(basis, ref, atol):
  basis = np.asarray(basis)
  assert basis.shape == ref.shape
  np.testing.assert_allclose(basis @ basis.T, ref @ ref.T, atol=atol)


SEQUENCES = [
    # (seed, d, n, new ranks per task, thresholds per task)
    (0, 16, 24, [3, 4, 0, 5], [0.9, 0.95, 0.97, 0.99]),
    (1, 10, 6, [4, 3, 3], [0.95, 0.99, 0.999]),
    (2, 8, 30, [3, 3, 4, 0], [0.97, 0.99, 0.99999, 0.97]),  # fills d
    (3, 12, 20, [2, 5, 3, 1], [0.5, 0.8, 0.9, 0.95]),
]


# ----------------------------------------------------------------------------
# energy_rank and first-task basis
# ----------------------------------------------------------------------------


def test_energy_rank_official_vs_paper_rule():
  s = np.sqrt([0.5, 0.3, 0.2])  # cumulative energies 0.5, 0.8, 1.0
  assert int(subspace.energy_rank(s, 0.7)) == 1  # #{c < 0.7}
  assert int(subspace.energy_rank(s, 0.7, inclusive=True)) == 2
  assert int(subspace.energy_rank(s, 0.4)) == 0  # official can keep nothing
  assert int(subspace.energy_rank(s, 0.4, inclusive=True)) == 1
  assert int(subspace.energy_rank(np.zeros(4), 0.9)) == 0
  assert int(subspace.energy_rank(np.zeros(4), 0.9, inclusive=True)) == 0


@pytest.mark.parametrize("inclusive", [False, True])
def test_energy_rank_matches_reference(x64, inclusive):
  rng = np.random.default_rng(10)
  for _ in range(12):
    s = np.sort(rng.exponential(size=rng.choice([1, 4, 9])))[::-1]
    threshold = rng.uniform(0.05, 1.0)
    got = subspace.energy_rank(s, threshold, inclusive=inclusive)
    assert got.dtype == jnp.int32
    assert int(got) == reference_energy_rank(s, threshold, inclusive)
    jitted = jax.jit(subspace.energy_rank, static_argnames="inclusive")
    assert int(jitted(s, threshold, inclusive=inclusive)) == int(got)


@pytest.mark.parametrize("inclusive", [False, True])
def test_basis_from_representation_matches_reference(x64, inclusive):
  rng = np.random.default_rng(11)
  r_mat = representation(rng, rng.normal(size=(9, 4)), 15)
  u, s, _ = np.linalg.svd(r_mat, full_matrices=False)
  k = reference_energy_rank(s, 0.97, inclusive)
  basis = subspace.basis_from_representation(r_mat, 0.97, inclusive=inclusive)
  assert_same_span(basis, u[:, :k], 1e-10)
  padded, rank = jax.jit(
      subspace.basis_from_representation_fixed, static_argnames="inclusive"
  )(r_mat, 0.97, inclusive=inclusive)
  assert int(rank) == k and padded.shape == (9, 9)
  np.testing.assert_array_equal(np.asarray(padded)[:, k:], 0.0)
  assert_same_span(padded[:, :k], u[:, :k], 1e-10)


# ----------------------------------------------------------------------------
# gpm_update / gpm_update_fixed vs the official loop
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed,d,n,new_ranks,thresholds", SEQUENCES)
def test_gpm_update_matches_official(x64, seed, d, n, new_ranks, thresholds):
  tasks = task_sequence(seed, d, n, new_ranks)
  ref, basis = None, None
  padded, rank = jnp.zeros((d, d)), 0
  fixed = jax.jit(subspace.gpm_update_fixed)
  skipped = 0
  # Sequence 3 (ε = 0.5) keeps nothing after task 1, so task 2 needs the
  # explicit first_task flag to follow the official later-task loop.
  for t, (r_mat, threshold) in enumerate(zip(tasks, thresholds)):
    if r_mat is None:
      r_mat = inside_span(seed, ref, n)
    before = None if ref is None else ref.shape[1]
    ref = official_update_gpm(ref, r_mat, threshold)
    skipped += before == ref.shape[1]
    basis = subspace.gpm_update(basis, r_mat, threshold)
    assert_same_span(basis, ref, 1e-8)
    np.testing.assert_allclose(basis.T @ basis, np.eye(ref.shape[1]), atol=1e-8)
    padded, rank = fixed(padded, rank, r_mat, threshold, first_task=t == 0)
    assert int(rank) == ref.shape[1]
    assert_same_span(padded[:, : int(rank)], ref, 1e-8)
    np.testing.assert_array_equal(np.asarray(padded)[:, int(rank) :], 0.0)
  assert skipped >= new_ranks.count(0)  # the r == 0 branch really ran


def test_gpm_update_fills_whole_space(x64):
  seed, d, n, new_ranks, thresholds = SEQUENCES[2]
  basis = None
  for r_mat, threshold in zip(task_sequence(seed, d, n, new_ranks), thresholds):
    if r_mat is None:
      r_mat = inside_span(seed, basis, n)
    basis = subspace.gpm_update(basis, r_mat, threshold)
  assert basis.shape == (d, d)


def test_gpm_update_truncates_at_d(x64):
  # Truncation is only reachable when M Mᵀ is not a projector (or through
  # rounding at ε = 1); feed a non-orthonormal memory to exercise it exactly.
  rng = np.random.default_rng(12)
  d = 5
  memory = np.tile(np.eye(d)[:, :1], (1, 4))  # 4 copies of e1
  r_mat = rng.normal(size=(d, 8))
  ref = official_update_gpm(memory, r_mat, 0.99)
  assert ref.shape == (d, d)  # 4 + r > 5 columns were cut back to d
  got = subspace.gpm_update(memory, r_mat, 0.99, check_orthonormal=False)
  assert got.shape == (d, d)
  np.testing.assert_allclose(got[:, :4], memory)
  np.testing.assert_allclose(np.abs(np.sum(got[:, 4] * ref[:, 4])), 1.0)


def test_gpm_update_threshold_one_stays_within_d(x64):
  rng = np.random.default_rng(13)
  basis = None
  for _ in range(3):
    basis = subspace.gpm_update(basis, rng.normal(size=(6, 4)), 1.0)
    assert basis.shape[0] == 6 and basis.shape[1] <= 6
  assert basis.shape[1] == 6


def test_empty_first_basis_then_inclusive_loop(x64):
  rng = np.random.default_rng(14)
  d = 7
  rank_one = np.outer(rng.normal(size=d), rng.normal(size=10))
  ref = official_update_gpm(None, rank_one, 0.9)
  assert ref.shape == (d, 0)  # official first-task rule keeps nothing
  basis = subspace.gpm_update(None, rank_one, 0.9)
  assert basis.shape == (d, 0)
  second = representation(rng, rng.normal(size=(d, 4)), 10)
  ref = official_update_gpm(ref, second, 0.9)
  got = subspace.gpm_update(basis, second, 0.9)
  assert_same_span(got, ref, 1e-8)
  # The fixed form needs first_task=False to follow the later-task loop here;
  # its default (rank == 0 means first task) applies the exclusive rule.
  padded = jnp.zeros((d, d))
  update = subspace.gpm_update_fixed
  _, k_exact = update(padded, 0, second, 0.9, first_task=False)
  _, k_default = update(padded, 0, second, 0.9)
  assert int(k_exact) == ref.shape[1]
  assert int(k_default) == ref.shape[1] - 1


def test_gpm_update_zero_representation_keeps_basis(x64):
  basis = random_orthonormal(np.random.default_rng(15), 6, 2)
  got = subspace.gpm_update(basis, np.zeros((6, 5)), 0.9)
  np.testing.assert_allclose(got, basis)
  assert subspace.gpm_update(None, np.zeros((6, 5)), 0.9).shape == (6, 0)


def test_gpm_update_fixed_vmap_over_seeds(x64):
  d, n = 12, 20
  seeds = [[2, 4, 1], [5, 2, 3], [1, 1, 6]]
  thresholds = np.array([0.9, 0.95, 0.99])
  sequences = [
      task_sequence(10 + i, d, n, ranks) for i, ranks in enumerate(seeds)
  ]
  update = jax.jit(jax.vmap(subspace.gpm_update_fixed))
  padded = jnp.zeros((len(seeds), d, d))
  ranks = jnp.zeros((len(seeds),), jnp.int32)
  refs = [None] * len(seeds)
  for task in range(3):
    stacked = jnp.stack([seq[task] for seq in sequences])
    first = jnp.full((len(seeds),), task == 0)  # vmap maps kwargs on axis 0
    padded, ranks = update(padded, ranks, stacked, thresholds, first_task=first)
    for i, seq in enumerate(sequences):
      refs[i] = official_update_gpm(refs[i], seq[task], thresholds[i])
      assert int(ranks[i]) == refs[i].shape[1]
      assert_same_span(padded[i, :, : int(ranks[i])], refs[i], 1e-8)
  assert len(set(np.asarray(ranks).tolist())) > 1  # ranks really differ


def test_gpm_update_float32_close_to_float64():
  seed, d, n, new_ranks, thresholds = SEQUENCES[0]
  ref, basis = None, None
  for r_mat, threshold in zip(task_sequence(seed, d, n, new_ranks), thresholds):
    if r_mat is None:  # inside the float32 memory: float32 must skip too
      r_mat = inside_span(seed, np.asarray(basis, np.float64), n)
    ref = official_update_gpm(ref, r_mat, threshold)
    basis = subspace.gpm_update(basis, r_mat.astype(np.float32), threshold)
    assert basis.dtype == jnp.float32
    assert_same_span(basis, ref, 2e-4)


# ----------------------------------------------------------------------------
# Projections
# ----------------------------------------------------------------------------


def test_projections_match_numpy(x64):
  rng = np.random.default_rng(20)
  m = random_orthonormal(rng, 7, 3)
  p = m @ m.T
  np.testing.assert_allclose(subspace.projector(m), p, atol=1e-12)
  x = rng.normal(size=(4, 5, 7))
  np.testing.assert_allclose(subspace.project_out(x, m), x - x @ p, atol=1e-12)
  np.testing.assert_allclose(subspace.project_onto(x, m), x @ p, atol=1e-12)
  y = rng.normal(size=(7, 5))
  np.testing.assert_allclose(
      subspace.project_out(y, m, axis=0), y - p @ y, atol=1e-12
  )
  z = rng.normal(size=(2, 7, 3))
  expected = z - np.einsum("ij,ajb->aib", p, z)
  np.testing.assert_allclose(
      subspace.project_out(z, m, axis=1), expected, atol=1e-12
  )
  jitted = jax.jit(subspace.project_out, static_argnames="axis")
  np.testing.assert_allclose(jitted(y, m, axis=0), y - p @ y, atol=1e-12)


def test_project_kernel_gradient_dense_and_conv(x64):
  rng = np.random.default_rng(21)
  dense = rng.normal(size=(6, 4))
  m = random_orthonormal(rng, 6, 2)
  np.testing.assert_allclose(
      subspace.project_kernel_gradient(dense, m),
      dense - m @ m.T @ dense,
      atol=1e-12,
  )
  conv = rng.normal(size=(3, 3, 2, 5))
  m = random_orthonormal(rng, 18, 4)
  flat = conv.reshape(18, 5)
  np.testing.assert_allclose(
      subspace.project_kernel_gradient(conv, m),
      (flat - m @ m.T @ flat).reshape(conv.shape),
      atol=1e-12,
  )


def test_conv_projection_leaves_old_outputs_unchanged(x64):
  # GPM's promise, checked end to end: a projected conv update does not change
  # outputs on inputs whose patches (in (kh, kw, cin) order) span M.
  rng = np.random.default_rng(22)
  image = rng.normal(size=(1, 5, 5, 2))
  kernel = rng.normal(size=(3, 3, 2, 4))
  patches = np.stack([
      image[0, i : i + 3, j : j + 3, :].reshape(-1)
      for i in range(3)
      for j in range(3)
  ], axis=1)  # (18, 9)
  m = np.linalg.svd(patches, full_matrices=False)[0]
  update = subspace.project_kernel_gradient(rng.normal(size=kernel.shape), m)

  def conv(k):
    return jax.lax.conv_general_dilated(
        image, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  np.testing.assert_allclose(conv(kernel + update), conv(kernel), atol=1e-10)


def test_scaled_projector_matches_numpy(x64):
  rng = np.random.default_rng(23)
  u = random_orthonormal(rng, 6, 3)
  lam = rng.uniform(size=3)
  np.testing.assert_allclose(
      subspace.scaled_projector(u, lam), u @ np.diag(lam) @ u.T, atol=1e-12
  )
  np.testing.assert_allclose(
      subspace.scaled_projector(u, np.ones(3)),
      subspace.projector(u),
      atol=1e-12,
  )


# ----------------------------------------------------------------------------
# Principal angles, overlap, orthonormalize
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("ka,kb", [(3, 3), (4, 2), (2, 5)])
def test_principal_angles_match_scipy(x64, ka, kb):
  rng = np.random.default_rng(30 + ka + kb)
  a, b = random_orthonormal(rng, 8, ka), random_orthonormal(rng, 8, kb)
  expected = np.sort(scipy.linalg.subspace_angles(a, b))
  close = lambda x, y: np.testing.assert_allclose(x, y, atol=1e-12)
  close(subspace.principal_angles(a, b), expected)
  cosines = np.sort(np.linalg.svd(a.T @ b, compute_uv=False))[::-1]
  close(subspace.principal_cosines(a, b), cosines)
  close(subspace.subspace_overlap(a, b), np.sum((a.T @ b) ** 2) / min(ka, kb))
  np.testing.assert_allclose(
      jax.jit(subspace.principal_angles)(a, b), expected, atol=1e-12
  )


def test_principal_angles_identical_and_orthogonal(x64):
  rng = np.random.default_rng(33)
  q = random_orthonormal(rng, 8, 6)
  a, b = q[:, :3], q[:, 3:]
  np.testing.assert_allclose(subspace.principal_angles(a, a), 0.0, atol=1e-14)
  right = subspace.principal_angles(a, b)
  np.testing.assert_allclose(right, np.pi / 2, atol=1e-12)
  assert float(subspace.subspace_overlap(a, a)) == pytest.approx(1.0)
  assert float(subspace.subspace_overlap(a, b)) == pytest.approx(0.0, abs=1e-14)
  assert subspace.principal_angles(a, np.zeros((8, 0))).shape == (0,)
  assert float(subspace.subspace_overlap(a, np.zeros((8, 0)))) == 0.0


def test_principal_angles_float32():
  rng = np.random.default_rng(34)
  a, b = random_orthonormal(rng, 10, 4), random_orthonormal(rng, 10, 3)
  got = subspace.principal_angles(a.astype(np.float32), b.astype(np.float32))
  assert got.dtype == jnp.float32
  expected = np.sort(scipy.linalg.subspace_angles(a, b))
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["qr", "svd"])
def test_orthonormalize(x64, method):
  rng = np.random.default_rng(35)
  x = rng.normal(size=(7, 4))
  q = subspace.orthonormalize(x, method=method)
  np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-12)
  ref = scipy.linalg.orth(x)
  assert_same_span(q, ref, 1e-12)
  if method == "qr":  # Gram-Schmidt order and signs: Qᵀx upper, positive diag
    r = np.asarray(q).T @ x
    np.testing.assert_allclose(np.tril(r, -1), 0.0, atol=1e-12)
    assert np.all(np.diag(r) > 0)


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------

# Few distinct shapes: every new shape costs an XLA compile (~0.1 s on CPU).
dims = st.sampled_from([4, 7])


@SETTINGS
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    d=dims,
    n=st.sampled_from([1, 5]),
    threshold=st.floats(0.05, 1.0),
    inclusive=st.booleans(),
)
def test_property_bases_orthonormal(seed, d, n, threshold, inclusive):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    r_mat = rng.normal(size=(d, n))
    basis = np.asarray(subspace.basis_from_representation(
        r_mat, threshold, inclusive=inclusive
    ))
    k = basis.shape[1]
    assert k <= min(d, n)
    np.testing.assert_allclose(basis.T @ basis, np.eye(k), atol=1e-10)
    if k < d:
      update = subspace.gpm_update(basis, rng.normal(size=(d, n)), threshold)
      np.testing.assert_allclose(update[:, :k], basis)
      kk = update.shape[1]
      np.testing.assert_allclose(update.T @ update, np.eye(kk), atol=1e-8)


@SETTINGS
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1), d=dims, k_frac=st.sampled_from([0, 0.5, 1])
)
def test_property_project_out_idempotent_and_orthogonal(seed, d, k_frac):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    k = int(round(k_frac * d))
    m = subspace.orthonormalize(rng.normal(size=(d, k)))
    x = rng.normal(size=(4, d))
    y = subspace.project_out(x, m)
    np.testing.assert_allclose(subspace.project_out(y, m), y, atol=1e-12)
    np.testing.assert_allclose(np.asarray(y) @ np.asarray(m), 0.0, atol=1e-12)
    np.testing.assert_allclose(y + subspace.project_onto(x, m), x, atol=1e-12)
    g = rng.normal(size=(d, 3))
    h = subspace.project_kernel_gradient(g, m)
    np.testing.assert_allclose(np.asarray(m).T @ np.asarray(h), 0.0, atol=1e-12)
    jitted = jax.jit(subspace.project_out)(x, m)
    np.testing.assert_allclose(jitted, y, atol=1e-14)


@SETTINGS
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    d=dims,
    ka=st.sampled_from([1, 3]),
    kb=st.sampled_from([1, 3]),
)
def test_property_angles_rotation_invariant_and_symmetric(seed, d, ka, kb):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    a, b = random_orthonormal(rng, d, ka), random_orthonormal(rng, d, kb)
    cosines = np.asarray(subspace.principal_cosines(a, b))
    assert np.all((cosines >= 0) & (cosines <= 1))
    assert np.all(np.diff(cosines) <= 0)
    rotated = a @ random_orthonormal(rng, ka, ka)
    np.testing.assert_allclose(
        subspace.principal_cosines(rotated, b), cosines, atol=1e-10
    )
    np.testing.assert_allclose(
        subspace.principal_angles(rotated, b),
        subspace.principal_angles(a, b),
        atol=1e-7,
    )
    overlap = float(subspace.subspace_overlap(a, b))
    assert 0.0 <= overlap <= 1.0
    assert overlap == pytest.approx(float(subspace.subspace_overlap(b, a)))
    assert overlap == pytest.approx(float(np.mean(cosines**2)), abs=1e-12)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, float("nan")])
def test_threshold_outside_unit_interval(threshold):
  with pytest.raises(ValueError, match=r"threshold must lie in \(0, 1\]"):
    subspace.energy_rank(np.ones(3), threshold)
  with pytest.raises(ValueError, match="threshold"):
    subspace.gpm_update(None, np.ones((3, 2)), threshold)


def test_nan_and_inf_inputs():
  bad = np.ones((4, 3))
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match="representation must be finite.*1 NaN"):
    subspace.gpm_update(None, bad, 0.9)
  bad[1, 2] = np.inf
  with pytest.raises(ValueError, match="representation must be finite.*1 Inf"):
    subspace.basis_from_representation(bad, 0.9)
  with pytest.raises(ValueError, match="x must be finite"):
    subspace.orthonormalize(bad)


def test_shape_errors():
  with pytest.raises(ValueError, match="representation must be 2-D"):
    subspace.gpm_update(None, np.ones(4), 0.9)
  with pytest.raises(ValueError, match="basis has 5 rows but representation"):
    subspace.gpm_update(np.zeros((5, 1)), np.ones((4, 3)), 0.9)
  with pytest.raises(ValueError, match=r"basis_padded must be \(d, d\)"):
    subspace.gpm_update_fixed(np.zeros((4, 2)), 0, np.ones((4, 3)), 0.9)
  with pytest.raises(ValueError, match="singular_values must be 1-D"):
    subspace.energy_rank(np.ones((2, 2)), 0.9)
  with pytest.raises(ValueError, match="singular_values must be non-negative"):
    subspace.energy_rank(np.array([1.0, -1.0]), 0.9)
  with pytest.raises(ValueError, match="does not match the data dimension 6"):
    subspace.project_out(np.ones((2, 6)), np.eye(5)[:, :2])
  with pytest.raises(ValueError, match="does not match the data dimension 18"):
    subspace.project_kernel_gradient(np.ones((3, 3, 2, 4)), np.eye(9)[:, :2])
  with pytest.raises(ValueError, match="grad must be a kernel of rank"):
    subspace.project_kernel_gradient(np.ones(3), np.eye(3))
  with pytest.raises(ValueError, match=r"importance must have shape \(k,\)"):
    subspace.scaled_projector(np.eye(4)[:, :2], np.ones(3))
  with pytest.raises(ValueError, match="b dimension 5 does not match"):
    subspace.principal_angles(np.eye(4)[:, :2], np.eye(5)[:, :2])


def test_rank_larger_than_dimension():
  with pytest.raises(ValueError, match=r"rank must lie in \[0, d\]"):
    subspace.gpm_update_fixed(np.zeros((4, 4)), 5, np.ones((4, 3)), 0.9)
  with pytest.raises(ValueError, match="rank 6 larger than its dimension d"):
    subspace.gpm_update(np.zeros((4, 6)), np.ones((4, 3)), 0.9)
  with pytest.raises(ValueError, match="rank 3 larger than its dimension d"):
    subspace.projector(np.ones((2, 3)))
  with pytest.raises(ValueError, match="more than its dimension d = 2"):
    subspace.orthonormalize(np.ones((2, 3)))
  with pytest.raises(ValueError, match="first_task=True needs an empty memory"):
    subspace.gpm_update_fixed(
        np.eye(4), 2, np.ones((4, 3)), 0.9, first_task=True
    )
  with pytest.raises(ValueError, match="method must be 'qr' or 'svd'"):
    subspace.orthonormalize(np.eye(3), method="lu")


def test_checks_skipped_under_jit():
  # Value checks need concrete inputs; under jit they are skipped, not wrong.
  out = jax.jit(subspace.energy_rank)(jnp.ones(3), 1.5)
  assert out.shape == ()
