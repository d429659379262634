"""Regenerate experiments/RESULTS.md: run experiments over seeds, aggregate mean ± std.

Command:   python experiments/results.py [--only pmnist_gpm,quickstart_pmnist] [--seeds 2,3,4]
           [--workroot runs/results] [--no-run]
Hardware:  2 CPU cores for the offline experiments listed in SUITE below.
Run time:  the sum of the experiments' run times times the number of seeds (each run
           resumes, so re-running after an interruption only does what is missing).
Output:    experiments/RESULTS.md with, per experiment, a table of every method's ACC / AIA /
           BWT / forgetting / wall time as mean ± std over seeds, the mean accuracy matrix
           and the methods' diagnostics (e.g. BECAME's λ per task, GPM memory ranks).

Each (experiment, seed) runs as `clx run EXPERIMENT --workdir ROOT/EXPERIMENT/seedN --set seed=N`
in a subprocess, so a crash or a kill loses nothing that was checkpointed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# experiment -> (seeds, extra --set overrides)
SUITE = {
    "quickstart": ((0,), ()),  # MiniLM: 1 seed for the face (about 2 min per seed)
    "quickstart_pmnist": ((0, 1, 2), ()),
    "pmnist_gpm": ((2, 3, 4, 5, 6), ()),
    "pmnist_became": ((2, 3, 4), ("methods=became_gpm,sgp,became_sgp",)),
    "text_inflora": ((0,), ()),
}
# acc: mean over tasks; acc_samples: over all seen test samples (official InfLoRA).
COLUMNS = ("acc", "acc_samples", "aia", "bwt", "forgetting", "wall_time_s")
# experiment -> a paragraph printed under its section's first line (what a reader must know
# to read the table that the docstring's first line does not say).
NOTES = {
    "quickstart": ("One seed (seed 0) for the face; `clx run quickstart` prints the same "
                   "matrices and table. Test set: 50 glosses per class, 600 in all (one "
                   "standard error of ACC ≈ 2 points). Time: see the experiment's docstring "
                   "(CPU seconds and wall time, measured with `/usr/bin/time -v`)."),
    "quickstart_pmnist": ("The quickstart before issue 14 under a new name: the same config, so "
                          "the same numbers (these seeds ran under the old name); "
                          "`clx run quickstart_pmnist`."),
}
# experiment -> (other experiment, methods): rows of the other run on the SAME seeds, so that
# methods split across experiments compare seed for seed.
COMPARE = {"pmnist_became": ("pmnist_gpm", ("gpm",))}


def run(experiment: str, seed: int, workroot: Path, sets: tuple[str, ...]) -> Path:
  workdir = workroot / experiment / f"seed{seed}"
  cmd = [sys.executable, "-m", "clx.cli", "run", experiment, "--workdir", str(workdir), "--quiet",
         "--set", f"seed={seed}"]
  for item in sets:
    cmd += ["--set", item]
  print(" ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)
  return workdir


def aggregate(workdirs: list[Path]) -> dict:
  runs: dict[str, list[dict]] = {}
  for wd in workdirs:
    path = wd / "metrics.json"
    if not path.exists():
      continue
    for method, entry in json.loads(path.read_text())["runs"].items():
      runs.setdefault(method, []).append(entry)
  return runs


def fmt(values: list[float | None]) -> str:
  if any(v is None for v in values):  # runs written before the column existed
    return "—"
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def section(experiment: str, runs: dict) -> str:
  from clx import experiment as exp
  from clx.report import format_matrix, matrix_from_json
  doc = (exp._load_module(HERE / f"{experiment}.py").__doc__ or "").strip()
  lines = [f"## {experiment}", "", doc.splitlines()[0], ""]
  if experiment in NOTES:
    lines += [NOTES[experiment], ""]
  lines += ["| method | seeds | " + " | ".join(COLUMNS) + " |",
            "|---|---|" + "---|" * len(COLUMNS)]
  for method, entries in runs.items():
    cells = [fmt([e.get(c) for e in entries]) for c in COLUMNS]
    lines.append(f"| {method} | {len(entries)} | " + " | ".join(cells) + " |")
  lines.append("")
  for method, entries in runs.items():
    stack = np.array([matrix_from_json(e["acc_matrix"]) for e in entries])
    mean = np.where(np.isnan(stack).all(0), np.nan, np.nansum(stack, 0) / np.maximum(
        np.sum(~np.isnan(stack), 0), 1))
    lines += [f"<details><summary>{method}: mean accuracy matrix over {len(entries)} seed(s)</summary>",
              "", "```", format_matrix(mean), "```"]
    diags = [e.get("diagnostics") for e in entries if e.get("diagnostics")]
    if diags and "lambdas" in diags[0]:
      lam = np.array([d["lambdas"] for d in diags])
      lines += ["", "λ per task (mean over seeds): " + ", ".join(f"{v:.3f}" for v in lam.mean(0))]
    if diags and "memory_ranks" in diags[0]:
      lines += ["", f"final memory ranks (seed 1 of {len(diags)}): {diags[0]['memory_ranks']}"]
    lines += ["", "</details>", ""]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated experiments to run (default: "
                      "all); the others' existing results are kept in RESULTS.md")
  parser.add_argument("--seeds", default="", help="override the seeds, e.g. 2,3")
  parser.add_argument("--workroot", default="runs/results")
  parser.add_argument("--no-run", action="store_true", help="only aggregate what exists")
  args = parser.parse_args()
  selected = [n for n in args.only.split(",") if n] or list(SUITE)
  unknown = sorted(set(selected) - set(SUITE))
  if unknown:
    raise SystemExit(f"unknown experiments {unknown}; the suite has {list(SUITE)}")
  workroot = Path(args.workroot)
  sections, missing = [], []
  for name in SUITE:  # every section is rewritten; only the selected ones run

    seeds, sets = SUITE[name]
    if args.seeds:
      seeds = tuple(int(s) for s in args.seeds.split(","))
    workdirs = [workroot / name / f"seed{s}" for s in seeds]
    if not args.no_run and name in selected:
      workdirs = [run(name, s, workroot, sets) for s in seeds]
    if not any((wd / "metrics.json").exists() for wd in workdirs):
      missing.append(name)
      continue
    runs = aggregate(workdirs)
    if name in COMPARE:
      other, methods = COMPARE[name]
      extra = aggregate([workroot / other / f"seed{s}" for s in seeds])
      runs = {**{f"{m} (from {other})": extra[m] for m in methods if m in extra}, **runs}
    sections.append(section(name, runs))
  if missing:
    # Never drop published sections because a workroot lacks them (e.g. a wrong --workroot).
    raise SystemExit(f"no metrics.json under {workroot} for {missing}; RESULTS.md not written "
                     "(run them, or point --workroot at where they ran)")
  header = ("# Results\n\nRegenerated by `python experiments/results.py` (see its docstring). "
            "Accuracies in percent; mean ± sample std over seeds. Wall times are per run on the "
            "machine that ran it (2-core CPU unless stated) and include whatever else ran there: "
            "take clean timings from BENCHMARKS.md.\n\n")
  extra = HERE / "results_extra.md"  # results of experiments with their own drivers
  tail = ("\n" + extra.read_text()) if extra.exists() else ""
  (HERE / "RESULTS.md").write_text(header + "\n".join(sections) + tail)
  print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
  main()
