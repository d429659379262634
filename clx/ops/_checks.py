"""Host-side input checks shared by the ops modules.

Every check here runs only when its input is concrete (a NumPy array, a Python
number or a committed `jax.Array`). Under `jax.jit`/`vmap` the inputs are
tracers and value checks are skipped, so the ops stay jit-able; shape checks
always run because shapes are static even under tracing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when `x` carries values on host, i.e. it is not a JAX tracer.

  Args:
    x: any array-like or Python scalar.

  Returns:
    False for `jax.core.Tracer` instances (inside jit/vmap/grad), else True.
  """
  return not isinstance(x, jax.core.Tracer)


def check_ndim(name: str, x: Any, ndim: int | tuple[int, ...]) -> None:
  """Raises ValueError unless `x` has (one of) the given rank(s)."""
  allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
  if np.ndim(x) not in allowed:
    want = " or ".join(f"{n}-D" for n in allowed)
    raise ValueError(
        f"{name} must be {want}, got shape {tuple(np.shape(x))}."
    )


def check_finite(name: str, x: Any) -> None:
  """Raises ValueError when a concrete `x` holds NaN or Inf (no-op on tracers)."""
  if not is_concrete(x):
    return
  # jnp handles bf16 and device arrays; only small counts cross to host.
  values = jnp.asarray(x)
  if not jnp.issubdtype(values.dtype, jnp.inexact):
    return
  if bool(jnp.all(jnp.isfinite(values))):
    return
  n_nan = int(jnp.sum(jnp.isnan(values)))
  n_inf = int(jnp.sum(jnp.isinf(values)))
  raise ValueError(
      f"{name} must be finite, found {n_nan} NaN and {n_inf} Inf "
      f"entries (shape {values.shape})."
  )


def check_threshold(name: str, threshold: Any) -> None:
  """Raises ValueError unless a concrete `threshold` is a scalar in (0, 1]."""
  if np.ndim(threshold) != 0:
    raise ValueError(
        f"{name} must be a scalar, got shape {tuple(np.shape(threshold))}."
    )
  if not is_concrete(threshold):
    return
  value = float(np.asarray(threshold))
  if not (0.0 < value <= 1.0):  # also rejects NaN
    raise ValueError(f"{name} must lie in (0, 1], got {value!r}.")


def check_nonnegative(name: str, x: Any) -> None:
  """Raises ValueError when a concrete `x` has negative entries."""
  if not is_concrete(x):
    return
  values = jnp.asarray(x)
  if values.size == 0 or bool(jnp.all(values >= 0)):
    return
  raise ValueError(
      f"{name} must be non-negative, found minimum {float(jnp.min(values))!r}."
  )
