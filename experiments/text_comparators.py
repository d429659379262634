"""MiniLM on WordNet supersenses (class-IL, 5 tasks): the seed papers' comparators next to the seed methods.

Command:   python experiments/text_comparators.py [--workdir runs/text_comparators] [--set seed=N]
           [--methods l2p,ranpac,...] [--smoke]
           (runs every row through ``clx.experiment.run_experiment``, then writes
           ``comparators.json``: per method the trainable parameter count on the last task,
           the checkpoint bytes and wall time of every task, and for the methods that pick
           task-specific parameters at test time (L2P, DualPrompt, CODA-Prompt, SPARC,
           PROTEUS) the (T, T) task-retrieval matrix; ``--smoke`` shrinks the stream and
           budget to a minutes-long check.)
           python experiments/text_comparators.py --report WORKDIR [--output FILE]
           (recomputes ``comparators.json`` of a finished workdir; trains nothing)
           python experiments/text_comparators.py --summarize runs/text_comparators/seed{0,1,2}
           [--reports A.json B.json C.json] [--output table.md]
           (the RESULTS.md table: mean ± std over seeds of ACC over tasks and over samples,
           AIA, BWT, wall time; trainable parameters; checkpoint bytes per task; paired ACC
           differences against ``lora`` and ``proteus``; mean retrieval matrices.)
Hardware:  2 CPU cores, no accelerator.
Run time:  per seed about 30-40 min on the 2 shared cores of the development machine (load
           15-35 from other jobs), every row trained and evaluated; joint about 5-7 min.
Expected:  3 seeds (experiments/RESULTS.md, section text_comparators): ACC RanPAC 65.4,
           PROTEUS 65.1, SimpleCIL 64.4, DualPrompt 62.6, SPARC 56.1, L2P 55.0, InfLoRA 50.9,
           SD-LoRA 26.2, CODA-Prompt 23.1, sequential LoRA 18.2, joint 73.2.

Setup (the stream, backbone and budget of ``text_proteus`` / ``text_inflora``):
all-MiniLM-L6-v2 (mean pooling, frozen), token ids of length 32; WordNet noun/verb
supersenses, 5 tasks x 4 classes, 64 training and 150 test glosses per class; batch 16,
2 epochs per task for every trained row. Optimiser per row from its official code
(``train_overrides``): L2P and DualPrompt Adam lr 0.03, constant, gradient clip 1.0
(``configs/cifar100_{l2p,dualprompt}.py``); CODA-Prompt Adam lr 1e-3, cosine
(``configs/cifar-100_prompt.yaml``); SD-LoRA SGD with momentum 0.9, lr 8e-3
(``exps/sdlora_c100.json``); the seed methods as in ``text_proteus``. SimpleCIL and RanPAC
train nothing (their one pass per task builds the head).

Rows: ``l2p``, ``dualprompt``, ``coda_prompt`` (official defaults; MiniLM has 6 layers, so
DualPrompt's G-layers 0-1 / E-layers 2-4 and CODA's layers 0-4 exist), ``ranpac`` (frozen
backbone, 2,000 random features as PROTEUS' row here, λ per task as the code), ``simplecil``,
``sd_lora`` (rank 10 on q and v), ``inflora``, ``sparc`` (20 tokens, k = 100, τ 0.7188 as
``text_sparc``), ``proteus``, ``lora`` (sequential, lower bound), ``joint`` (upper bound).

Retrieval matrices (``comparators.json``, ``--summarize``): row t (after task t), column
j ≤ t, the % of task j's test texts whose task-specific parameters come from task j — L2P:
the owner of the top-1 prompt; DualPrompt: the task of the top-1 E-prompt key; CODA-Prompt:
the task with the largest mean |α|; SPARC: the best-reconstructing task PCA; PROTEUS: the
signature argmax. All five test sets have the same size, so ACC over samples equals ACC over
tasks here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The rows that pick task-specific parameters at test time, and how each picks them.
RETRIEVERS = ("l2p", "dualprompt", "coda_prompt", "sparc", "proteus")
# Paired differences of the summary are taken against these rows (when present).
PAIRED_AGAINST = ("lora", "proteus")

def get_config():
  adam_l2p = {"optimizer": "adam", "learning_rate": 0.03, "grad_clip": 1.0}
  return {
      "name": "text_comparators",
      "stream": {"name": "wordnet_supersense", "num_tasks": 5, "classes_per_task": 4,
                 "per_class_train": 64, "per_class_test": 150, "max_length": 32, "seed": None},
      "model": {"name": "minilm"},
      "methods": ["l2p", "dualprompt", "coda_prompt", "ranpac", "simplecil", "sd_lora",
                  "inflora", "sparc", "proteus", "lora", "joint"],
      "method_args": {
          "ranpac": {"rp_dim": 2000},
          "sd_lora": {"lora_rank": 10, "sites": ["q", "v"]},
          "inflora": {"lora_rank": 10, "sites": ["k", "v"], "lamb": 0.95, "lame": 1.0},
          "sparc": {"num_prompt_tokens": 20, "num_components": 100, "overlap_threshold": 0.7188},
          "proteus": {"n_components": 20, "weight_concentration_prior": 0.01, "rp_dim": 2000,
                      "screen_top_m": 0, "screen_signatures": False},
          "lora": {"lora_rank": 8, "sites": ["q", "v"]},
      },
      "train": {"epochs": 2, "batch_size": 16, "optimizer": "adam", "learning_rate": 1e-3,
                "eval_batch_size": 128},
      "train_overrides": {
          "l2p": adam_l2p, "dualprompt": adam_l2p,
          "coda_prompt": {"optimizer": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
          "sd_lora": {"optimizer": "momentum", "learning_rate": 8e-3},
          "sparc": {"learning_rate": 3e-2},
          # Full fine-tuning of all 22M weights at the rows' Adam 1e-3 collapses to chance
          # (seed 0: ACC 5.0, loss ln 20); 5e-5 is the usual BERT fine-tuning rate (not tuned).
          "joint": {"learning_rate": 5e-5},
          "simplecil": {"epochs": 1}, "ranpac": {"epochs": 1},
      },
      "seed": 0,
  }


def smoke(config: dict) -> dict:
  """A minutes-long version: 2 tasks x 2 classes, 16 / 8 glosses per class, 1 epoch, and
  prompt pools that fit 2 tasks."""
  config = json.loads(json.dumps(config))
  config["stream"].update(num_tasks=2, classes_per_task=2, per_class_train=16, per_class_test=8)
  config["train"]["epochs"] = 1
  for over in config["train_overrides"].values():
    over.pop("epochs", None)
  config["method_args"]["ranpac"]["rp_dim"] = 256
  config["method_args"]["coda_prompt"] = {"pool_size": 10}
  config["method_args"]["proteus"]["rp_dim"] = 256
  return config


def _setup(config):
  """Stream, backbone and StreamSpec as run_experiment builds them (text_proteus' helper)."""
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from text_proteus import _setup as setup  # pylint: disable=import-outside-toplevel
  return setup(config)


def _dir_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def trainable_params(method, state, info) -> int:
  """Number of parameters ``method`` trains on task ``info.task``, counted from ``state``.

  ``state`` is the state after the task (as restored from its checkpoint): the protocol's
  ``trainable`` reads the trained params back after ``combine`` (SD-LoRA's read the emptied
  ``lora`` slot before the fix and missed the task's LoRA).

  Args:
    method: the :class:`clx.methods.base.ContinualMethod`.
    state: its state after task ``info.task``.
    info: the :class:`clx.methods.base.TaskInfo` of that task.

  Returns:
    The number of scalars in ``method.trainable(state, info)``: what the optimiser holds on
    that task. For CODA-Prompt and DualPrompt this includes pool entries the loss detaches or
    never selects on that task (earlier tasks' components, other tasks' E-prompt slots): the
    optimiser's size, not the number of scalars that receive a gradient.
  """
  import jax
  import numpy as np
  return int(sum(np.size(v) for v in jax.tree.leaves(method.trainable(state, info))))


def retrieval_function(name: str, backbone, args: dict, spec):
  """The task a row picks its task-specific parameters from, for the rows in RETRIEVERS.

  L2P: the owner (most selections in training) of the top-1 prompt; DualPrompt: the task of
  the top-1 E-prompt key; CODA-Prompt: the task whose components get the largest mean |α|
  (:func:`clx.methods.l2p.retrieved_task` and its siblings); SPARC: the stored task whose PCA
  reconstructs the row best (:func:`clx.methods.sparc.route`); PROTEUS: the signature argmax
  (:func:`clx.methods.proteus.route`).

  Args:
    name: a row of :data:`RETRIEVERS`.
    backbone: the frozen backbone the row ran on.
    args: the row's ``method_args``.
    spec: the stream's :class:`clx.methods.base.StreamSpec`.

  Returns:
    One jitted ``fn(state, base, x (n, L), task) -> (n,)`` int task ids, ``task`` (the last
    trained task) static: it compiles once per task count (the stored tasks fix the shapes),
    not once per call.
  """
  import jax
  from clx.methods import coda_prompt, dualprompt, l2p, proteus, sparc
  from clx.methods.base import TaskInfo

  prompt_libs = {"l2p": (l2p, l2p.L2PConfig),
                 "dualprompt": (dualprompt, dualprompt.DualPromptConfig),
                 "coda_prompt": (coda_prompt, coda_prompt.CodaPromptConfig)}
  if name in prompt_libs:
    lib, cfg_cls = prompt_libs[name]
    cfg = cfg_cls(**args)

    def fn(state, base, x, task):
      return lib.retrieved_task(cfg, backbone, state, base, x, TaskInfo(task, spec))
  elif name == "sparc":
    setup = sparc.resolve(backbone, sparc.SPARCConfig(**sparc._renamed(args)))  # pylint: disable=protected-access

    def fn(state, base, x, task):
      return sparc.route(setup, state, base, x, task)
  elif name == "proteus":
    setup = proteus.ProteusParts(backbone, **args).setup

    def fn(state, base, x, task):
      return proteus.route(setup, state, base, x, task + 1)[0]
  else:
    raise ValueError(f"no retrieval for {name!r}; rows with one: {RETRIEVERS}")
  return jax.jit(fn, static_argnames="task")


def retrieval_matrix(fn, states: list, base, test_x: list, batch_size: int):
  """``(T, T)`` percent: row t (after task t), column j ≤ t, the share of task j's test rows
  that ``fn`` (:func:`retrieval_function`) retrieves as j; NaN above the diagonal.

  Args:
    fn: ``fn(state, base, x, task) -> (n,)`` task ids.
    states: the state after each task 0 … T − 1.
    base: frozen backbone params.
    test_x: per task, its ``(n_j, …)`` test inputs.
    batch_size: rows per call (zero-padded batches: one input shape).

  Returns:
    A float64 ``(T, T)`` array.
  """
  import numpy as np
  from clx.methods import passes

  T = len(states)
  matrix = np.full((T, T), np.nan)
  for t, state in enumerate(states):
    for j in range(t + 1):
      ids = passes.collect(lambda xb, mask, state=state, t=t: fn(state, base, xb, task=t),
                           np.asarray(test_x[j]), batch_size)
      matrix[t, j] = 100.0 * float(np.mean(ids == j))
  return matrix


def report(config: dict, workdir: Path) -> dict:
  """Per row of a finished run: trainable parameters on the last task, checkpoint bytes and
  wall time per task, and for :data:`RETRIEVERS` the task-retrieval matrix.

  Args:
    config: the experiment config the run used (``WORKDIR/config.json``).
    workdir: the run's workdir (read only).

  Returns:
    ``{method: {"trainable_params", "checkpoint_bytes" {task: bytes}, "wall_time_s" (the
    run's, from metrics.json), "task_wall_time_s" [per task, from the checkpoints' meta],
    "retrieval_matrix" (T, T) percent (retrievers only)}}``.
  """
  import jax
  import numpy as np
  from clx import checkpoint, methods
  from clx import report as clx_report
  from clx import workdir as wd
  from clx.methods.base import TaskInfo

  stream, backbone, spec = _setup(config)
  metrics, _ = wd.load_metrics(workdir / wd.METRICS_FILE)
  runs = (metrics or {}).get("runs", {})
  batch_size = int(config["train"].get("eval_batch_size", 128))
  test_x = [task.test.x for task in stream.tasks]
  out = {}
  for name in config["methods"]:
    ckpt_dir = workdir / name / "checkpoints"
    if not ckpt_dir.exists():
      continue
    print(f"report: {name}", file=sys.stderr, flush=True)
    args = config.get("method_args", {}).get(name, {})
    method = methods.build(name, backbone, **args)
    init = method.init(jax.random.fold_in(jax.random.PRNGKey(int(config.get("seed", 0))), 0), spec)
    with checkpoint.TaskCheckpointer(ckpt_dir) as ckpt:
      last = ckpt.latest_task()
      restored = [ckpt.restore_state(t, init) for t in range(last + 1)]
    states = [state for state, _ in restored]
    elapsed = [float(meta.get("wall_time_s", np.nan)) for _, meta in restored]
    row = {"trainable_params": trainable_params(method, states[-1], TaskInfo(last, spec)),
           "checkpoint_bytes": {str(t): _dir_bytes(ckpt_dir / str(t)) for t in range(last + 1)},
           "wall_time_s": runs.get(name, {}).get("wall_time_s"),
           "task_wall_time_s": np.diff([0.0, *elapsed]).round(3).tolist()}
    if name in RETRIEVERS:
      fn = retrieval_function(name, backbone, args, spec)
      row["retrieval_matrix"] = clx_report.matrix_to_json(  # null above the diagonal
          retrieval_matrix(fn, states, backbone.params, test_x, batch_size))
    out[name] = row
  return out


def _fmt_bytes(n: float) -> str:
  for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= size:
      return f"{n / size:.3g} {unit}B"
  return f"{n:.0f} B"


def _pm(values, digits: int = 2) -> str:
  """``mean ± sample std`` (ddof 1) of ``values``; the mean alone for one value."""
  import numpy as np
  values = np.asarray([v for v in values if v is not None], dtype=float)
  if values.size == 0:
    return "–"
  if values.size == 1:
    return f"{values[0]:.{digits}f}"
  return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def summarize(workdirs: list[Path], reports: list[dict]) -> str:
  """The RESULTS.md table over seed workdirs of this experiment (Markdown).

  Args:
    workdirs: one finished workdir per seed (same config up to ``seed``).
    reports: each workdir's :func:`report` (``comparators.json``), in the same order.

  Returns:
    Markdown: per method mean ± sample std over seeds of ACC over tasks, ACC over samples
    (test-set-size weighted), AIA, BWT and wall time, the trainable parameters and mean
    checkpoint bytes per task; the paired ACC differences against :data:`PAIRED_AGAINST`
    (per seed, then mean ± std); and each retriever's retrieval matrix averaged over seeds.
  """
  import numpy as np
  from clx import report as clx_report

  if len(workdirs) != len(reports):
    raise ValueError(f"{len(workdirs)} workdirs but {len(reports)} reports")
  loaded = [clx_report._load(w) for w in workdirs]  # pylint: disable=protected-access
  seeds = clx_report._check_seeds(workdirs, [c for _, c, _, _, _ in loaded])  # pylint: disable=protected-access
  runs = [same for _, _, same, _, _ in loaded]
  names = list(dict.fromkeys(m for r in runs for m in r))
  lines = [f"{len(workdirs)} seed(s): {', '.join(map(str, seeds))}; mean ± sample std over "
           "seeds; ACC, AIA, BWT in %; checkpoint bytes: mean over tasks", "",
           "| method | seeds | ACC (tasks) | ACC (samples) | AIA | BWT | trainable params "
           "| checkpoint / task | wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
  for name in names:
    entries = [r[name] for r in runs if name in r]
    reps = [rep[name] for r, rep in zip(runs, reports) if name in r and name in rep]
    params = sorted({rep["trainable_params"] for rep in reps})
    ckpt = [float(np.mean(list(rep["checkpoint_bytes"].values()))) for rep in reps]
    cells = [_pm([e.get(k) for e in entries]) for k in ("acc", "acc_samples", "aia", "bwt")]
    lines.append("| " + " | ".join([
        name, str(len(entries)), *cells,
        "/".join(f"{p:,}" for p in params) if params else "–",
        _fmt_bytes(float(np.mean(ckpt))) if ckpt else "–",
        _pm([e.get("wall_time_s") for e in entries], 0)]) + " |")

  against = [a for a in PAIRED_AGAINST if a in names]
  if against:
    lines += ["", "Paired ACC (tasks) differences, per seed then mean ± std:", "",
              "| method | " + " | ".join(f"− {a}" for a in against) + " |",
              "|---|" + "---|" * len(against)]
    for name in names:
      cells = []
      for a in against:
        diffs = [r[name]["acc"] - r[a]["acc"] for r in runs if name in r and a in r]
        cells.append("–" if name == a else _pm(diffs))
      lines.append(f"| {name} | " + " | ".join(cells) + " |")

  for name in RETRIEVERS:
    mats = [np.asarray(rep[name]["retrieval_matrix"], float) for rep in reports
            if name in rep and "retrieval_matrix" in rep[name]]
    if not mats:
      continue
    mean = np.mean(mats, axis=0)
    T = mean.shape[0]
    lines += ["", f"{name}: task retrieval (% of task j's test texts retrieved as j; row: "
                  f"after task t; mean over {len(mats)} seed(s))", "",
              "| after task | " + " | ".join(f"T{j + 1}" for j in range(T)) + " |",
              "|---|" + "---|" * T]
    for t in range(T):
      lines.append(f"| T{t + 1} | " + " | ".join(f"{mean[t, j]:.1f}" if j <= t else ""
                                                 for j in range(T)) + " |")
  return "\n".join(lines) + "\n"


def _load_config(workdir: Path) -> dict:
  path = workdir / "config.json"
  if not path.is_file():
    raise SystemExit(f"{workdir} has no config.json: not a finished text_comparators workdir")
  config = json.loads(path.read_text())
  if config.get("name") != "text_comparators":
    raise SystemExit(f"{path} is the config of {config.get('name')!r}, not text_comparators")
  return config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/text_comparators")
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE (seed=N)")
  parser.add_argument("--methods", default=None,
                      help="comma-separated subset of the rows (to run, or with --report to report)")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--report", metavar="WORKDIR", default=None,
                      help="recompute comparators.json of a finished workdir, train nothing")
  parser.add_argument("--summarize", metavar="WORKDIR", nargs="+", default=None,
                      help="the RESULTS.md table over these seed workdirs")
  parser.add_argument("--reports", metavar="JSON", nargs="+", default=None,
                      help="with --summarize: the comparators.json of each workdir, in order "
                           "(default WORKDIR/comparators.json)")
  parser.add_argument("--output", default=None,
                      help="with --report: where to write comparators.json (default: in the "
                           "workdir); with --summarize: also write the table there")
  args = parser.parse_args(argv)
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

  if args.summarize:
    workdirs = [Path(w) for w in args.summarize]
    paths = ([Path(r) for r in args.reports] if args.reports
             else [w / "comparators.json" for w in workdirs])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
      raise SystemExit(f"no report {missing}: run --report WORKDIR first")
    table = summarize(workdirs, [json.loads(p.read_text()) for p in paths])
    if args.output:
      Path(args.output).write_text(table)
    print(table, end="")
    return 0
  if args.report:
    workdir = Path(args.report)
    config = _load_config(workdir)
    if args.methods:  # recompute some rows only
      config["methods"] = [m for m in args.methods.split(",") if m in config["methods"]]
    result = report(config, workdir)
    out = Path(args.output) if args.output else workdir / "comparators.json"
    if args.methods and out.exists():  # the other rows of an earlier report stay
      result = {**json.loads(out.read_text()), **result}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(json.dumps(result, indent=1))
    return 0

  from clx import experiment
  config = smoke(get_config()) if args.smoke else get_config()
  for item in args.set:
    key, value = item.split("=", 1)
    if key != "seed":
      raise SystemExit(f"--set supports seed=N only, got {key!r}")
    config["seed"] = int(value)
  if args.methods:
    config["methods"] = [m for m in args.methods.split(",") if m]
  workdir = Path(args.workdir)
  experiment.run_experiment(config, workdir)
  result = report(config, workdir)
  (workdir / "comparators.json").write_text(json.dumps(result, indent=1))
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  os.environ.setdefault("CLX_OFFLINE", "1")
  raise SystemExit(main())
