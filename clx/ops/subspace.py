"""Subspace ops: GPM memory bases, projections and principal angles.

Notation. A representation matrix R has shape (d, n): n activations of a
layer's d-dimensional input, one per column (GPM, Saha et al. ICLR 2021).
Equation numbers below are those cited in the official code's comments
(Eq-5 first-task criterion, Eq-8 projected representation, Eq-9 criterion).
A basis M has shape (d, k) with orthonormal columns, MᵀM = I_k.
Flax kernels are (d_in, d_out), so the input space of a kernel is its axis 0.

Official code vs paper (GPM). The official code (sahagobinda/GPM, main_*.py
`update_GPM`) keeps, after the first task, the r singular vectors with
  r = #{k : Σ_{i≤k} σ_i² / Σ_i σ_i² < ε}          (strict, "exclusive"),
i.e. one fewer than the paper's Eq. 5, which asks for the smallest k with
  Σ_{i≤k} σ_i² / Σ_i σ_i² ≥ ε                      ("inclusive").
For later tasks both use Eq. 8-9 on the residual R̂ = R − M Mᵀ R, which the
official loop implements as "add directions while accumulated energy < ε"
(inclusive). `gpm_update` reproduces the official code exactly;
`energy_rank(..., inclusive=True)` gives the paper's first-task form.

Precision. Matmuls use `Precision.HIGHEST`, because on GPU/TPU the default
(TF32/bf16 passes) would leave projected gradients with ~1e-3 components
inside span(M), which defeats the point of projecting.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clx.ops import _checks

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: Array, b: Array) -> Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _safe_ratio(num: Array, den: Array) -> Array:
  """num / den with 0 where den == 0 (no NaN, so masks need no double-where)."""
  safe_den = jnp.where(den > 0, den, 1)
  return jnp.where(den > 0, num / safe_den, 0)


# ----------------------------------------------------------------------------
# Energy criterion and first-task basis
# ----------------------------------------------------------------------------


def energy_rank(
    singular_values: Array, threshold: Any, *, inclusive: bool = False
) -> Array:
  """Number of leading singular directions kept by the GPM energy rule.

  With ratio_i = σ_i² / Σ_j σ_j² and c_k = Σ_{i≤k} ratio_i (k = 0-based):
    inclusive=False (official code, default):  r = #{k : c_k < ε}
    inclusive=True  (paper Eq. 5):             r = min{k+1 : c_k ≥ ε}
  The two differ by exactly one whenever ε is reached before the last value:
  the official code stops *before* the direction that crosses ε. If every σ
  is zero (no energy) r = 0 under both rules (the official code compares NaN
  and also keeps nothing).

  Args:
    singular_values: (m,) non-negative, sorted descending (as from an SVD).
    threshold: ε, a scalar in (0, 1].
    inclusive: use the paper's "smallest k reaching ε" form.

  Returns:
    int32 scalar r in [0, m].
  """
  _checks.check_ndim("singular_values", singular_values, 1)
  _checks.check_finite("singular_values", singular_values)
  _checks.check_nonnegative("singular_values", singular_values)
  _checks.check_threshold("threshold", threshold)
  return _energy_rank(singular_values, threshold, inclusive)


# Public functions check inputs on host, then call one jitted implementation:
# eager calls compile once per shape instead of once per primitive, and
# inside a caller's jit the inner jit is simply inlined.
@functools.partial(jax.jit, static_argnums=2)
def _energy_rank(singular_values: Array, threshold: Any, inclusive: bool):
  s = jnp.asarray(singular_values)
  energy = s**2
  total = jnp.sum(energy)
  cumulative = jnp.cumsum(_safe_ratio(energy, total))
  below = jnp.sum(cumulative < threshold).astype(jnp.int32)
  if inclusive:
    below = jnp.minimum(below + 1, s.shape[0])
  return jnp.where(total > 0, below, 0).astype(jnp.int32)


def _pad_columns(u: Array, width: int) -> Array:
  """Zero-pads (d, m) to (d, width) on the right (m ≤ width)."""
  return jnp.pad(u, ((0, 0), (0, width - u.shape[1])))


def _float_dtype(*arrays: Any) -> Any:
  """Result dtype promoted to at least float32 (SVD needs a float type)."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _check_representation(representation: Any) -> None:
  _checks.check_ndim("representation", representation, 2)
  _checks.check_finite("representation", representation)


