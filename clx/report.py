"""Render results for a person: tables in the terminal, accuracy-matrix heatmaps."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

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
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
  os.close(fd)
  try:
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def render(workdir: str | os.PathLike, *, heatmaps: bool = True) -> str:
  """The text report of a workdir's ``metrics.json`` (and refreshed heatmaps)."""
  workdir = Path(workdir)
  path = workdir / "metrics.json"
  if not path.is_file():
    raise FileNotFoundError(f"{workdir} has no metrics.json (run `clx run EXPERIMENT --workdir {workdir}` first)")
  data = json.loads(path.read_text())
  parts = [f"experiment: {data.get('experiment')}  ({workdir})", ""]
  for name, run in data["runs"].items():
    acc = matrix_from_json(run["acc_matrix"])
    parts += [format_matrix(acc, title=f"{name} accuracy matrix (%)"), ""]
    if heatmaps:
      png = save_heatmap(acc, workdir / name / "acc_matrix.png", title=f"{data.get('experiment')}: {name}")
      parts.append(f"heatmap: {png}")
      parts.append("")
  parts.append(format_table(data["runs"]))
  return "\n".join(parts)
