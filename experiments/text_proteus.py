"""MiniLM on WordNet supersenses (class-IL, 5 tasks): PROTEUS, its components switched off, head-matched baselines.

Command:   python experiments/text_proteus.py [--workdir runs/text_proteus] [--set seed=N] [--light]
           (trains proteus, proteus_independent, inflora and lora, then writes retrieval.json
           (retrieval, the bound under both δ forms; with --light no screening signatures and
           no refitted k-means/diagonal signatures) and controlled.json (the head-matched and
           oracle rows below). ``--summarize WORKDIR...`` prints the RESULTS.md tables of
           finished seed workdirs. ``clx run text_proteus`` gives the loop's accuracy matrices
           alone.)
Hardware:  2 CPU cores, no accelerator.
Run time:  seed 0 on the 2 shared cores of the development machine (load 12-18 from other
           jobs): PROTEUS 16 min; about 70 min for everything; ≈ 20 CPU-minutes on an idle
           machine (an estimate from the share measured under load).
Expected:  seed 0 (experiments/RESULTS.md, section text_proteus): PROTEUS 62.0 % ACC,
           without composition 61.7, with the true task 62.0, the same RanPAC head on the
           frozen backbone 61.9, on InfLoRA's backbone 67.5, InfLoRA with its per-task heads
           49.5, sequential LoRA 15.2; retrieval 66.6 %; the bound's check passes on every
           cluster under both δ forms while 23-42 % of test glosses are misretrieved.

Setup: all-MiniLM-L6-v2 (mean pooling, frozen), token ids of length 32; WordNet noun/verb
supersenses, 5 tasks x 4 classes (the 20 largest supersenses), 64 training and 32 test
glosses per class (seeded by the run seed); Adam lr 1e-3 (the authors' main configs), batch 16,
2 epochs per task (32 steps; the code's 20 epochs of batch 32 are far too slow on 2 CPU
cores). Every row below shares the backbone, the stream and this budget.

Rows:
- ``proteus``: the code's main-config composition settings (rank-4 units on q and v of every
  layer, input-side factor 0 and output-side factor N(0, 0.01²) as the code, scale 0.1, alpha
  0.3, l1 0.006, no orthogonality penalty); DP-GMM signatures with full covariances in
  d = 384, at most 20 components (the code's CIFAR-100 count; 100 on ImageNet-R/A),
  concentration 0.01; RanPAC head with 2,000 random features (the code's 10,000 needs a
  10,000² Gram and eigendecomposition per task, minutes on 2 cores); retrieval by signature.
- ``proteus_independent``: the same with alpha = 0 (each task's unit alone: no composition),
  same signatures, retrieval and head.
- ``proteus_oracle`` / ``proteus_independent_oracle``: those runs' own states after each
  task, every test input through its *true* task's backbone (no retrieval).
- ``ridge_frozen``: the same RanPAC head (same W_rand draw, λ rule and statistics) on the
  frozen backbone, no adapters.
- ``inflora_ridge``: the same head on InfLoRA's network after each task (all branches active,
  as InfLoRA's forward; G and Q accumulate task k's training features through the network
  after task k, and tests go through that same network).
- ``inflora``: official settings (rank 10 on k and v, epsilon 0.95), per-task linear heads
  whose logits are concatenated in class-IL (no task id).
- ``lora``: one rank-8 adapter on q and v trained through all tasks, per-task heads.

Measured numbers, with the bound's δ in both forms (the authors' cluster-mean form and clx's
earlier per-point form) on training and held-out glosses: experiments/RESULTS.md, section
text_proteus.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SCREEN_M = (1, 2)


def get_config():
  proteus_args = {"n_components": 20, "weight_concentration_prior": 0.01, "rp_dim": 2000,
                  "screen_top_m": 0, "screen_signatures": True}
  return {
      "name": "text_proteus",
      "stream": {"name": "wordnet_supersense", "num_tasks": 5, "classes_per_task": 4,
                 "per_class_train": 64, "per_class_test": 32, "max_length": 32, "seed": None},
      "model": {"name": "minilm"},
      "methods": ["proteus", "proteus_independent", "inflora", "lora"],
      "method_args": {
          "proteus": proteus_args,
          "proteus_independent": {**proteus_args, "transfer_alpha": 0.0, "screen_signatures": False},
          "proteus_kmeans": {"rp_dim": 2000, "kmeans_clusters": 5},
          "inflora": {"lora_rank": 10, "sites": ["k", "v"], "lamb": 0.95, "lame": 1.0},
          "lora": {"lora_rank": 8, "sites": ["*attention/query/kernel", "*attention/value/kernel"]},
      },
      "train": {"epochs": 2, "batch_size": 16, "optimizer": "adam", "learning_rate": 1e-3,
                "eval_batch_size": 128},
      "seed": 0,
  }


def _ensure_registered(config) -> list[str]:
  """Register PROTEUS (and InfLoRA, if its module exists) in this process if the lead has
  not yet; methods that cannot be found are dropped with a message. Returns the dropped."""
  from clx import methods
  from clx.methods import proteus
  for name, fn in proteus.REGISTRY.items():
    methods.REGISTRY.setdefault(name, fn)
  methods.REGISTRY.setdefault("proteus_independent", proteus.proteus_independent)
  if "inflora" not in methods.REGISTRY:
    try:
      from clx.methods import inflora
      methods.REGISTRY.update(inflora.REGISTRY)
    except Exception as e:  # noqa: BLE001 - the module is being written concurrently
      print(f"InfLoRA unavailable ({type(e).__name__}: {e}); running without it", flush=True)
  dropped = [m for m in config["methods"] if m not in methods.REGISTRY]
  config["methods"] = [m for m in config["methods"] if m in methods.REGISTRY]
  return dropped


ABLATIONS = {"kmeans": {"signature": "kmeans"}, "diag": {"covariance_type": "diag"}}


def proteus_report(config, workdir: Path, name: str = "proteus", screen_m=SCREEN_M,
                   ablations: bool = True) -> dict:
  """Restore the final PROTEUS state from its checkpoints; measure retrieval (exhaustive,
  screened, with k-means and diagonal-covariance signatures refitted on the same adapted
  features) and the bound's quantities on train and test data."""
  import jax
  from clx import checkpoint, experiment, models
  from clx.methods import proteus
  from clx.methods.base import StreamSpec

  stream = experiment.build_stream(config)
  model_args = {k: v for k, v in config["model"].items() if k != "name"}
  if models.accepts_seed(config["model"]["name"]):
    model_args.setdefault("seed", config.get("seed", 0))
  backbone = models.build(config["model"]["name"], stream.input_shape, **model_args)
  args = dict(config.get("method_args", {}).get(name, {}))
  if name == "proteus_kmeans":
    args.setdefault("signature", "kmeans")
  parts = proteus.ProteusParts(backbone, **args)
  spec = StreamSpec.from_stream(stream)
  init = parts.init(jax.random.fold_in(jax.random.PRNGKey(int(config.get("seed", 0))), 0), spec)
  with checkpoint.TaskCheckpointer(workdir / name / "checkpoints") as ckpt:
    state, _ = ckpt.restore_state(ckpt.latest_task(), init)
  have_screen = "screen" in state["tasks"]["0"]
  return parts.retrieval_report(state, backbone.params, stream,
                                screen_m=screen_m if have_screen else (),
                                ablations=ABLATIONS if ablations and parts.signature == "dpgmm"
                                else None)