def basis_from_representation_fixed(
    representation: Array, threshold: Any, *, inclusive: bool = False
) -> tuple[Array, Array]:
  """Energy-thresholded top left singular vectors, zero-padded to (d, d).

  R = U Σ Vᵀ; keeps U[:, :r] with r = `energy_rank`(σ(R), ε) (GPM Eq. 5);
  columns ≥ r are zero, so M Mᵀ is still the projector onto the kept space.

  Args:
    representation: R, (d, n).
    threshold: ε in (0, 1].
    inclusive: paper form of the rule (see `energy_rank`).

  Returns:
    (basis_padded (d, d), rank int32 scalar). jit- and vmap-able.
  """
  _check_representation(representation)
  _checks.check_threshold("threshold", threshold)
  return _basis_fixed(representation, threshold, inclusive)


@functools.partial(jax.jit, static_argnums=2)
def _basis_fixed(representation: Array, threshold: Any, inclusive: bool):
  r_mat = jnp.asarray(representation, _float_dtype(representation))
  d = r_mat.shape[0]
  u, s, _ = jnp.linalg.svd(r_mat, full_matrices=False)
  rank = _energy_rank(s, threshold, inclusive)
  keep = jnp.arange(d) < rank
  return _pad_columns(u, d) * keep[None, :], rank


def basis_from_representation(
    representation: Array, threshold: Any, *, inclusive: bool = False
) -> Array:
  """Host version of `basis_from_representation_fixed`, sliced to (d, r).

  Not jit-able: the output width r depends on the data (dynamic shape).

  Args:
    representation: R, (d, n), concrete.
    threshold: ε in (0, 1].
    inclusive: paper form of the rule (see `energy_rank`).

  Returns:
    (d, r) orthonormal basis, r ≤ min(d, n).
  """
  padded, rank = basis_from_representation_fixed(
      representation, threshold, inclusive=inclusive
  )
  return padded[:, : int(rank)]


# ----------------------------------------------------------------------------
# GPM memory update
# ----------------------------------------------------------------------------


