"""SGP: importance-scaled gradient projection memory (Saha & Roy, AAAI 2023).

Alongside the GPM basis M (d, k), SGP keeps per-direction importances
s ∈ [0, 1]^k and projects gradients with ``(I − M diag(s) Mᵀ)`` instead of the
hard ``(I − M Mᵀ)``. Importances come from singular values σ through
(SGP Eq. 2, official ``update_SGP``)

    s = (α + 1)·σ / (α·σ + max σ),       α = ``scale_coff``.

Update after a later task, following the official code (BECAME repo
``GPM-based/sgp.py``) step by step:

    total = Σ σ²(R);  R_p = M Mᵀ R = U_c Σ_c V_cᵀ
    σ_old = sqrt( (Mᵀ U_c[:, :k])² · Σ_c[:k]² )      new energy on old directions
    R̂ = R − R_p = Û Σ̂ V̂ᵀ; r from the GPM loop on Σ̂ (as gpm_update_fixed)
    σ_all = [σ_old, Σ̂[:r]];  s' = (α+1)σ_all / (ασ_all + max σ_all)
    s'[:k] = clip(s'[:k] + s[:k], 0, 1);  M ← [M, Û[:, :r]] (truncated to d)

Fixed-shape layout as :func:`clx.ops.subspace.gpm_update_fixed`: M is (d, d)
zero-padded with its rank, s is (d,) with zeros past the rank.

One corner differs from the official code: when the memory overflows d
columns, the official code takes ``max σ`` over the new directions *before*
truncating them; here the truncated ones are not counted. This only matters
for a layer whose memory is already full.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp

from clx.ops import subspace

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def _importance(sigma: Array, valid: Array, scale_coff: float) -> Array:
  sigma = jnp.where(valid, sigma, 0.0)
  peak = jnp.max(sigma)
  den = scale_coff * sigma + peak
  safe = jnp.where(den > 0, den, 1.0)
  return jnp.where(valid & (den > 0), (scale_coff + 1.0) * sigma / safe, 0.0)


def sgp_update_fixed(basis_padded: Array, rank: Any, scale: Array, representation: Array,
                     threshold: Any, *, scale_coff: float = 10.0,
                     first_task: Any = None) -> tuple[Array, Array, Array]:
  """One official SGP memory + importance update in the (d, d) padded layout.

  Args:
    basis_padded: (d, d) memory, columns < rank valid.
    rank: k, int scalar.
    scale: (d,) importances of the memory directions (zeros past k).
    representation: R (d, n).
    threshold: ε in (0, 1].
    scale_coff: α of SGP Eq. 2.
    first_task: whether this is the very first update (default: rank == 0).

  Returns:
    (basis (d, d), rank k', scale (d,)). Jit- and vmap-able.
  """
  shapes = "sgp_update_fixed(basis_padded (d, d), rank (), scale (d,), representation (d, n))"
  chex.assert_rank(representation, 2, custom_message=shapes)
  d = representation.shape[0]
  chex.assert_shape([basis_padded, scale], [(d, d), (d,)], custom_message=shapes)
  chex.assert_rank(rank, 0, custom_message=shapes)
  basis, new_rank = subspace.gpm_update_fixed(basis_padded, rank, representation, threshold,
                                              first_task=first_task)
  r_mat = jnp.asarray(representation, basis.dtype)
  d = r_mat.shape[0]
  rank = jnp.asarray(rank, jnp.int32)
  cols = jnp.arange(d)
  old = jnp.where(cols[None, :] < rank, jnp.asarray(basis_padded, basis.dtype), 0.0)
  projected = jnp.matmul(old, jnp.matmul(old.T, r_mat, precision=_HIGHEST), precision=_HIGHEST)
  u_c, s_c, _ = jnp.linalg.svd(projected, full_matrices=False)
  u_c = jnp.pad(u_c, ((0, 0), (0, d - u_c.shape[1])))
  s_c = jnp.pad(s_c, (0, d - s_c.shape[0]))
  s_c = jnp.where(cols < rank, s_c, 0.0)  # the official code uses the top-k pairs only
  sigma_old = jnp.sqrt(jnp.matmul(jnp.matmul(old.T, u_c, precision=_HIGHEST) ** 2, s_c ** 2,
                                  precision=_HIGHEST))
  residual = r_mat - projected
  s_hat = jnp.linalg.svd(residual, compute_uv=False)
  s_hat = jnp.pad(s_hat, (0, d - s_hat.shape[0]))
  # New directions occupy columns [k, k'); their σ are Σ̂[:k'−k] (first task: σ(R)).
  source = jnp.clip(cols - rank, 0, d - 1)
  sigma = jnp.where(cols < rank, sigma_old, s_hat[source])
  importance = _importance(sigma, cols < new_rank, scale_coff)
  importance = jnp.where(cols < rank, jnp.clip(importance + scale, 0.0, 1.0), importance)
  return basis, new_rank, importance.astype(basis.dtype)


def scaled_projection_out(grad: Array, basis_padded: Array, rank: Any, scale: Array) -> Array:
  """``(I − M diag(s) Mᵀ) g`` for a Flax kernel gradient (input axis first).

  Args:
    grad: g, a kernel gradient (D_1, …, D_k, out) with Π D_i = d (dense (d, out); conv HWIO).
    basis_padded: M (d, K), columns < rank valid.
    rank: k, int scalar.
    scale: s (K,) importances.

  Returns:
    ``(I − M_k diag(s) M_kᵀ) g``, shaped like ``grad``.
  """
  shapes = ("scaled_projection_out(grad (D_1..D_k, out) with prod(D) = d, basis_padded (d, K), "
            'rank (), scale (K,))')
  chex.assert_rank(basis_padded, 2, custom_message=shapes)
  chex.assert_shape(basis_padded, (math.prod(grad.shape[:-1]), None), custom_message=shapes)
  chex.assert_shape(scale, (basis_padded.shape[1],), custom_message=shapes)
  cols = jnp.arange(basis_padded.shape[1])
  m = jnp.where(cols[None, :] < rank, basis_padded, 0.0)
  g2 = grad.reshape(-1, grad.shape[-1])
  coords = jnp.matmul(m.T, g2, precision=_HIGHEST) * scale[:, None]
  return (g2 - jnp.matmul(m, coords, precision=_HIGHEST)).reshape(grad.shape)