def _setup(config):
  """Stream, backbone and StreamSpec of ``config`` (as run_experiment builds them)."""
  from clx import experiment, models
  from clx.methods.base import StreamSpec
  stream = experiment.build_stream(config)
  model_args = {k: v for k, v in config["model"].items() if k != "name"}
  if models.accepts_seed(config["model"]["name"]):
    model_args.setdefault("seed", config.get("seed", 0))
  backbone = models.build(config["model"]["name"], stream.input_shape, **model_args)
  return stream, backbone, StreamSpec.from_stream(stream)


def _features(fn, x_all, batch_size: int = 128):
  """``fn(x)`` over ``x_all`` in zero-padded batches of one shape, host ``(n, d)``."""
  import numpy as np
  from clx.methods.proteus import _padded
  parts = []
  for s in range(0, len(x_all), batch_size):
    x, n = _padded(x_all[s:s + batch_size], batch_size)
    parts.append(np.asarray(fn(x))[:n])
  return np.concatenate(parts)


def inflora_effective_params(backbone, state, base, sites):
  """InfLoRA's network after the tasks in ``state``: base + Σ_j a_j b_j at every site.

  Recomputed here from the state (``branches/<j>/a/<input group>`` (d_in, r), scale included,
  and ``branches/<j>/b/<site>`` (r, d_out); all branches active, as InfLoRA's forward) so that
  clx/methods/inflora.py is not touched; ``tests/methods/test_proteus.py::
  test_inflora_effective_params_match_its_forward`` checks it against InfLoRA's ``predict``.

  Args:
    backbone: the frozen backbone InfLoRA was built on.
    state: InfLoRA's state (``branches``).
    base: the frozen params.
    sites: InfLoRA's ``sites`` argument (roles or kernel paths).

  Returns:
    The params pytree with every adapted kernel W replaced by W + Σ_j a_j b_j.
  """
  from clx.methods import inflora
  from clx.methods.base import site_key
  from clx.ops import lora as lora_ops
  paths = inflora.resolve_sites(backbone, sites)
  group_of = {s: g for g, members in inflora.input_groups(backbone, paths).items() for s in members}
  order = sorted(state["branches"], key=int)
  if not order:
    return base
  adapters = {s: [{"a": state["branches"][j]["a"][group_of[s]],
                   "b": state["branches"][j]["b"][site_key(s)]} for j in order] for s in paths}
  return lora_ops.apply_adapters(base, adapters, 1.0)


