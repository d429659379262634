"""Per-task delta checkpoints for continual learning, on top of Orbax.

A continual-learning run trains a sequence of tasks. After task ``t`` the
method state (a nested dict with string keys whose leaves are arrays) is
checkpointed as ONE Orbax step ``t`` holding only what task ``t`` added or
changed relative to the state after task ``t - 1`` (see :func:`state_delta`),
plus JSON metadata. The state before task 0 (``initial_state``) is not stored:
it is what ``method.init`` returns, and :meth:`TaskCheckpointer.restore_state`
replays the deltas 0..t onto it.

Typical use::

    with TaskCheckpointer(workdir / "ckpt") as ckpt:
      start = 0 if ckpt.latest_task() is None else ckpt.latest_task() + 1
      if start:
        state, meta = ckpt.restore_state(start - 1, initial_state)
      for t in range(start, num_tasks):
        prev, state = state, train_task(state, t)
        delta, removed = state_delta(prev, state)
        ckpt.save(t, delta, removed, {"acc": acc_row})

On-disk layout of one step (``<directory>/<task>/``), as written by Orbax
0.12.8::

    _CHECKPOINT_METADATA, commit_success.txt   Orbax step bookkeeping
    meta/metadata                              plain JSON (see below)
    delta/                                     StandardSave of the changed leaves
      _METADATA                                Orbax tree metadata (names, types)
      manifest.ocdbt, d/                       tensorstore OCDBT root + b-tree
      ocdbt.process_0/{manifest.ocdbt, d/}     per-process OCDBT: array chunks

``delta/`` is absent when the task stored no non-empty array (an empty delta,
or one made only of zero-size arrays and empty sub-dicts, which Orbax cannot
save). ``meta/metadata`` holds the caller's metadata merged with::

    {"task": t, "removed": ["a/b", ...],
     "sha256": {path: hex}, "shapes": {path: [...]}, "dtypes": {path: name},
     "empty_dicts": [path, ...], "format": 2,
     "prev_meta_sha256": hex | null, "meta_sha256": {field: hex}}

where ``path`` is the ``/``-joined key path of every array leaf of the delta
(zero-size ones included; those are rebuilt from ``shapes``/``dtypes``) and
``empty_dicts`` lists the delta's empty sub-dicts.

The metadata is verified as strictly as the arrays, because callers build
reported numbers from it (clx's loop stores the accuracy matrix there and a
resume rebuilds ``metrics.json`` from it):

* ``meta_sha256`` holds, for every other top-level field of ``meta`` (user
  fields included), the sha256 of its canonical JSON (:func:`meta_field_sha256`).
  A field whose value, name or presence differs from these hashes raises
  :class:`CheckpointCorruptedError` naming the task and the field.
* ``prev_meta_sha256`` chains the tasks: it is :func:`meta_sha256` of task
  ``t - 1``'s whole ``meta`` (null for task 0), so a step copied in from
  another run, or an earlier step redone after a later one was written, does
  not replay: :meth:`TaskCheckpointer.restore_state` checks every link.
* :meth:`TaskCheckpointer.restore_state` can also require user fields (e.g. a
  config fingerprint) to have given values in EVERY replayed task
  (``expect=``); a mismatch raises :class:`CheckpointMismatchError`.

Format 1 steps (written before these hashes existed) still restore; their
metadata cannot be verified, which is logged once per checkpointer. A format 2
step after a format 1 one must chain to it.

Paths: keys are joined with ``/``; a ``/`` or ``%`` inside a key is written
``%2F`` / ``%25`` (clx's LoRA adapters use keys such as ``"lin1/kernel"``, whose
path is ``"adapters/lin1%2Fkernel/a"``). In the Orbax tree a ``.`` or ``%``
inside a key is written ``%2E`` / ``%25`` instead (see below); keys are
restored exactly.

What Orbax does by itself and what this module adds (measured on Orbax 0.12.8):

* Orbax writes a step to ``<step>.orbax-checkpoint-tmp*`` and renames it, so a
  killed save leaves only a tmp dir, which ``all_steps`` ignores. This module
  also treats a step without its ``meta`` item as incomplete, removes the tmp
  dir of a save that failed, and refuses to save out of order (Orbax silently
  skips a save whose step is not newer than the latest one).
* Orbax does not checksum array payloads: one flipped byte in a large array
  data file restores silently with wrong values. Every leaf's sha256 is stored
  in ``meta`` and checked on restore; any mismatch, missing or extra leaf, or
  Orbax/JSON error surfaces as :class:`CheckpointCorruptedError` naming the
  task, the step path and (when it can be found) the leaf.
* Orbax cannot save an empty tree or a zero-size array (ValueError), nor an
  empty sub-dict reliably; these are stored in ``meta`` only.
* Orbax names parameters by joining keys with ``.``, so ``{"a.b": x}`` and
  ``{"a": {"b": y}}`` collide (its restore then silently returns ``x`` for
  both). Keys are escaped in the Orbax tree so that names are unique.
* Orbax restores each leaf as the type it was saved with (a ``jax.Array``
  with its saved sharding); leaves are saved as host numpy arrays so that a
  restore works on any device set.

Multi-host: every process must call :func:`state_delta` and
:meth:`TaskCheckpointer.save` with the same arguments. Array leaves are
gathered to host numpy (a collective for arrays that are not fully
addressable) and saved by Orbax, which writes replicated numpy arrays from the
primary process only; Orbax's ``JsonSave`` and the :func:`atomic_write_json` /
:func:`atomic_write_bytes` helpers write side files from process 0 only. Only
single-process runs are tested here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy by name)
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from clx._io import write_atomic

__all__ = [
    "FORMAT_VERSION",
    "CheckpointCorruptedError",
    "CheckpointMismatchError",
    "TaskCheckpointer",
    "apply_delta",
    "array_sha256",
    "atomic_write_bytes",
    "atomic_write_json",
    "meta_field_sha256",
    "meta_sha256",
    "state_delta",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Version of the ``meta`` layout written by :meth:`TaskCheckpointer.save` (1 still restores)."""
