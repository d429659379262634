"""``clx`` command line: ``clx run EXPERIMENT``, ``clx list``, ``clx report DIR``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_list(args) -> int:
  from clx import experiment
  for name, doc in experiment.list_experiments().items():
    print(f"{name:<24} {doc}")
  return 0


def _cmd_run(args) -> int:
  from clx import experiment, report
  from clx.train.sharding import maybe_initialize_distributed

  config = experiment.apply_overrides(experiment.load_config(args.experiment), args.set or [])
  experiment.validate(config)
  workdir = Path(args.workdir or os.path.join("runs", config["name"]))
  maybe_initialize_distributed()
  # The workdir is locked, checked and (on failure) cleaned inside run_experiment: a failed
  # run removes only what it created, under its own lock (see clx/workdir.py).
  result = experiment.run_experiment(config, workdir, progress=args.progress, quiet=args.quiet)
  print()
  print(report.format_table(result["runs"]))
  print(f"\nresults: {workdir / 'metrics.json'}")
  return 0


def _cmd_report(args) -> int:
  from clx import report
  from clx._io import write_atomic
  text = report.render(*args.workdir, heatmaps=not args.no_plots, fmt=args.format)
  print(text)
  if args.output:
    # The table alone (no matrices), in --format's format, for a paper or a spreadsheet.
    workdirs = report.expand_workdirs(args.workdir)
    table = report.table_of(workdirs, args.format)
    write_atomic(Path(args.output), table.encode("utf-8"))
    print(f"\ntable ({args.format}): {args.output}")
  return 0


def _cmd_rehearse(args) -> int:
  from clx import rehearse
  return rehearse.run_command(args)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="clx", description="Parameter-efficient continual fine-tuning in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="run an experiment (resumes an existing workdir)")
  run.add_argument("experiment", help="experiment name (see `clx list`) or path to a .py config")
  run.add_argument("--workdir", help="output directory (default: runs/<experiment>)")
  run.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set methods=finetune,lora --set seed=1")
  run.add_argument("--quiet", action="store_true", help="print only the final table")
  run.add_argument("--progress", action="store_true", default=None,
                   help="force progress bars (default: only on a terminal)")
  run.set_defaults(func=_cmd_run)
  reh = sub.add_parser("rehearse", help="run a config at its real shapes on synthetic data and "
                       "measure it (steps/s, memory, RSS, checkpoint bytes)")
  from clx.rehearse import add_arguments
  add_arguments(reh)
  reh.set_defaults(func=_cmd_rehearse)
  lst = sub.add_parser("list", help="list the experiments")
  lst.set_defaults(func=_cmd_list)
  rep = sub.add_parser("report", help="render results (tables, heatmaps, loss curves); several "
                       "workdirs of one configuration (or a folder of seed workdirs): mean ± std")
  rep.add_argument("workdir", nargs="+")
  rep.add_argument("--no-plots", action="store_true",
                   help="do not rewrite the heatmap and loss-curve PNGs")
  rep.add_argument("--format", choices=("text", "md", "csv", "latex"), default="text",
                   help="the metrics table's format (default: text)")
  rep.add_argument("--output", metavar="PATH", help="also write the table alone to PATH")
  rep.set_defaults(func=_cmd_report)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from clx.checkpoint import CheckpointCorruptedError, CheckpointMismatchError
  from clx.data.assets import AssetChecksumError, AssetUnavailableError
  from clx.experiment import ConfigError
  from clx.report import ReportError
  from clx.workdir import WorkdirError
  try:
    return args.func(args)
  except (ConfigError, ReportError, OSError, FloatingPointError, AssetUnavailableError, AssetChecksumError,
          CheckpointCorruptedError, CheckpointMismatchError, WorkdirError) as e:
    # Expected failures (bad config, missing data/asset, damaged or foreign checkpoint,
    # workdir locked / of another configuration / unusable, diverged training): one clear line.
    print(f"clx: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
