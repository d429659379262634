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

Modules (every public name is re-exported here, so ``clx.checkpoint.X`` keeps working):
  delta:        state trees as ``/``-joined paths; :func:`state_delta`, :func:`apply_delta`.
  hashing:      :func:`array_sha256`, :func:`meta_field_sha256`, :func:`meta_sha256`.
  meta:         the ``meta`` formats (:data:`FORMAT_VERSION`), structure checks, chain links.
  files:        :func:`atomic_write_bytes`, :func:`atomic_write_json` (run-level side files).
  errors:       :class:`CheckpointCorruptedError`, :class:`CheckpointMismatchError`.
  checkpointer: :class:`TaskCheckpointer`.
"""

# The private names re-exported here (_EMPTY, _flatten, _unflatten, _to_json) are used by
# clx.workdir and the checkpoint tests through ``clx.checkpoint``, as before the split.
from clx.checkpoint.checkpointer import TaskCheckpointer
from clx.checkpoint.delta import _EMPTY, _flatten, _unflatten, apply_delta, state_delta
from clx.checkpoint.errors import CheckpointCorruptedError, CheckpointMismatchError
from clx.checkpoint.files import NonFinite, _to_json, atomic_write_bytes, atomic_write_json
from clx.checkpoint.hashing import array_sha256, meta_field_sha256, meta_sha256
from clx.checkpoint.meta import FORMAT_VERSION

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