def gpm_update_fixed(
    basis_padded: Array,
    rank: Any,
    representation: Array,
    threshold: Any,
    *,
    first_task: Any = None,
    check_orthonormal: bool = True,
) -> tuple[Array, Array]:
  """One official-GPM memory update in a fixed (d, d) zero-padded layout.

  First task (official exclusive rule, see module doc):
    M ← U[:, :r],  r = #{k : Σ_{i≤k} σ_i²(R)/Σσ²(R) < ε}.
  Later tasks (GPM Eq. 8-9, official loop):
    total = Σ σ²(R);  R̂ = R − M Mᵀ R = Û Σ̂ V̂ᵀ;
    acc = (total − Σ σ̂²)/total;  r = 0;
    for i: if acc < ε: acc += σ̂_i²/total; r += 1 else break
    M ← [M, Û[:, :r]] truncated to d columns (unchanged when r = 0).
  The loop is evaluated in closed form: the accumulated energy before step
  i is non-decreasing, so r = #{i : acc_before_i < ε}. A zero R (no energy)
  keeps M unchanged.

  Args:
    basis_padded: (d, d); columns < rank hold M, columns ≥ rank are ignored
      (treated as zero), so M Mᵀ is the projector.
    rank: k, int scalar in [0, d].
    representation: R, (d, n).
    threshold: ε in (0, 1].
    first_task: bool (may be traced). The official code uses the exclusive
      rule only for the very first task; a later task whose memory happens
      to be empty (k = 0) uses the inclusive loop. Default None means
      `rank == 0`, which is right unless the first task kept nothing; pass
      it explicitly to be exact in that corner case.
    check_orthonormal: verify that the first `rank` columns are orthonormal
      when basis and rank are concrete (a non-orthonormal M makes R − M MᵀR
      a wrong residual and the update silently wrong); skipped under jit.

  Returns:
    (new basis_padded (d, d), new rank int32 scalar k' = min(k + r, d)).
    Pure, jit- and vmap-able (e.g. over seeds with different ranks).
  """
  _check_representation(representation)
  _checks.check_threshold("threshold", threshold)
  d = np.shape(representation)[0]
  if np.shape(basis_padded) != (d, d):
    raise ValueError(
        f"basis_padded must be (d, d) = ({d}, {d}) to match representation "
        f"{np.shape(representation)}, got shape {np.shape(basis_padded)}."
    )
  if np.ndim(rank) != 0:
    raise ValueError(f"rank must be a scalar, got shape {np.shape(rank)}.")
  if _checks.is_concrete(rank) and not 0 <= int(rank) <= d:
    raise ValueError(
        f"rank must lie in [0, d] = [0, {d}], got {int(rank)} (a basis of "
        f"dimension {d} cannot hold more than {d} orthonormal columns)."
    )
  _checks.check_finite("basis_padded", basis_padded)
  if check_orthonormal and _checks.is_concrete(rank):
    check_orthonormal_basis(
        jnp.asarray(basis_padded)[:, : int(rank)], name="basis_padded[:, :rank]"
    )
  if (
      first_task is not None
      and _checks.is_concrete(first_task)
      and _checks.is_concrete(rank)
      and bool(first_task)
      and int(rank) != 0
  ):
    raise ValueError(
        f"first_task=True needs an empty memory (rank 0), got rank {int(rank)}."
    )

  return _gpm_fixed(basis_padded, rank, representation, threshold, first_task)


@jax.jit
def _gpm_fixed(basis_padded, rank, representation, threshold, first_task):
  r_mat = jnp.asarray(representation)
  d = r_mat.shape[0]
  rank = jnp.asarray(rank, jnp.int32)
  if first_task is None:
    first_task = rank == 0
  columns = jnp.arange(d)
  dtype = _float_dtype(basis_padded, r_mat)
  memory = jnp.where(columns[None, :] < rank, basis_padded, 0).astype(dtype)
  r_mat = r_mat.astype(dtype)

  total = jnp.sum(jnp.linalg.svd(r_mat, compute_uv=False) ** 2)
  residual = r_mat - _mm(memory, _mm(memory.T, r_mat))
  u, s_hat, _ = jnp.linalg.svd(residual, full_matrices=False)
  energy_hat = s_hat**2

  # First task: R̂ == R exactly (memory is zero), so σ̂ are σ(R).
  r_first = _energy_rank(s_hat, threshold, False)
  # Later tasks: accumulated energy *before* each step of the official loop,
  # summed in the loop's order (acc0, +ratio_0, +ratio_1, ...).
  acc0 = _safe_ratio(total - jnp.sum(energy_hat), total)
  steps = jnp.concatenate([acc0[None], _safe_ratio(energy_hat, total)[:-1]])
  r_later = jnp.sum(jnp.cumsum(steps) < threshold).astype(jnp.int32)
  r_new = jnp.where(first_task, r_first, r_later)
  r_new = jnp.where(total > 0, r_new, 0).astype(jnp.int32)

  # Append Û[:, :r] at columns [k, k + r); columns ≥ d fall off (truncation).
  u_padded = _pad_columns(u, d).astype(dtype)
  source = jnp.clip(columns - rank, 0, d - 1)
  appended = (columns >= rank) & (columns < rank + r_new)
  new_basis = jnp.where(appended[None, :], u_padded[:, source], memory)
  new_rank = jnp.minimum(rank + r_new, d).astype(jnp.int32)
  return new_basis, new_rank


