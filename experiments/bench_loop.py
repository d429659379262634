"""Training-loop step throughput on 1 device vs N simulated CPU devices (data parallel).

Command:   python experiments/bench_loop.py [--devices 4] [--steps 3000] [--batch 64]
Hardware:  any CPU (the N devices are simulated with
           XLA_FLAGS=--xla_force_host_platform_device_count=N, so they share the cores).
Run time:  about a minute.
Prints:    steps/s and examples/s of the jitted, scanned, sharded training step for each
           device count, measured in the same run, and the ratio N-device / 1-device. On a
           2-core machine N simulated devices cannot be faster than 1 (same cores, plus
           the all-reduce): the ratio measures the sharding overhead, not a speed-up.

Each device count runs in its own subprocess because the number of host devices is fixed
when JAX starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _measure(devices: int, steps: int, batch: int, hidden: int) -> dict:
  import jax
  import numpy as np

  from clx.data.types import ArraySplit
  from clx.methods.base import StreamSpec, TaskInfo
  from clx.methods.sequential import finetune
  from clx.models.mlp import mlp
  from clx.train.loop import Fitter, TrainConfig
  from clx.train.sharding import make_mesh, replicate

  rng = np.random.default_rng(0)
  n = steps * batch
  split = ArraySplit({"x": rng.normal(size=(n, 784)).astype(np.float32),
                      "y": rng.integers(0, 10, n).astype(np.int32)})
  backbone = mlp((784,), (hidden, hidden), seed=0)
  method = finetune(backbone)
  spec = StreamSpec(1, 10, "domain", (tuple(range(10)),), (784,))
  mesh = make_mesh(devices)
  state = replicate(method.init(jax.random.PRNGKey(0), spec), mesh)
  base = replicate(backbone.params, mesh)
  info = TaskInfo(0, spec)
  params = method.trainable(state, info)
  loss = lambda p, s, b, batch, r: method.loss(p, s, b, batch, r, info)  # noqa: E731
  cfg = TrainConfig(epochs=1, batch_size=batch, optimizer="sgd", learning_rate=0.01)
  fitter = Fitter(mesh, progress=False, quiet=True)
  # Warm-up (compile) on a short split, then time a full epoch.
  fitter.fit(params, loss, split.take(np.arange(batch * 10)), cfg, state=state, base=base,
             rng=jax.random.PRNGKey(1))
  start = time.perf_counter()
  out = fitter.fit(params, loss, split, cfg, state=state, base=base, rng=jax.random.PRNGKey(1))
  jax.block_until_ready(out)
  elapsed = time.perf_counter() - start
  return {"devices": devices, "steps": steps, "batch": batch, "seconds": elapsed,
          "steps_per_s": steps / elapsed, "examples_per_s": steps * batch / elapsed}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=4)
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=100)
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(_measure(args.child, args.steps, args.batch, args.hidden)))
    return
  results = []
  for n in (1, args.devices):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={max(n, 1)}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, __file__, "--child", str(n), "--steps", str(args.steps),
                          "--batch", str(args.batch), "--hidden", str(args.hidden)],
                         env=env, capture_output=True, text=True, check=True)
    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
  for r in results:
    print(f"{r['devices']} device(s): {r['steps_per_s']:8.1f} steps/s  "
          f"{r['examples_per_s']:10.0f} examples/s  ({r['steps']} steps of {r['batch']} in "
          f"{r['seconds']:.2f} s)")
  ratio = results[1]["steps_per_s"] / results[0]["steps_per_s"]
  print(f"ratio {args.devices}-device / 1-device throughput: {ratio:.2f}")


if __name__ == "__main__":
  main()
