"""PCA from accumulated second moments (streaming, jit-able).

A data set too large to hold (every token of a task: N rows of dimension d)
is summarised in one pass by its first and second moments, accumulated batch
by batch inside ``jax.jit``; PCA then needs only the (d, d) covariance:

    moments = {"shift": s (d,), "sum": Σ_i w_i (x_i − s) (d,),
               "outer": Σ_i w_i (x_i − s)(x_i − s)ᵀ (d, d), "count": Σ_i w_i ()}

    μ = s + sum / count                                  (mean)
    C = outer / count − (μ − s)(μ − s)ᵀ                  (covariance 1/N; ddof=1: 1/(N−1))
    C = V Λ Vᵀ  (``jnp.linalg.eigh``), λ_1 ≥ … ≥ λ_d      (descending)
    U = V[:, :k]  (d, k) orthonormal, Λ_k = λ_1..λ_k      (top-k principal directions)

This is the PCA of the centred data matrix X_c = X − μ (N, d): C = X_cᵀX_c / N,
the rows projected as X_c U (N, k). ``w_i ∈ {0, 1}`` masks padding (or weights
rows). The *shift* ``s`` (any point near the data, e.g. the first batch's mean)
keeps float32 accumulation accurate: the raw form Σxxᵀ/N − μμᵀ cancels
catastrophically when |μ| ≫ std, the shifted form does not. ``s = 0`` (the
default) is the raw form.

Eigenvector signs are fixed (the entry of largest magnitude of every column is
positive), so the same data gives the same U on every platform. ``eigh``
returns the eigenvalues ascending; they are reversed here. Negative round-off
eigenvalues are clipped to 0.

Everything is a pure function of arrays (``k`` and ``ddof`` are static), so it
can run inside ``jit``/``vmap``; moments from several passes or devices add with
:func:`merge_moments` (same shift).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from clx.ops import _checks

Array = jax.Array
Moments = dict[str, Array]
_HIGHEST = jax.lax.Precision.HIGHEST


def init_moments(dim: int, *, shift: Array | None = None, dtype: Any = jnp.float32) -> Moments:
  """Empty moments of ``dim``-dimensional rows (count 0).

  Args:
    dim: d, the row dimension.
    shift: s (d,), subtracted from every row before accumulating (default 0).
    dtype: accumulation dtype (float32; float64 under ``jax.enable_x64``).

  Returns:
    ``{"shift": (d,), "sum": (d,), "outer": (d, d), "count": ()}``.
  """
  if int(dim) < 1:
    raise ValueError(f"dim must be >= 1, got {dim}")
  shift = jnp.zeros((dim,), dtype) if shift is None else jnp.asarray(shift, dtype)
  if shift.shape != (dim,):
    raise ValueError(f"shift must have shape ({dim},), got {shift.shape}")
  return {"shift": shift, "sum": jnp.zeros((dim,), dtype), "outer": jnp.zeros((dim, dim), dtype),
          "count": jnp.zeros((), dtype)}


def _check_moments(moments: Moments) -> int:
  keys = {"shift", "sum", "outer", "count"}
  if not isinstance(moments, dict) or set(moments) != keys:
    got = sorted(moments) if isinstance(moments, dict) else type(moments).__name__
    raise ValueError(f"moments must be a dict with keys {sorted(keys)}, got {got}")
  d = np.shape(moments["sum"])[0]
  if np.shape(moments["outer"]) != (d, d) or np.shape(moments["shift"]) != (d,):
    raise ValueError(f"inconsistent moments shapes: shift {np.shape(moments['shift'])}, sum "
                     f"{np.shape(moments['sum'])}, outer {np.shape(moments['outer'])}")
  return d


def accumulate(moments: Moments, x: Array, weights: Array | None = None) -> Moments:
  """Moments after adding the rows of ``x``.

  Args:
    moments: from :func:`init_moments` (or a previous call).
    x: rows ``(..., d)`` (e.g. token embeddings ``(n, L, d)``).
    weights: ``(...)`` row weights, e.g. a 0/1 validity mask ``(n, L)``
      (default: every row counts 1).

  Returns:
    Updated moments (same dtypes). Jit-able.
  """
  d = _check_moments(moments)
  if np.shape(x)[-1] != d:
    raise ValueError(f"x rows have dimension {np.shape(x)[-1]}, the moments have {d}")
  dtype = moments["sum"].dtype
  rows = jnp.reshape(jnp.asarray(x).astype(dtype), (-1, d)) - moments["shift"]
  if weights is None:
    w = jnp.ones((rows.shape[0],), dtype)
  else:
    if tuple(np.shape(weights)) != tuple(np.shape(x)[:-1]):
      raise ValueError(f"weights must have shape {tuple(np.shape(x)[:-1])} (x without its last "
                       f"axis), got {tuple(np.shape(weights))}")
    w = jnp.reshape(jnp.asarray(weights).astype(dtype), (-1,))
  weighted = rows * w[:, None]
  return {"shift": moments["shift"],
          "sum": moments["sum"] + jnp.sum(weighted, axis=0),
          "outer": moments["outer"] + jnp.matmul(weighted.T, rows, precision=_HIGHEST),
          "count": moments["count"] + jnp.sum(w)}


def merge_moments(a: Moments, b: Moments) -> Moments:
  """Moments of the union of two row sets (both accumulated with the same shift).

  Args:
    a: moments ``{"shift" (d,), "sum" (d,), "outer" (d, d), "count" ()}``.
    b: moments of other rows, same d and shift.

  Returns:
    ``{"shift": a's, "sum": a + b, "outer": a + b, "count": a + b}``.

  Raises:
    ValueError: malformed moments, or (concrete) shifts that differ.
  """
  _check_moments(a)
  _check_moments(b)
  if (_checks.is_concrete(a["shift"]) and _checks.is_concrete(b["shift"])
      and not np.array_equal(np.asarray(a["shift"]), np.asarray(b["shift"]))):
    raise ValueError("cannot merge moments accumulated with different shifts")
  return {"shift": a["shift"], "sum": a["sum"] + b["sum"], "outer": a["outer"] + b["outer"],
          "count": a["count"] + b["count"]}


def mean_covariance(moments: Moments, *, ddof: int = 0) -> tuple[Array, Array]:
  """``(μ (d,), C (d, d))`` of the accumulated rows.

  C = (outer − count·δδᵀ) / (count − ddof) with δ = sum / count (the mean
  relative to the shift); symmetrised. With count 0 both are zero.

  Args:
    moments: accumulated rows (:func:`accumulate`).
    ddof: 0 (divide by count) or 1 (unbiased).

  Returns:
    ``(μ (d,), C (d, d))`` in the moments' dtype; μ = shift + δ.

  Raises:
    ValueError: malformed moments.
  """
  _check_moments(moments)
  return _mean_cov(moments, ddof)


@functools.partial(jax.jit, static_argnums=1)
def _mean_cov(moments, ddof):
  count = moments["count"]
  safe = jnp.maximum(count, 1e-30)
  delta = moments["sum"] / safe
  mean = jnp.where(count > 0, moments["shift"] + delta, 0.0)
  scatter = moments["outer"] - count * jnp.outer(delta, delta)
  cov = scatter / jnp.maximum(count - ddof, 1e-30)
  cov = 0.5 * (cov + cov.T)
  return mean, jnp.where(count > ddof, cov, 0.0)


def fix_signs(vectors: Array) -> Array:
  """Flips each column so its entry of largest magnitude is positive (deterministic PCA).

  Args:
    vectors: (d, k) columns (eigenvectors).

  Returns:
    (d, k) ``vectors · diag(s)``, s_j = sign of column j's largest-|·| entry (1 where it is 0).
  """
  v = jnp.asarray(vectors)
  idx = jnp.argmax(jnp.abs(v), axis=0)
  signs = jnp.sign(v[idx, jnp.arange(v.shape[1])])
  return v * jnp.where(signs == 0, 1, signs).astype(v.dtype)[None, :]


def pca_from_moments(moments: Moments, k: int, *, ddof: int = 0) -> dict[str, Array]:
  """Top-``k`` PCA of the accumulated rows.

  Args:
    moments: accumulated rows (see the module docstring).
    k: number of components, 1 ≤ k ≤ d (static). Components beyond the data's
      rank (fewer rows than k) have eigenvalue ~0 and are arbitrary but still
      orthonormal.
    ddof: 0 (C = X_cᵀX_c/N, the default) or 1 (unbiased).

  Returns:
    ``{"mean": μ (d,), "components": U (d, k) orthonormal columns, descending
    variance, "eigenvalues": λ_1..λ_k (k,) ≥ 0, "total_variance": tr C ()}``;
    the explained-variance ratio is ``eigenvalues / total_variance``. Jit-able.
  """
  d = _check_moments(moments)
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= d:
    raise ValueError(f"k must be an int in [1, d={d}], got {k!r}")
  return _pca(moments, int(k), int(ddof))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pca(moments, k, ddof):
  mean, cov = _mean_cov(moments, ddof)
  evals, evecs = jnp.linalg.eigh(cov)
  evals, evecs = evals[::-1][:k], evecs[:, ::-1][:, :k]
  return {"mean": mean, "components": fix_signs(evecs), "eigenvalues": jnp.maximum(evals, 0.0),
          "total_variance": jnp.maximum(jnp.trace(cov), 0.0)}


def pca(x: Array, k: int, *, weights: Array | None = None, ddof: int = 0,
        shift: Array | None = None) -> dict[str, Array]:
  """PCA of the rows of ``x`` (..., d) in one call (moments, then :func:`pca_from_moments`).

  ``shift`` defaults to the first row (accurate float32 accumulation).

  Args:
    x: rows (..., d).
    k: number of components, 1 ≤ k ≤ d (static).
    weights: (...) row weights (x without its last axis), or None for 1 each.
    ddof: 0 or 1, see :func:`pca_from_moments`.
    shift: s (d,) subtracted before accumulating, or None for the first row.

  Returns:
    ``{"mean" (d,), "components" (d, k), "eigenvalues" (k,), "total_variance" ()}``
    (:func:`pca_from_moments`); accumulated in float32 (float64 for float64 ``x``).

  Raises:
    ValueError: ``k`` outside [1, d], or ``weights`` of the wrong shape.
  """
  x = jnp.asarray(x)
  d = x.shape[-1]
  dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  if shift is None:
    shift = jnp.reshape(x, (-1, d))[0]
  moments = accumulate(init_moments(d, shift=shift, dtype=dtype), x, weights)
  return pca_from_moments(moments, k, ddof=ddof)


def _check_basis(x: Array, mean: Array, components: Array) -> None:
  """Rows ``x`` (..., d), ``mean`` (d,) and ``components`` (d, k) agree (trace-time, chex)."""
  shapes = "pca.project / residual_fraction(x (..., d), mean (d,), components (d, k))"
  chex.assert_rank(components, 2, custom_message=shapes)
  chex.assert_shape(mean, (components.shape[0],), custom_message=shapes)
  chex.assert_axis_dimension(x, -1, components.shape[0], custom_message=shapes)


def project(x: Array, mean: Array, components: Array) -> Array:
  """Coordinates ``(x − μ) U`` (..., k) of rows ``x`` (..., d) in the principal basis.

  Args:
    x: rows (..., d).
    mean: μ (d,).
    components: U (d, k).

  Returns:
    (..., k) coordinates (x − μ) U.

  Raises:
    AssertionError: mismatched shapes (chex).
  """
  _check_basis(x, mean, components)
  return jnp.matmul(jnp.asarray(x) - mean, components, precision=_HIGHEST)


def reconstruct(coords: Array, mean: Array, components: Array) -> Array:
  """Rows ``coords Uᵀ + μ`` (..., d) from principal coordinates (..., k).

  Args:
    coords: (..., k) principal coordinates.
    mean: μ (d,).
    components: U (d, k).

  Returns:
    (..., d) rows coords Uᵀ + μ.

  Raises:
    AssertionError: mismatched shapes (chex).
  """
  shapes = "pca.reconstruct(coords (..., k), mean (d,), components (d, k))"
  chex.assert_rank(components, 2, custom_message=shapes)
  chex.assert_shape(mean, (components.shape[0],), custom_message=shapes)
  chex.assert_axis_dimension(coords, -1, components.shape[1], custom_message=shapes)
  return jnp.matmul(coords, jnp.asarray(components).T, precision=_HIGHEST) + mean


def residual_fraction(x: Array, mean: Array, components: Array, eps: float = 1e-12) -> Array:
  """``‖(x − μ) − (x − μ)UUᵀ‖² / ‖x − μ‖²`` per row (...,): 0 in the affine span, ≤ 1.

  Args:
    x: rows (..., d).
    mean: μ (d,).
    components: U (d, k), orthonormal columns.
    eps: lower bound of the denominator (a row equal to μ gives 0).

  Returns:
    (...) fractions in [0, 1].

  Raises:
    AssertionError: mismatched shapes (chex).
  """
  _check_basis(x, mean, components)
  centred = jnp.asarray(x) - mean
  inside = jnp.matmul(jnp.matmul(centred, components, precision=_HIGHEST), components.T,
                      precision=_HIGHEST)
  total = jnp.sum(centred**2, axis=-1)
  return jnp.sum((centred - inside) ** 2, axis=-1) / jnp.maximum(total, eps)


__all__ = ["Moments", "accumulate", "fix_signs", "init_moments", "mean_covariance",
           "merge_moments", "pca", "pca_from_moments", "project", "reconstruct",
           "residual_fraction"]