def gpm_update(
    basis: Array | None,
    representation: Array,
    threshold: Any,
    *,
    check_orthonormal: bool = True,
) -> Array:
  """Official GPM memory update, returning a basis of dynamic width.

  Same rule as `gpm_update_fixed`: `basis=None` is the first task (exclusive
  rule); any array, even (d, 0), takes the later-task loop, exactly as the
  official `update_GPM` branches on an empty feature list.

  Not jit-able: the output width depends on the data (use
  `gpm_update_fixed` inside jit).

  Args:
    basis: M, (d, k) with orthonormal columns, or None before the first task.
    representation: R, (d, n), concrete.
    threshold: ε in (0, 1].
    check_orthonormal: verify MᵀM = I first (see `check_orthonormal_basis`); a
      non-orthonormal M would give a silently wrong residual R − M MᵀR.

  Returns:
    (d, k') orthonormal basis, k ≤ k' ≤ d.
  """
  _check_representation(representation)
  _checks.check_threshold("threshold", threshold)
  d = np.shape(representation)[0]
  if basis is None:
    dtype = _float_dtype(representation)
    padded, rank, first = jnp.zeros((d, d), dtype), 0, True
  else:
    _checks.check_ndim("basis", basis, 2)
    d_b, k = np.shape(basis)
    if d_b != d:
      raise ValueError(
          f"basis has {d_b} rows but representation has d = {d} "
          f"(basis {np.shape(basis)}, representation "
          f"{np.shape(representation)})."
      )
    if k > d:
      raise ValueError(
          f"basis has rank {k} larger than its dimension d = {d}."
      )
    padded, rank, first = _pad_columns(jnp.asarray(basis), d), k, False
  new_padded, new_rank = gpm_update_fixed(
      padded, rank, representation, threshold, first_task=first,
      check_orthonormal=check_orthonormal,
  )
  return new_padded[:, : int(new_rank)]


# ----------------------------------------------------------------------------
# Projections
# ----------------------------------------------------------------------------


def _check_basis(basis: Any, d: int | None = None, name: str = "basis") -> None:
  _checks.check_ndim(name, basis, 2)
  d_b, k = np.shape(basis)
  if k > d_b:
    raise ValueError(
        f"{name} has rank {k} larger than its dimension d = {d_b} "
        f"(shape {np.shape(basis)})."
    )
  if d is not None and d_b != d:
    raise ValueError(
        f"{name} dimension {d_b} does not match the data dimension {d} "
        f"({name} shape {np.shape(basis)})."
    )


def _orthonormality_tolerance(dtype: Any, d: int) -> float:
  """Allowed max |MᵀM − I| entry: a few hundred ulps, growing like √d (rounding
  of d-term dot products), e.g. 8e-4 for float32 at d = 784, 2e-12 in float64."""
  return 256 * float(jnp.finfo(dtype).eps) * max(1.0, float(np.sqrt(d)))


@jax.jit
def _orthonormality_error(basis: Array) -> Array:
  m = jnp.asarray(basis)
  gram = _mm(m.T, m)
  # Exactly-zero columns are padding (the fixed-shape layouts), not a violation.
  live = jnp.sum(m * m, axis=0) > 0
  target = jnp.diag(live.astype(gram.dtype))
  return jnp.max(jnp.abs(gram - target), initial=0.0)


def check_orthonormal_basis(basis: Any, name: str = "basis") -> None:
  """Raises ValueError unless a concrete basis has orthonormal columns.

  Checks max |MᵀM − I| ≤ 256·eps·√d (exactly-zero columns count as padding);
  one (k, k) Gram matrix, O(d k²). A no-op on tracers, so the ops that call
  it stay jit-able: inside jit pass a basis you built orthonormal (e.g. from
  `gpm_update_fixed` or `orthonormalize`).

  Args:
    basis: M, (d, k).
    name: the argument name used in the message.
  """
  _checks.check_ndim(name, basis, 2)
  if not _checks.is_concrete(basis) or 0 in np.shape(basis):
    return
  dtype = _float_dtype(basis)
  error = float(_orthonormality_error(jnp.asarray(basis, dtype)))
  tolerance = _orthonormality_tolerance(dtype, np.shape(basis)[0])
  if not error <= tolerance:  # also catches NaN
    raise ValueError(
        f"{name} must have orthonormal columns (MᵀM = I), but max |MᵀM − I| = "
        f"{error:.3g} > {tolerance:.3g} (shape {np.shape(basis)}); "
        "orthonormalize it first (subspace.orthonormalize) or pass "
        "check_orthonormal=False if it is orthonormal to a looser tolerance."
    )