def controlled_rows(config, workdir: Path) -> dict:
  """Head-matched and component-off rows: accuracy matrices (%) on the run's stream.

  - ``ridge_frozen``: PROTEUS's RanPAC head (same W_rand size and seed, λ rule, statistics)
    on the frozen backbone, no adapters (RanPAC without its first-session adaptation).
  - ``inflora_ridge``: the same head on InfLoRA's adapted backbone: after task k, task k's
    training features through InfLoRA's network after task k (all branches ≤ k active, as
    InfLoRA's own forward) update G and Q; the tests of tasks ≤ k go through that same
    network (one network, no retrieval needed).
  - ``<proteus run>_oracle``: a PROTEUS run's own states after each task k; each test input
    goes through its *true* task's composed backbone (no retrieval), the run's own head.

  Also returns the mean relative feature drift ‖h_i(x) − h_base(x)‖ / ‖h_base(x)‖ of each
  PROTEUS run's final backbones on their own tasks' test inputs.
  """
  import jax
  import numpy as np

  from clx import checkpoint, methods, report
  from clx.experiment import summarize
  from clx.methods import proteus

  stream, backbone, spec = _setup(config)
  base = backbone.params
  seed = int(config.get("seed", 0))
  T = len(stream.tasks)
  parts = proteus.ProteusParts(backbone, **dict(config["method_args"]["proteus"]))
  init_key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
  apply = jax.jit(backbone.apply)

  def ridge_matrix(params_after):
    """The RanPAC continual head over a per-task network ``params_after(k)``."""
    ridge = parts.init(init_key, spec)["ridge"]
    acc = np.full((T, T), np.nan)
    for k in range(T):
      params = params_after(k)
      tr = stream.tasks[k].train
      feats = _features(lambda x: apply(params, x), np.asarray(tr.x))
      ridge, _ = parts.ridge_head_update(ridge, feats, np.asarray(tr.y), spec.num_classes, k)
      for i in range(k + 1):
        te = stream.tasks[i].test
        f = _features(lambda x: apply(params, x), np.asarray(te.x))
        pred = np.asarray(parts.head_logits({"ridge": ridge}, f, spec, k)).argmax(-1)
        acc[k, i] = 100.0 * float(np.mean(pred == np.asarray(te.y)))
    return acc

  out = {"ridge_frozen": ridge_matrix(lambda k: base)}
  if "inflora" in config["methods"]:
    iargs = dict(config["method_args"].get("inflora", {}))
    iinit = methods.build("inflora", backbone, **iargs).init(init_key, spec)
    with checkpoint.TaskCheckpointer(workdir / "inflora" / "checkpoints") as ck:
      states = [ck.restore_state(k, iinit)[0] for k in range(T)]
    out["inflora_ridge"] = ridge_matrix(lambda k: inflora_effective_params(
        backbone, states[k], base, iargs.get("sites", ("k", "v"))))
  drift = {}
  for name in ("proteus", "proteus_independent"):
    if name not in config["methods"]:
      continue
    p = proteus.ProteusParts(backbone, **dict(config["method_args"][name]))
    pinit = p.init(init_key, spec)
    with checkpoint.TaskCheckpointer(workdir / name / "checkpoints") as ck:
      states = [ck.restore_state(k, pinit)[0] for k in range(T)]
    # one compiled forward: task i's composed delta after task k is an argument
    feat_fn = jax.jit(lambda d_i, x: backbone.apply(p._params_with(base, d_i), x))
    acc = np.full((T, T), np.nan)
    rel = []
    for k in range(T):
      deltas = p.deltas(states[k], k + 1)
      for i in range(k + 1):
        te = stream.tasks[i].test
        d_i = {s: d[i] for s, d in deltas.items()}
        f = _features(lambda x: feat_fn(d_i, x), np.asarray(te.x))
        pred = np.asarray(p.head_logits(states[k], f, spec, k)).argmax(-1)
        acc[k, i] = 100.0 * float(np.mean(pred == np.asarray(te.y)))
        if k == T - 1:
          f0 = _features(lambda x: apply(base, x), np.asarray(te.x))
          rel.append(float(np.mean(np.linalg.norm(f - f0, axis=1) / np.linalg.norm(f0, axis=1))))
    out[f"{name}_oracle"] = acc
    drift[name] = rel
  runs = {k: {"acc_matrix": report.matrix_to_json(v), **summarize(v)} for k, v in out.items()}
  return {"runs": runs, "feature_drift": drift}


