"""Atomic file writes shared by the checkpoint, asset and report code (no JAX import)."""

from __future__ import annotations

import contextlib
import os
import uuid


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
  """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename.

  Readers see the old file or the complete new one, never a partial write; the
  directory is fsync'ed after the rename (best effort) so the name survives a
  crash. Parent directories are created. Local/POSIX file systems.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
  path = os.path.abspath(os.fspath(path))
  directory, name = os.path.split(path)
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  with contextlib.suppress(OSError):  # e.g. file systems that cannot open directories
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)
