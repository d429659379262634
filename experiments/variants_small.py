"""Small synthetic checks of the official variants: InfLoRA+CA (align on/off), Adam-NSCL, BECAME-NSCL.

Command:   python experiments/variants_small.py [--seeds 0 1 2] [--only ca|nscl]
Hardware:  2 CPU cores, no data or weights (Gaussian blobs, MLP backbones).
Run time:  about 5 min on 2 idle cores; 30 min on the shared development machine (load 15).
Expected:  (numbers in experiments/results_extra.md, section "Official variants")
           CA: class-IL, 3 tasks × 2 classes of overlapping blobs (separation 1), MLP 16-32,
           InfLoRA+CA rank 4 on both kernels vs the same run with ``align=False``: alignment
           raises the final ACC and the old tasks' accuracy on every seed.
           NSCL: task-IL, 5 tasks × 2 classes, MLP 16-32-32; Adam with the same parameter groups
           and learning rates, without the projection ("unprojected") vs Adam-NSCL vs
           BECAME-NSCL: the projection cuts forgetting (BWT), BECAME's merge trades some of it back
           for accuracy when λ > 0.

Each comparison changes one thing between its rows (the alignment; the projection; the merge);
backbone, heads, stream, seed and training budget are shared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def ca_rows(seed: int) -> list[dict]:
  import numpy as np

  from clx.methods import inflora_ca as ca
  from clx.models.mlp import mlp
  from clx.train.loop import TrainConfig, run_method
  from clx.train.sharding import make_mesh
  from tests.helpers import make_gaussian_stream

  stream = make_gaussian_stream(num_tasks=3, classes_per_task=2, dim=16, n_train=128, n_test=100,
                                seed=seed, separation=1.0)
  backbone = mlp(stream.input_shape, (32,), seed=seed)
  cfg = TrainConfig(epochs=3, batch_size=16, learning_rate=1e-2, eval_batch_size=128)
  rows = []
  for align in (False, True):
    t0 = time.time()
    method = ca.inflora_ca(backbone, lora_rank=4, sites="mlp", lamb=0.9, align=align)
    acc = run_method(method, stream, cfg, mesh=make_mesh(1), quiet=True, seed=seed).acc_matrix
    rows.append({"seed": seed, "method": "inflora_ca" if align else "inflora_ca (align off)",
                 "acc": round(float(np.mean(acc[-1])), 2),
                 "old_tasks": round(float(np.mean(acc[-1, :-1])), 2),
                 "last_row": np.round(acc[-1], 1).tolist(), "s": round(time.time() - t0)})
  return rows


def nscl_rows(seed: int) -> list[dict]:
  import numpy as np

  from clx.data.types import Stream
  from clx.methods import became_nscl as nl
  from clx.models.mlp import mlp
  from clx.ops import metrics
  from clx.train.loop import TrainConfig, run_method
  from clx.train.sharding import make_mesh
  from tests.helpers import make_gaussian_stream

  rates = {"first": 1e-2, "body": 1e-2, "head": 1e-2, "norm": 1e-2}
  cfg = TrainConfig(epochs=3, batch_size=16, learning_rate=1e-3, eval_batch_size=128)
  s = make_gaussian_stream(num_tasks=5, classes_per_task=2, dim=16, n_train=128, n_test=100,
                           seed=seed, separation=1.0)
  stream = Stream(s.name, s.tasks, "task", s.num_classes)
  backbone = mlp((16,), (32, 32), seed=seed)
  su = nl.setup(backbone, nl.NSCLConfig(threshold=10.0, covariance="batch_mean",
                                        learning_rates=rates, weight_decay=5e-5))
  methods = {"unprojected": nl.method(su, "unprojected", transform_updates=nl.scale_updates),
             "adam_nscl": nl.method(su, "adam_nscl"),
             "became_nscl": nl.became_nscl(backbone, threshold=10.0, learning_rates=rates,
                                           verbose=False)}
  rows = []
  for name, method in methods.items():
    t0 = time.time()
    result = run_method(method, stream, cfg, mesh=make_mesh(1), quiet=True, seed=seed)
    summary = metrics.summarize(result.acc_matrix)
    row = {"seed": seed, "method": name, "acc": round(float(summary["acc"]), 2),
           "bwt": round(float(summary["bwt"]), 2), "s": round(time.time() - t0)}
    if "lambdas" in result.state:
      row["lambdas"] = np.round(np.asarray(result.state["lambdas"]), 4).tolist()
    rows.append(row)
  return rows


def main(argv=None) -> int:
  import numpy as np

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--only", choices=("ca", "nscl"), default=None)
  args = parser.parse_args(argv)
  rows = []
  for seed in args.seeds:
    new = ((ca_rows(seed) if args.only in (None, "ca") else [])
           + (nscl_rows(seed) if args.only in (None, "nscl") else []))
    for row in new:
      print(json.dumps(row), flush=True)
    rows += new
  for name in dict.fromkeys(r["method"] for r in rows):
    sel = [r for r in rows if r["method"] == name]
    cols = [k for k in ("acc", "old_tasks", "bwt") if k in sel[0]]
    sd = (lambda a: a.std(ddof=1) if len(a) > 1 else 0.0)  # noqa: E731
    text = "  ".join(f"{k} {np.mean([r[k] for r in sel]):.2f} ± "
                     f"{sd(np.array([r[k] for r in sel])):.2f}" for k in cols)
    print(f"{name:24s} {text}  (n={len(sel)})")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  sys.exit(main())
