"""Host passes on N (simulated) devices: GPM's memory update and InfLoRA's design, timed.

Command:   python experiments/bench_host_passes.py [--devices 8] [--samples 300] [--repeat 1]
Hardware:  CPU (N simulated devices via XLA_FLAGS, set by this script before JAX loads).
Run time:  about a minute on 2 cores with --devices 1; the old code took minutes per update
           with --devices 8 (every host pass ran once per device).
Prints:    seconds (wall and process CPU) per GPM memory update of the cifar100_gpm AlexNet (representation pass of
           ``--samples`` images + one SVD per site, 5 sites) with the state replicated on a
           ``data`` mesh of N devices, as the loop places it, after one warm-up update; and the
           time of one InfLoRA design + DualGPM update of a 768-d group (ViT-B shape) from
           replicated Gram/memory inputs, moved to one device first as InfLoRA's
           begin_task/end_task do (``passes.on_one_device``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--samples", type=int, default=300)
  parser.add_argument("--repeat", type=int, default=1)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import types

  import jax
  import jax.numpy as jnp
  import numpy as np

  from clx.methods import gpm as gpm_lib
  from clx.methods.base import StreamSpec
  from clx.methods import inflora as inflora_lib
  from clx.methods import passes
  from clx.models import convnets
  from clx.ops import memory as memory_ops
  from clx.train import sharding

  mesh = sharding.make_mesh()
  print(f"devices: {len(mesh.devices.flat)} ({jax.devices()[0].platform})")
  backbone = convnets.alexnet((32, 32, 3))
  method = gpm_lib.gpm(backbone, threshold=0.97, site_samples=convnets.alexnet_gpm_samples(),
                       head_mode="per_task")
  spec = StreamSpec(10, 100, "task", tuple(tuple(range(10 * t, 10 * t + 10)) for t in range(10)),
                    (32, 32, 3))
  state = sharding.place_state(method.init(jax.random.PRNGKey(0), spec), mesh)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.samples, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, args.samples).astype(np.int32)
  ctx = types.SimpleNamespace(
      task_index=0, spec=spec, sample=lambda n, **_: {"x": x[:n], "y": y[:n]},
      arrays=lambda split="train": {"x": x, "y": y})
  for label in ("warm-up (compiles)", *[f"run {i + 1}" for i in range(args.repeat)]):
    start, cpu = time.perf_counter(), time.process_time()
    new = method.end_task(state, ctx)
    jax.block_until_ready(new)
    print(f"GPM memory update, AlexNet, {args.samples} samples, {label}: "
          f"{time.perf_counter() - start:.2f} s wall, {time.process_time() - cpu:.2f} s CPU; "
          f"ranks {gpm_lib.memory_ranks(new)}")

  d = 768
  cfg = inflora_lib.InfLoRAConfig()
  feats = rng.standard_normal((4096, d)).astype(np.float32)
  gram = sharding.replicate(jnp.asarray(feats.T @ feats / len(feats)), mesh)
  memory = sharding.replicate(memory_ops.empty(d), mesh)
  for label in ("warm-up", *[f"run {i + 1}" for i in range(args.repeat)]):
    start, cpu = time.perf_counter(), time.process_time()
    local_gram, local_memory = passes.on_one_device((gram, memory))  # as begin/end_task do
    a = inflora_lib.design(cfg, local_memory, local_gram)
    mem = inflora_lib.update_memory(cfg, local_memory, local_gram, 0, 10)
    jax.block_until_ready((a, mem))
    print(f"InfLoRA design + DualGPM update, d={d}, {label}: "
          f"{time.perf_counter() - start:.2f} s wall, {time.process_time() - cpu:.2f} s CPU")


if __name__ == "__main__":
  main()
