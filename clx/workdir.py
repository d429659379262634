"""A workdir is one configuration's record, used by one run at a time.

What ``clx run`` guarantees about ``--workdir DIR`` (see README "What a
workdir guarantees"):

* One configuration. ``config.json`` records the configuration (everything
  but the list of methods). A run whose configuration differs from the
  recorded one, for any key that can change a result already in the workdir
  (seed, stream, model, train, experiment name, the method_args /
  train_overrides of a method that has results), is refused with
  :class:`WorkdirConfigError` listing the differing keys. Running another
  method under the same configuration is allowed: ``config.json``'s
  ``methods`` is the union. Nothing constrains a workdir that holds no
  results yet (e.g. a run killed before its first task finished).
* Verified bytes. ``metrics.json`` carries a sha256 of its content and each
  run entry the hash of the configuration it was produced under
  (:func:`method_config_sha256`); the per-task checkpoints verify every array
  and metadata byte (:mod:`clx.checkpoint`). A damaged or unverifiable
  ``metrics.json`` is rebuilt from the verified checkpoints by the next run
  (and said so on stderr); ``clx report`` refuses it with one line.
* Locked while running. :class:`WorkdirLock` holds an exclusive
  ``fcntl.flock`` on ``DIR/.clx.lock`` (released by the kernel when the
  process dies, so a ``kill -9`` never leaves it locked); the lock file names
  the holder (pid, host, start time, command). A second run is refused with
  :class:`WorkdirLockedError`.
* A refused run changes nothing; a failed run removes only what it created
  (the workdir itself, its ``config.json``, method folders without a complete
  task), under its own lock. Temp files of atomic writes left by a killed
  process are removed by the next run, under the lock.

Multi-host: process 0 alone takes the lock and reads/writes workdir-level
files; its decision (go / refused) is broadcast so that every process stops
alike. Per-task checkpoints are written jointly as before.

This module imports neither JAX nor Orbax at import time (``clx report``
uses it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from clx._io import write_atomic

LOCK_FILE = ".clx.lock"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
# Temp files of clx's atomic writes: `_io.write_atomic` (".<name>.<uuid hex>.tmp") and
# the tempfile.mkstemp(suffix=".png.tmp") heatmap writes of older versions.
_TMP_PATTERNS = (re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$"), re.compile(r"^tmp.*\.png\.tmp$"))
_METRICS_DOMAIN = b"clx.metrics_sha256.v1\0"
_METHOD_CONFIG_DOMAIN = b"clx.method_config_sha256.v1\0"
_PER_METHOD_KEYS = ("method_args", "train_overrides")
_OPTIONAL_PER_METHOD_KEYS = ("lr_schedules",)
_ALL_PER_METHOD_KEYS = _PER_METHOD_KEYS + _OPTIONAL_PER_METHOD_KEYS


class WorkdirError(RuntimeError):
  """A workdir that cannot be used as asked (the CLI prints it as one line)."""


class WorkdirLockedError(WorkdirError):
  """Another process holds the workdir's lock."""


class WorkdirConfigError(WorkdirError):
  """The run's configuration differs from the one the workdir records."""


class MetricsDamagedError(WorkdirError):
  """``metrics.json`` cannot be read or does not match its hash."""


# ------------------------------------------------------------------ hashing


def _canonical(obj: Any) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                    allow_nan=False).encode("ascii")


def _plain(config: dict[str, Any]) -> dict[str, Any]:
  """``config`` as plain JSON types (tuples become lists), as config.json stores it."""
  return json.loads(json.dumps(config, default=str))


