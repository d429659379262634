"""SPARC on MiniLM, offline text tasks, with the controls that isolate its parts.

Command:   python experiments/text_sparc.py --seed N               (every row, both scenarios)
           python experiments/text_sparc.py --validate             (choose the lrs, validation)
           python experiments/text_sparc.py --table                (3-seed table from the workdir)
           clx run text_sparc                                      (task-IL, registered methods)
Hardware:  2 CPU cores, no accelerator (any JAX device works).
Run time:  measured 2026-12-03 on the shared 2-core machine (load 20-38 of niced jobs): domain
           scenario (64 train / 500 test texts per class per task) 40-45 s per seed for the
           probe and sequential LoRA, 75-82 s for the prompt and SPARC rows, 155-160 s for
           SPARC+LoRA, about 11 min per seed for every row; task scenario 42-80 s per row,
           9.5 min per seed. `--validate` (12 runs on the smaller validation stream) about
           15 min, `--calibrate` 2.5 min, `--routing` 36 s (embedding layer only).
Expected:  measured (domain-IL, seeds 0-2, RESULTS.md text_sparc): linear probe ACC 93.0 ± 0.1
           (BWT −3.4), SPARC k=100 90.4 ± 0.6 (−3.1), per-task free prompt 91.1 ± 2.3 (−3.0),
           shared prompt tuning 85.9 ± 0.4 (−13.5), sequential LoRA 94.1 ± 0.4 (−3.3). SPARC
           beats neither the probe nor the free prompt here; it beats a shared prompt. Task-IL:
           every row 66.7-68.5 (probe 68.3 ± 0.8, SPARC k=100 67.0 ± 1.1), BWT 0 by construction.

SPARC has no public code (arXiv 2502.02909; confirmed in
``shared/research/fidelity_proteus_sparc.md`` §0): every SPARC detail here is clx's
reconstruction (``clx/methods/sparc.py``).

Streams (scenario):

* ``task``: Rotten Tomatoes sentiment → RT subjectivity → 2012 convention party (the three
  binary tasks of ``clx.data.text``), global labels 0-5, per-task heads, the task id given at
  test time. 64 training and 500 test texts per class per task: every task has them (checked,
  seeds 0-2: 500 / 500 per task; uncapped, the test splits hold RT plot 1,127, party 927 / 687,
  and RT rotten/fresh ≥ 528 / 656 even when subjectivity takes all 1,127 plot sentences).
  Task-IL zero forgetting holds for any per-task-parameter method by construction, so this
  scenario only tells the controls apart by *accuracy*.
* ``domain``: ``wordnet_living`` (``clx.data.text``): "is it a living thing?" over three WordNet
  lexical domains (noun.animal vs noun.artifact, noun.plant vs noun.substance, noun.person vs
  noun.location); label 1 = living, 0 = non-living in every task, one shared 2-way head, no task
  id at test time (SPARC routes by PCA reconstruction error). The stream holds 128 training /
  500 test glosses per class per task; the runs use 64 / 500.
* the validation stream (``--validate``): ``wordnet_living(validation=True)``, the same domains
  with train and test texts drawn from a fixed held-out 20 % of the training split (disjoint
  from every evaluated text; 64 train / 200 test glosses per class per task). The learning
  rates (``--validate``) and SPARC's reuse threshold τ (``--calibrate``) are chosen there.

Rows (same frozen MiniLM, same mean-pooled features, same head type per scenario, same epochs
and batch size; only the trainable part differs):

* ``linear_probe``: the head alone (no prompt, no LoRA).
* ``prompt_tuning``: one shared 20-token free prompt trained task after task.
* ``free_prompt``: SPARC with the PCA-subspace constraint off (per-task 20 × 384 prompt, the same
  initial prompt, re-use and routing as SPARC).
* ``sparc_k{K}``: SPARC, 20 tokens in a K-dim PCA subspace of the task's post-LayerNorm token
  embeddings (special tokens and padding excluded), K ∈ ``SPARC_KS``.
* ``sparc_lora``: SPARC (K = 100) + per-task rank-8 LoRA on query/value of all layers.
* ``lora``: one rank-8 LoRA on query/value trained task after task (sequential LoRA).

Learning rates: prompt and head parameters train at ``lr_prompt``, LoRA factors at ``lr_lora``
in every row (SPARC+LoRA: ``lora_lr_scale = lr_lora / lr_prompt``; sequential LoRA: the run at
``lr_prompt`` and its adapters' Adam steps scaled by ``lr_lora / lr_prompt``, see
:func:`_scale_adapter_updates`), both chosen on the validation stream by ``--validate``
(``VALIDATION_LRS``; RESULTS.md text_sparc has the grid); the chosen values are the defaults of
:func:`rows`. ``clx run text_sparc`` (registered methods only) cannot scale one parameter group,
so there sequential LoRA trains its head at ``lr_lora`` too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

QV = ["*attention/query/kernel", "*attention/value/kernel"]
SPARC_KS = (10, 50, 100)
# Chosen on the validation stream by `--validate` (grid below; RESULTS.md text_sparc has the ACCs).
LR_PROMPT = 3e-2
LR_LORA = 5e-4
TAU = 0.7188  # `--calibrate` on the validation stream (runs/text_sparc/tau_calibration.json)
VALIDATION_LRS = {"prompt": (5e-3, 3e-2, 1e-1), "lora": (1e-4, 5e-4, 5e-3)}
TRAIN = {"epochs": 2, "batch_size": 16, "optimizer": "adam", "eval_batch_size": 250}
# Texts per class per task in the measured runs (wordnet_living holds 128 train / 500 test glosses
# per class per task). The validation stream's held-out pool is smaller: it uses 64 / 200.
PER_CLASS_TRAIN, PER_CLASS_TEST = 64, 500
VALIDATION_PER_CLASS_TEST = 200


def text_sparc_stream(*, scenario: str = "task", per_class_train: int | None = None,
                      per_class_test: int | None = None, max_length: int = 32, seed: int = 0,
                      validation: bool = False, **kwargs):
  """The task-IL (RT sentiment, RT subjectivity, party) or domain-IL (wordnet_living) stream."""
  from clx import data
  if scenario == "task":
    if validation:
      raise ValueError("text_sparc: the validation stream is domain-incremental (wordnet_living)")
    return data.get_stream("text_tasks", num_tasks=3, political=True, scenario="task",
                           per_class_train=per_class_train or PER_CLASS_TRAIN,
                           per_class_test=per_class_test or PER_CLASS_TEST, max_length=max_length,
                           seed=seed, **kwargs)
  if scenario == "domain":
    return data.get_stream("wordnet_living", validation=validation,
                           per_class_train=per_class_train or PER_CLASS_TRAIN,
                           per_class_test=per_class_test or PER_CLASS_TEST,
                           max_length=max_length, seed=seed, **kwargs)
  raise ValueError(f"text_sparc: scenario must be 'task' or 'domain', got {scenario!r}")


def _register():
  from clx.data import streams
  streams.register_stream("text_sparc", lambda flatten=True, data_dir=None, asset_cache=None,
                          **kw: text_sparc_stream(data_dir=data_dir, asset_cache=asset_cache, **kw),
                          overwrite=True)


_register()


def get_config():
  """Task-IL rows that are registered methods (``clx run text_sparc``); the script runs all."""
  sparc_args = {"num_prompt_tokens": 20, "num_components": 100, "overlap_threshold": TAU}
  prompt_lr = {"learning_rate": LR_PROMPT}
  return {
      "name": "text_sparc",
      "stream": {"name": "text_sparc", "scenario": "task", "per_class_train": 64,
                 "per_class_test": 500, "max_length": 32, "seed": 0},
      "model": {"name": "minilm"},
      "methods": ["linear_probe", "prompt_tuning", "free_prompt", "sparc", "sparc_lora", "lora"],
      "method_args": {"sparc": sparc_args, "free_prompt": sparc_args,
                      "sparc_lora": {**sparc_args, "lora_rank": 8,
                                     "lora_lr_scale": LR_LORA / LR_PROMPT},
                      "prompt_tuning": {"num_prompt_tokens": 20},
                      "lora": {"lora_rank": 8, "sites": QV}},
      "train": {**TRAIN, "learning_rate": LR_PROMPT},
      "train_overrides": {"linear_probe": prompt_lr, "prompt_tuning": prompt_lr,
                          "free_prompt": prompt_lr, "sparc": prompt_lr, "sparc_lora": prompt_lr,
                          "lora": {"learning_rate": LR_LORA}},
      "seed": 0,
  }


def rows(lr_prompt: float = LR_PROMPT, lr_lora: float = LR_LORA, tau: float = TAU,
         ks=SPARC_KS) -> dict[str, tuple[str, dict, float]]:
  """``{row: (registered method, method args, learning rate)}``."""
  sparc_args = {"num_prompt_tokens": 20, "overlap_threshold": tau}
  out = {"linear_probe": ("linear_probe", {}, lr_prompt),
         "prompt_tuning": ("prompt_tuning", {"num_prompt_tokens": 20}, lr_prompt),
         "free_prompt": ("free_prompt", {**sparc_args, "num_components": 100}, lr_prompt)}
  for k in ks:
    out[f"sparc_k{k}"] = ("sparc", {**sparc_args, "num_components": k}, lr_prompt)
  out["sparc_lora"] = ("sparc_lora", {**sparc_args, "num_components": 100, "lora_rank": 8,
                                      "lora_lr_scale": lr_lora / lr_prompt}, lr_prompt)
  # Sequential LoRA under SPARC+LoRA's per-group rule: the run (and its head) at lr_prompt, the
  # LoRA factors' Adam steps scaled to lr_lora (``adapters_lr_scale``, see :func:`_build`).
  out["lora"] = ("lora", {"lora_rank": 8, "sites": QV, "adapters_lr_scale": lr_lora / lr_prompt},
                 lr_prompt)
  return out


def _scale_adapter_updates(scale: float):
  """``transform_updates`` that multiplies the optimiser's steps on ``adapters`` by ``scale``.

  The loop applies it to Adam's update u = −lr · m̂ / (√v̂ + ε), which is linear in lr, so the
  adapters train exactly as Adam at ``lr · scale`` while the head keeps ``lr``.
  """
  import jax

  def transform(updates, state):
    del state
    return {**updates, "adapters": jax.tree.map(lambda u: u * scale, updates["adapters"])}

  return transform


def _build(name: str, args: dict, backbone):
  """``methods.build`` plus the script-level ``adapters_lr_scale`` option of sequential LoRA."""
  from clx import methods
  args = dict(args)
  scale = args.pop("adapters_lr_scale", None)
  method = methods.build(name, backbone, **args)
  if scale is not None:
    if method.transform_updates is not None:
      raise ValueError(f"text_sparc: {name} already has transform_updates; cannot scale adapters")
    if not float(scale) > 0:
      raise ValueError(f"text_sparc: adapters_lr_scale must be > 0, got {scale}")
    method = method._replace(transform_updates=_scale_adapter_updates(float(scale)))
  return method


def forgetting_ratios(acc) -> list[float]:
  """FR_i = 1 − a[T−1, i] / max_t a[t, i], in percent (last task: 0)."""
  from clx.ops import metrics
  return [round(100.0 * (1.0 - float(r)), 2) for r in np.asarray(metrics.forgetting_ratio(acc))]


_CACHE: dict = {}


def _backbone(max_length: int = 32):
  from clx import models
  if max_length not in _CACHE:
    _CACHE[max_length] = models.build("minilm", (max_length,))
  return _CACHE[max_length]


def run_row(stream, row: str, spec: tuple[str, dict, float], seed: int, out: pathlib.Path,
            ) -> dict:
  """Trains one row on ``stream``; writes and returns its result (skips if already written)."""
  import jax
  from clx.ops import metrics
  from clx.train import TrainConfig, run_method
  if out.is_file():
    return json.loads(out.read_text())
  name, args, lr = spec
  method = _build(name, args, _backbone(stream.input_shape[0]))
  start = time.time()
  res = run_method(method, stream, TrainConfig(**TRAIN, learning_rate=lr), seed=seed, quiet=True)
  acc = np.asarray(res.acc_matrix)
  summary = metrics.summarize(acc)
  diag = method.diagnostics(jax.device_get(res.state)) if method.diagnostics else {}
  result = {"row": row, "method": name, "method_args": args, "learning_rate": lr, "seed": seed,
            "acc_matrix": np.round(acc, 3).tolist(),
            **{k: float(np.asarray(v)) for k, v in summary.items() if np.ndim(v) == 0},
            "forgetting_ratio_pct": forgetting_ratios(acc),
            "wall_time_s": round(time.time() - start, 1), "diagnostics": diag}
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".tmp")
  tmp.write_text(json.dumps(result, indent=1, default=float))
  tmp.replace(out)
  print(f"{out.parent.name:>8} {row:<14} ACC {result['acc']:.1f} BWT {result['bwt']:+.1f} "
        f"({result['wall_time_s']:.0f} s)", flush=True)
  return result


def calibrate_tau(workdir: pathlib.Path, seed: int = 0, k: int = 100, repeats: int = 3) -> dict:
  """τ from the validation stream: overlaps of different domains vs of one domain with itself.

  For every validation task (disjoint from every evaluated text), the subspace overlap of two
  disjoint random halves of its texts, each of the size of an evaluated task's training set
  (``2 × PER_CLASS_TRAIN``), is what "the same distribution" scores at that sample size; the
  overlap of two different validation tasks (same size) is what different domains score. τ is
  the midpoint between the largest cross-domain and the smallest same-domain overlap (re-use
  only what looks like the same distribution); if they overlap, the smallest same-domain value.
  PCA passes only (the embedding layer), no training.
  """
  from clx.methods import sparc as sparc_lib
  stream = text_sparc_stream(scenario="domain", validation=True, seed=seed,
                             per_class_train=128, per_class_test=200)
  backbone = _backbone(stream.input_shape[0])
  n = 2 * PER_CLASS_TRAIN
  rng = np.random.RandomState(seed)
  texts = [np.concatenate([t.train.x, t.test.x]) for t in stream.tasks]
  same, cross, halves = [], [], []
  for r in range(repeats):
    first = []
    for t, x in enumerate(texts):
      perm = rng.permutation(len(x))
      a = sparc_lib.token_pca(backbone, x[perm[:n]], k)["components"]
      b = sparc_lib.token_pca(backbone, x[perm[n:2 * n]], k)["components"]
      same.append((t, r, sparc_lib.overlap_score(a, b)))
      first.append(a)
    for i in range(len(first)):
      for j in range(i):
        cross.append((j, i, r, sparc_lib.overlap_score(first[i], first[j])))
  lo_same = min(v for *_, v in same)
  hi_cross = max(v for *_, v in cross)
  tau = round((lo_same + hi_cross) / 2, 4) if hi_cross < lo_same else round(lo_same, 4)
  record = {"k": k, "sample_size": n, "tasks": [t.name for t in stream.tasks],
            "same_domain_split_half": [[t, r, round(v, 4)] for t, r, v in same],
            "cross_domain": [[i, j, r, round(v, 4)] for i, j, r, v in cross],
            "min_same": round(lo_same, 4), "max_cross": round(hi_cross, 4), "tau": tau}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "tau_calibration.json").write_text(json.dumps(record, indent=1))
  print(json.dumps({k_: v for k_, v in record.items()}, indent=1))
  return record


def routing(workdir: pathlib.Path, seeds=(0, 1, 2), ks=(10, 100)) -> dict:
  """How often SPARC's task choice without a task id (PCA reconstruction) picks the true task.

  Recomputes each task's PCA from its training texts exactly as ``begin_task`` does
  (:func:`clx.methods.sparc.token_pca`) and routes every test text of the domain stream to
  the task with the smallest mean squared residual over its real tokens (``selection=
  "subspace"``). Embedding layer only, no training. Returns ``{k: {seed: [per-task %]}}``.
  """
  import jax.numpy as jnp
  from clx.methods import sparc as sparc_lib
  out = {}
  for k in ks:
    out[k] = {}
    for seed in seeds:
      stream = text_sparc_stream(scenario="domain", seed=seed)
      backbone = _backbone(stream.input_shape[0])
      embed = sparc_lib._Embedder(backbone, "input", None, "auto")  # pylint: disable=protected-access
      pcs = [sparc_lib.token_pca(backbone, t.train.x, k) for t in stream.tasks]
      per_task = []
      for true, task in enumerate(stream.tasks):
        e, w = embed(backbone.params, jnp.asarray(task.test.x))
        e, w = np.asarray(e, np.float64), np.asarray(w, np.float64)
        errs = []
        for pc in pcs:
          c = e - np.asarray(pc["mean"], np.float64)
          r = np.sum(c**2, -1) - np.sum((c @ np.asarray(pc["components"], np.float64))**2, -1)
          errs.append(np.sum(r * w, -1) / np.maximum(np.sum(w, -1), 1.0))
        per_task.append(round(100.0 * float(np.mean(np.argmin(errs, 0) == true)), 1))
      out[k][seed] = per_task
  (workdir / "routing.json").write_text(json.dumps(out, indent=1))
  print(json.dumps(out))
  return out


def validate(workdir: pathlib.Path, seed: int = 0, choose_tau: bool = False) -> dict:
  """Learning rates (and optionally τ) chosen on the validation stream (domain-IL, one seed).

  Prompt/head rows (``linear_probe``, ``prompt_tuning``, ``sparc_k100``; τ = ∞, no re-use) pick
  ``lr_prompt`` from ``VALIDATION_LRS["prompt"]`` by their mean ACC; then sequential LoRA, its
  head at the chosen ``lr_prompt``, picks ``lr_lora`` from ``VALIDATION_LRS["lora"]``.
  ``choose_tau``: also pick τ by validation ACC, one ``sparc_k100`` run per distinct re-use
  decision set (the thresholds just below each observed overlap); by default τ comes from
  :func:`calibrate_tau` (PCA passes only). Writes ``workdir/validation.json``.
  """
  stream = text_sparc_stream(scenario="domain", validation=True, seed=seed,
                             per_class_test=VALIDATION_PER_CLASS_TEST)
  root = workdir / "validation"
  choice, record = {}, {"grid": {}, "seed": seed, "tasks": [t.name for t in stream.tasks],
                        "per_class_train": PER_CLASS_TRAIN,
                        "per_class_test": VALIDATION_PER_CLASS_TEST}

  def grid(kind: str, names: list[str], specs_for) -> float:
    scores = {}
    for lr in VALIDATION_LRS[kind]:
      specs = specs_for(lr)
      accs = [run_row(stream, n, specs[n], seed, root / f"{kind}_lr{lr:g}" / f"{n}.json")["acc"]
              for n in names]
      scores[lr] = float(np.mean(accs))
      record["grid"][f"{kind} lr {lr:g}"] = {**dict(zip(names, accs)), "mean": scores[lr]}
    return max(scores, key=scores.get)

  choice["lr_prompt"] = grid("prompt", ["linear_probe", "prompt_tuning", "sparc_k100"],
                             lambda lr: rows(lr_prompt=lr, tau=math.inf, ks=(100,)))
  choice["lr_lora"] = grid("lora", ["lora"], lambda lr: rows(lr_prompt=choice["lr_prompt"],
                                                            lr_lora=lr, tau=math.inf, ks=(100,)))
  if choose_tau:
    probe = json.loads((root / f"prompt_lr{choice['lr_prompt']:g}" / "sparc_k100.json"
                        ).read_text())
    scores = sorted({s for t in probe["diagnostics"]["tasks"].values() for s in t["scores"]})
    results = {}
    for tau in [math.inf] + [round(s - 1e-4, 4) for s in scores]:
      spec = rows(lr_prompt=choice["lr_prompt"], tau=tau, ks=(100,))["sparc_k100"]
      res = run_row(stream, "sparc_k100", spec, seed, root / f"tau{tau:g}" / "sparc_k100.json")
      results[tau] = (res["acc"], res["diagnostics"].get("reuse_decisions"))
    choice["tau"] = max(results, key=lambda t: (results[t][0], t))  # ties: higher τ, less re-use
    record.update({"overlap_scores": probe["diagnostics"]["tasks"],
                   "tau_runs": {f"{t:g}": {"acc": a, "reuse": r}
                                for t, (a, r) in results.items()}})
  record["choice"] = choice
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "validation.json").write_text(json.dumps(record, indent=1, default=str))
  print(json.dumps(record, indent=1, default=str))
  return choice


def _lr_label(result: dict) -> str:
  """The run's learning rate, and its LoRA factors' (``lr · scale``) where they differ."""
  lr = result["learning_rate"]
  args = result.get("method_args", {})
  scale = args.get("adapters_lr_scale", args.get("lora_lr_scale"))
  return f"{lr:g}" if scale is None else f"{lr:g} / {lr * scale:.3g}"


def table(workdir: pathlib.Path) -> str:
  """Markdown: mean ± sample std over the seeds found under ``workdir/seed*/``."""
  found: dict = {}
  for path in sorted(workdir.glob("seed*/*/*.json")):
    res = json.loads(path.read_text())
    found.setdefault((path.parent.name, res["row"]), []).append(res)
  order = list(rows())
  lines = ["| scenario | row | seeds | ACC | BWT | forgetting ratio per task (%) | trainable % "
           "(with head) | lr (head, prompt / LoRA) | wall s |", "|---|---|---|---|---|---|---|---|---|"]

  def ms(values, fmt="{:.1f}"):
    v = np.asarray(values, np.float64)
    return (fmt.format(v.mean()) + (" ± " + fmt.format(v.std(ddof=1)) if len(v) > 1 else ""))

  for scenario in ("task", "domain"):
    for row in order:
      runs = found.get((scenario, row))
      if not runs:
        continue
      diag = runs[0]["diagnostics"]
      pct = diag.get("trainable_pct")
      if row == "lora":  # clx.methods.sequential.lora reports no diagnostics: computed
        # 6 layers × (q, v) × 8 × (384 + 384) = 73,728; a 2-way head 770; of 22,565,376
        pct_s = f"{100 * 73728 / 22565376:.4f} ({100 * (73728 + 770) / 22565376:.4f})"
      else:
        pct_s = f"{pct:.4f} ({diag.get('trainable_pct_with_head', 0):.4f})"
      fr = np.mean([r["forgetting_ratio_pct"] for r in runs], axis=0)
      lines.append(
          f"| {scenario} | {row} | {len(runs)} | {ms([r['acc'] for r in runs])} | "
          f"{ms([r['bwt'] for r in runs])} | {', '.join(f'{v:.1f}' for v in fr)} | {pct_s} | "
          f"{_lr_label(runs[0])} | {np.mean([r['wall_time_s'] for r in runs]):.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/text_sparc")
  parser.add_argument("--scenarios", default="task,domain")
  parser.add_argument("--rows", default=None, help="comma-separated subset of rows")
  parser.add_argument("--seed", type=int, default=0,
                      help="run seed; the stream's sample of texts follows it")
  parser.add_argument("--seeds", default=None,
                      help="comma-separated seeds, run row by row (every seed of a row first)")
  parser.add_argument("--validate", action="store_true",
                      help="choose the learning rates and τ on the validation stream (training)")
  parser.add_argument("--choose-tau", action="store_true",
                      help="with --validate: also choose τ by validation ACC (training runs)")
  parser.add_argument("--calibrate", action="store_true",
                      help="τ from split-half vs cross-domain overlaps on the validation stream")
  parser.add_argument("--table", action="store_true", help="print the table over seeds")
  parser.add_argument("--routing", action="store_true",
                      help="accuracy of SPARC's task choice without task id (domain stream)")
  args = parser.parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  if args.table:
    print(table(workdir))
    return 0
  if args.validate:
    validate(workdir, args.seed, choose_tau=args.choose_tau)
    return 0
  if args.calibrate:
    calibrate_tau(workdir, args.seed)
    return 0
  if args.routing:
    routing(workdir)
    return 0
  specs = rows()
  wanted = args.rows.split(",") if args.rows else list(specs)
  unknown = sorted(set(wanted) - set(specs))
  if unknown:
    raise SystemExit(f"unknown rows {unknown}; rows: {list(specs)}")
  seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
  streams = {}
  for scenario in args.scenarios.split(","):
    for row in wanted:
      for seed in seeds:
        if (scenario, seed) not in streams:
          streams[scenario, seed] = text_sparc_stream(scenario=scenario, seed=seed)
        run_row(streams[scenario, seed], row, specs[row], seed,
                workdir / f"seed{seed}" / scenario / f"{row}.json")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.exit(main())
