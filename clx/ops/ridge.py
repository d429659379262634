"""RanPAC-style closed-form classifier head: random projection, Gram statistics, ridge.

RanPAC (McDonnell et al., NeurIPS 2023) and PROTEUS' code (``Alisia0303/HESTIA``,
``baselines/RanPAC/lib/random_projection.py``) classify a frozen feature ``f`` (d,) by

    h = ReLU(f W_rand)                W_rand (d, M) with N(0, 1) entries, M = 10,000
    logits = h W_o,   W_o = (G + λ I)⁻¹ Q,   G = Σ hᵀh,  Q = Σ hᵀ y   (y one-hot)

where ``G`` and ``Q`` are accumulated over every task seen so far (no replay: only the
(M, M) and (M, C) sums are kept). The ridge λ is chosen per task from ``10⁻⁸ … 10⁸`` by
fitting on the first 80 % of the task's projected features and measuring the mean squared
error of the one-hot targets on the remaining 20 % (``optimise_ridge_parameter``).

Here :func:`select_ridge` evaluates the whole λ grid with one eigendecomposition of the fit
Gram (``W(λ) = V diag(1/(e + λ)) Vᵀ Q``), which is the same closed form for every λ. It can
add earlier tasks' statistics to the fit part (``base_gram``/``base_xty``), so λ is chosen
for the head that will actually be used; with ``None`` it is the code's per-task choice.
Everything is jit-able; shapes are static.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from clx.ops import _checks

Array = jax.Array
RIDGE_GRID = tuple(10.0 ** np.arange(-8, 9))  # the code's np.arange(-8, 9)
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def random_projection(key: Array, d: int, m: int, dtype: Any = jnp.float32) -> Array:
  """``W_rand (d, m)`` with i.i.d. N(0, 1) entries (``torch.randn(d, M)`` in the code).

  Args:
    key: the PRNG key.
    d: feature size.
    m: M, the projected size (RanPAC: 10,000).
    dtype: the entries' dtype.

  Returns:
    (d, M) W_rand.
  """
  return jax.random.normal(key, (d, m), dtype)


def project(features: Array, w_rand: Array) -> Array:
  """``ReLU(f W_rand)``, ``(n, M)``.

  Args:
    features: f (..., d).
    w_rand: W_rand (d, M).

  Returns:
    (..., M) h = ReLU(f W_rand), in the features' dtype.

  Raises:
    AssertionError: mismatched shapes (chex).
  """
  shapes = "ridge.project(features (..., d), w_rand (d, M))"
  chex.assert_rank(w_rand, 2, custom_message=shapes)
  chex.assert_axis_dimension(features, -1, w_rand.shape[0], custom_message=shapes)
  return jax.nn.relu(_mm(features, w_rand.astype(features.dtype)))


def init_statistics(m: int, num_classes: int, dtype: Any = jnp.float32) -> dict[str, Array]:
  """Zero ``{"gram" (M, M), "xty" (M, C), "count" ()}``.

  Args:
    m: M, the projected size.
    num_classes: C.
    dtype: dtype of ``gram`` and ``xty`` (``count`` is int32).

  Returns:
    ``{"gram": G (M, M), "xty": Q (M, C), "count": ()}``, all zero.
  """
  return {"gram": jnp.zeros((m, m), dtype), "xty": jnp.zeros((m, num_classes), dtype),
          "count": jnp.zeros((), jnp.int32)}


def one_hot(labels: Array, num_classes: int, dtype: Any = jnp.float32) -> Array:
  """Targets ``(n, C)`` of int labels ``(n,)`` (RanPAC's ``target2onehot``).

  Args:
    labels: (n,) int class ids in [0, C). Concrete labels outside that range raise a
      ValueError; under ``jit`` (traced labels) they cannot be checked and give a zero row.
    num_classes: C.
    dtype: the targets' dtype.

  Returns:
    (n, C) Y with Y[i, labels[i]] = 1.

  Raises:
    ValueError: concrete labels that are not in [0, num_classes), or not 1-D.
  """
  if _checks.is_concrete(labels):
    host = np.asarray(labels)
    if host.ndim != 1:
      raise ValueError(f"ridge.one_hot: labels must be (n,), got shape {host.shape}")
    bad = host[(host < 0) | (host >= num_classes)]
    if bad.size:
      raise ValueError(f"ridge.one_hot: {bad.size} label(s) outside [0, {num_classes}), "
                       f"e.g. {sorted(set(bad.tolist()))[:5]}; a ridge target row would be all "
                       "zeros")
  return jax.nn.one_hot(labels, num_classes, dtype=dtype)


def accumulate(stats: dict, h: Array, y: Array, mask: Array | None = None) -> dict[str, Array]:
  """Add ``hᵀh`` and ``hᵀy`` of a batch (rows with ``mask == 0`` ignored).

  Args:
    stats: from :func:`init_statistics`.
    h: ``(n, M)`` projected features.
    y: ``(n, C)`` targets (one-hot).
    mask: optional ``(n,)`` 0/1 row weights.

  Returns:
    ``{"gram" (M, M), "xty" (M, C), "count" ()}`` with the batch added.
  """
  shapes = ("ridge.accumulate(stats {gram (M, M), xty (M, C)}, h (n, M), y (n, C), "
            "mask (n,) or None)")
  chex.assert_rank([h, y], 2, custom_message=shapes)
  chex.assert_shape([stats["gram"], stats["xty"], y],
                    [(h.shape[1], h.shape[1]), (h.shape[1], y.shape[1]), (h.shape[0], None)],
                    custom_message=shapes)
  if mask is not None:
    chex.assert_shape(mask, (h.shape[0],), custom_message=shapes)
    w = mask.astype(h.dtype)[:, None]
    h, y = h * w, y * w
    count = jnp.sum(mask > 0).astype(jnp.int32)
  else:
    count = jnp.asarray(h.shape[0], jnp.int32)
  return {"gram": stats["gram"] + _mm(h.T, h), "xty": stats["xty"] + _mm(h.T, y.astype(h.dtype)),
          "count": stats["count"] + count}


def solve(gram: Array, xty: Array, ridge: float | Array) -> Array:
  """``W_o = (G + λ I)⁻¹ Q`` by a Cholesky solve, ``(M, C)``.

  Args:
    gram: G (M, M), symmetric positive semi-definite.
    xty: Q (M, C).
    ridge: λ > 0, a float or () array.

  Returns:
    (M, C) W_o = (G + λ I)⁻¹ Q (NaN when G + λ I is not positive definite).

  Raises:
    AssertionError: mismatched shapes (chex).
  """
  shapes = "ridge.solve(gram (M, M), xty (M, C))"
  chex.assert_rank([gram, xty], 2, custom_message=shapes)
  chex.assert_shape(gram, (xty.shape[0], xty.shape[0]), custom_message=shapes)
  m = gram.shape[0]
  a = gram + ridge * jnp.eye(m, dtype=gram.dtype)
  chol = jax.scipy.linalg.cho_factor(a, lower=True)
  return jax.scipy.linalg.cho_solve(chol, xty)


@functools.partial(jax.jit, static_argnames=("fit_fraction",))
def _ridge_losses(h, y, base_gram, base_xty, grid, *, fit_fraction):
  n = h.shape[0]
  n_fit = int(n * fit_fraction)
  h_fit, y_fit = h[:n_fit], y[:n_fit]
  h_val, y_val = h[n_fit:], y[n_fit:]
  gram = base_gram + _mm(h_fit.T, h_fit)
  xty = base_xty + _mm(h_fit.T, y_fit)
  evals, evecs = jnp.linalg.eigh(gram)
  evals = jnp.maximum(evals, 0.0)
  proj_q = _mm(evecs.T, xty)        # (M, C)
  proj_v = _mm(h_val, evecs)        # (n_val, M)

  def loss(lam):
    pred = _mm(proj_v, proj_q / (evals + lam)[:, None])
    return jnp.mean((pred - y_val) ** 2)

  return jax.lax.map(loss, grid)


def select_ridge(h: Array, y: Array, *, grid: Sequence[float] = RIDGE_GRID,
                 fit_fraction: float = 0.8, base_gram: Array | None = None,
                 base_xty: Array | None = None) -> tuple[float, Array]:
  """Choose λ on a held-out split: fit on the first ``fit_fraction`` of the rows,
  mean squared error of the targets on the rest (the code's ``optimise_ridge_parameter``).

  Args:
    h: ``(n, M)`` projected features of the current task, in the order to split
      (shuffle first if the data is sorted by class).
    y: ``(n, C)`` one-hot targets.
    grid: candidate λ values.
    fit_fraction: share of rows in the fit part.
    base_gram, base_xty: statistics of earlier tasks added to the fit part (default none).

  Returns:
    ``(best λ, losses (len(grid),))``.
  """
  h = jnp.asarray(h)
  y = jnp.asarray(y, h.dtype)
  shapes = "select_ridge(h (n, M), y (n, C), finite)"
  chex.assert_rank([h, y], 2, custom_message=shapes)
  chex.assert_axis_dimension(y, 0, h.shape[0], custom_message=shapes)
  # Host-side (λ is chosen on the host), so the values are concrete: NaN would pick λ silently.
  chex.assert_tree_all_finite([h, y], custom_message=shapes)
  n, m = h.shape
  n_fit = int(n * fit_fraction)
  if n_fit < 1 or n_fit >= n:
    raise ValueError(f"fit_fraction {fit_fraction} of {n} rows leaves an empty fit or held-out part")
  if base_gram is None:
    base_gram = jnp.zeros((m, m), h.dtype)
  if base_xty is None:
    base_xty = jnp.zeros((m, y.shape[1]), h.dtype)
  grid_arr = jnp.asarray(grid, h.dtype)
  losses = _ridge_losses(h, y, jnp.asarray(base_gram, h.dtype), jnp.asarray(base_xty, h.dtype),
                         grid_arr, fit_fraction=float(fit_fraction))
  best = int(jnp.argmin(losses))
  return float(grid[best]), losses


def logits(features: Array, w_rand: Array, w_out: Array) -> Array:
  """``ReLU(f W_rand) W_o``, ``(n, C)``.

  Args:
    features: f (n, d).
    w_rand: W_rand (d, M).
    w_out: W_o (M, C).

  Returns:
    (n, C) ReLU(f W_rand) W_o, in the features' dtype.

  Raises:
    AssertionError: mismatched shapes (chex).
  """
  shapes = "ridge.logits(features (n, d), w_rand (d, M), w_out (M, C))"
  chex.assert_rank(w_out, 2, custom_message=shapes)
  chex.assert_axis_dimension(w_out, 0, w_rand.shape[-1], custom_message=shapes)
  return _mm(project(features, w_rand), w_out.astype(features.dtype))


def update_head(stats: dict, h: Array, y: Array, *, grid: Sequence[float] = RIDGE_GRID,
                fit_fraction: float = 0.8, with_history: bool = False
                ) -> tuple[dict[str, Array], float]:
  """One task's head update: choose λ on this task's rows, add them to the statistics, solve.

  RanPAC's ``replace_fc`` (``RanPAC.py`` l.115–126): ``Q += Hᵀ Y``, ``G += Hᵀ H``, λ from
  ``optimise_ridge_parameter`` on the task's rows alone (``with_history=False``; ``True``
  adds the earlier statistics to the fit part, :func:`select_ridge`), ``W_o = (G + λ I)⁻¹ Q``.

  Args:
    stats: ``{"gram" (M, M), "xty" (M, C), "count"}`` of the earlier tasks.
    h: ``(n, M)`` projected features of the task, in the order to split (the code's loader
      is shuffled: permute before calling).
    y: ``(n, C)`` one-hot targets.
    grid, fit_fraction: see :func:`select_ridge`.
    with_history: see above.

  Returns:
    ``(new statistics with "w_out" (M, C), λ)``.
  """
  lam, _ = select_ridge(h, y, grid=grid, fit_fraction=fit_fraction,
                        base_gram=stats["gram"] if with_history else None,
                        base_xty=stats["xty"] if with_history else None)
  new = accumulate({k: stats[k] for k in ("gram", "xty", "count")}, h, y)
  return {**new, "w_out": solve(new["gram"], new["xty"], jnp.asarray(lam, new["gram"].dtype))}, lam


__all__ = ["RIDGE_GRID", "accumulate", "init_statistics", "logits", "one_hot", "project",
           "random_projection", "select_ridge", "solve", "update_head"]
