"""Hashes that verify a checkpoint: array bytes and metadata fields.

:func:`array_sha256` covers an array's dtype, shape and bytes;
:func:`meta_field_sha256` / :func:`meta_sha256` cover the canonical JSON of one
``meta`` field / of a whole ``meta`` dict (the chain link between tasks).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy by name)
import numpy as np

_HASH_DOMAIN = b"clx.array_sha256.v1\0"
_META_FIELD_DOMAIN = b"clx.meta_field_sha256.v1\0"
_META_DOMAIN = b"clx.meta_sha256.v1\0"


# --------------------------------------------------------------------------- arrays


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _to_host(x: Any, where: str = "value") -> np.ndarray:
  """Returns a host numpy copy/view of an array leaf, validating its dtype."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      raise TypeError(f"{where} is a typed PRNG key array ({x.dtype}); store "
                      "jax.random.key_data(key) instead")
    if not x.is_fully_addressable:
      # Collective: every process must reach this point with the same array.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      x = multihost_utils.process_allgather(x, tiled=True)
    arr = np.asarray(x)
  elif isinstance(x, (np.ndarray, np.generic)):
    arr = np.asarray(x)
  else:
    raise TypeError(f"{where} has type {type(x).__name__}; expected a jax.Array or a "
                    "numpy array (wrap Python scalars with np.asarray)")
  dt = arr.dtype
  if dt.kind in "OUSMm" or dt.fields is not None or dt.name.startswith("void"):
    raise TypeError(f"{where} has dtype {dt}, which cannot be checkpointed; "
                    "use a numeric or bool dtype")
  return arr


def _sha256_host(arr: np.ndarray) -> str:
  if arr.dtype.byteorder == ">":
    arr = arr.astype(arr.dtype.newbyteorder("<"))
  h = hashlib.sha256(_HASH_DOMAIN)
  h.update(f"{arr.dtype.name}\0{','.join(str(d) for d in arr.shape)}\0".encode())
  h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
  return h.hexdigest()


def array_sha256(x: Any) -> str:
  """Hashes an array's dtype, shape and C-order bytes.

  The digest covers ``b"clx.array_sha256.v1\\0"``, the dtype name (e.g.
  ``"bfloat16"``), the shape and the little-endian C-contiguous bytes, so
  arrays that differ in dtype or shape but share bytes hash differently, and
  equal values hash equally whatever their memory layout, endianness or
  device. Comparison is bitwise: ``0.0`` and ``-0.0`` differ, a NaN equals
  the same NaN bit pattern.

  Args:
    x: a ``jax.Array`` (copied to host; an array that is not fully
      addressable is first gathered with ``process_allgather``, a collective
      that every process must call) or a numpy array / scalar.

  Returns:
    The hex sha256 digest.

  Raises:
    TypeError: for non-arrays, object/string dtypes and PRNG key arrays.
  """
  return _sha256_host(_to_host(x))


# ------------------------------------------------------------------ meta hashes


def _canonical_json(obj: Any) -> bytes:
  # Keys sorted, no whitespace, ASCII only: a JSON value read back from disk
  # (floats round-trip exactly through repr) re-encodes to the same bytes.
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                    allow_nan=False).encode("ascii")


def meta_field_sha256(field: str, value: Any) -> str:
  """The hash stored in ``meta["meta_sha256"][field]``.

  Args:
    field: the top-level ``meta`` key.
    value: its JSON value (as stored, i.e. plain JSON types).

  Returns:
    hex sha256 of ``b"clx.meta_field_sha256.v1\\0" + field + b"\\0" +
    canonical_json(value)`` (keys sorted, no whitespace, ASCII).
  """
  h = hashlib.sha256(_META_FIELD_DOMAIN)
  h.update(field.encode("utf-8") + b"\0")
  h.update(_canonical_json(value))
  return h.hexdigest()


def meta_sha256(meta: Mapping[str, Any]) -> str:
  """hex sha256 of a whole ``meta`` dict's canonical JSON (the chain link to the next task)."""
  h = hashlib.sha256(_META_DOMAIN)
  h.update(_canonical_json(meta))
  return h.hexdigest()

