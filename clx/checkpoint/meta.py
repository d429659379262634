"""The ``meta`` layout of a task step: its formats, structure checks and chain links.

Format 2 (written today) adds ``prev_meta_sha256`` and ``meta_sha256`` to
format 1's reserved keys; format 1 steps (written by an older clx) still
restore, unverified, and a format 2 step may follow a format 1 one (this is
the format migration: a resumed run continues in format 2, chained to the last
format 1 task). A format 1 step after a format 2 one is refused. The one place
that tells the formats apart is :func:`meta_format`; everything else in a step
(the delta's arrays, its ``/``-joined paths with ``%2F`` / ``%25`` inside keys,
the state keys) has had one layout since checkpoints were first written
(f265423), so no key needs migrating (``tests/train/test_checkpoint_fixture.py``
restores steps written by that code at 91610c0, format 1, and at d258705, format 2).

Every check takes a ``damaged(detail, leaf=None, cause=None, *, field=None)``
callable that builds the :class:`~clx.checkpoint.errors.CheckpointCorruptedError`
to raise, so the messages name the task and step directory of the caller.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from clx.checkpoint.errors import CheckpointCorruptedError
from clx.checkpoint.hashing import meta_field_sha256, meta_sha256

FORMAT_VERSION = 2
"""Version of the ``meta`` layout written by :meth:`TaskCheckpointer.save` (1 still restores)."""
_READABLE_FORMATS = (1, 2)

_RESERVED_META_KEYS_V1 = ("task", "removed", "sha256", "shapes", "dtypes", "empty_dicts", "format")
_PREV_KEY = "prev_meta_sha256"
_HASHES_KEY = "meta_sha256"
_RESERVED_META_KEYS = (*_RESERVED_META_KEYS_V1, _PREV_KEY, _HASHES_KEY)

_MISSING = object()

Damaged = Callable[..., CheckpointCorruptedError]


def meta_format(meta: dict[str, Any], damaged: Damaged) -> int:
  """The layout version of a step's ``meta``: 1 (written before e7b2e78) or 2.

  The one place that tells the formats apart. Format 1 is format 2 without the
  hash fields: no ``meta_sha256`` (its fields are not verified) and no
  ``prev_meta_sha256`` (it does not chain to the previous task). Its arrays and
  paths are read as they are; a run resumed on it writes format 2, chained to it
  (:func:`verify_link`).

  Args:
    meta: a step's ``meta`` as read from JSON (a dict).
    damaged: builds the error to raise.

  Returns:
    1 or 2. A ``meta`` without ``format`` is judged as the current format, so
    :func:`validate_meta` names ``format`` among its missing keys.

  Raises:
    CheckpointCorruptedError: ``format`` is not a readable version, or a format 1
      ``meta`` carries format 2's hash fields (its ``format`` was altered).
  """
  fmt = meta.get("format", FORMAT_VERSION)
  if isinstance(fmt, bool) or fmt not in _READABLE_FORMATS:
    raise damaged(f"meta format {fmt!r} is not supported (readable formats: "
                  f"{list(_READABLE_FORMATS)})", field="format")
  if fmt == 1:
    extra = [k for k in (_PREV_KEY, _HASHES_KEY) if k in meta]
    if extra:
      raise damaged(f"meta says format 1 but has format 2's fields {extra} (its 'format' was "
                    "altered)", field="format")
  return int(fmt)


def validate_meta(meta: Any, task: int, damaged: Damaged
                  ) -> tuple[dict[str, tuple[str, tuple[int, ...], np.dtype]], list[str]]:
  """Checks the reserved ``meta`` fields of task ``task``'s step.

  Args:
    meta: the step's ``meta`` as read from JSON.
    task: the task (step) index it must name.
    damaged: builds the error to raise (see the module docstring).

  Returns:
    ``({path: (sha256, shape, dtype)}, empties)``: every array leaf the delta
    holds, and the paths of its empty sub-dicts.

  Raises:
    CheckpointCorruptedError: unsupported format, missing reserved keys,
      malformed entries (built by ``damaged``).
  """
  if not isinstance(meta, dict):
    raise damaged(f"meta is a {type(meta).__name__}, not a JSON object")
  required = _RESERVED_META_KEYS_V1 if meta_format(meta, damaged) == 1 else _RESERVED_META_KEYS
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


def verify_meta_hashes(meta: dict[str, Any], damaged: Damaged) -> bool:
  """Checks every top-level ``meta`` field against ``meta["meta_sha256"]``.

  Args:
    meta: a ``meta`` that passed :func:`validate_meta`.
    damaged: builds the error to raise.

  Returns:
    True when the fields were verified; False for a format 1 ``meta``, which
    has no hashes (the caller warns that it is not verified).

  Raises:
    CheckpointCorruptedError: a missing, extra or altered field.
  """
  if meta_format(meta, damaged) == 1:
    return False
  hashes = meta.get(_HASHES_KEY, _MISSING)
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
  return True


def verify_link(task: int, meta: dict[str, Any], prev_meta: dict[str, Any] | None,
                damaged: Damaged) -> None:
  """Checks that ``meta`` (task ``task``) chains to ``prev_meta`` (task ``task - 1``).

  Args:
    task: the task of ``meta``.
    meta: its verified ``meta``.
    prev_meta: task ``task - 1``'s verified ``meta``, None for task 0.
    damaged: builds the error to raise.

  Raises:
    CheckpointCorruptedError: a broken link, or a format 1 step after a
      format 2 one.
  """
  if meta_format(meta, damaged) == 1:
    if prev_meta is not None and meta_format(prev_meta, damaged) != 1:
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
