"""Atomic JSON / bytes side files of a run, written from process 0 by default."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Literal

import jax
import numpy as np

from clx._io import write_atomic
from clx.checkpoint.hashing import _to_host

NonFinite = Literal["error", "null"]


def _to_json(obj: Any, where: str, nonfinite: NonFinite) -> Any:
  """Converts ``obj`` to plain JSON types (numpy/jax scalars and arrays included)."""
  if obj is None or isinstance(obj, bool):
    return obj
  if isinstance(obj, str):
    return str(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)) or (
      isinstance(obj, np.generic) and np.dtype(obj.dtype).kind == "V"):  # ml_dtypes floats
    f = float(obj)
    if math.isfinite(f):
      return f
    if nonfinite == "null":
      return None
    raise ValueError(f"{where} is {f}, which JSON cannot represent; pass "
                     "nonfinite='null' to store non-finite floats as null")
  if isinstance(obj, (jax.Array, np.ndarray)):
    arr = _to_host(obj, where)
    if arr.dtype.kind == "c":
      raise TypeError(f"{where} is a complex array, which is not JSON-serialisable")
    return _to_json(arr.tolist() if arr.dtype.kind != "V" else arr.astype(np.float32).tolist(),
                    where, nonfinite)
  if isinstance(obj, Mapping):
    out = {}
    for k, v in obj.items():
      if not isinstance(k, str):
        raise TypeError(f"{where} has key {k!r} of type {type(k).__name__}; JSON object keys "
                        "must be str")
      out[str(k)] = _to_json(v, f"{where}[{k!r}]", nonfinite)
    return out
  if isinstance(obj, (list, tuple)):
    return [_to_json(v, f"{where}[{i}]", nonfinite) for i, v in enumerate(obj)]
  raise TypeError(f"{where} has type {type(obj).__name__}, which is not JSON-serialisable")


def _check_nonfinite(nonfinite: str) -> NonFinite:
  if nonfinite not in ("error", "null"):
    raise ValueError(f"nonfinite must be 'error' or 'null', got {nonfinite!r}")
  return nonfinite  # type: ignore[return-value]


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview, *,
                       all_processes: bool = False) -> bool:
  """Writes a file atomically: temp file in the same directory, fsync, rename.

  Readers see either the old file or the complete new one, never a partial
  write; the directory is fsync'ed after the rename (best effort) so the new
  name survives a crash. Local/POSIX file systems only.

  Args:
    path: destination file; parent directories are created.
    data: the bytes to write.
    all_processes: write from every JAX process. By default only process 0
      writes (run-level side files are shared between processes).

  Returns:
    True if this process wrote the file, False if it skipped (not process 0).
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
  if not all_processes and jax.process_index() != 0:
    return False
  write_atomic(path, data)
  return True


def atomic_write_json(path: str | os.PathLike, obj: Any, *, nonfinite: NonFinite = "error",
                      indent: int | None = 2, all_processes: bool = False) -> bool:
  """Writes ``obj`` as JSON atomically (see :func:`atomic_write_bytes`).

  numpy/jax scalars and arrays are converted to Python numbers/lists, tuples
  to lists. The object is validated on every process (so all fail alike) but
  written by process 0 only unless ``all_processes``.

  Args:
    path: destination file.
    obj: JSON-like data (dicts with str keys, lists, numbers, str, None).
    nonfinite: ``"error"`` raises ValueError on NaN/±inf (strict JSON has no
      such values); ``"null"`` stores them as ``null``.
    indent: passed to ``json.dumps``.
    all_processes: write from every process.

  Returns:
    True if this process wrote the file.

  Raises:
    TypeError: for values that are not JSON-serialisable.
    ValueError: for non-finite floats when ``nonfinite="error"``.
  """
  clean = _to_json(obj, "obj", _check_nonfinite(nonfinite))
  text = json.dumps(clean, indent=indent, allow_nan=False, ensure_ascii=False) + "\n"
  return atomic_write_bytes(path, text.encode("utf-8"), all_processes=all_processes)