ROWS = (  # (run key, source, adapters, head, task at test)
    ("ridge_frozen", "controlled", "none (frozen)", "RanPAC ridge", "-"),
    ("inflora_ridge", "controlled", "InfLoRA", "RanPAC ridge", "-"),
    ("proteus_independent_oracle", "controlled", "independent units (α = 0)", "RanPAC ridge",
     "true"),
    ("proteus_independent", "metrics", "independent units (α = 0)", "RanPAC ridge", "retrieved"),
    ("proteus_oracle", "controlled", "composed units (α = 0.3)", "RanPAC ridge", "true"),
    ("proteus", "metrics", "composed units (α = 0.3)", "RanPAC ridge", "retrieved"),
    ("inflora", "metrics", "InfLoRA", "per-task linear", "-"),
    ("lora", "metrics", "sequential LoRA", "per-task linear", "-"),
)
# (name, a, b): paired per-seed difference a − b of ACC
EFFECTS = (
    ("composition, retrieved task (proteus − proteus_independent)", "proteus",
     "proteus_independent"),
    ("composition, true task (proteus_oracle − proteus_independent_oracle)", "proteus_oracle",
     "proteus_independent_oracle"),
    ("retrieval vs true task (proteus − proteus_oracle)", "proteus", "proteus_oracle"),
    ("adapters + retrieval vs frozen (proteus − ridge_frozen)", "proteus", "ridge_frozen"),
    ("head, InfLoRA backbone (inflora_ridge − inflora)", "inflora_ridge", "inflora"),
    ("PROTEUS vs InfLoRA, same head (proteus − inflora_ridge)", "proteus", "inflora_ridge"),
)


