"""AlexNet (GPM CIFAR-100) projected training step: clx vs the official PyTorch step.

Command:   python experiments/bench_alexnet_gpm.py [--torch-python /work/torchenv/bin/python]
           [--steps 60] [--batch 64]
Hardware:  2 CPU cores (any machine; on a GPU run the clx half alone).
Run time:  about 1-2 minutes.
Prints:    ms per training step at batch 64 of clx's GPM step on the 5-layer AlexNet (task > 0:
           conv kernels projected in ``transform_grads``, fc1/fc2 through their inputs, BN
           gradients zeroed, dropout on, plain SGD) measured with the real loop
           (``Fitter.fit``, ``lax.scan`` chunks), and, with ``--torch-python``, the same step
           in PyTorch as the official ``train_projected`` (``g − g.view(O,−1) @ U Uᵀ`` for the
           5 projected weights, BN grads zeroed) on random memories of the official task-2
           ranks, and the ratio clx / PyTorch.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import textwrap
import time

TORCH_REFERENCE = textwrap.dedent("""
    import json, sys, time
    import torch, torch.nn as nn, torch.nn.functional as F
    torch.set_num_threads(2); torch.manual_seed(0)
    steps, batch = int(sys.argv[1]), int(sys.argv[2])
    class AlexNet(nn.Module):
      def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 4, bias=False); self.bn1 = nn.BatchNorm2d(64, track_running_stats=False)
        self.conv2 = nn.Conv2d(64, 128, 3, bias=False); self.bn2 = nn.BatchNorm2d(128, track_running_stats=False)
        self.conv3 = nn.Conv2d(128, 256, 2, bias=False); self.bn3 = nn.BatchNorm2d(256, track_running_stats=False)
        self.fc1 = nn.Linear(1024, 2048, bias=False); self.bn4 = nn.BatchNorm1d(2048, track_running_stats=False)
        self.fc2 = nn.Linear(2048, 2048, bias=False); self.bn5 = nn.BatchNorm1d(2048, track_running_stats=False)
        self.head = nn.Linear(2048, 10, bias=False)
        self.d1, self.d2 = nn.Dropout(0.2), nn.Dropout(0.5)
      def forward(self, x):
        x = F.max_pool2d(self.d1(F.relu(self.bn1(self.conv1(x)))), 2)
        x = F.max_pool2d(self.d1(F.relu(self.bn2(self.conv2(x)))), 2)
        x = F.max_pool2d(self.d2(F.relu(self.bn3(self.conv3(x)))), 2)
        x = self.d2(F.relu(self.bn4(self.fc1(x.flatten(1)))))
        return self.head(self.d2(F.relu(self.bn5(self.fc2(x)))))
    model = AlexNet().train(); opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mats = []
    for d, k in ((48, 20), (576, 200), (512, 200), (1024, 300), (2048, 300)):
      q, _ = torch.linalg.qr(torch.randn(d, k)); mats.append(q @ q.T)
    x = torch.randn(steps * batch, 3, 32, 32); y = torch.randint(0, 10, (steps * batch,))
    def step(i):
      b = slice(i * batch, (i + 1) * batch)
      opt.zero_grad(); F.cross_entropy(model(x[b]), y[b]).backward()
      kk = 0
      for k, (name, p) in enumerate(model.named_parameters()):
        if k < 15 and p.dim() != 1:
          sz = p.grad.size(0)
          p.grad.data = p.grad.data - torch.mm(p.grad.data.view(sz, -1), mats[kk]).view(p.size()); kk += 1
        elif k < 15:
          p.grad.data.fill_(0)
      opt.step()
    for i in range(3): step(i)
    start = time.perf_counter()
    for i in range(steps): step(i)
    print(json.dumps({"step_s": (time.perf_counter() - start) / steps}))
""")


def run_clx(steps: int, batch: int, steps_per_call: int = 0) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from clx.data.types import ArraySplit, Stream, Task
  from clx.methods import build
  from clx.methods.base import StreamSpec, site_key
  from clx.models import convnets
  from clx.train.loop import Fitter, TrainConfig
  from clx.train.sharding import make_mesh

  backbone = convnets.alexnet()
  method = build("gpm", backbone, threshold=0.97, num_samples=125, project_head=False,
                 site_samples=convnets.alexnet_gpm_samples())
  rng = np.random.default_rng(0)
  n = steps * batch
  split = ArraySplit({"x": rng.standard_normal((n, 32, 32, 3)).astype(np.float32),
                      "y": rng.integers(10, 20, n).astype(np.int32)})
  first = ArraySplit({"x": split.x[:8], "y": split.y[:8] - 10})
  stream = Stream("bench", (Task("t0", first, first, tuple(range(10))),
                            Task("t1", split, split.take(np.arange(8)), tuple(range(10, 20)))),
                  "task", 20)
  spec = StreamSpec.from_stream(stream)
  state = method.init(jax.random.PRNGKey(0), spec)
  # Memories of the official task-2 ranks (random orthonormal bases), so task 1 projects.
  ranks = {"conv1/kernel": 20, "conv2/kernel": 200, "conv3/kernel": 200, "fc1/kernel": 300,
           "fc2/kernel": 300}
  for site, k in ranks.items():
    mem = state["memory"][site_key(site)]
    d = mem["basis"].shape[0]
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    mem["basis"] = jnp.zeros((d, d)).at[:, :k].set(q)
    mem["rank"] = jnp.asarray(k, jnp.int32)
  from clx.methods import heads as heads_lib
  for t in (0, 1):
    state["heads"] = heads_lib.add_task_head(state["heads"], jax.random.PRNGKey(t), spec,
                                             backbone.feature_dim, t, "per_task")
  state["task"] = jnp.asarray(1, jnp.int32)
  from clx.methods.base import TaskInfo
  loss = functools.partial(method.loss, info=TaskInfo(1, spec))
  fitter = Fitter(make_mesh(), quiet=True)
  cfg = TrainConfig(epochs=1, batch_size=batch, optimizer="sgd", learning_rate=0.05,
                    steps_per_call=steps_per_call)
  params = method.trainable(state, TaskInfo(1, spec))
  fit = functools.partial(fitter.fit, loss=loss, cfg=cfg, state=state,
                          base=backbone.params, rng=jax.random.PRNGKey(1),
                          transform_grads=method.transform_grads)
  # Every fit compiles its program once: the per-step time is the difference
  # between an epoch of `steps` steps and one of `steps // 4` (compile cancels).
  def timed(m):
    start = time.perf_counter()
    jax.block_until_ready(fit(params, split=split.take(np.arange(m * batch))))
    return time.perf_counter() - start
  short, full = timed(steps // 4), timed(steps)
  return {"step_s": (full - short) / (steps - steps // 4), "compile_and_short_s": short,
          "devices": jax.device_count(), "platform": jax.devices()[0].platform}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch-python", default=None)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  clx = run_clx(args.steps, args.batch)
  print(f"clx AlexNet GPM step (batch {args.batch}, {clx['platform']} x{clx['devices']}): "
        f"{1e3 * clx['step_s']:.1f} ms")
  result = {"clx_step_ms": 1e3 * clx["step_s"]}
  if args.torch_python:
    out = subprocess.run([args.torch_python, "-c", TORCH_REFERENCE, str(args.steps),
                          str(args.batch)], capture_output=True, text=True, check=True)
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    result["torch_step_ms"] = 1e3 * ref["step_s"]
    result["ratio"] = clx["step_s"] / ref["step_s"]
    print(f"PyTorch official-style step: {result['torch_step_ms']:.1f} ms; "
          f"clx / PyTorch = {result['ratio']:.2f}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
