"""PMNIST GPM speed: clx's full 10-task run vs the official PyTorch training step, same sitting.

Command:   python experiments/bench_pmnist_gpm.py [--torch-python /path/to/python-with-torch]
           [--seed 2] [--tasks 10] [--reference-steps 5400]
Hardware:  2 CPU cores (the official code's anchor, 617 s for the full run, was measured on
           this machine kind: ../shared/research/gpm_pmnist_peer.md).
Run time:  the clx run (a couple of minutes) plus ~1 minute for the PyTorch reference.
Prints:    clx's wall time for the whole run (training, evaluation after every task, memory
           updates), its ms per training step, the PyTorch reference's ms per step measured
           in this run (a replica of the official ``train``/``train_projected`` loops:
           MLP 784-100-100-10 without biases, plain SGD lr 0.01, batch 10, projection
           ``g - g·(U Uᵀ)`` of every weight for tasks > 0) and the ratios. The official full
           run spends ~94 % of its 617 s in those loops, so the step ratio is the ratio of
           the runs up to evaluation overheads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import textwrap
import time

TORCH_REFERENCE = textwrap.dedent("""
    import json, sys, time
    import numpy as np, torch
    torch.set_num_threads(2)
    torch.manual_seed(0)
    steps, rank = int(sys.argv[1]), int(sys.argv[2])
    class MLPNet(torch.nn.Module):
      def __init__(self):
        super().__init__()
        self.lin1 = torch.nn.Linear(784, 100, bias=False)
        self.lin2 = torch.nn.Linear(100, 100, bias=False)
        self.fc1 = torch.nn.Linear(100, 10, bias=False)
      def forward(self, x):
        return self.fc1(torch.relu(self.lin2(torch.relu(self.lin1(x)))))
    x = torch.randn(steps * 10, 784); y = torch.randint(0, 10, (steps * 10,))
    def run(project):
      model = MLPNet(); opt = torch.optim.SGD(model.parameters(), lr=0.01)
      crit = torch.nn.CrossEntropyLoss()
      mats = []
      for d, k in ((784, rank), (100, 80), (100, 80)):
        q, _ = torch.linalg.qr(torch.randn(d, k))
        mats.append(q @ q.T)
      r = torch.randperm(x.size(0))
      start = time.perf_counter()
      for i in range(0, len(r), 10):
        b = r[i:i + 10]
        opt.zero_grad()
        loss = crit(model(x[b]), y[b])
        loss.backward()
        if project:
          for k, p in enumerate(model.parameters()):
            sz = p.grad.data.size(0)
            p.grad.data = p.grad.data - torch.mm(p.grad.data.view(sz, -1), mats[k]).view(p.size())
        opt.step()
      return (time.perf_counter() - start) / steps
    print(json.dumps({"plain_s": run(False), "projected_s": run(True)}))