def summarize_seeds(workdirs) -> str:
  """The RESULTS.md tables of several seeds' workdirs (metrics.json, controlled.json,
  retrieval.json): accuracy rows, paired effects, retrieval, feature drift and the bound."""
  import json

  import numpy as np

  def ms(values, fmt="{:.2f}"):
    v = np.asarray(values, float)
    sd = v.std(ddof=1) if len(v) > 1 else float("nan")
    return (fmt + " ± " + fmt).format(v.mean(), sd).replace("-", "−")

  seeds = []
  for wd in workdirs:
    wd = Path(wd)
    seeds.append({"metrics": json.loads((wd / "metrics.json").read_text())["runs"],
                  "controlled": json.loads((wd / "controlled.json").read_text()),
                  "retrieval": json.loads((wd / "retrieval.json").read_text())})

  def run(s, key, source):
    return s["metrics"][key] if source == "metrics" else s["controlled"]["runs"][key]

  rows = [r for r in ROWS if all(r[0] in (s["metrics"] if r[1] == "metrics"
                                          else s["controlled"]["runs"]) for s in seeds)]
  out = [f"| row | adapters | head | task at test | ACC | AIA | BWT |", "|---|---|---|---|---|---|---|"]
  for key, src, adapters, head, task in rows:
    vals = [run(s, key, src) for s in seeds]
    out.append(f"| {key} | {adapters} | {head} | {task} | {ms([v['acc'] for v in vals])} | "
               f"{ms([v['aia'] for v in vals])} | {ms([v['bwt'] for v in vals])} |")
  src_of = {r[0]: r[1] for r in rows}
  out += ["", "Paired differences of ACC (points, mean ± std over seeds; per seed in brackets):", "",
          "| effect | ΔACC | per seed |", "|---|---|---|"]
  for name, a, b in EFFECTS:
    if a in src_of and b in src_of:
      d = [run(s, a, src_of[a])["acc"] - run(s, b, src_of[b])["acc"] for s in seeds]
      out.append(f"| {name} | {ms(d)} | {' / '.join(f'{x:+.1f}' for x in d)} |")
  out += ["", "Retrieval accuracy after the last task (% of test glosses routed to their task; "
          "chance 20 %) and mean relative feature drift ‖h_t(x) − h_base(x)‖/‖h_base(x)‖ of "
          "the final backbones on their own tasks' test glosses:", "",
          "| run | retrieval | drift |", "|---|---|---|"]
  for name in ("proteus", "proteus_independent"):
    if all(name in s["retrieval"] for s in seeds):
      r = [s["retrieval"][name]["mean"]["retrieval_acc"] for s in seeds]
      dr = [100 * np.mean(s["controlled"]["feature_drift"][name]) for s in seeds]
      out.append(f"| {name} | {ms(r, '{:.1f}')} | {ms(dr, '{:.2f}')} % |")
  # the bound, both δ forms, main run
  out += ["", "The bound's check (PROTEUS run; per task, clusters = the task's DP-GMM components "
          "with ≥ 2 sample points; cm = the authors' theories.py δ (cluster-mean Mahalanobis), "
          "pp = clx's earlier per-point δ; train = training points, as theories.py; test = "
          "held-out glosses). Over all seeds and tasks:", "",
          "| side | δ cm (min over clusters, mean over tasks) | clusters passing, cm | "
          "δ pp | clusters passing, pp | threshold (max) | own-component δ cm / pp |",
          "|---|---|---|---|---|---|---|"]
  for side in ("train", "test"):
    b = [t[f"bound_{side}"] for s in seeds for t in s["retrieval"]["proteus"]["tasks"]
         if f"bound_{side}" in t]
    if not b:
      continue
    tot = sum(x["clusters"] for x in b)
    pc = sum(x["clusters_pass_cluster_mean"] for x in b)
    pp = sum(x["clusters_pass_per_point"] for x in b)
    out.append(
        f"| {side} | {ms([x['delta_min_cluster_mean'] for x in b])} | {pc}/{tot} | "
        f"{ms([x['delta_min_per_point'] for x in b])} | {pp}/{tot} | "
        f"{ms([x['threshold_max'] for x in b], '{:.3f}')} | "
        f"{ms([x['delta_self_cluster_mean'] for x in b])} / "
        f"{ms([x['delta_self_per_point'] for x in b])} |")
  return "\n".join(out)


