"""Adam-NSCL: the optimiser's update projected into the approximate null space of old inputs.

Adam-NSCL (Wang et al., CVPR 2021), as the BECAME repository's ``NSCL-based/``
code runs it (``svd_agent/svd_based.py``, ``optim/adam_svd.py``), per projected
layer l with input dimension D (a linear layer's inputs; a convolution's
im2col patches, in clx's (kh, kw, C) row order):

1. After every task, a pass over the task's training batches accumulates an
   uncentred input covariance over *all tasks so far* (never reset). The
   official ``SVDAgentAvg`` adds, per batch, the outer product of the
   **batch-mean** input (a convolution: the patches of the batch-mean image):

       C ← C + Σ_batches M_bᵀ M_b,   M_b = mean_{n∈b} X_n   ((1, D), or (P, D) patches)

   (:func:`batch_mean_covariance`). ``"sample"`` (:func:`sample_covariance`) is
   the plain Σ_n X_nᵀ X_n of the paper's description.
2. Eigen-decomposition C = U diag(s) Uᵀ (the code takes ``torch.svd``: s are the
   singular values, descending). The approximate null space is spanned by the
   columns whose value is within ``threshold`` (``svd_thres``: 10 on CIFAR-100
   10 tasks, 30 on 20 tasks) of the smallest:

       B = U[:, s ≤ s_min · threshold],   P = B Bᵀ / ‖B Bᵀ‖_F = B Bᵀ / √k

   (the code normalises the projector by its Frobenius norm, which scales the
   step by 1/√k; kept, :func:`null_space_projector`).
3. While learning the next task, every step's **update** (Adam's −lr·m̂/(√v̂+ε),
   after its L2 weight decay) is replaced by its projection on the input side,
   Δ ← P Δ for a Flax kernel (D, out) (the code: Δ_torch (out, D) @ P)
   (:func:`project_update`). An old input x changes the layer's output by
   xᵀ P Δ: zero when x is orthogonal to span(B), i.e. lies in the span of the
   covariance's larger eigenvectors, and small otherwise (old inputs carry
   little energy along B by construction).

All functions are pure and jit-able.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from clx.ops import _checks

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST
COVARIANCES = ("batch_mean", "sample")


def _rows(x: Array) -> Array:
  return x.reshape(-1, x.shape[-1])


def batch_mean_covariance(inputs: Array) -> Array:
  """One batch's term of the official ``SVDAgentAvg`` covariance, M_bᵀ M_b.

  Args:
    inputs: (B, ..., D) a layer's inputs for one batch (B examples; a conv's
      patches (B, P, D); tokens (B, L, D)).

  Returns:
    (D, D): M_bᵀ M_b with M_b = mean over the batch axis, rows flattened.
  """
  if np.ndim(inputs) < 2:
    raise ValueError(f"inputs must be (B, ..., D), got shape {np.shape(inputs)}")
  x = jnp.asarray(inputs)
  m = _rows(jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=0))  # (1 or P, D)
  return jnp.matmul(m.T, m, precision=_HIGHEST)


def sample_covariance(inputs: Array) -> Array:
  """Σ_rows x xᵀ (D, D) of a batch's inputs (B, ..., D): the paper's uncentred covariance.

  Args:
    inputs: (B, ..., D) layer inputs; every leading position is a row x.

  Returns:
    (D, D) Σ_rows x xᵀ (not divided by the row count).

  Raises:
    ValueError: ``inputs`` has fewer than 2 dimensions.
  """
  if np.ndim(inputs) < 2:
    raise ValueError(f"inputs must be (B, ..., D), got shape {np.shape(inputs)}")
  x = _rows(jnp.asarray(inputs))
  return jnp.matmul(x.T, x, precision=_HIGHEST)


def null_space_projector(cov: Array, threshold: float) -> tuple[Array, Array]:
  """The official Adam-NSCL transform P = B Bᵀ / ‖B Bᵀ‖_F.

  B holds the eigenvectors of ``cov`` whose singular value s (= |eigenvalue|)
  satisfies s ≤ s_min · threshold.

  Args:
    cov: C (D, D), symmetric (the accumulated uncentred covariance).
    threshold: ``svd_thres`` (≥ 1; official 10 / 30).

  Returns:
    ``(P (D, D), k)``: the normalised projector and the null-space dimension
    k (int32). A zero ``cov`` (no data yet) gives k = D and P = I/√D.
  """
  _checks.check_ndim("cov", cov, 2)
  if np.shape(cov)[0] != np.shape(cov)[1]:
    raise ValueError(f"cov must be square, got shape {np.shape(cov)}")
  if not threshold >= 1.0:
    raise ValueError(f"threshold must be >= 1 (s <= s_min * threshold), got {threshold}")
  if _checks.is_concrete(cov) and not np.all(np.isfinite(np.asarray(cov))):
    raise ValueError("cov has NaN/Inf entries")
  return _projector(jnp.asarray(cov), float(threshold))


@functools.partial(jax.jit, static_argnums=1)
def _projector(cov, threshold):
  dtype = jnp.promote_types(cov.dtype, jnp.float32)
  sym = (cov.astype(dtype) + cov.astype(dtype).T) / 2
  eigvals, eigvecs = jnp.linalg.eigh(sym)
  s = jnp.abs(eigvals)  # singular values of a symmetric matrix
  keep = s <= jnp.min(s) * threshold
  k = jnp.sum(keep)
  basis = eigvecs * keep[None, :].astype(dtype)
  projector = jnp.matmul(basis, basis.T, precision=_HIGHEST) / jnp.sqrt(k.astype(dtype))
  return projector, k.astype(jnp.int32)


def project_update(update: Array, projector: Array) -> Array:
  """P Δ on the input side of a Flax kernel (..., out), leading axes flattened to D.

  Args:
    update: Δ, a kernel-shaped update (D_1, …, D_k, out) with Π D_i = D
      (dense (D, out); conv HWIO (kh, kw, C, out), rows in (kh, kw, C) order).
    projector: P (D, D).

  Returns:
    P Δ reshaped like ``update``.
  """
  shape = np.shape(update)
  d = int(np.prod(shape[:-1]))
  if np.shape(projector) != (d, d):
    raise ValueError(f"projector must be ({d}, {d}) for an update of shape {shape}, "
                     f"got {np.shape(projector)}")
  flat = jnp.reshape(update, (d, shape[-1]))
  return jnp.matmul(projector.astype(flat.dtype), flat, precision=_HIGHEST).reshape(shape)


__all__ = ["COVARIANCES", "batch_mean_covariance", "null_space_projector", "project_update",
           "sample_covariance"]