_READABLE_FORMATS = (1, 2)

NonFinite = Literal["error", "null"]

_SEP = "/"
_UNESCAPE = re.compile(r"%(25|2F|2E)")
_UNESCAPED = {"25": "%", "2F": "/", "2E": "."}
_DELTA_ITEM = "delta"
_META_ITEM = "meta"
_META_FILE = "metadata"  # file name used by Orbax's JsonCheckpointHandler
_TMP_MARKER = ".orbax-checkpoint-tmp"
_HASH_DOMAIN = b"clx.array_sha256.v1\0"
_RESERVED_META_KEYS_V1 = ("task", "removed", "sha256", "shapes", "dtypes", "empty_dicts", "format")
_PREV_KEY = "prev_meta_sha256"
_HASHES_KEY = "meta_sha256"
_RESERVED_META_KEYS = (*_RESERVED_META_KEYS_V1, _PREV_KEY, _HASHES_KEY)
_META_FIELD_DOMAIN = b"clx.meta_field_sha256.v1\0"
_META_DOMAIN = b"clx.meta_sha256.v1\0"


class CheckpointCorruptedError(RuntimeError):
  """A task checkpoint exists but cannot be restored faithfully.

  Attributes:
    task: the task (Orbax step) index.
    path: the step directory.
    leaf: the ``/``-joined path of the offending leaf, or None when the damage
      is not tied to one leaf (e.g. unreadable ``meta`` JSON).
    field: the top-level ``meta`` field whose value does not match its
      recorded hash (or whose chain link is wrong), else None.
    detail: what is wrong, without the task/path prefix.
  """

  def __init__(self, task: int, path: Any, detail: str, *, leaf: str | None = None,
               field: str | None = None):
    self.task = task
    self.path = str(path)
    self.leaf = leaf
    self.field = field
    self.detail = detail
    super().__init__(f"task {task} checkpoint at {path} is damaged: {detail}")


class CheckpointMismatchError(ValueError):
  """A task checkpoint is intact but was written by another run or configuration.

  Raised by :meth:`TaskCheckpointer.restore_state` when a replayed task's
  metadata field differs from the value the caller requires (``expect=``).

  Attributes:
    task: the task (Orbax step) index.
    path: the step directory.
    field: the metadata field that differs.
    expected: the value the caller required.
    found: the value stored in the checkpoint.
  """

  def __init__(self, task: int, path: Any, field: str, expected: Any, found: Any):
    self.task, self.path, self.field = task, str(path), field
    self.expected, self.found = expected, found
    super().__init__(f"task {task} checkpoint at {path} was written by another run or "
                     f"configuration: its {field!r} is {found!r}, this run's is {expected!r}; "
                     "use another workdir (or delete this one) to start afresh")


class _EmptyDict:
  """Marker for an empty sub-dict in a flattened state."""

  def __repr__(self) -> str:
    return "{}"


_EMPTY = _EmptyDict()
_MISSING = object()


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


# ------------------------------------------------------------------- state trees


def _esc(key: str) -> str:
  """Escapes a key for use as one component of a ``/``-joined path."""
  return key.replace("%", "%25").replace(_SEP, "%2F")


def _orbax_key(key: str) -> str:
  """Escapes a key for Orbax, which names parameters by joining keys with ``.``."""
  return key.replace("%", "%25").replace(".", "%2E")


def _unesc(component: str) -> str:
  """Inverse of :func:`_esc` and of :func:`_orbax_key`."""
  return _UNESCAPE.sub(lambda m: _UNESCAPED[m.group(1)], component)


def _split(path: str) -> list[str]:
  return [_unesc(c) for c in path.split(_SEP)]


def _check_key(key: Any, prefix: str, what: str) -> None:
  if not isinstance(key, str):
    raise TypeError(f"{what}: key {key!r} under {prefix.rstrip(_SEP) or '<root>'!r} is a "
                    f"{type(key).__name__}; keys must be str")
  if not key:
    raise ValueError(f"{what}: empty key under {prefix.rstrip(_SEP) or '<root>'!r}; keys must "
                     "be non-empty")


def _flatten(tree: Any, what: str) -> dict[str, Any]:
  """Flattens a nested dict to ``{path: leaf}``; empty sub-dicts map to ``_EMPTY``."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"{what} must be a nested dict (Mapping) with str keys, got "
                    f"{type(tree).__name__}")
  out: dict[str, Any] = {}

  def rec(node: Mapping, prefix: str) -> None:
    for k, v in node.items():
      _check_key(k, prefix, what)
      path = prefix + _esc(k)
      if isinstance(v, Mapping):
        if v:
          rec(v, path + _SEP)
        else:
          out[path] = _EMPTY
      elif _is_array(v):
        out[path] = v
      else:
        raise TypeError(f"{what}: leaf {path!r} has type {type(v).__name__}; leaves must be "
                        "jax.Array or numpy arrays (wrap Python scalars with np.asarray)")

  rec(tree, "")
  return out


def _unflatten(flat: Mapping[str, Any], key_fn=lambda k: k) -> dict[str, Any]:
  """Inverse of :func:`_flatten` (``_EMPTY`` becomes ``{}``); ``key_fn`` maps each key."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    *parents, last = (key_fn(k) for k in _split(path))
    node = out
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = {} if v is _EMPTY else v
  return out


