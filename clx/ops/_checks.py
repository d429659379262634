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
  """Raises ValueError unless `x` has (one of) the given rank(s).

  Args:
    name: the argument's name, for the message.
    x: an array or array-like (only its shape is read; tracers are fine).
    ndim: the allowed rank, or a tuple of allowed ranks.

  Raises:
    ValueError: ``np.ndim(x)`` is not allowed (the message gives the shape).
  """
  allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
  if np.ndim(x) not in allowed:
    want = " or ".join(f"{n}-D" for n in allowed)
    raise ValueError(
        f"{name} must be {want}, got shape {tuple(np.shape(x))}."
    )


# Above this many elements a device array is reduced on device and only a
# bool crosses to host; below it a host copy is cheaper than compiling a
# reduction for every new shape.
_DEVICE_REDUCE_SIZE = 1 << 20


def _host_values(x: Any) -> np.ndarray:
  values = np.asarray(x)
  is_ml_dtype = values.dtype.kind not in "fc"  # bfloat16 & co. (ml_dtypes)
  if is_ml_dtype and jnp.issubdtype(values.dtype, jnp.inexact):
    values = values.astype(np.float32)
  return values


def check_finite(name: str, x: Any) -> None:
  """Raises ValueError if a concrete `x` holds NaN or Inf (no-op on tracers).

  Args:
    name: the argument's name, for the message.
    x: an array or array-like; tracers and non-float dtypes are not checked.

  Raises:
    ValueError: NaN or Inf entries (the message counts them).
  """
  if not is_concrete(x):
    return
  if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
    return
  if isinstance(x, jax.Array) and x.size > _DEVICE_REDUCE_SIZE:
    if bool(jnp.all(jnp.isfinite(x))):
      return
  values = _host_values(x)
  if np.all(np.isfinite(values)):
    return
  n_nan = int(np.sum(np.isnan(values)))
  n_inf = int(np.sum(np.isinf(values)))
  raise ValueError(
      f"{name} must be finite, found {n_nan} NaN and {n_inf} Inf "
      f"entries (shape {values.shape})."
  )


def check_threshold(name: str, threshold: Any) -> None:
  """Raises ValueError unless a concrete `threshold` is a scalar in (0, 1].

  Args:
    name: the argument's name, for the message.
    threshold: a scalar; a tracer only has its rank checked.

  Raises:
    ValueError: not a scalar, or a concrete value outside (0, 1] (NaN included).
  """
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
  """Raises ValueError when a concrete `x` has negative entries.

  Args:
    name: the argument's name, for the message.
    x: an array or array-like; tracers and empty arrays are not checked.

  Raises:
    ValueError: an entry < 0 (the message gives the minimum).
  """
  if not is_concrete(x) or np.size(x) == 0:
    return
  if isinstance(x, jax.Array) and x.size > _DEVICE_REDUCE_SIZE:
    if bool(jnp.all(x >= 0)):
      return
  values = _host_values(x)
  if np.all(values >= 0):
    return
  raise ValueError(
      f"{name} must be non-negative, found minimum {values.min()!r}."
  )
