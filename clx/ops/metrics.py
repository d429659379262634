"""Continual-learning metrics from an accuracy matrix.

a[t, i] is the accuracy on task i after training on task t (T × T, 0-based).
Only the lower triangle (i ≤ t) is read: entries above the diagonal (tasks
not seen yet) are ignored and may hold anything, NaN included. Results are
in the unit of `a` (fractions or percent). All functions are jit-able (T is
a static shape; masks replace loops); `summarize_to_floats` is the host
helper that returns Python floats.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clx.ops import _checks

Array = jax.Array


def _as_matrix(a: Any, read: str = "lower") -> Array:
  """Validates a (T, T) accuracy matrix and returns it as a float array.

  ``read``: the entries the caller reads, which must be finite: ``"lower"`` (on or below the
  diagonal) or ``"last_row"`` (a run evaluated after its last task only has no other row).
  """
  if isinstance(a, (str, bytes)):
    raise ValueError(f"accuracy matrix must be a (T, T) numeric array, got a string {a!r:.40}.")
  dtype = getattr(a, "dtype", None)
  if dtype is None:  # lists/tuples: let NumPy infer (None entries become NaN via float)
    values = np.asarray(a)
    if values.dtype == object:
      try:
        a = np.asarray(a, dtype=np.float64)
      except (TypeError, ValueError):
        raise ValueError(
            "accuracy matrix must hold numbers, got non-numeric entries "
            f"(e.g. {next(iter(values.ravel()), None)!r:.40})."
        ) from None
    else:
      a = values
    dtype = a.dtype
  if not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
    raise ValueError(
        f"accuracy matrix must hold numbers, got dtype {dtype} (e.g. strings from a CSV "
        "or JSON file: convert with np.asarray(a, dtype=float))."
    )
  _checks.check_ndim("accuracy matrix", a, 2)
  rows, cols = np.shape(a)
  if rows != cols or rows == 0:
    raise ValueError(
        f"accuracy matrix must be square (T, T) with T ≥ 1, got shape "
        f"{(rows, cols)}."
    )
  matrix = jnp.asarray(a)
  if not jnp.issubdtype(matrix.dtype, jnp.inexact):
    matrix = matrix.astype(jnp.promote_types(matrix.dtype, jnp.float32))
  if _checks.is_concrete(a) and read == "last_row":
    _checks.check_finite("accuracy matrix (last row)", np.asarray(a, dtype=np.float64)[-1])
  elif _checks.is_concrete(a):  # only the read (lower) triangle must be finite
    lower = np.tril(np.asarray(a, dtype=np.float64))
    _checks.check_finite("accuracy matrix (on or below the diagonal)", lower)
  return matrix


def _seen_mask(t: int) -> Array:
  """(T, T) bool, True where i ≤ t (task i already trained at row t)."""
  return jnp.tril(jnp.ones((t, t), dtype=bool))


# Public functions validate on host, then call one jitted implementation:
# eager calls compile once per T instead of once per primitive.
@jax.jit
def _curve(matrix: Array) -> Array:
  t = matrix.shape[0]
  seen_sum = jnp.sum(jnp.where(_seen_mask(t), matrix, 0), axis=1)
  return seen_sum / jnp.arange(1, t + 1, dtype=matrix.dtype)


@jax.jit
def _forgetting(matrix: Array) -> Array:
  t = matrix.shape[0]
  if t == 1:
    return jnp.zeros((0,), matrix.dtype)
  rows = matrix[: t - 1, : t - 1]  # rows t ∈ [0, T−2], columns i < T−1
  best = jnp.max(jnp.where(_seen_mask(t - 1), rows, -jnp.inf), axis=0)
  return best - matrix[t - 1, : t - 1]


@jax.jit
def _ratio(matrix: Array) -> Array:
  t = matrix.shape[0]
  best = jnp.max(jnp.where(_seen_mask(t), matrix, -jnp.inf), axis=0)
  final = matrix[t - 1]
  safe_best = jnp.where(best != 0, best, 1)
  return jnp.where(best != 0, final / safe_best, 1.0).astype(matrix.dtype)


@jax.jit
def _summary(matrix: Array, reference: Array | None) -> dict[str, Array]:
  t = matrix.shape[0]
  diag = jnp.diagonal(matrix)
  final = matrix[t - 1]
  zero = jnp.zeros((), matrix.dtype)
  result = {
      "acc": jnp.mean(final),
      "aia": jnp.mean(_curve(matrix)),
      "bwt": jnp.mean(final[: t - 1] - diag[: t - 1]) if t > 1 else zero,
      "forgetting": jnp.mean(_forgetting(matrix)) if t > 1 else zero,
  }
  if reference is not None:
    result["fwt"] = jnp.mean(diag - reference.astype(matrix.dtype))
  return result


def average_accuracy_curve(a: Any) -> Array:
  """Average accuracy over seen tasks after each task.

    A_t = (1/(t+1)) Σ_{i≤t} a[t, i]

  Args:
    a: (T, T) accuracy matrix.

  Returns:
    (T,) curve; its last entry is ACC, its mean is AIA.
  """
  return _curve(_as_matrix(a))


def per_task_forgetting(a: Any) -> Array:
  """Forgetting of each old task (Chaudhry et al., ECCV 2018).

    f_i = max_{t ∈ [i, T−2]} a[t, i] − a[T−1, i],   i < T−1

  Args:
    a: (T, T) accuracy matrix.

  Returns:
    (T−1,) forgetting (empty for T = 1); positive means accuracy was lost.
  """
  return _forgetting(_as_matrix(a))


def forgetting_ratio(a: Any) -> Array:
  """Share of each task's best accuracy still held at the end.

    ρ_i = a[T−1, i] / max_{t ∈ [i, T−1]} a[t, i]

  Defined as 1 when that maximum is 0 (nothing was ever learnt, so nothing
  was lost), which keeps the result finite.

  Args:
    a: (T, T) accuracy matrix.

  Returns:
    (T,) ratios; ρ_{T−1} = 1, and ρ ≤ 1 for non-negative accuracies.
  """
  return _ratio(_as_matrix(a))


def summarize(a: Any, reference: Any = None) -> dict[str, Array]:
  """Standard CL summary metrics (as 0-D arrays; jit-able).

    acc        = (1/T) Σ_i a[T−1, i]                       (final average)
    aia        = (1/T) Σ_t (1/(t+1)) Σ_{i≤t} a[t, i]       (avg incremental)
    bwt        = (1/(T−1)) Σ_{i<T−1} a[T−1, i] − a[i, i]   (GPM/GEM BWT)
    forgetting = (1/(T−1)) Σ_{i<T−1} max_{t∈[i,T−2]} a[t, i] − a[T−1, i]
    fwt        = (1/T) Σ_i a[i, i] − reference[i]          (only with reference)
  For T = 1, bwt = forgetting = 0. The usual FWT (Lopez-Paz & Ranzato 2017)
  reads a[i−1, i], above the diagonal, which this matrix does not carry;
  here FWT compares the accuracy just after learning task i with a reference
  model trained on task i alone.

  Args:
    a: (T, T) accuracy matrix.
    reference: optional (T,) per-task reference accuracies.

  Returns:
    {"acc", "aia", "bwt", "forgetting"} (+ "fwt") → scalar arrays.
  """
  matrix = _as_matrix(a)
  t = matrix.shape[0]
  if reference is not None:
    if np.shape(reference) != (t,):
      raise ValueError(
          f"reference must have shape (T,) = ({t},), got "
          f"{np.shape(reference)}."
      )
    _checks.check_finite("reference", reference)
    reference = jnp.asarray(reference)
  return _summary(matrix, reference)


def summarize_to_floats(a: Any, reference: Any = None) -> dict[str, float]:
  """Host helper: `summarize` with every value as a Python float.

  Args:
    a: (T, T) accuracy matrix (concrete).
    reference: optional (T,) per-task reference accuracies.

  Returns:
    {"acc", "aia", "bwt", "forgetting"} (+ "fwt") → float.
  """
  return {k: float(v) for k, v in summarize(a, reference).items()}


def accuracy_over_samples(a: Any, test_counts: Any) -> Array:
  """Final accuracy over all seen test **samples** (official InfLoRA ``utils/toolkit.py``).

    acc_samples = Σ_i n_i · a[T−1, i] / Σ_i n_i

  with n_i the number of test examples of task i: the share of all test
  examples classified correctly after the last task (when a[T−1, i] is
  100·correct_i / n_i). ``summarize``'s ``acc`` weights every task equally
  instead; the two agree when all tasks have the same test size (split
  CIFAR-100) and differ on unequal tasks (ImageNet-R's classes).

  Args:
    a: (T, T) accuracy matrix.
    test_counts: (T,) test examples per task, each ≥ 1.

  Returns:
    Scalar array, in the unit of ``a``.
  """
  matrix = _as_matrix(a, read="last_row")  # the rows before it may be unmeasured (NaN)
  t = matrix.shape[0]
  if not isinstance(test_counts, jax.Array):
    test_counts = np.asarray(test_counts)
  if np.shape(test_counts) != (t,):
    raise ValueError(f"test_counts must have shape (T,) = ({t},), got {np.shape(test_counts)}.")
  _checks.check_finite("test_counts", test_counts)
  if _checks.is_concrete(test_counts) and not np.all(np.asarray(test_counts) >= 1):
    raise ValueError(f"test_counts must be >= 1 per task, got {np.asarray(test_counts)}.")
  counts = jnp.asarray(test_counts, matrix.dtype)
  return jnp.sum(counts * matrix[t - 1]) / jnp.sum(counts)