def _check_axis(x: Any, axis: int, name: str = "x") -> int:
  """The non-negative axis, or a ValueError naming x's rank."""
  ndim = np.ndim(x)
  if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
    raise ValueError(f"axis must be an int, got {axis!r}.")
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"axis {axis} is out of range for {name} of rank {ndim} (shape "
        f"{np.shape(x)}); valid axes are {-ndim}..{ndim - 1}."
    )
  return int(axis) % ndim


def _check_projection_inputs(x, basis, axis, check_orthonormal_: bool) -> int:
  axis = _check_axis(x, axis)
  _check_basis(basis, np.shape(x)[axis])
  _checks.check_finite("x", x)
  _checks.check_finite("basis", basis)
  if check_orthonormal_:
    check_orthonormal_basis(basis)
  return axis


def projector(basis: Array) -> Array:
  """Orthogonal projector onto span(M): P = M Mᵀ (GPM's feature matrix).

  Args:
    basis: M, (d, k) orthonormal columns (zero-padded columns are fine).

  Returns:
    (d, d) symmetric idempotent matrix.
  """
  _check_basis(basis)
  m = jnp.asarray(basis)
  return _mm(m, m.T)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _project(x: Array, basis: Array, axis: int, remove: bool) -> Array:
  x = jnp.asarray(x)
  m = jnp.asarray(basis).astype(x.dtype)
  moved = jnp.moveaxis(x, axis, -1)
  inside = _mm(_mm(moved, m), m.T)  # (x M) Mᵀ: O(dk), no d×d matrix
  return jnp.moveaxis(moved - inside if remove else inside, -1, axis)


def project_onto(
    x: Array, basis: Array, axis: int = -1, *, check_orthonormal: bool = True
) -> Array:
  """Component of `x` inside span(M) along `axis`.

  axis=-1: x M Mᵀ (x is (..., d));  axis=0: M Mᵀ x (x is (d, ...)).
  Computed as (x M) Mᵀ, O(dk) per vector instead of forming the d×d P.
  M Mᵀ is a projector only for orthonormal M: concrete inputs are checked
  (finite x and M, orthonormal M, see `check_orthonormal_basis`); traced inputs
  (inside jit) are not.

  Args:
    x: array whose `axis` has size d.
    basis: M, (d, k) orthonormal columns (exactly-zero padding columns allowed).
    axis: the axis of `x` that lives in R^d.
    check_orthonormal: verify MᵀM = I on concrete inputs (O(d k²)); False
      skips it for a basis known to be orthonormal.

  Returns:
    Array of x's shape and dtype.
  """
  axis = _check_projection_inputs(x, basis, axis, check_orthonormal)
  return _project(x, basis, axis, False)


def project_out(
    x: Array, basis: Array, axis: int = -1, *, check_orthonormal: bool = True
) -> Array:
  """Removes the component of `x` along span(M) (the GPM gradient update).

  axis=-1: x − x M Mᵀ;  axis=0: x − M Mᵀ x, i.e. (I − P) applied on `axis`.
  The result is orthogonal to every column of M, and the op is idempotent,
  when M is orthonormal: concrete inputs are checked (finite x and M, as
  `gpm_update`; orthonormal M, see `check_orthonormal_basis`); traced inputs
  (inside jit) are not.

  Args:
    x: array whose `axis` has size d.
    basis: M, (d, k) orthonormal columns (exactly-zero padding columns allowed).
    axis: the axis of `x` that lives in R^d. Flax Dense kernels are
      (d_in, d_out): projecting a gradient off the *input* space is axis=0.
    check_orthonormal: verify MᵀM = I on concrete inputs (O(d k²)); False
      skips it for a basis known to be orthonormal.

  Returns:
    Array of x's shape and dtype.
  """
  axis = _check_projection_inputs(x, basis, axis, check_orthonormal)
  return _project(x, basis, axis, True)


