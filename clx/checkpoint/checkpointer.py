"""The task checkpointer: one verified Orbax step per task, holding that task's state delta."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from clx.checkpoint.delta import (_EMPTY, _MISSING, _SEP, _copy_tree, _esc, _flatten,
                                  _orbax_key, _split, _unesc, _unflatten, apply_delta)
from clx.checkpoint.errors import CheckpointCorruptedError, CheckpointMismatchError
from clx.checkpoint.files import NonFinite, _check_nonfinite, _to_json
from clx.checkpoint.hashing import _sha256_host, _to_host, meta_field_sha256, meta_sha256
from clx.checkpoint.meta import (_HASHES_KEY, _PREV_KEY, _RESERVED_META_KEYS, FORMAT_VERSION,
                                 validate_meta, verify_link, verify_meta_hashes)

# The package's logger name, as before the split into modules (log filters keep working).
log = logging.getLogger("clx.checkpoint")

_DELTA_ITEM = "delta"
_META_ITEM = "meta"
_META_FILE = "metadata"  # file name used by Orbax's JsonCheckpointHandler
_TMP_MARKER = ".orbax-checkpoint-tmp"


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
    if not verify_meta_hashes(meta, damaged) and not self._warned_v1:
      self._warned_v1 = True
      log.warning("%s holds format 1 task checkpoints (written by an older clx): their "
                  "metadata has no hashes and is not verified", self._directory)

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
    verify_link(task, meta, prev_meta, self._damaged_fn(task))

  @staticmethod
  def _validate_meta(meta: Any, task: int, damaged):
    """Checks the reserved ``meta`` fields; returns ``({path: (sha, shape, dtype)}, empties)``."""
    return validate_meta(meta, task, damaged)

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