def method_config_sha256(config: dict[str, Any], method: str) -> str:
  """Hash of the configuration that one method's results depend on.

  Covers every key of ``config`` except ``methods``, with ``method_args``,
  ``train_overrides`` and ``lr_schedules`` reduced to ``method``'s own entries (a schedule
  given to one method does not invalidate the others' results).

  Args:
    config: an experiment config (JSON-able dict).
    method: a method name.

  Returns:
    hex sha256 (stored as ``config_sha256`` in each ``metrics.json`` run entry).
  """
  config = _plain(config)
  # ``lr_schedules`` is per method too, and counts only for a method it names: the hashes of
  # the other methods, and of every config written before the key existed, stay as they were.
  shared = {k: v for k, v in config.items()
            if k != "methods" and k not in _ALL_PER_METHOD_KEYS}
  own = {k: (config.get(k) or {}).get(method, {}) for k in _PER_METHOD_KEYS}
  own.update({k: config[k][method] for k in _OPTIONAL_PER_METHOD_KEYS
              if method in (config.get(k) or {})})
  h = hashlib.sha256(_METHOD_CONFIG_DOMAIN)
  h.update(_canonical({"shared": shared, "method": method, **own}))
  return h.hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(obj, dict) and obj:
    out = {}
    for k, v in obj.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: obj}


def config_differences(recorded: dict[str, Any], config: dict[str, Any],
                       methods_with_results: list[str]) -> list[str]:
  """The keys whose values differ between two configs, as ``"key: old → new"`` lines.

  ``methods`` is ignored; ``method_args`` / ``train_overrides`` / ``lr_schedules`` entries
  only count for ``methods_with_results`` (another method's arguments cannot change
  a result already recorded).

  Args:
    recorded: the workdir's ``config.json``.
    config: the new run's config.
    methods_with_results: methods with results in the workdir.

  Returns:
    Sorted descriptions of the differing dotted keys (empty if compatible).
  """
  def view(c):
    c = _plain(c)
    out = {k: v for k, v in c.items() if k != "methods" and k not in _ALL_PER_METHOD_KEYS}
    for key in _ALL_PER_METHOD_KEYS:
      for m in methods_with_results:
        out[f"{key}.{m}"] = (c.get(key) or {}).get(m, {})
    return _flatten(out)

  old, new = view(recorded), view(config)
  lines = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if a != b:
      lines.append(f"{key}: {json.dumps(a)} → {json.dumps(b)}")
  return lines


# ------------------------------------------------------------------ metrics.json


def metrics_sha256(data: dict[str, Any]) -> str:
  """hex sha256 of ``metrics.json``'s content without its ``sha256`` key."""
  h = hashlib.sha256(_METRICS_DOMAIN)
  h.update(_canonical({k: v for k, v in data.items() if k != "sha256"}))
  return h.hexdigest()