def project_kernel_gradient(grad: Array, basis: Array) -> Array:
  """GPM gradient projection for a Flax kernel: g ← (I − M Mᵀ) g on d_in.

  Dense kernels are (d_in, d_out). Conv kernels (kh, kw, cin, cout) are
  flattened row-major to (kh·kw·cin, cout); M must index input patches in
  that same (kh, kw, cin) order. Note `lax.conv_general_dilated_patches`
  returns patches in (cin, kh, kw) order: reorder them before building R.

  Args:
    grad: (d_in, d_out) or (kh, kw, cin, cout) (any rank ≥ 2: all axes but
      the last are the input space).
    basis: M, (prod(grad.shape[:-1]), k) orthonormal columns.

  Returns:
    Projected gradient of grad's shape.
  """
  if np.ndim(grad) < 2:
    raise ValueError(
        f"grad must be a kernel of rank ≥ 2 (d_in, d_out) or "
        f"(kh, kw, cin, cout), got shape {np.shape(grad)}."
    )
  shape = np.shape(grad)
  d_in = int(np.prod(shape[:-1]))
  _check_basis(basis, d_in)
  flat = jnp.reshape(grad, (d_in, shape[-1]))
  return jnp.reshape(_project(flat, basis, 0, True), shape)


def scaled_projector(basis: Array, importance: Array) -> Array:
  """SGP importance-scaled projector U diag(λ) Uᵀ (Saha & Roy, AAAI 2023).

  With λ_i ∈ [0, 1] the update g ← g − g U diag(λ) Uᵀ only partially
  blocks direction i; λ = 1 everywhere recovers GPM's M Mᵀ.

  Args:
    basis: U, (d, k) orthonormal columns.
    importance: λ, (k,).

  Returns:
    (d, d) symmetric matrix.
  """
  _check_basis(basis)
  k = np.shape(basis)[1]
  if np.shape(importance) != (k,):
    raise ValueError(
        f"importance must have shape (k,) = ({k},) to match basis "
        f"{np.shape(basis)}, got {np.shape(importance)}."
    )
  _checks.check_finite("importance", importance)
  u = jnp.asarray(basis)
  return _mm(u * jnp.asarray(importance)[None, :], u.T)


# ----------------------------------------------------------------------------
# Geometry between subspaces
# ----------------------------------------------------------------------------


def _check_pair(a: Any, b: Any) -> None:
  _check_basis(a, name="a")
  _check_basis(b, np.shape(a)[0], name="b")


def principal_cosines(a: Array, b: Array) -> Array:
  """Cosines of the principal angles between span(A) and span(B).

  cos θ_i = σ_i(Aᵀ B) (Björck & Golub 1973), descending, clipped to [0, 1].

  Args:
    a: (d, k_a) orthonormal columns.
    b: (d, k_b) orthonormal columns.

  Returns:
    (min(k_a, k_b),) cosines, descending.
  """
  _check_pair(a, b)
  if min(np.shape(a)[1], np.shape(b)[1]) == 0:
    return jnp.zeros((0,), jnp.result_type(a, b))
  return _principal_cosines(a, b)


@jax.jit
def _principal_cosines(a: Array, b: Array) -> Array:
  cross = _mm(jnp.asarray(a).T, jnp.asarray(b))
  return jnp.clip(jnp.linalg.svd(cross, compute_uv=False), 0.0, 1.0)


