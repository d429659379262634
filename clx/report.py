"""Render results for a person: tables in the terminal, accuracy-matrix heatmaps."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np

from clx._io import write_atomic

METRIC_COLUMNS = ("acc", "acc_samples", "aia", "bwt", "forgetting", "wall_time_s")


def matrix_to_json(acc: np.ndarray) -> list[list[float | None]]:
  """(T, T) matrix → nested lists with ``None`` (JSON null) above the diagonal."""
  return [[None if (j > i or not math.isfinite(v)) else round(float(v), 4)
           for j, v in enumerate(row)] for i, row in enumerate(np.asarray(acc))]


def matrix_from_json(rows) -> np.ndarray:
  return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def format_matrix(acc: np.ndarray, title: str = "") -> str:
  acc = np.asarray(acc, dtype=float)
  T = acc.shape[0]
  lines = [title] if title else []
  lines.append("after \\ on " + "".join(f"{f'T{j + 1}':>8}" for j in range(T)))
  for i in range(T):
    cells = "".join(f"{acc[i, j]:8.2f}" if j <= i and np.isfinite(acc[i, j]) else f"{'':>8}"
                    for j in range(T))
    lines.append(f"{f'T{i + 1}':<11}{cells}")
  return "\n".join(lines)


def format_table(runs: dict[str, dict]) -> str:
  """One row per method with ACC / AIA / BWT / forgetting / wall time."""
  header = f"{'method':<16}" + "".join(f"{c:>14}" for c in METRIC_COLUMNS)
  lines = [header, "-" * len(header)]
  for name, run in runs.items():
    cells = "".join(f"{run.get(c, float('nan')):14.2f}" for c in METRIC_COLUMNS)
    lines.append(f"{name:<16}{cells}")
  return "\n".join(lines)


def save_heatmap(acc: np.ndarray, path: str | os.PathLike, title: str = "") -> Path:
  """Write an accuracy-matrix heatmap PNG atomically."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  acc = np.asarray(acc, dtype=float)
  T = acc.shape[0]
  masked = np.ma.masked_invalid(np.where(np.tril(np.ones_like(acc, bool)), acc, np.nan))
  fig, ax = plt.subplots(figsize=(1.0 + 0.6 * T, 0.8 + 0.55 * T), dpi=110)
  im = ax.imshow(masked, vmin=0, vmax=100, cmap="viridis")
  for i in range(T):
    for j in range(i + 1):
      if np.isfinite(acc[i, j]):
        ax.text(j, i, f"{acc[i, j]:.0f}", ha="center", va="center", fontsize=7,
                color="white" if acc[i, j] < 60 else "black")
  ax.set_xticks(range(T), [f"T{j + 1}" for j in range(T)], fontsize=7)
  ax.set_yticks(range(T), [f"T{i + 1}" for i in range(T)], fontsize=7)
  ax.set_xlabel("evaluated on task")
  ax.set_ylabel("after training task")
  ax.set_title(title, fontsize=8)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
  fig.tight_layout()
  path = Path(path)
  buf = io.BytesIO()
  try:
    fig.savefig(buf, format="png")
  finally:
    plt.close(fig)
  write_atomic(path, buf.getvalue())  # temp ".<name>.<hex>.tmp": a killed write is cleaned up
  return path


def render(workdir: str | os.PathLike, *, heatmaps: bool = True) -> str:
  """The text report of a workdir's ``metrics.json`` (and refreshed heatmaps).

  ``metrics.json`` must verify against its sha256 (else
  :class:`clx.workdir.MetricsDamagedError`, one line naming the file). Each run
  entry's ``config_sha256`` is compared with ``config.json``: runs made under
  another (or an unrecorded) configuration are never merged into the main
  table; they are listed in their own table under a warning. Heatmaps are
  rewritten only while holding the workdir's lock (skipped, with a note, when
  a run holds it).

  Args:
    workdir: the workdir.
    heatmaps: rewrite ``<method>/acc_matrix.png``.

  Returns:
    The report text.
  """
  from clx import workdir as wd

  workdir = Path(workdir)
  path = workdir / wd.METRICS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{workdir} has no metrics.json (run `clx run EXPERIMENT --workdir {workdir}` first)")
  data, problem = wd.load_metrics(path)
  if data is None:
    raise wd.MetricsDamagedError(
        f"{path} {problem}; the results are safe in the verified checkpoints: re-run the same "
        f"`clx run EXPERIMENT --workdir {workdir}` to rebuild it")
  config = None
  try:
    config = json.loads((workdir / wd.CONFIG_FILE).read_text())
    if not isinstance(config, dict):
      config = None
  except (OSError, ValueError):
    pass
  runs = data["runs"]
  if config is None:
    same, other = {}, dict(runs)
    why = (f"{workdir / wd.CONFIG_FILE} is missing or unreadable, so no run can be matched to a "
           "configuration")
  elif problem is not None:
    same, other = {}, dict(runs)
    why = f"{path} {problem}; `clx run` on this workdir re-verifies it"
  else:
    same = {m: r for m, r in runs.items()
            if r.get("config_sha256") == wd.method_config_sha256(config, m)}
    other = {m: r for m, r in runs.items() if m not in same}
    why = f"these runs were not produced under {workdir / wd.CONFIG_FILE}'s configuration"
  header = f"experiment: {data.get('experiment')}  ({workdir})"
  if config is not None:
    header += f"\nconfiguration: {workdir / wd.CONFIG_FILE} (seed {config.get('seed')})"
  parts = [header, ""]
  lock = None
  notes = []
  if heatmaps:
    try:
      lock = wd.WorkdirLock(workdir, "clx report").acquire()
    except wd.WorkdirError as e:
      notes.append(f"heatmaps not refreshed: {e}")
  try:
    for name, run in runs.items():
      acc = matrix_from_json(run["acc_matrix"])
      parts += [format_matrix(acc, title=f"{name} accuracy matrix (%)"), ""]
      if lock is not None:
        png = save_heatmap(acc, workdir / name / "acc_matrix.png",
                           title=f"{data.get('experiment')}: {name}")
        parts.append(f"heatmap: {png}")
        parts.append("")
  finally:
    if lock is not None:
      lock.release()
  if same:
    parts.append(format_table(same))
  if other:
    if same:
      parts.append("")
    parts.append(f"WARNING: {why}; they are listed apart and must not be compared with other runs:")
    parts.append(format_table(other))
  parts += [f"note: {n}" for n in notes]
  return "\n".join(parts)