def load_metrics(path: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
  """Reads and verifies a ``metrics.json``.

  Args:
    path: the file.

  Returns:
    ``(data, problem)``: ``(None, None)`` when there is no file; ``(data,
    None)`` when it verifies; ``(data, why)`` when it parses but carries no
    hash (written by an older clx: unverifiable); ``(None, why)`` when it is
    damaged (unreadable, not JSON, wrong shape, hash mismatch).
  """
  path = Path(path)
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None, None
  except (OSError, UnicodeDecodeError) as e:
    return None, f"cannot be read ({type(e).__name__}: {e})"
  try:
    data = json.loads(text)
  except ValueError as e:
    return None, f"is not valid JSON ({e})"
  if not (isinstance(data, dict) and isinstance(data.get("runs"), dict)
          and all(isinstance(r, dict) for r in data["runs"].values())):
    return None, "does not hold a {'runs': {...}} object"
  if "sha256" not in data:
    return data, "has no sha256 (written by an older clx), so its numbers cannot be verified"
  if data["sha256"] != metrics_sha256(data):
    return None, "does not match its recorded sha256 (its content was altered or damaged)"
  return data, None


def write_metrics(path: str | os.PathLike, data: dict[str, Any]) -> None:
  """Writes ``data`` (plus its ``sha256``) atomically, from process 0 only."""
  from clx import checkpoint  # JAX: only the run path writes metrics
  body = {k: v for k, v in data.items() if k != "sha256"}
  clean = checkpoint._to_json(body, "metrics", "error")  # pylint: disable=protected-access
  clean["sha256"] = metrics_sha256(clean)
  checkpoint.atomic_write_json(path, clean)


# ------------------------------------------------------------------ lock


def _describe_holder(text: str) -> str:
  try:
    info = json.loads(text)
    return (f"pid {info['pid']} on host {info['host']}, started {info['started']}"
            f" ({info.get('command', '?')})")
  except (ValueError, KeyError, TypeError):
    return "holder details not written yet"


class WorkdirLock:
  """An exclusive, non-blocking ``flock`` on ``<workdir>/.clx.lock``.

  The kernel releases the lock when the holding process dies (even by
  SIGKILL). The holder writes ``{"pid", "host", "started", "command"}`` into
  the file so that a refused process can name it. :meth:`release` unlinks the
  file while still holding the lock; :meth:`acquire` re-checks after locking
  that its descriptor is still the file at the path (the classic unlink race).

  Args:
    workdir: an existing directory.
    what: a short description of the holder (e.g. the command line).
  """

  def __init__(self, workdir: str | os.PathLike, what: str):
    self.path = Path(workdir) / LOCK_FILE
    self._fd: int | None = None
    self._what = what

  def acquire(self) -> WorkdirLock:
    """Takes the lock or raises :class:`WorkdirLockedError` naming the holder."""
    for _ in range(100):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise _os_error(self.path.parent, e, "lock") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise _os_error(self.path.parent, e, "lock") from None
        raise WorkdirLockedError(
            f"workdir {self.path.parent} is in use by another clx process "
            f"({_describe_holder(holder)}); wait for it to finish or use another --workdir"
        ) from None
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)  # the previous holder unlinked the file while we waited: retry
    else:
      raise WorkdirLockedError(f"cannot lock workdir {self.path.parent}: its lock file keeps "
                               "changing")
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": self._what}
    self._fd = fd
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError as e:  # e.g. disk full: do not run without a named holder
      self.release()
      raise _os_error(self.path.parent, e, "lock") from None
    return self

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    """Unlinks the lock file (if still ours) and releases the lock (idempotent)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    with contextlib.suppress(OSError):
      if os.path.samestat(os.fstat(fd), os.stat(self.path)):
        os.unlink(self.path)
    os.close(fd)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _os_error(path: Path, e: OSError, action: str) -> WorkdirError:
  reason = {errno.ENOTDIR: "a path component is a file, not a directory",
            errno.EEXIST: "it exists and is not a directory",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
            errno.ENOENT: "it was removed meanwhile"}.get(e.errno, e.strerror or str(e))
  return WorkdirError(f"cannot {action} workdir {path}: {reason}")


# ------------------------------------------------------------------ contents


def methods_with_results(workdir: str | os.PathLike) -> list[str]:
  """Methods with at least one complete task checkpoint or a ``metrics.json`` entry."""
  workdir = Path(workdir)
  found = {p.parents[3].name for p in workdir.glob("*/checkpoints/*/meta/metadata")
           if p.parents[1].name.isdigit()}
  data, _ = load_metrics(workdir / METRICS_FILE)
  if data is not None:
    found |= set(data["runs"])
  return sorted(found)


def complete_tasks(workdir: str | os.PathLike, method: str) -> list[int]:
  """Task indices with a committed ``meta`` under ``<workdir>/<method>/checkpoints``."""
  root = Path(workdir) / method / "checkpoints"
  return sorted(int(p.parents[1].name) for p in root.glob("*/meta/metadata")
                if p.parents[1].name.isdigit())


def clean_temp_files(workdir: str | os.PathLike) -> list[Path]:
  """Removes temp files of interrupted atomic writes in the workdir and its method folders.

  Call under the workdir's lock (no other clx writer is active then).
  Orbax's own ``*.orbax-checkpoint-tmp*`` folders are cleaned by
  :class:`clx.checkpoint.TaskCheckpointer`.

  Returns:
    The removed paths.
  """
  workdir = Path(workdir)
  removed = []
  for folder in [workdir, *(p for p in workdir.iterdir() if p.is_dir())]:
    for p in folder.iterdir():
      if p.is_file() and any(rx.match(p.name) for rx in _TMP_PATTERNS):
        with contextlib.suppress(FileNotFoundError):
          p.unlink()
          removed.append(p)
  return removed


def _process_index() -> int:
  if "jax" not in sys.modules:
    return 0
  import jax
  return jax.process_index()


def _agree(error: BaseException | None) -> None:
  """Raises ``error`` on process 0 and a matching WorkdirError on the others (multi-host)."""
  import jax
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    flag = np.int32(0 if error is None else 1)
    flag = int(multihost_utils.broadcast_one_to_all(flag))
    if flag and error is None:
      raise WorkdirError("process 0 refused to use the workdir (see its error)")
  if error is not None:
    raise error


class Workdir:
  """One run's use of a workdir: lock, configuration check, cleanup on failure.

  Use::

      with Workdir(path, config, command="clx run ...") as w:  # lock + config check
        ...load data...
        w.accept()   # temp-file cleanup, config.json (nothing written before)
        ...train, w.write_metrics(...)...

  On an exception inside the block, what this process created is removed
  (see :meth:`_cleanup`) before the lock is released.

  Args:
    path: the workdir.
    config: the run's experiment config.
    command: how the holder is named in the lock file.
  """

  def __init__(self, path: str | os.PathLike, config: dict[str, Any], *, command: str = "clx run"):
    self.path = Path(path).absolute()  # compared with the absolute folders it creates
    self.config = _plain(config)
    self.primary = _process_index() == 0
    self._lock = WorkdirLock(self.path, command)
    self._created: list[Path] = []  # directories this process created, outermost first
    self._old_config: bytes | None = None
    self._wrote_config = False
    self._preexisting_method_dirs: set[str] | None = None  # None: not read yet
    self.recorded: dict[str, Any] | None = None
    self.with_results: list[str] = []
    self.merged: dict[str, Any] = self.config
    self.metrics: dict[str, Any] | None = None
    self.metrics_problem: str | None = None

  # -- open / check (nothing but the lock file and missing folders is created)
  def __enter__(self) -> Workdir:
    error = None
    if self.primary:
      try:
        self._open()
      except BaseException as e:  # pylint: disable=broad-except
        error = e
        try:
          self._cleanup()
        finally:
          self._lock.release()
    else:
      # Read what process 0 reads, before the barrier (process 0 writes only after it).
      with contextlib.suppress(OSError):
        self._inspect()
    _agree(error)
    return self

  def _inspect(self) -> None:
    """Reads the workdir's state: method folders, results, config.json, metrics.json."""
    path = self.path
    self._preexisting_method_dirs = ({p.name for p in path.iterdir() if p.is_dir()}
                                     if path.is_dir() else set())
    self.with_results = methods_with_results(path) if path.is_dir() else []
    self.metrics, self.metrics_problem = load_metrics(path / METRICS_FILE)
    config_path = path / CONFIG_FILE
    self.recorded, self._config_problem = None, None
    if config_path.exists():
      self._old_config = config_path.read_bytes()
      try:
        self.recorded = json.loads(self._old_config)
        if not isinstance(self.recorded, dict):
          raise ValueError("not a JSON object")
      except ValueError as e:
        self.recorded, self._config_problem = None, str(e)

  def _open(self) -> None:
    path = self.path
    for _ in range(10):
      missing = []
      p = path.absolute()
      while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
      if p.exists() and not p.is_dir() or os.path.lexists(path) and not path.is_dir():
        raise WorkdirError(f"cannot use workdir {path}: {p} is a file, not a directory")
      try:
        for d in reversed(missing):
          try:
            os.mkdir(d)
            self._created.append(d)
          except FileExistsError:
            pass  # another process made it first: not ours
      except OSError as e:
        raise _os_error(path, e, "create") from None
      try:
        self._lock.acquire()
        break
      except WorkdirError as e:
        if "removed meanwhile" not in str(e):
          raise
    else:
      raise WorkdirError(f"cannot lock workdir {path}: it keeps disappearing")
    if not os.access(path, os.W_OK | os.X_OK):
      raise WorkdirError(f"cannot write to workdir {path}: permission denied")
    self._inspect()
    config_path = path / CONFIG_FILE
    if not self.with_results:
      return
    if self._config_problem is not None:
      raise WorkdirError(f"{config_path} is damaged ({self._config_problem}) and the workdir "
                         f"holds results for {self.with_results}: restore the file or use "
                         "another workdir")
    if self.recorded is None:
      others = [m for m in self.with_results if m not in self.config["methods"]]
      if others:
        raise WorkdirConfigError(
            f"workdir {path} holds results for {others} but no {CONFIG_FILE} records their "
            "configuration; include them in --set methods=... (their checkpoints are then "
            "checked against this configuration) or use another workdir")
      return
    diff = config_differences(self.recorded, self.config, self.with_results)
    if diff:
      raise WorkdirConfigError(
          f"workdir {path} records another configuration (results for "
          f"{', '.join(self.with_results)}); this run differs in: " + "; ".join(diff)
          + ". One workdir holds one configuration: use another --workdir")

  # -- accepted: the only writes before training
  def accept(self) -> list[Path]:
    """Removes leftover temp files and writes ``config.json`` (process 0).

    ``config.json`` gets the run's config with ``methods`` = the methods with
    results followed by this run's, and the ``method_args`` /
    ``train_overrides`` of recorded methods this config omits.

    Returns:
      The temp files removed.
    """
    recorded = self.recorded or {}
    merged = dict(self.config)
    methods = [m for m in recorded.get("methods", []) if m in self.with_results]
    methods += [m for m in self.with_results if m not in methods]
    methods += [m for m in self.config["methods"] if m not in methods]
    merged["methods"] = methods
    for key in _ALL_PER_METHOD_KEYS:
      old = {m: v for m, v in (recorded.get(key) or {}).items() if m in self.with_results}
      if old or key in merged:
        merged[key] = {**old, **(merged.get(key) or {})}
    self.merged = merged
    if not self.primary:
      return []
    removed = clean_temp_files(self.path)
    from clx import checkpoint
    checkpoint.atomic_write_json(self.path / CONFIG_FILE, merged)
    self._wrote_config = True
    return removed

  def __exit__(self, exc_type, exc, tb) -> None:
    if self.primary:
      try:
        if exc_type is not None:
          self._cleanup()
      finally:
        self._lock.release()

  def _cleanup(self) -> None:
    """After a failure: remove what this process created, only while holding the lock."""
    if not self._lock.held:
      # Refused before locking: only empty folders this process made are removed.
      for d in reversed(self._created):
        with contextlib.suppress(OSError):
          os.rmdir(d)
      return
    results = [m for m in methods_with_results(self.path)]
    if not results and self.path in self._created:
      shutil.rmtree(self.path, ignore_errors=True)  # all of it is ours (we made it, locked)
      for d in reversed(self._created[:self._created.index(self.path)]):
        with contextlib.suppress(OSError):
          os.rmdir(d)  # parents only if still empty: another run may use them
      return
    if self._preexisting_method_dirs is None:
      return  # failed before the workdir was read: nothing of ours to tell apart
    for p in self.path.iterdir():
      if (p.is_dir() and p.name not in self._preexisting_method_dirs
          and p.name not in results):
        shutil.rmtree(p, ignore_errors=True)
    if not self._wrote_config:
      return
    if set(results) == set(self.with_results):
      # Nothing new was recorded: config.json goes back to what it was.
      if self._old_config is None:
        with contextlib.suppress(FileNotFoundError):
          (self.path / CONFIG_FILE).unlink()
      else:
        write_atomic(self.path / CONFIG_FILE, self._old_config)
    else:  # some methods finished before the failure: list only methods with results
      record = {**self.merged, "methods": [m for m in self.merged["methods"] if m in results]}
      write_atomic(self.path / CONFIG_FILE,
                   (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