def format_report(report: dict) -> str:
  first = report["tasks"][0]
  screens = list(first["screen"])
  abls = list(first.get("ablations", {}))
  head = (f"{'task':>4} {'retr':>6} {'acc':>6} {'oracle':>6}" + "".join(f"{'m=' + m:>6}" for m in screens)
          + "".join(f"{a[:6]:>7}{'acc':>6}" for a in abls))
  lines = ["retrieval / accuracy (%): exhaustive, screened top-m, refitted signatures", head]
  for r in report["tasks"]:
    lines.append(f"{r['task']:>4} {r['retrieval_acc']:6.1f} {r['acc']:6.1f} {r['oracle_acc']:6.1f}"
                 + "".join(f"{r['screen'][m]:6.1f}" for m in screens)
                 + "".join(f"{r['ablations'][a]['retrieval_acc']:7.1f}{r['ablations'][a]['acc']:6.1f}"
                           for a in abls))
  m = report["mean"]
  lines.append(f"mean {m['retrieval_acc']:6.1f} {m['acc']:6.1f} {m['oracle_acc']:6.1f}"
               + "".join(f"{m['screen_' + k]:6.1f}" for k in screens)
               + "".join(f"{m[a + '_retrieval_acc']:7.1f}{m[a + '_acc']:6.1f}" for a in abls))
  if "bound_train" in first:
    lines += ["", "bound (per task; train = the code's check on training clusters, test = the "
              "same on held-out points; cm = the code's cluster-mean delta, pp = per-point)",
              f"{'task':>4} {'side':>5} {'delta cm':>9} {'self cm':>8} {'pass cm':>8} "
              f"{'delta pp':>9} {'self pp':>8} {'pass pp':>8} {'kappa':>8} {'thresh':>7} "
              f"{'retr err':>8}"]
    for r in report["tasks"]:
      for side in ("train", "test"):
        b = r[f"bound_{side}"]
        cells = ""
        for form in ("cluster_mean", "per_point"):
          passed = f"{b[f'clusters_pass_{form}']}/{b['clusters']}"
          cells += (f" {b[f'delta_min_{form}']:9.2f} {b[f'delta_self_{form}']:8.2f} "
                    f"{passed:>8}")
        lines.append(f"{r['task']:>4} {side:>5}{cells} {b['kappa_min']:8.1f} "
                     f"{b['threshold_max']:7.3f} {100 - r['retrieval_acc']:8.1f}")
  return "\n".join(lines)


def main(argv=None) -> int:
  from clx import checkpoint, experiment, report

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=os.path.join("runs", "text_proteus"))
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--summarize", nargs="+", metavar="WORKDIR",
                      help="print the RESULTS.md tables of finished seed workdirs and exit")
  parser.add_argument("--light", action="store_true",
                      help="skip the screening signatures and the refitted-signature ablations "
                           "(k-means, diagonal) of the retrieval report")
  args = parser.parse_args(argv)
  if args.summarize:
    print(summarize_seeds(args.summarize))
    return 0
  config = experiment.apply_overrides(get_config(), args.set)
  if args.light:
    config["method_args"]["proteus"]["screen_signatures"] = False
  dropped = _ensure_registered(config)
  if dropped:
    print(f"not registered, skipped: {dropped}", flush=True)
  workdir = Path(args.workdir)
  result = experiment.run_experiment(config, workdir, quiet=True)
  print(report.format_table(result["runs"]))
  retrieval = {}
  for name in ("proteus", "proteus_independent", "proteus_kmeans"):
    if name in config["methods"]:
      retrieval[name] = proteus_report(config, workdir, name,
                                       screen_m=SCREEN_M if name == "proteus" else (),
                                       ablations=name == "proteus" and not args.light)
      print(f"\n{name}:")
      print(format_report(retrieval[name]), flush=True)
  checkpoint.atomic_write_json(workdir / "retrieval.json", retrieval)
  controlled = controlled_rows(config, workdir)
  checkpoint.atomic_write_json(workdir / "controlled.json", controlled)
  print("\nhead-matched and component-off rows:")
  print(report.format_table(controlled["runs"]))
  print("feature drift of the final PROTEUS backbones (per task):", controlled["feature_drift"])
  print(f"\nresults: {workdir / 'metrics.json'}, {workdir / 'retrieval.json'}, "
        f"{workdir / 'controlled.json'}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  sys.exit(main())