""")


def run_clx(seed: int, tasks: int) -> dict:
  import dataclasses

  from clx.data import get_stream
  from clx.methods.gpm import gpm, memory_ranks
  from clx.models.mlp import mlp
  from clx.ops import metrics
  from clx.train.loop import TrainConfig, run_method
  from clx.train.sharding import make_mesh

  stream = get_stream("pmnist", seed=seed)
  stream = dataclasses.replace(stream, tasks=stream.tasks[:tasks])
  backbone = mlp(stream.input_shape, (100, 100), use_bias=False, seed=seed)
  method = gpm(backbone, threshold=(0.95, 0.99, 0.99), num_samples=300)
  cfg = TrainConfig(epochs=5, batch_size=10, optimizer="sgd", learning_rate=0.01,
                    eval_batch_size=1000)
  start = time.perf_counter()
  result = run_method(method, stream, cfg, seed=seed, mesh=make_mesh(1), quiet=True)
  wall = time.perf_counter() - start
  steps = tasks * 5 * len(stream.tasks[0].train) // 10
  return {"wall_s": wall, "steps": steps, "ms_per_step_incl_eval": 1e3 * wall / steps,
          **metrics.summarize_to_floats(result.acc_matrix), "ranks": memory_ranks(result.state)}


def run_seed_batch(seeds: list[int], tasks: int) -> dict:
  """The same GPM run for several seeds: batched in one program vs one after another."""
  import dataclasses

  import numpy as np

  from clx.data import get_stream
  from clx.methods.gpm import gpm
  from clx.models.mlp import mlp
  from clx.ops import metrics
  from clx.train.loop import TrainConfig, run_method
  from clx.train.seeds import run_seeds
  from clx.train.sharding import make_mesh

  streams = [get_stream("pmnist", seed=s) for s in seeds]
  streams = [dataclasses.replace(st, tasks=st.tasks[:tasks]) for st in streams]
  backbone = mlp(streams[0].input_shape, (100, 100), use_bias=False, seed=seeds[0])
  method = gpm(backbone, threshold=(0.95, 0.99, 0.99), num_samples=300)
  cfg = TrainConfig(epochs=5, batch_size=10, optimizer="sgd", learning_rate=0.01,
                    eval_batch_size=1000)
  start = time.perf_counter()
  batched = run_seeds(method, streams, cfg, seeds, mesh=make_mesh(1), quiet=True)
  t_batched = time.perf_counter() - start
  start = time.perf_counter()
  singles = [run_method(method, st, cfg, seed=s, mesh=make_mesh(1), quiet=True)
             for st, s in zip(streams, seeds)]
  t_singles = time.perf_counter() - start
  diff = max(float(np.nanmax(np.abs(b.acc_matrix - s.acc_matrix))) for b, s in zip(batched, singles))
  accs = [metrics.summarize_to_floats(b.acc_matrix)["acc"] for b in batched]
  return {"batched_s": t_batched, "singles_s": t_singles, "max_acc_diff": diff, "accs": accs}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch-python", default=None,
                      help="a Python with torch installed, for the reference (skipped if absent)")
  parser.add_argument("--seed", type=int, default=2)
  parser.add_argument("--tasks", type=int, default=10)
  parser.add_argument("--reference-steps", type=int, default=5400)
  parser.add_argument("--seed-batch", default="", help="e.g. 2,3,4,5,6: also time these seeds "
                      "batched in one program vs one after another (on --seed-batch-tasks tasks)")
  parser.add_argument("--seed-batch-tasks", type=int, default=3)
  parser.add_argument("--skip-single", action="store_true", help="skip the single full run")
  args = parser.parse_args()
  if args.seed_batch:
    seeds = [int(s) for s in args.seed_batch.split(",")]
    r = run_seed_batch(seeds, args.seed_batch_tasks)
    print(f"{len(seeds)} seeds x {args.seed_batch_tasks} tasks: batched in one program "
          f"{r['batched_s']:.1f} s, one after another {r['singles_s']:.1f} s -> speed-up "
          f"{r['singles_s'] / r['batched_s']:.2f}x; max accuracy difference {r['max_acc_diff']:.4f}; "
          f"ACC per seed {[round(a, 2) for a in r['accs']]}")
    if args.skip_single:
      return

  clx_result = run_clx(args.seed, args.tasks)
  print(f"clx GPM PMNIST ({args.tasks} tasks, seed {args.seed}): wall {clx_result['wall_s']:.1f} s, "
        f"{clx_result['ms_per_step_incl_eval']:.3f} ms/step including evaluation and memory updates; "
        f"ACC {clx_result['acc']:.2f} BWT {clx_result['bwt']:.2f}; ranks {clx_result['ranks']}")
  print("official code anchor (same machine kind, peer run): 617.2 s for 10 tasks "
        f"-> ratio {clx_result['wall_s'] / 617.2 * 10 / args.tasks:.3f}")
  if args.torch_python:
    out = subprocess.run([args.torch_python, "-c", TORCH_REFERENCE, str(args.reference_steps),
                          str(400)], capture_output=True, text=True, check=True)
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    # The official run: 1 plain task and (tasks - 1) projected tasks of 27,000 steps each.
    ref_total = 27000 * (ref["plain_s"] + (args.tasks - 1) * ref["projected_s"])
    print(f"PyTorch reference, this run: {1e3 * ref['plain_s']:.3f} ms/step plain, "
          f"{1e3 * ref['projected_s']:.3f} ms/step projected -> {ref_total:.0f} s of training "
          f"steps for {args.tasks} tasks")
    print(f"ratio clx whole run / PyTorch training steps alone: {clx_result['wall_s'] / ref_total:.3f}")


if __name__ == "__main__":
  main()
