"""Render results for a person: tables, accuracy-matrix heatmaps, loss curves.

``clx report DIR [DIR ...]``: one workdir gives its accuracy matrices, heatmaps
(``METHOD/acc_matrix.png``), training-loss curves per task
(``METHOD/loss_curves.png``, from ``METHOD/metrics.jsonl``) and the metrics
table. Several workdirs of one configuration that differ only in ``seed`` (or
one folder holding them as subfolders, e.g. ``runs/EXP/seed0``, ``seed1``, … as
``experiments/results.py`` writes them) give mean ± sample std (ddof 1) over the
seeds. ``--format md|csv|latex`` writes the table in that format.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np

from clx._io import write_atomic

METRIC_COLUMNS = ("acc", "acc_samples", "aia", "bwt", "forgetting", "wall_time_s")
TABLE_FORMATS = ("text", "md", "csv", "latex")
LOSS_CURVES_PNG = "loss_curves.png"


class ReportError(ValueError):
  """Workdirs that cannot be reported together (the message names why)."""


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


def _number(value) -> float:
  """A metric as a float; NaN when absent (e.g. AIA of a run evaluated after its last task only)."""
  return float("nan") if value is None else float(value)


def format_table(runs: dict[str, dict]) -> str:
  """One row per method with ACC / AIA / BWT / forgetting / wall time."""
  header = f"{'method':<16}" + "".join(f"{c:>14}" for c in METRIC_COLUMNS)
  lines = [header, "-" * len(header)]
  for name, run in runs.items():
    cells = "".join(f"{_number(run.get(c)):14.2f}" for c in METRIC_COLUMNS)
    lines.append(f"{name:<16}{cells}")
  return "\n".join(lines)


Summary = dict[str, dict[str, tuple[float, float | None]]]  # method → column → (mean, std)


def summarize_seeds(runs_per_seed: list[dict[str, dict]]) -> tuple[Summary, dict[str, int]]:
  """Mean and sample std (ddof 1) of every metric column over seeds.

  Args:
    runs_per_seed: one ``metrics.json`` ``runs`` dict per seed.

  Returns:
    ``({method: {column: (mean, std)}}, {method: number of seeds})``; std is
    ``None`` with a single seed; a method is summarised over the seeds that have it.
  """
  summary, counts = {}, {}
  methods = list(dict.fromkeys(m for runs in runs_per_seed for m in runs))
  for method in methods:
    entries = [runs[method] for runs in runs_per_seed if method in runs]
    counts[method] = len(entries)
    summary[method] = {}
    for column in METRIC_COLUMNS:
      values = np.array([_number(e.get(column)) for e in entries])
      std = float(np.std(values, ddof=1)) if len(values) > 1 else None
      summary[method][column] = (float(np.mean(values)), std)
  return summary, counts


def format_summary(summary: Summary, counts: dict[str, int] | None = None,
                   fmt: str = "text") -> str:
  """The metrics table as text, Markdown, CSV or LaTeX.

  Args:
    summary: from :func:`summarize_seeds` (std ``None``: one seed, printed alone).
    counts: seeds per method (a ``seeds`` column when given).
    fmt: one of :data:`TABLE_FORMATS`.

  Returns:
    The table (CSV: ``method[,seeds],<col>_mean,<col>_std,...``).
  """
  if fmt not in TABLE_FORMATS:
    raise ReportError(f"unknown table format {fmt!r}; expected one of {TABLE_FORMATS}")
  with_std = any(std is not None for cols in summary.values() for _, std in cols.values())

  def cell(mean, std, pm):
    if not math.isfinite(mean):
      return "nan"
    return f"{mean:.2f}" if std is None or not with_std else f"{mean:.2f}{pm}{std:.2f}"

  seeds = (lambda m: [str(counts[m])]) if counts else (lambda m: [])
  seed_head = ["seeds"] if counts else []
  if fmt == "csv":
    head = ["method", *seed_head, *[f"{c}_{k}" for c in METRIC_COLUMNS for k in ("mean", "std")]]
    lines = [",".join(head)]
    for name, cols in summary.items():
      values = [f"{v:.6g}" if v is not None else "" for c in METRIC_COLUMNS for v in cols[c]]
      lines.append(",".join([_csv_field(name), *seeds(name), *values]))
    return "\n".join(lines) + "\n"
  if fmt == "md":
    lines = ["| " + " | ".join(["method", *seed_head, *METRIC_COLUMNS]) + " |",
             "|" + "---|" * (1 + len(seed_head) + len(METRIC_COLUMNS))]
    for name, cols in summary.items():
      lines.append("| " + " | ".join([name, *seeds(name),
                                      *[cell(*cols[c], " ± ") for c in METRIC_COLUMNS]]) + " |")
    return "\n".join(lines) + "\n"
  if fmt == "latex":
    head = ["method", *seed_head, *[c.replace("_", r"\_") for c in METRIC_COLUMNS]]
    lines = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\hline",
             " & ".join(head) + r" \\", r"\hline"]
    for name, cols in summary.items():
      lines.append(" & ".join([name.replace("_", r"\_"), *seeds(name),
                               *[cell(*cols[c], r" $\pm$ ") for c in METRIC_COLUMNS]]) + r" \\")
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
  width = 22 if with_std else 14
  header = f"{'method':<16}" + (f"{'seeds':>6}" if counts else "") + \
      "".join(f"{c:>{width}}" for c in METRIC_COLUMNS)
  lines = [header, "-" * len(header)]
  for name, cols in summary.items():
    lines.append(f"{name:<16}" + (f"{counts[name]:>6}" if counts else "") +
                 "".join(f"{cell(*cols[c], ' ± '):>{width}}" for c in METRIC_COLUMNS))
  return "\n".join(lines)


def _csv_field(text: str) -> str:
  return '"' + text.replace('"', '""') + '"' if any(ch in text for ch in ',"\n') else text


def save_loss_curves(records: list[dict], path: str | os.PathLike, title: str = "") -> Path | None:
  """Write the training-loss curve of every task (one line each) as a PNG, atomically.

  Args:
    records: a ``METHOD/metrics.jsonl`` (:func:`clx.train.logging.read_jsonl`).
    path: the PNG.
    title: the plot title.

  Returns:
    ``path``, or ``None`` when the records hold no step losses.
  """
  from clx.train.logging import loss_curves
  curves = loss_curves(records)
  if not curves:
    return None
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.0, 3.2), dpi=110)
  for task, (steps, losses) in curves.items():
    ax.plot(steps, losses, lw=0.8, label=f"T{task + 1}")
  ax.set_xlabel("training step (all tasks)")
  ax.set_ylabel("training loss")
  ax.set_title(title, fontsize=8)
  ax.legend(fontsize=6, ncol=min(len(curves), 10), loc="upper right")
  fig.tight_layout()
  buf = io.BytesIO()
  try:
    fig.savefig(buf, format="png")
  finally:
    plt.close(fig)
  path = Path(path)
  write_atomic(path, buf.getvalue())
  return path


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


def _load(workdir: Path):
  """``(data, config, same, other, why)`` of one workdir; see :func:`render`."""
  from clx import workdir as wd

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
  return data, config, same, other, why


def expand_workdirs(paths: list[str | os.PathLike]) -> list[Path]:
  """Workdirs named on the command line; a folder without ``metrics.json`` stands for its
  subfolders that have one (``runs/EXP`` → ``runs/EXP/seed0``, ``runs/EXP/seed1``, …)."""
  from clx import workdir as wd
  out = []
  for p in map(Path, paths):
    if (p / wd.METRICS_FILE).is_file() or not p.is_dir():
      out.append(p)
      continue
    subs = sorted(q for q in p.iterdir() if (q / wd.METRICS_FILE).is_file())
    out.extend(subs or [p])
  return out


def render(workdir: str | os.PathLike, *more: str | os.PathLike, heatmaps: bool = True,
           fmt: str = "text") -> str:
  """The report of one workdir, or of several seeds of one configuration.

  One workdir: ``metrics.json`` must verify against its sha256 (else
  :class:`clx.workdir.MetricsDamagedError`, one line naming the file). Each run
  entry's ``config_sha256`` is compared with ``config.json``: runs made under
  another (or an unrecorded) configuration are never merged into the main
  table; they are listed in their own table under a warning. Heatmaps and loss
  curves are rewritten only while holding the workdir's lock (skipped, with a
  note, when a run holds it).

  Several workdirs (``more``, or a folder of seed subfolders): their
  ``config.json`` must agree in every key but ``seed`` and name distinct seeds
  (else :class:`ReportError`); the table gives mean ± sample std over the seeds
  of the runs that match their configuration, and the mean accuracy matrices.

  Args:
    workdir: the workdir (or a folder of seed workdirs).
    more: further workdirs of other seeds.
    heatmaps: rewrite ``<method>/acc_matrix.png`` and ``<method>/loss_curves.png``.
    fmt: the table's format, one of :data:`TABLE_FORMATS`.

  Returns:
    The report text.
  """
  if fmt not in TABLE_FORMATS:
    raise ReportError(f"unknown table format {fmt!r}; expected one of {TABLE_FORMATS}")
  workdirs = expand_workdirs([workdir, *more])
  if len(workdirs) > 1:
    return _render_seeds(workdirs, fmt)
  return _render_one(workdirs[0], heatmaps, fmt)


def _render_one(workdir: Path, heatmaps: bool, fmt: str) -> str:
  from clx import workdir as wd
  from clx.train.logging import METRICS_JSONL, read_jsonl

  data, config, same, other, why = _load(workdir)
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
    for name, run in data["runs"].items():
      acc = matrix_from_json(run["acc_matrix"])
      parts += [format_matrix(acc, title=f"{name} accuracy matrix (%)"), ""]
      if lock is not None:
        png = save_heatmap(acc, workdir / name / "acc_matrix.png",
                           title=f"{data.get('experiment')}: {name}")
        parts.append(f"heatmap: {png}")
        curves = save_loss_curves(read_jsonl(workdir / name / METRICS_JSONL),
                                  workdir / name / LOSS_CURVES_PNG,
                                  title=f"{data.get('experiment')}: {name} training loss per task")
        if curves is not None:
          parts.append(f"loss curves: {curves}")
        parts.append("")
  finally:
    if lock is not None:
      lock.release()
  if same:
    parts.append(_table(same, fmt))
  if other:
    if same:
      parts.append("")
    parts.append(f"WARNING: {why}; they are listed apart and must not be compared with other runs:")
    parts.append(_table(other, fmt))
  parts += [f"note: {n}" for n in notes]
  return "\n".join(parts)


def _table(runs: dict[str, dict], fmt: str) -> str:
  if fmt == "text":
    return format_table(runs)
  return format_summary(summarize_seeds([runs])[0], fmt=fmt).rstrip("\n")


def table_of(workdirs: list[Path], fmt: str) -> str:
  """The metrics table alone of one workdir (its matching runs) or of several seeds.

  Args:
    workdirs: from :func:`expand_workdirs` (checked as :func:`render` checks them).
    fmt: one of :data:`TABLE_FORMATS`.

  Returns:
    The table text, ending in a newline.
  """
  if len(workdirs) > 1:
    _check_seeds(workdirs, [_load(w)[1] for w in workdirs])
    summary, counts = summarize_seeds([_load(w)[2] for w in workdirs])
    return format_summary(summary, counts, fmt).rstrip("\n") + "\n"
  return _table(_load(workdirs[0])[2], fmt).rstrip("\n") + "\n"


def _check_seeds(workdirs: list[Path], configs: list[dict | None]) -> list:
  """The seeds of ``workdirs``; raises ReportError unless they differ only in the seed."""
  from clx import workdir as wd

  missing = [str(w) for w, c in zip(workdirs, configs) if c is None]
  if missing:
    raise ReportError(f"cannot report seeds together: no readable config.json in {missing}")
  first = {k: v for k, v in configs[0].items() if k != "seed"}
  for w, config in zip(workdirs[1:], configs[1:]):
    rest = {k: v for k, v in config.items() if k != "seed"}
    diff = wd.config_differences(first, rest, sorted(set(first.get("methods", [])) |
                                                     set(rest.get("methods", []))))
    if diff:
      raise ReportError(f"{w} and {workdirs[0]} differ in more than the seed, so their runs "
                        f"cannot be averaged: {'; '.join(diff)}")
  seeds = [c.get("seed") for c in configs]
  if len(set(map(str, seeds))) != len(seeds):
    raise ReportError(f"the workdirs {[str(w) for w in workdirs]} repeat a seed ({seeds}); "
                      "each seed must be given once")
  return seeds


def _render_seeds(workdirs: list[Path], fmt: str) -> str:
  loaded = [_load(w) for w in workdirs]
  seeds = _check_seeds(workdirs, [config for _, config, _, _, _ in loaded])
  same_runs = [same for _, _, same, _, _ in loaded]
  summary, counts = summarize_seeds(same_runs)
  parts = [f"experiment: {loaded[0][0].get('experiment')}  ({len(workdirs)} seeds: "
           f"{', '.join(str(s) for s in seeds)})", ""]
  for name in summary:
    mats = [matrix_from_json(r[name]["acc_matrix"]) for r in same_runs if name in r]
    parts += [format_matrix(np.mean(mats, 0),
                            title=f"{name} mean accuracy matrix over {len(mats)} seed(s) (%)"), ""]
  parts.append(format_summary(summary, counts, fmt).rstrip("\n"))
  for w, (_, _, _, other, why) in zip(workdirs, loaded):
    if other:
      parts.append(f"WARNING: {w}: {', '.join(other)} left out: {why}")
  return "\n".join(parts)
