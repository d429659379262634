"""Before/after numbers for batch-norm host passes (issue 12): evaluation padding and BECAME's Fisher.

Command:   PYTHONPATH=. python experiments/bench_bn_passes.py eval     (→ /tmp/fidbn/eval.json)
           PYTHONPATH=. python experiments/bench_bn_passes.py fisher   (→ /tmp/fidbn/fisher.json)
Hardware:  2 CPU cores; eval ≈ 5 min, fisher ≈ 30 min on the loaded development machine.
Output:    eval: on a random-weight AlexNet (official sizes), 1,000 coloured-noise test images
           in batches of 64 (the last one holds 40): how many predictions differ from the
           official batching (last batch alone) with the old padding (24 copies of image 0 in
           the batch statistics) and with the masked pass, and the three accuracies.
           fisher: a 2-task BECAME+GPM run on AlexNet (71 = 64 + 7 training images per task,
           2 epochs), identical up to the Fisher pass, in three variants (old: no dropout and
           the padding inside BN; no dropout, masked BN; new default: dropout on, masked BN):
           λ of task 2 and ΣF. The fixture's test images use other colours than its training
           images, so its accuracies mean nothing; only the Fisher/λ comparison is meaningful.
"""
import dataclasses, functools, json, sys
import jax, jax.numpy as jnp, numpy as np
from clx.data.types import ArraySplit, Stream, Task
from clx.methods import build, gpm as gpm_lib, heads as heads_lib, passes
from clx.methods import became as became_lib
from clx.methods.base import StreamSpec, TaskInfo
from clx.models.convnets import alexnet
from clx.ops import merging
from clx.train.loop import TrainConfig, run_method
from clx.train.sharding import make_mesh

def images(rng, n, classes, size=32):
  colours = rng.random((len(classes), 3)).astype(np.float32)
  y = rng.integers(0, len(classes), n)
  x = colours[y][:, None, None, :] + 0.5 * rng.standard_normal((n, size, size, 3))
  return x.astype(np.float32), np.asarray(classes)[y].astype(np.int32)

# (a) evaluation, random-weight AlexNet (official sizes), 1,000 test images, batch 64
what = sys.argv[1]
if what == "eval":
  out = {}
  for seed in (0, 1, 2):
    backbone = alexnet((32, 32, 3), seed=seed)
    spec = StreamSpec(1, 10, "task", (tuple(range(10)),), (32, 32, 3))
    method = gpm_lib.gpm(backbone, project_head=False)
    state = method.init(jax.random.PRNGKey(seed), spec)
    state = {**state, "heads": {"0": {"kernel": heads_lib.init_linear(jax.random.PRNGKey(seed + 9), 2048, 10)["kernel"]}}}
    rng = np.random.default_rng(seed)
    x, y = images(rng, 1000, range(10))
    pred = jax.jit(lambda s, xb, m: method.predict(s, None, xb, TaskInfo(0, spec, 0), mask=m))
    pred_nomask = jax.jit(lambda s, xb: method.predict(s, None, xb, TaskInfo(0, spec, 0)))
    official, before, after = [], [], []
    for start in range(0, 1000, 64):
      xb = x[start:start + 64]
      official.append(np.argmax(np.asarray(pred_nomask(state, xb)), -1))
      n = len(xb)
      padded = np.concatenate([xb, np.repeat(x[:1], 64 - n, 0)]) if n < 64 else xb  # old loop: copies of x[0]
      mask = (np.arange(64) < n).astype(np.float32)
      before.append(np.argmax(np.asarray(pred_nomask(state, padded)), -1)[:n])
      after.append(np.argmax(np.asarray(pred(state, padded, mask)), -1)[:n])
    official, before, after = map(np.concatenate, (official, before, after))
    acc = lambda p: float(100 * np.mean(p == y))
    out[seed] = {"last_batch_rows": 1000 % 64, "changed_before": int(np.sum(before != official)),
                 "changed_after": int(np.sum(after != official)), "acc_official": acc(official),
                 "acc_before": acc(before), "acc_after": acc(after)}
    print(seed, out[seed], flush=True)
  import os; os.makedirs("/tmp/fidbn", exist_ok=True); json.dump(out, open("/tmp/fidbn/eval.json", "w"), indent=1)

# (b) BECAME Fisher on a small AlexNet run: 2 tasks x 71 training images (64 + 7), batch 64
if what == "fisher":
  rng = np.random.default_rng(0)
  tasks = []
  for t in range(2):
    cls = (2 * t, 2 * t + 1)
    xtr, ytr = images(rng, 71, cls); xte, yte = images(rng, 40, cls)
    tasks.append(Task(f"t{t}", ArraySplit({"x": xtr, "y": ytr}), ArraySplit({"x": xte, "y": yte}), cls))
  stream = Stream("noise", tuple(tasks), "task", 4)
  cfg = TrainConfig(epochs=2, batch_size=64, optimizer="sgd", learning_rate=0.05, eval_batch_size=64)
  kw = dict(threshold=0.97, num_samples=50, verbose=False,
            site_samples={"conv1/kernel": 12, "conv2/kernel": 50, "conv3/kernel": 50})
  real_fisher = merging.diagonal_fisher
  real_coef = merging.became_coefficient
  out = {}
  for variant in ("old: no dropout, padding in BN", "no dropout, masked BN", "new default: dropout + masked BN"):
    cap = {}
    def coef(gp, hat, fc, fo, per_leaf=False):
      cap["f_cur"] = sum(float(jnp.sum(a)) for a in jax.tree.leaves(fc))
      return real_coef(gp, hat, fc, fo, per_leaf=per_leaf)
    became_lib.merging.became_coefficient = coef
    if variant.startswith("old"):
      became_lib.merging.diagonal_fisher = functools.partial(
          lambda *a, **k: real_fisher(*a, **{**k, "pass_mask": False, "rng": None}))
    else:
      became_lib.merging.diagonal_fisher = real_fisher
    args = dict(kw, fisher_dropout=variant.startswith("new"))
    res = run_method(build("became_gpm", alexnet((32, 32, 3), seed=0), **args), stream, cfg,
                     mesh=make_mesh(1), quiet=True)
    f_old = sum(float(np.sum(a)) for a in jax.tree.leaves(res.state["fisher"]["backbone"]))
    out[variant] = {"lambda_task2": float(res.state["lambdas"][1]), "sum_F_cur_task2": cap["f_cur"],
                    "sum_F_stored_backbone_after_task2": f_old,
                    "acc_final": [round(float(v), 2) for v in res.acc_matrix[-1]]}
    print(variant, out[variant], flush=True)
  import os; os.makedirs("/tmp/fidbn", exist_ok=True); json.dump(out, open("/tmp/fidbn/fisher.json", "w"), indent=1)
