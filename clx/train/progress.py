"""Per-task progress: a tqdm bar with loss, throughput and ETA; quiet off a TTY."""

from __future__ import annotations

import sys
import time

import jax
from tqdm.auto import tqdm


class TaskProgress:
  """Progress over the training steps of one task.

  Shows a bar (loss, examples/s, ETA) when stderr is a terminal and this is
  process 0; otherwise prints nothing until :meth:`close`, which logs a single
  summary line (unless ``quiet``).
  """

  def __init__(self, title: str, total_steps: int, *, enabled: bool | None = None,
               quiet: bool = False):
    if enabled is None:
      enabled = sys.stderr.isatty()
    self.enabled = enabled and jax.process_index() == 0
    self.quiet = quiet or jax.process_index() != 0
    self.title = title
    self.start = time.perf_counter()
    self.examples = 0
    self.steps = 0
    self.last_loss = float("nan")
    self.bar = tqdm(total=total_steps, desc=title, unit="step", leave=False,
                    dynamic_ncols=True) if self.enabled else None

  def update(self, steps: int, examples: int, loss: float) -> None:
    self.steps += steps
    self.examples += examples
    self.last_loss = loss
    if self.bar is not None:
      rate = self.examples / max(time.perf_counter() - self.start, 1e-9)
      self.bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:,.0f}", refresh=False)
      self.bar.update(steps)

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def close(self, summary: str = "") -> None:
    if self.bar is not None:
      self.bar.close()
    if not self.quiet:
      rate = self.examples / max(self.elapsed, 1e-9)
      print(f"{self.title}: {self.steps} steps, loss {self.last_loss:.4f}, "
            f"{rate:,.0f} ex/s, {self.elapsed:.1f}s {summary}".rstrip(), file=sys.stderr, flush=True)
