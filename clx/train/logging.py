"""Run logs people can read while a run goes: ``METHOD/metrics.jsonl``, TensorBoard, W&B.

One :class:`RunLogger` per method run writes

* ``<dir>/metrics.jsonl``: one JSON object per line, appended and flushed as it
  is produced. ``{"kind": "step", "task", "phase", "epoch", "step", "loss",
  "learning_rate", "grad_norm", "examples_per_s"}`` per training step (``step``
  counts every logged step of the run, all tasks and phases) and ``{"kind":
  "task", "task", "acc_row", "fit", "wall_time_s"}`` once per finished task.
  A killed run leaves whole lines plus at most one partial last line;
  :func:`read_jsonl` skips a line that does not parse.
* TensorBoard event files under ``<dir>/tensorboard`` (tensorboardX, no
  TensorFlow), on by default.
* Weights & Biases, when a project is named and ``wandb`` is installed.

Resume: a finished task's lines are the truth. :meth:`RunLogger.open` keeps the
lines of tasks ``< start_task`` (the tasks whose checkpoints verified) and drops
the rest (a task in progress when the run was killed is trained again, so its
lines would be duplicated); TensorBoard is told to purge the dropped steps
(``purge_step``). Only process 0 writes on multi-host runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clx._io import write_atomic

METRICS_JSONL = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
STEP_SCALARS = ("loss", "learning_rate", "grad_norm")


class LoggerUnavailableError(RuntimeError):
  """A requested log backend is not installed (the message names the pip command)."""


def require_backends(*, tensorboard: bool, wandb_project: str | None) -> None:
  """Fail fast, before any training, when a requested backend cannot be imported.

  Args:
    tensorboard: TensorBoard event files are requested.
    wandb_project: a Weights & Biases project name, or ``None``/``""`` for none.

  Raises:
    LoggerUnavailableError: naming the package to install.
  """
  if tensorboard:
    try:
      import tensorboardX  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise LoggerUnavailableError(
          "TensorBoard logs need tensorboardX: `pip install tensorboardX` (or turn them off with "
          "--set log.tensorboard=false)") from None
  if wandb_project:
    try:
      import wandb  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise LoggerUnavailableError(
          f"log.wandb={wandb_project} needs Weights & Biases: `pip install wandb` (and "
          "`wandb login`), or drop --set log.wandb") from None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl``; lines that do not parse (a killed write) are skipped.

  Args:
    path: the file (missing → ``[]``).

  Returns:
    The JSON objects in file order.
  """
  path = Path(path)
  if not path.is_file():
    return []
  records = []
  with open(path, "rb") as f:
    for raw in f:
      try:
        record = json.loads(raw)
      except ValueError:  # partial last line of a killed run (or a torn write)
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def _finite_or_none(value: float) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None  # strict JSON has no NaN


