"""Errors raised when a task checkpoint cannot be restored (no JAX import)."""

from __future__ import annotations

from typing import Any


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