def _copy_tree(tree: Mapping, what: str) -> dict[str, Any]:
  """Copies the dict structure of a nested Mapping (leaves are shared)."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"{what} must be a nested dict (Mapping) with str keys, got "
                    f"{type(tree).__name__}")
  return {k: _copy_tree(v, what) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _same_array(a: Any, b: Any) -> bool:
  if a is b:
    return True
  if tuple(np.shape(a)) != tuple(np.shape(b)) or np.dtype(a.dtype) != np.dtype(b.dtype):
    return False
  return array_sha256(a) == array_sha256(b)


def state_delta(prev_state: Mapping, new_state: Mapping) -> tuple[dict[str, Any], list[str]]:
  """Computes what changed between two states.

  Leaves are compared by dtype, shape and bytes (:func:`array_sha256`), so a
  value that is recomputed but bitwise identical does not enter the delta.

  Args:
    prev_state: the state after the previous task (nested dict, str keys,
      array leaves; empty sub-dicts allowed).
    new_state: the state after this task.

  Returns:
    ``(delta, removed_paths)``. ``delta`` is a sparse nested dict holding the
    leaves of ``new_state`` that are new or whose dtype, shape or bytes
    changed (the leaf objects themselves, not copies), plus every empty
    sub-dict of ``new_state`` that was not an empty sub-dict before.
    ``removed_paths`` is the sorted list of ``"a/b/c"`` paths (see the
    module docstring for keys containing ``/``) of
    ``prev_state`` leaves (or empty sub-dicts) that are absent from
    ``new_state`` or changed kind (array ↔ empty dict).
    ``apply_delta(prev_state, delta, removed_paths)`` equals ``new_state``.

  Raises:
    TypeError / ValueError: for non-str or empty keys or leaves that are not
      arrays.
  """
  pf = _flatten(prev_state, "prev_state")
  nf = _flatten(new_state, "new_state")
  removed = [p for p, old in pf.items() if p not in nf or (old is _EMPTY) != (nf[p] is _EMPTY)]
  delta: dict[str, Any] = {}
  for p, v in nf.items():
    old = pf.get(p, _MISSING)
    if v is _EMPTY:
      if old is not _EMPTY:
        delta[p] = _EMPTY
    elif old is _MISSING or old is _EMPTY or not _same_array(old, v):
      delta[p] = v
  return _unflatten(delta), sorted(removed)


def _remove_path(tree: dict[str, Any], path: str) -> None:
  keys = _split(path)
  nodes = [tree]
  for k in keys[:-1]:
    node = nodes[-1].get(k, _MISSING)
    if not isinstance(node, dict):
      raise ValueError(f"cannot remove {path!r}: it is not in the state")
    nodes.append(node)
  if keys[-1] not in nodes[-1]:
    raise ValueError(f"cannot remove {path!r}: it is not in the state")
  del nodes[-1][keys[-1]]
  # Drop the sub-dicts that this removal emptied (not the root).
  for depth in range(len(nodes) - 1, 0, -1):
    if nodes[depth]:
      break
    del nodes[depth - 1][keys[depth - 1]]


def _merge(dst: dict[str, Any], src: Mapping, prefix: str) -> None:
  for k, v in src.items():
    _check_key(k, prefix, "delta")
    path = prefix + _esc(k)
    cur = dst.get(k, _MISSING)
    if isinstance(v, Mapping):
      if not v:
        if cur is _MISSING:
          dst[k] = {}
        elif not (isinstance(cur, dict) and not cur):
          raise ValueError(f"delta sets {path!r} to an empty dict but the state holds "
                           f"{'a non-empty dict' if isinstance(cur, dict) else 'an array'} "
                           "there that removed_paths does not remove")
        continue
      if cur is _MISSING:
        cur = dst[k] = {}
      elif not isinstance(cur, dict):
        raise ValueError(f"delta has a sub-dict at {path!r} but the state holds an array there "
                         "that removed_paths does not remove")
      _merge(cur, v, path + _SEP)
    elif _is_array(v):
      if isinstance(cur, dict):
        raise ValueError(f"delta has an array at {path!r} but the state holds a dict there "
                         "whose leaves removed_paths does not remove")
      dst[k] = v
    else:
      raise TypeError(f"delta: leaf {path!r} has type {type(v).__name__}; leaves must be arrays")


def apply_delta(state: Mapping, delta: Mapping, removed_paths: Iterable[str]) -> dict[str, Any]:
  """Applies a delta from :func:`state_delta` (pure: inputs are not modified).

  First every path in ``removed_paths`` is deleted (sub-dicts left empty by a
  deletion are dropped), then ``delta`` is merged in: its arrays replace or
  add leaves, its empty sub-dicts add empty sub-dicts.

  Args:
    state: the state the delta was computed against.
    delta: the sparse nested dict of new/changed leaves.
    removed_paths: ``"a/b/c"`` paths to delete.

  Returns:
    A new nested dict (plain ``dict`` nodes; array leaves shared, not copied).

  Raises:
    ValueError: if a removed path is not in ``state`` or the delta conflicts
      with the state's structure (e.g. an array where the state keeps a dict),
      i.e. the delta was not computed against ``state``.
  """
  out = _copy_tree(state, "state")
  if isinstance(removed_paths, str):
    raise TypeError("removed_paths must be a list of paths, not a str")
  for path in removed_paths:
    if not isinstance(path, str) or not path:
      raise TypeError(f"removed_paths entries must be non-empty str, got {path!r}")
    _remove_path(out, path)
  if not isinstance(delta, Mapping):
    raise TypeError(f"delta must be a nested dict, got {type(delta).__name__}")
  _merge(out, delta, "")
  return out


# ------------------------------------------------------------------------- JSON


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


# ----------------------------------------------------------------- checkpointer


def _check_task(task: Any, name: str = "task", minimum: int = 0) -> int:
  if isinstance(task, (bool, np.bool_)) or not isinstance(task, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(task).__name__}")
  if task < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {task}")
  return int(task)


def _short(e: BaseException, limit: int = 300) -> str:
  msg = " ".join(str(e).split())
  if len(msg) > limit:
    msg = msg[:limit] + " …"
  return f"{type(e).__name__}: {msg}"


def _tree_paths(tree: Any) -> dict[str, Any]:
  """Flattens an Orbax metadata/restored tree (Orbax-escaped keys) to ``{path: leaf}``."""
  out: dict[str, Any] = {}

  def rec(node: Any, prefix: str) -> None:
    if isinstance(node, Mapping):
      for k, v in node.items():
        rec(v, prefix + _esc(_unesc(str(k))) + _SEP)
    else:
      out[prefix[:-1]] = node

  rec(tree, "")
  return out


class TaskCheckpointer:
  """One verified Orbax step per task, holding that task's state delta.

  Wraps an ``ocp.CheckpointManager`` with the items ``delta``
  (``StandardCheckpointHandler``) and ``meta`` (``JsonCheckpointHandler``)
  and ``max_to_keep=None`` (every task is kept: the chain of deltas is
  needed to rebuild any later state). Steps are task indices and must be
  saved in order 0, 1, 2, ….

  Use as a context manager (or call :meth:`close`) so pending writes finish.

  Multi-host: construct and call every method on all processes with the same
  arguments. Orbax coordinates array writes across processes and writes the
  ``meta`` JSON from the primary process only; this class's own file
  operations (removing tmp dirs of a failed save) run on process 0 only.

  Args:
    directory: root directory of the run's task checkpoints (created).
    nonfinite: what :meth:`save` does with NaN/±inf in user metadata:
      ``"error"`` (default) raises ValueError naming the offending key, so a
      diverged run is noticed; ``"null"`` stores them as JSON ``null``.
    read_only: open an existing directory for restoring only (e.g. from an
      evaluation job while training still writes): no directory creation,
      no tmp-dir cleanup, :meth:`save`/:meth:`delete_after` raise.
  """

  def __init__(self, directory: str | os.PathLike, *, nonfinite: NonFinite = "error",
               read_only: bool = False):
    self._nonfinite = _check_nonfinite(nonfinite)
    self._read_only = bool(read_only)
    path = os.fspath(directory)
    self._directory = epath.Path(path if "://" in path else os.path.abspath(path))
    if read_only and not self._directory.is_dir():
      raise FileNotFoundError(f"checkpoint directory {self._directory} does not exist")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=not read_only, read_only=read_only,
        # Synchronous saves: save() blocks until the step is committed anyway,
        # and with async saves a failing item leaves Orbax background threads
        # writing into the tmp dir (step metadata), which races its cleanup.
        enable_async_checkpointing=False,
        # Removes leftovers of killed saves (<step>.orbax-checkpoint-tmp*) at
        # start-up. Off when read-only: a reader must not delete the tmp dir of
        # a save in progress in another job.
        cleanup_tmp_directories=not read_only)
    # Explicit handlers (rather than item_names) so that a fresh manager can
    # read a step's item metadata before it has saved or restored that item.
    self._manager = ocp.CheckpointManager(
        self._directory, options=options,
        item_handlers={_DELTA_ITEM: ocp.StandardCheckpointHandler(),
                       _META_ITEM: ocp.JsonCheckpointHandler()})
    self._leaf_reader: ocp.Checkpointer | None = None
    self._closed = False
    self._digests: dict[int, str] = {}  # task -> meta_sha256 of its verified/written meta
    self._warned_v1 = False

  # ----------------------------------------------------------------- basics

  @property
  def directory(self) -> epath.Path:
    """The root directory (absolute)."""
    return self._directory

  def step_dir(self, task: int) -> epath.Path:
    """The directory of task ``task``'s step (whether or not it exists)."""
    return self._directory / str(_check_task(task))

  def __enter__(self) -> TaskCheckpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    """Waits for pending writes and releases Orbax resources (idempotent)."""
    if self._closed:
      return
    self._closed = True
    try:
      self._manager.wait_until_finished()
    finally:
      self._manager.close()
      if self._leaf_reader is not None:
        self._leaf_reader.close()

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError(f"TaskCheckpointer for {self._directory} is closed")

  def _check_writable(self, what: str) -> None:
    self._check_open()
    if self._read_only:
      raise PermissionError(f"cannot {what}: TaskCheckpointer for {self._directory} is read-only")

  def _has_meta(self, step: int) -> bool:
    return (self._directory / str(step) / _META_ITEM / _META_FILE).is_file()

  def _orbax_steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  # ------------------------------------------------------------------ query

  def complete_tasks(self) -> list[int]:
    """Tasks whose step is fully committed, in increasing order.

    Re-reads the directory. Orbax already ignores ``*.orbax-checkpoint-tmp*``
    dirs (saves that never finished); a step without its ``meta`` item is
    also treated as incomplete. Damage to array data is only detected by
    :meth:`restore_delta`.
    """
    self._check_open()
    return [s for s in self._orbax_steps() if self._has_meta(s)]

  def latest_task(self) -> int | None:
    """The newest complete task, or None if there is none."""
    tasks = self.complete_tasks()
    return tasks[-1] if tasks else None

  # ------------------------------------------------------------------- save

  def _remove_tmp_dirs(self, predicate) -> None:
    if jax.process_index() != 0:
      return
    for child in self._directory.iterdir():
      name = child.name
      if _TMP_MARKER in name:
        step = name.split(".", 1)[0]
        if step.isdigit() and predicate(int(step)):
          child.rmtree(missing_ok=True)

  def _cleanup_failed_save(self, task: int) -> None:
    """Removes whatever a failed save of ``task`` left behind (process 0)."""
    with contextlib.suppress(Exception):  # the save's own error is being raised
      self._manager.wait_until_finished()
    if jax.process_index() == 0:
      with contextlib.suppress(Exception):
        self._remove_tmp_dirs(lambda s: s == task)
        step_dir = self._directory / str(task)
        if step_dir.exists():  # did not exist before this save (checked in save)
          step_dir.rmtree(missing_ok=True)
    with contextlib.suppress(Exception):
      self._manager.reload()

  def save(self, task: int, delta: Mapping, removed: Iterable[str],
           metadata: Mapping[str, Any] | None = None) -> None:
    """Saves task ``task``'s delta and metadata as Orbax step ``task``.

    Blocks until the step is committed: afterwards it is either fully present
    (listed by :meth:`complete_tasks`) or, if this raises, absent (the tmp dir
    and any partial step are removed).

    Array leaves are copied to host numpy arrays before saving, so a restore
    does not depend on the devices or sharding of the saving run. Zero-size
    arrays and empty sub-dicts are recorded in ``meta`` only.

    Args:
      task: the task index; must be the next one (0 when there is no complete
        step, else ``latest_task() + 1``). Incomplete steps at or after
        ``task`` (no ``meta`` item) are removed first; a complete one raises.
      delta: the delta from :func:`state_delta` (may be empty: a task that
        changed nothing still gets a step, with no ``delta`` item).
      removed: the removed paths from :func:`state_delta`.
      metadata: JSON-like user metadata (dict with str keys; numpy/jax scalars
        and arrays are converted). NaN/±inf follow the ``nonfinite`` option.
        It must not use the reserved keys ``task``, ``removed``, ``sha256``,
        ``shapes``, ``dtypes``, ``empty_dicts``, ``format``,
        ``prev_meta_sha256``, ``meta_sha256`` (except ``task`` with the same
        value as the ``task`` argument). For ``task > 0`` the previous task's
        ``meta`` is verified and chained (its hash is stored).

    Raises:
      ValueError: out-of-order task, existing complete step, reserved
        metadata keys or non-finite metadata (``nonfinite="error"``).
      TypeError: non-array leaves or non-JSON metadata.
      PermissionError: read-only checkpointer.
    """
    self._check_writable("save")
    task = _check_task(task)
    # ---- validate and prepare everything before touching the disk.
    flat = _flatten(delta, "delta")
    if isinstance(removed, str):
      raise TypeError("removed must be a list of paths, not a str")
    removed = list(removed)
    for p in removed:
      if not isinstance(p, str) or not p or any(not k for k in _split(p)):
        raise ValueError(f"removed entries must be 'a/b/c' paths, got {p!r}")
    stored: dict[str, np.ndarray] = {}
    sha: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    empties: list[str] = []
    for path, leaf in flat.items():
      if leaf is _EMPTY:
        empties.append(path)
        continue
      arr = _to_host(leaf, f"delta leaf {path!r}")
      sha[path] = _sha256_host(arr)
      shapes[path] = [int(d) for d in arr.shape]
      dtypes[path] = arr.dtype.name
      if arr.size:
        stored[path] = arr
    if metadata is None:
      metadata = {}
    if not isinstance(metadata, Mapping):
      raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    user = _to_json(metadata, "metadata", self._nonfinite)
    reserved = {"task": task, "removed": sorted(removed), "sha256": sha, "shapes": shapes,
                "dtypes": dtypes, "empty_dicts": sorted(empties), "format": FORMAT_VERSION}
    for key in _RESERVED_META_KEYS:
      if key in user and (key not in reserved or user[key] != reserved[key]):
        raise ValueError(f"metadata key {key!r} is reserved by TaskCheckpointer (it stores "
                         f"{key} itself); rename it")
    # ---- order checks.
    steps = self._orbax_steps()
    complete = [s for s in steps if self._has_meta(s)]
    expected = complete[-1] + 1 if complete else 0
    if task in complete:
      raise ValueError(f"task {task} is already checkpointed at {self._directory / str(task)}; "
                       f"call delete_after({task - 1}) first to redo it")
    if task != expected:
      raise ValueError(f"tasks must be saved in order: the next task for {self._directory} is "
                       f"{expected} (complete tasks: {complete}), got {task}")
    # ---- chain to the previous task's (verified) meta, then hash every field.
    reserved[_PREV_KEY] = self._meta_digest(task - 1) if task else None
    meta = {**user, **reserved}
    meta[_HASHES_KEY] = {k: meta_field_sha256(k, v) for k, v in meta.items()}
    stale = [s for s in steps if s >= task]  # incomplete, since task == max(complete) + 1
    for s in stale:
      log.warning("removing incomplete checkpoint step %s (no %s item)",
                  self._directory / str(s), _META_ITEM)
      self._manager.delete(s)
    if stale:
      self._manager.reload()
    # ---- write.
    items: dict[str, Any] = {_META_ITEM: ocp.args.JsonSave(meta)}
    if stored:
      items[_DELTA_ITEM] = ocp.args.StandardSave(_unflatten(stored, _orbax_key))
    try:
      saved = self._manager.save(task, args=ocp.args.Composite(**items))
      self._manager.wait_until_finished()
    except BaseException:
      self._cleanup_failed_save(task)
      raise
    if not saved or not self._has_meta(task):
      self._cleanup_failed_save(task)
      raise RuntimeError(f"Orbax did not write task {task} to {self._directory / str(task)} "
                         f"(CheckpointManager.save returned {saved})")
    self._digests[task] = meta_sha256(meta)

  # ---------------------------------------------------------------- restore

  def _read_leaf(self, delta_dir: epath.Path, path: str, shape, dtype) -> None:
    """Restores one leaf alone (used to find which leaf Orbax chokes on)."""
    if self._leaf_reader is None:
      self._leaf_reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    target = _unflatten({path: jax.ShapeDtypeStruct(shape, dtype)}, _orbax_key)
    args = _unflatten({path: ocp.RestoreArgs(restore_type=np.ndarray)}, _orbax_key)
    self._leaf_reader.restore(delta_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=args, partial_restore=True))

  def restore_delta(self, task: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores and verifies task ``task``'s delta.

    No target pytree is needed: the abstract target is built from the shapes
    and dtypes stored in ``meta``. Every leaf's dtype, shape and sha256 is
    then checked against ``meta``, and the set of leaves on disk must equal
    the set in ``meta``.

    Args:
      task: a task index.

    Returns:
      ``(delta, metadata)``: the delta as a nested dict of host numpy arrays
      (bfloat16 & co. as ml_dtypes arrays; use ``jax.device_put`` to place
      them), and the step's full ``meta`` dict (user keys plus the reserved
      ones listed in the module docstring).

    Raises:
      FileNotFoundError: there is no step directory for ``task``.
      CheckpointCorruptedError: the step exists but is incomplete or damaged
        (missing/garbled ``meta``, missing ``delta`` files or metadata,
        unreadable array data, missing/extra leaves, hash/shape/dtype
        mismatch). Wrong values are never returned.
    """
    self._check_open()
    task = _check_task(task)
    step_dir = self._directory / str(task)
    if not step_dir.is_dir():
      raise FileNotFoundError(f"task {task} has no checkpoint at {step_dir} "
                              f"(complete tasks: {self.complete_tasks()})")

    damaged = self._damaged_fn(task)
    if task not in self._manager.all_steps():
      self._manager.reload()
    meta = self._load_meta(task, damaged)
    entries, empties = self._validate_meta(meta, task, damaged)
    stored = {p: (shape, dtype) for p, (_, shape, dtype) in entries.items() if math.prod(shape)}
    # ---- delta arrays.
    delta_dir = step_dir / _DELTA_ITEM
    restored: dict[str, Any] = {}
    if not stored:
      if delta_dir.exists():
        raise damaged(f"it has a {_DELTA_ITEM!r} item but meta lists no stored leaves (extra "
                      "leaves)")
    else:
      if not delta_dir.is_dir():
        first = sorted(stored)[0]
        raise damaged(f"its {_DELTA_ITEM!r} item is missing (leaf {first!r} and "
                      f"{len(stored) - 1} more)", leaf=first)
      if not (delta_dir / "_METADATA").is_file():
        raise damaged(f"its {_DELTA_ITEM}/_METADATA file (Orbax's tree metadata) is missing")
      try:
        on_disk_md = self._manager.item_metadata(task)[_DELTA_ITEM]
        if on_disk_md is None:
          raise FileNotFoundError(f"no metadata for item {_DELTA_ITEM!r}")
        on_disk = _tree_paths(getattr(on_disk_md, "tree", on_disk_md))
      except Exception as e:  # pylint: disable=broad-except
        raise damaged(f"cannot read the {_DELTA_ITEM!r} item's Orbax metadata ({_short(e)})",
                      cause=e) from e
      for p in sorted(stored):
        if p not in on_disk:
          raise damaged(f"leaf {p!r} is missing from the {_DELTA_ITEM!r} item", leaf=p)
      for p in sorted(on_disk):
        if p not in stored:
          raise damaged(f"extra leaf {p!r} in the {_DELTA_ITEM!r} item is not listed in meta",
                        leaf=p)
      for p, (shape, dtype) in sorted(stored.items()):
        md = on_disk[p]
        md_shape, md_dtype = getattr(md, "shape", None), getattr(md, "dtype", None)
        if md_shape is not None and tuple(md_shape) != shape:
          raise damaged(f"leaf {p!r} has shape {tuple(md_shape)} on disk, meta says {shape}",
                        leaf=p)
        if md_dtype is not None and np.dtype(md_dtype) != dtype:
          raise damaged(f"leaf {p!r} has dtype {np.dtype(md_dtype).name} on disk, meta says "
                        f"{dtype.name}", leaf=p)
      target = _unflatten({p: jax.ShapeDtypeStruct(s, d) for p, (s, d) in stored.items()},
                          _orbax_key)
      try:
        tree = self._manager.restore(task, args=ocp.args.Composite(
            **{_DELTA_ITEM: ocp.args.StandardRestore(target)}))[_DELTA_ITEM]
      except Exception as e:  # pylint: disable=broad-except
        for p, (shape, dtype) in sorted(stored.items()):
          try:
            self._read_leaf(delta_dir, p, shape, dtype)
          except Exception as leaf_e:  # pylint: disable=broad-except
            raise damaged(f"leaf {p!r} cannot be read ({_short(leaf_e)})", leaf=p,
                          cause=leaf_e) from e
        raise damaged(f"Orbax cannot restore the {_DELTA_ITEM!r} item ({_short(e)})",
                      cause=e) from e
      restored = _tree_paths(tree)
      if set(restored) != set(stored):
        odd = sorted(set(restored) ^ set(stored))[0]
        raise damaged(f"leaf {odd!r} is {'extra' if odd in restored else 'missing'} in the "
                      "restored delta", leaf=odd)
    # ---- verify every leaf (zero-size ones are rebuilt from meta).
    flat: dict[str, Any] = {}
    for p, (expected_sha, shape, dtype) in sorted(entries.items()):
      if p in stored:
        arr = restored[p]
        if not isinstance(arr, np.ndarray):
          arr = np.asarray(arr)
      else:
        arr = np.zeros(shape, dtype)
      if arr.shape != shape:
        raise damaged(f"leaf {p!r} restored with shape {arr.shape}, expected {shape}", leaf=p)
      if arr.dtype != dtype:
        raise damaged(f"leaf {p!r} restored with dtype {arr.dtype.name}, expected {dtype.name}",
                      leaf=p)
      got = _sha256_host(arr)
      if got != expected_sha:
        raise damaged(f"leaf {p!r} sha256 mismatch (expected {expected_sha}, got {got})", leaf=p)
      flat[p] = arr
    for p in empties:
      flat[p] = _EMPTY
    self._verify_meta_hashes(meta, task, damaged)
    return _unflatten(flat), meta

  def _damaged_fn(self, task: int):
    step_dir = self._directory / str(task)

    def damaged(detail: str, leaf: str | None = None, cause: BaseException | None = None, *,
                field: str | None = None):
      err = CheckpointCorruptedError(task, step_dir, detail, leaf=leaf, field=field)
      if cause is not None:
        err.__cause__ = cause
      return err

    return damaged

  def _load_meta(self, task: int, damaged) -> Any:
    """Reads a step's ``meta`` JSON (a plain file; no Orbax call, so no cross-process sync)."""
    path = self._directory / str(task) / _META_ITEM / _META_FILE
    if not path.is_file():
      raise damaged(f"its {_META_ITEM!r} item is missing (save never completed or the step was "
                    "damaged); it is not a complete task")
    try:
      return json.loads(path.read_text())
    except Exception as e:  # pylint: disable=broad-except
      raise damaged(f"cannot read {_META_ITEM}/{_META_FILE} ({_short(e)})", cause=e) from e

  def _verify_meta_hashes(self, meta: dict[str, Any], task: int, damaged) -> None:
    """Checks every top-level ``meta`` field against ``meta["meta_sha256"]``."""
    hashes = meta.get(_HASHES_KEY, _MISSING)
    if hashes is _MISSING and meta["format"] == 1:
      if not self._warned_v1:
        self._warned_v1 = True
        log.warning("%s holds format 1 task checkpoints (written by an older clx): their "
                    "metadata has no hashes and is not verified", self._directory)
      return
    if not (isinstance(hashes, dict) and all(isinstance(h, str) for h in hashes.values())):
      raise damaged(f"meta field {_HASHES_KEY!r} is missing or malformed", field=_HASHES_KEY)
    fields = set(meta) - {_HASHES_KEY}
    for f in sorted(set(hashes) - fields):
      raise damaged(f"meta field {f!r} is missing (meta_sha256 records it)", field=f)
    for f in sorted(fields - set(hashes)):
      raise damaged(f"meta field {f!r} is not covered by meta_sha256 (added or renamed)", field=f)
    for f in sorted(fields):
      if meta_field_sha256(f, meta[f]) != hashes[f]:
        raise damaged(f"meta field {f!r} does not match its recorded sha256 (the metadata was "
                      "altered)", field=f)

  def read_meta(self, task: int) -> dict[str, Any]:
    """Reads and verifies task ``task``'s ``meta`` without restoring its arrays.

    Checks the reserved fields' structure and every field's hash (format 2);
    the chain link to the previous task is checked by :meth:`restore_state`
    and :meth:`last_good_task`.

    Args:
      task: a task index.

    Returns:
      The step's full ``meta`` dict.

    Raises:
      FileNotFoundError: there is no step directory for ``task``.
      CheckpointCorruptedError: missing, unreadable or altered ``meta``.
    """
    self._check_open()
    task = _check_task(task)
    if not (self._directory / str(task)).is_dir():
      raise FileNotFoundError(f"task {task} has no checkpoint at {self._directory / str(task)} "
                              f"(complete tasks: {self.complete_tasks()})")
    damaged = self._damaged_fn(task)
    meta = self._load_meta(task, damaged)
    self._validate_meta(meta, task, damaged)
    self._verify_meta_hashes(meta, task, damaged)
    return meta

  def _meta_digest(self, task: int) -> str:
    if task not in self._digests:
      self._digests[task] = meta_sha256(self.read_meta(task))
    return self._digests[task]

  def _verify_link(self, task: int, meta: dict[str, Any], prev_meta: dict[str, Any] | None) -> None:
    """Checks that ``meta`` (task ``task``) chains to ``prev_meta`` (task ``task - 1``)."""
    damaged = self._damaged_fn(task)
    if _PREV_KEY not in meta:  # format 1
      if prev_meta is not None and prev_meta.get("format", 1) != 1:
        raise damaged(f"meta is format 1 but task {task - 1}'s is format "
                      f"{prev_meta.get('format')!r}: a step from an older run was copied in",
                      field="format")
      return
    link = meta[_PREV_KEY]
    if prev_meta is None:
      if link is not None:
        raise damaged(f"task 0's meta names a previous task ({_PREV_KEY} = {link!r})",
                      field=_PREV_KEY)
      return
    if link != meta_sha256(prev_meta):
      raise damaged(f"meta does not chain to task {task - 1}'s ({_PREV_KEY} = {link!r}, task "
                    f"{task - 1}'s meta hashes to {meta_sha256(prev_meta)!r}): the steps come "
                    "from different runs, or task "
                    f"{task - 1} was redone after task {task} was written", field=_PREV_KEY)

  @staticmethod
  def _validate_meta(meta: Any, task: int, damaged):
    """Checks the reserved ``meta`` fields; returns ``({path: (sha, shape, dtype)}, empties)``."""
    if not isinstance(meta, dict):
      raise damaged(f"meta is a {type(meta).__name__}, not a JSON object")
    fmt = meta.get("format")
    if "format" in meta and (isinstance(fmt, bool) or fmt not in _READABLE_FORMATS):
      raise damaged(f"meta format {fmt!r} is not supported (readable formats: "
                    f"{list(_READABLE_FORMATS)})", field="format")
    required = _RESERVED_META_KEYS_V1 if fmt == 1 else _RESERVED_META_KEYS
    missing = [k for k in required if k not in meta]
    if missing:
      raise damaged(f"meta lacks the keys {missing}")
    if meta["task"] != task:
      raise damaged(f"meta says task {meta['task']!r}")
    sha, shapes, dtypes = meta["sha256"], meta["shapes"], meta["dtypes"]
    if not all(isinstance(x, dict) for x in (sha, shapes, dtypes)):
      raise damaged("meta sha256/shapes/dtypes must be JSON objects")
    if not (sha.keys() == shapes.keys() == dtypes.keys()):
      odd = sorted(set(sha) ^ set(shapes) | set(sha) ^ set(dtypes))[0]
      raise damaged(f"meta sha256/shapes/dtypes disagree on leaf {odd!r}", leaf=odd)
    if not (isinstance(meta["removed"], list) and all(isinstance(p, str) for p in meta["removed"])):
      raise damaged("meta 'removed' must be a list of str")
    empties = meta["empty_dicts"]
    if not (isinstance(empties, list) and all(isinstance(p, str) and p for p in empties)):
      raise damaged("meta 'empty_dicts' must be a list of paths")
    entries = {}
    for p in sha:
      s, shape, dt = sha[p], shapes[p], dtypes[p]
      if not (isinstance(s, str) and len(s) == 64 and isinstance(shape, list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
              and isinstance(dt, str)):
        raise damaged(f"meta entry for leaf {p!r} is malformed", leaf=p)
      try:
        dtype = np.dtype(dt)
      except TypeError as e:
        raise damaged(f"meta gives leaf {p!r} the unknown dtype {dt!r}", leaf=p) from e
      entries[p] = (s, tuple(shape), dtype)
    clash = sorted(set(empties) & set(entries))
    if clash:
      raise damaged(f"meta lists {clash[0]!r} both as a leaf and as an empty dict", leaf=clash[0])
    return entries, empties

  def restore_state(self, upto_task: int, initial_state: Mapping, *,
                    expect: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rebuilds the state after task ``upto_task`` by replaying deltas.

    Before any array is read, every task's ``meta`` in 0..upto_task is
    verified (field hashes), its chain link to the previous task is checked,
    and each ``expect`` field must have the required value in every task.

    Args:
      upto_task: the last task to replay (inclusive).
      initial_state: the state before task 0, i.e. the ``prev_state`` that
        task 0's delta was computed against (typically ``method.init(...)``).
      expect: ``{field: value}`` that every replayed task's ``meta`` must hold
        (e.g. ``{"fingerprint": ...}`` of the run's configuration).

    Returns:
      ``(state, metadata)``: the state after ``upto_task`` (nested dict; the
      leaves that some task stored are host numpy arrays, the others are
      ``initial_state``'s objects) and ``upto_task``'s ``meta``.

    Raises:
      FileNotFoundError: a task in 0..upto_task has no step.
      CheckpointCorruptedError: a task's step is incomplete or damaged, or the
        chain of ``meta`` hashes is broken.
      CheckpointMismatchError: an ``expect`` field differs in some task.
      ValueError: a delta does not apply (``initial_state`` is not the one the
        run started from).
    """
    self._check_open()
    upto_task = _check_task(upto_task, "upto_task")
    expect = dict(expect or {})
    state = _copy_tree(initial_state, "initial_state")
    prev_meta = None
    for t in range(upto_task + 1):  # metadata first: cheap, and names the first bad task
      meta = self.read_meta(t)
      for field, want in expect.items():
        if meta.get(field, _MISSING) != want:
          raise CheckpointMismatchError(t, self._directory / str(t), field, want,
                                        meta.get(field))
      self._verify_link(t, meta, prev_meta)
      self._digests[t] = meta_sha256(meta)
      prev_meta = meta
    meta = {}
    for t in range(upto_task + 1):
      delta, meta = self.restore_delta(t)
      try:
        state = apply_delta(state, delta, meta["removed"])
      except (ValueError, TypeError) as e:
        raise ValueError(f"task {t}'s delta ({self._directory / str(t)}) does not apply to the "
                         f"state replayed from tasks 0..{t - 1}; is initial_state the state the "
                         f"run started from? ({e})") from e
    return state, meta

  def last_good_task(self) -> int | None:
    """The largest ``t`` such that tasks 0..t all restore and verify.

    Restores every delta, so it costs one full read of the checkpoints.
    Returns None if task 0 is missing or damaged.
    """
    self._check_open()
    complete = set(self.complete_tasks())
    last, prev_meta = None, None
    t = 0
    while t in complete:
      try:
        _, meta = self.restore_delta(t)
        self._verify_link(t, meta, prev_meta)
      except CheckpointCorruptedError as e:
        log.warning("%s", e)
        break
      last, t, prev_meta = t, t + 1, meta
    return last

  def delete_after(self, task: int) -> list[int]:
    """Deletes every step newer than ``task`` (complete or not) and their tmp dirs.

    When a loop uses it: on resume, when the newest steps cannot be used, e.g.
    :meth:`restore_state` raised :class:`CheckpointCorruptedError`, or a gap
    or an incomplete step follows the last good task. Then::

        good = ckpt.last_good_task()
        ckpt.delete_after(-1 if good is None else good)
        # ... restore_state(good, init) and retrain from task good + 1

    Also to redo tasks after ``task`` (e.g. with other hyper-parameters).
    :meth:`save` already removes incomplete steps by itself, so a plain
    crash-and-resume does not need this.

    Args:
      task: the last task to keep; ``-1`` deletes every step.

    Returns:
      The deleted steps.
    """
    self._check_writable("delete steps")
    task = _check_task(task, minimum=-1)
    self._manager.wait_until_finished()
    doomed = [s for s in self._orbax_steps() if s > task]
    for s in reversed(doomed):
      self._manager.delete(s)
    self._remove_tmp_dirs(lambda s: s > task)
    self._manager.reload()
    self._digests = {t: d for t, d in self._digests.items() if t <= task}
    return doomed