class RunLogger:
  """Per-step scalars and per-task metrics of one method's run.

  Usage: ``logger = RunLogger(dir, ...)``; ``logger.open(start_task)`` before
  the first task (drops the lines of unfinished tasks); the loop calls
  :meth:`log_steps` once per fused chunk and :meth:`log_task` after each
  task's evaluation; :meth:`close` at the end (also a context manager).

  Args:
    directory: the method's folder in the workdir (``<workdir>/<method>``).
    tensorboard: also write TensorBoard event files (tensorboardX).
    wandb_project: also log to this W&B project (``None``/``""``: off).
    run_name: the W&B run name (default: the directory's name).
    run_config: JSON-able config attached to the W&B run.
    enabled: write anything at all (default: only on process 0).
  """

  def __init__(self, directory: str | os.PathLike, *, tensorboard: bool = True,
               wandb_project: str | None = None, run_name: str | None = None,
               run_config: Mapping[str, Any] | None = None, enabled: bool | None = None):
    if enabled is None:
      import jax  # pylint: disable=import-outside-toplevel
      enabled = jax.process_index() == 0
    self.enabled = bool(enabled)
    self.directory = Path(directory)
    self.path = self.directory / METRICS_JSONL
    self.tensorboard = tensorboard
    self.wandb_project = wandb_project or None
    self.run_name = run_name or self.directory.name
    self.run_config = dict(run_config or {})
    self.task: int | None = None  # set by the loop before each task
    self.global_step = 0
    self._file = None
    self._tb = None
    self._wandb = None
    if self.enabled:
      require_backends(tensorboard=tensorboard, wandb_project=self.wandb_project)

  # ------------------------------------------------------------------ lifecycle

  def open(self, start_task: int = 0) -> RunLogger:
    """Start (or resume at ``start_task``): keep only lines of tasks ``< start_task``.

    Args:
      start_task: the first task this run trains (tasks before it restored from
        verified checkpoints).

    Returns:
      ``self``.
    """
    if not self.enabled:
      return self
    self.directory.mkdir(parents=True, exist_ok=True)
    kept = [r for r in read_jsonl(self.path)
            if isinstance(r.get("task"), int) and r["task"] < start_task]
    # Rewritten atomically: a kill here leaves either the old file or the trimmed one.
    write_atomic(self.path, b"".join(_line(r) for r in kept))
    steps = [r["step"] for r in kept if r.get("kind") == "step" and isinstance(r.get("step"), int)]
    self.global_step = max(steps) + 1 if steps else 0
    self._file = open(self.path, "ab")  # pylint: disable=consider-using-with
    if self.tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      # purge_step: TensorBoard discards the killed run's events from this step on.
      self._tb = SummaryWriter(logdir=str(self.directory / TENSORBOARD_DIR),
                               purge_step=self.global_step, flush_secs=10)
    if self.wandb_project:
      import wandb  # pylint: disable=import-outside-toplevel
      run_id = hashlib.sha256(str(self.directory.resolve()).encode()).hexdigest()[:16]
      self._wandb = wandb.init(project=self.wandb_project, name=self.run_name, id=run_id,
                               resume="allow", config=self.run_config)
    return self

  def close(self) -> None:
    """Flush and close every backend (idempotent)."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None

  def __enter__(self) -> RunLogger:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------------ records

  def _write(self, record: dict[str, Any]) -> None:
    self._file.write(_line(record))
    self._file.flush()  # survives a kill of the process (not a power cut: no fsync per chunk)

  def log_steps(self, scalars: Mapping[str, np.ndarray], *, phase: str, epoch: int,
                examples_per_s: float) -> None:
    """One line per step of a fused chunk.

    Args:
      scalars: ``{name: (steps,) array}`` read from the device once per chunk
        (``loss``, ``learning_rate``, ``grad_norm``).
      phase: the fit's title (e.g. ``"gpm task 2/5"``).
      epoch: 0-based epoch of these steps.
      examples_per_s: the chunk's throughput (examples / wall seconds).
    """
    if not self.enabled or self._file is None:
      return
    columns = {k: np.asarray(v, np.float64).reshape(-1) for k, v in scalars.items()}
    steps = min(len(v) for v in columns.values()) if columns else 0
    for i in range(steps):
      record = {"kind": "step", "task": self.task, "phase": phase, "epoch": epoch,
                "step": self.global_step,
                **{k: _finite_or_none(v[i]) for k, v in columns.items()},
                "examples_per_s": round(float(examples_per_s), 3)}
      self._write(record)
      if self._tb is not None:
        for k, v in columns.items():
          self._tb.add_scalar(f"train/{k}", float(v[i]), self.global_step)
        self._tb.add_scalar("train/examples_per_s", float(examples_per_s), self.global_step)
      if self._wandb is not None:
        self._wandb.log({**{f"train/{k}": float(v[i]) for k, v in columns.items()},
                         "train/examples_per_s": float(examples_per_s), "task": self.task},
                        step=self.global_step)
      self.global_step += 1

  def log_task(self, task: int, acc_row: np.ndarray, *, fit: Mapping[str, Any] | None = None,
               wall_time_s: float | None = None) -> None:
    """The metrics of a finished task (written before its checkpoint is committed).

    Args:
      task: 0-based task index.
      acc_row: (task + 1,) test accuracies in percent on tasks 0..task (NaN when the row was
        not measured: ``acc_row`` / ``acc`` are then null and nothing goes to TensorBoard /
        wandb).
      fit: the fit log of the task's main phase (epochs, learning rates, validation history).
      wall_time_s: run wall time so far.
    """
    if not self.enabled or self._file is None:
      return
    values = np.asarray(acc_row, np.float64).reshape(-1)
    measured = not np.isnan(values).any()  # evaluate_after="last_task" leaves rows unmeasured
    row = [float(a) for a in values] if measured else None
    record = {"kind": "task", "task": task, "step": None, "acc_row": row,
              "acc": float(np.mean(values)) if measured else None,
              "fit": _jsonable(dict(fit or {})), "wall_time_s": wall_time_s, "time": time.time()}
    self._write(record)
    if not measured:
      return
    if self._tb is not None:
      self._tb.add_scalar("task/acc", record["acc"], task)
      for i, a in enumerate(row):
        self._tb.add_scalar(f"task/acc_on_task_{i + 1}", a, task)
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log({"task/acc": record["acc"], "task": task}, step=max(self.global_step - 1, 0))


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.floating, float)):
    return _finite_or_none(obj)
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  return obj if isinstance(obj, (str, int, bool, type(None))) else str(obj)


def _line(record: Mapping[str, Any]) -> bytes:
  return (json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")


def loss_curves(records: list[dict[str, Any]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """Per task, the training-loss curve of its steps (all phases, in order).

  Args:
    records: from :func:`read_jsonl`.

  Returns:
    ``{task: (steps (n,), losses (n,))}``; steps are the run's global step numbers.
  """
  curves: dict[int, tuple[list[int], list[float]]] = {}
  for r in records:
    if r.get("kind") != "step" or not isinstance(r.get("task"), int) or r.get("loss") is None:
      continue
    steps, losses = curves.setdefault(r["task"], ([], []))
    steps.append(int(r["step"]))
    losses.append(float(r["loss"]))
  return {t: (np.asarray(s), np.asarray(v)) for t, (s, v) in sorted(curves.items())}


class StepProfiler:
  """A ``jax.profiler`` trace of a few training steps after warm-up.

  The first chunk of every fit compiles, so tracing starts at a fit's second
  chunk and stops once ``steps`` steps are traced (or the fit ends); one trace
  per run, into ``directory`` (open it with XProf or TensorBoard's profile tab).

  Args:
    directory: where ``jax.profiler`` writes (``<workdir>/<method>/profile``).
    steps: how many steps to trace at least.
  """

  def __init__(self, directory: str | os.PathLike, steps: int = 5):
    self.directory = Path(directory)
    self.steps = steps
    self.state = "waiting"  # waiting → tracing → done
    self.traced = 0

  def before_chunk(self, chunk_index: int) -> None:
    """Called before dispatching chunk ``chunk_index`` (0-based) of a fit."""
    if self.state == "waiting" and chunk_index >= 1:
      import jax  # pylint: disable=import-outside-toplevel
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.state = "tracing"

  def after_chunk(self, steps: int, outputs: Any) -> None:
    """Called after dispatching a chunk of ``steps`` steps with device ``outputs``."""
    if self.state != "tracing":
      return
    self.traced += steps
    if self.traced >= self.steps:
      self._stop(outputs)

  def end_fit(self, outputs: Any) -> None:
    """Called when a fit ends (a trace in progress stops there)."""
    if self.state == "tracing":
      self._stop(outputs)

  def _stop(self, outputs: Any) -> None:
    import jax  # pylint: disable=import-outside-toplevel
    jax.block_until_ready(outputs)  # the traced steps run inside the trace
    jax.profiler.stop_trace()
    self.state = "done"


def trace_files(directory: str | os.PathLike) -> Iterator[Path]:
  """The trace files ``jax.profiler`` wrote under ``directory`` (``*.xplane.pb``)."""
  return Path(directory).rglob("*.xplane.pb")