def principal_angles(a: Array, b: Array) -> Array:
  """Principal angles θ between span(A) and span(B), in radians, ascending.

  cos θ_i = σ_i(Aᵀ B) (see `principal_cosines`). Small angles use the sine
  form sin θ = σ(B − A Aᵀ B) (with A the larger basis), because arccos is
  ill-conditioned near 1 (it would give ~1e-8 instead of 0 in float64);
  this is the same split as `scipy.linalg.subspace_angles` (cos² ≥ 1/2).

  Args:
    a: (d, k_a) orthonormal columns.
    b: (d, k_b) orthonormal columns.

  Returns:
    (min(k_a, k_b),) angles in [0, π/2], ascending.
  """
  _check_pair(a, b)
  if min(np.shape(a)[1], np.shape(b)[1]) == 0:
    return jnp.zeros((0,), jnp.result_type(a, b))
  if np.shape(a)[1] >= np.shape(b)[1]:
    return _principal_angles(a, b)
  return _principal_angles(b, a)


@jax.jit
def _principal_angles(big: Array, small: Array) -> Array:
  cosines = _principal_cosines(big, small)
  big, small = jnp.asarray(big), jnp.asarray(small)
  residual = small - _mm(big, _mm(big.T, small))
  # σ(residual) descending are the sines of the angles in descending order.
  sines = jnp.clip(jnp.linalg.svd(residual, compute_uv=False)[::-1], 0.0, 1.0)
  return jnp.where(cosines**2 >= 0.5, jnp.arcsin(sines), jnp.arccos(cosines))


def subspace_overlap(a: Array, b: Array) -> Array:
  """Mean squared principal cosine: ‖Aᵀ B‖_F² / min(k_a, k_b).

  1 when the smaller space lies inside the other (identical spaces), 0 when
  they are orthogonal; symmetric in (a, b). Defined as 0 if either is empty.

  Args:
    a: (d, k_a) orthonormal columns.
    b: (d, k_b) orthonormal columns.

  Returns:
    Scalar in [0, 1].
  """
  _check_pair(a, b)
  k_min = min(np.shape(a)[1], np.shape(b)[1])
  if k_min == 0:
    return jnp.zeros((), jnp.result_type(a, b))
  return _subspace_overlap(a, b)


@jax.jit
def _subspace_overlap(a: Array, b: Array) -> Array:
  k_min = min(a.shape[1], b.shape[1])
  cross = _mm(jnp.asarray(a).T, jnp.asarray(b))
  return jnp.clip(jnp.sum(cross**2) / k_min, 0.0, 1.0)


def orthonormalize(x: Array, *, method: str = "qr") -> Array:
  """Orthonormal basis Q (QᵀQ = I) of the column space of a full-rank x.

  "qr":  x = Q R with the signs fixed so diag(R) ≥ 0 (unique for full rank,
         Q[:, :j] spans x[:, :j] for every j: Gram-Schmidt order is kept).
  "svd": Q = U of x = U Σ Vᵀ (ordered by energy instead of by column).
  For rank-deficient x use `basis_from_representation` (it drops null
  directions by energy) instead: fixed-shape QR cannot.

  Args:
    x: (d, k) with k ≤ d.
    method: "qr" or "svd".

  Returns:
    (d, k) orthonormal columns.
  """
  _checks.check_ndim("x", x, 2)
  d, k = np.shape(x)
  if k > d:
    raise ValueError(
        f"x has {k} columns, more than its dimension d = {d}: rank larger than "
        f"dimension, at most {d} orthonormal columns exist."
    )
  if method not in ("qr", "svd"):
    raise ValueError(f"method must be 'qr' or 'svd', got {method!r}.")
  _checks.check_finite("x", x)
  return _orthonormalize(x, method)


@functools.partial(jax.jit, static_argnums=1)
def _orthonormalize(x: Array, method: str) -> Array:
  x = jnp.asarray(x)
  if method == "svd":
    return jnp.linalg.svd(x, full_matrices=False)[0]
  q, r = jnp.linalg.qr(x, mode="reduced")
  signs = jnp.where(jnp.diagonal(r) < 0, -1, 1).astype(q.dtype)
  return q * signs[None, :]
