"""Input pipeline benchmark: host peak RSS over 1 epoch of one task, input vs train-step images/s.

Command:   python experiments/make_synthetic_image_folder.py /tmp/inr6k --num-images 6000
           python experiments/make_synthetic_image_folder.py /tmp/inr24k --num-images 24000
           python experiments/bench_input_pipeline.py /tmp/inr6k /tmp/inr24k
What:      for each folder, in a fresh process: InfLoRA's ImageNet-R split (``random_split``
           80/20, torch seed 0), 10 class-incremental tasks of 20 classes, then ONE epoch of
           task 0 through ``clx.data.pipeline.image_batches`` (RandomResizedCrop(224) + flip,
           decoded per batch in grain threads, uint8 batches scaled to [0, 1] on device) feeding
           a minimal jitted SGD step
           (16x16 patches -> 64-d linear -> mean pool -> 200-way linear, float32) at global
           batch 128. Reports the process's peak RSS (``ru_maxrss``) after the epoch, the RSS
           after setup (imports, split index, compiled step), the epoch's images/s, the input
           pipeline alone (single thread = one core, and with --threads threads), and the step
           alone on a resident batch.
Goal:      (issue 13) peak RSS at 6k vs 24k images within 10 % and <= 3 GB: the pipeline holds
           file paths, never decoded splits.
Hardware:  numbers in experiments/BENCHMARKS.md ("Input pipeline"), 2 shared Xeon cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
  import psutil  # pylint: disable=import-outside-toplevel
  return psutil.Process().memory_info().rss / 2 ** 20


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def run_one(folder: str, batch_size: int, threads: int, input_batches: int,
            args_dtype: str = "uint8") -> dict:
  """One folder, in this process; returns the measurements."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from clx.data import images, pipeline

  t0 = time.perf_counter()
  splits = images.load_image_dataset("imagenet_r", folder, seed=0)
  stream = pipeline.class_incremental_images(splits, pipeline.inflora_increments(200, 20, 20),
                                             name="imagenet_r")
  setup_index_s = time.perf_counter() - t0
  task = stream.tasks[0]

  key1, key2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"w1": jax.random.normal(key1, (768, 64)) * 0.02,
            "w2": jax.random.normal(key2, (64, 200)) * 0.02}

  def loss_fn(p, x, y, mask):
    if x.dtype == jnp.uint8:  # ToTensor on device: the host moves uint8 (4x fewer bytes)
      x = x.astype(jnp.float32) / 255.0
    b = x.shape[0]
    patches = x.reshape(b, 14, 16, 14, 16, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 196, 768)
    logits = jnp.mean(jax.nn.relu(patches @ p["w1"]), axis=1) @ p["w2"]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)  # mean over real rows

  @jax.jit
  def step(p, x, y, mask):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y, mask)
    return jax.tree.map(lambda a, g: a - 0.01 * g, p, grads), loss

  zeros = (jnp.zeros((batch_size, 224, 224, 3), args_dtype), jnp.zeros((batch_size,), jnp.int32),
           jnp.ones((batch_size,), jnp.float32))
  jax.block_until_ready(step(params, *zeros))
  rss_setup = _rss_mb()

  # end-to-end: 1 epoch of task 0
  start, seen, steps, rss_steps, previous = time.perf_counter(), 0, 0, [], None
  for batch in pipeline.image_batches(task.train, batch_size, transform=stream.train_transform,
                                      seed=0, task=0, epoch=0, process_index=0, process_count=1,
                                      num_threads=threads, prefetch=2, dtype=args_dtype):
    params, loss = step(params, batch["x"], batch["y"], batch["mask"].astype(np.float32))
    if previous is not None:  # at most 2 steps in flight (async dispatch would queue batches)
      jax.block_until_ready(previous)
    previous = loss
    seen += int(batch["mask"].sum())
    steps += 1
    rss_steps.append(round(_rss_mb()))
  jax.block_until_ready(loss)
  epoch_s = time.perf_counter() - start
  peak_epoch = _peak_mb()

  def input_only(num_threads: int) -> float:
    it = pipeline.image_batches(task.train, batch_size, transform=stream.train_transform, seed=0,
                                task=0, epoch=1, process_index=0, process_count=1,
                                num_threads=num_threads, prefetch=2, dtype=args_dtype)
    begin, count = time.perf_counter(), 0
    for k, batch in enumerate(it):
      count += int(batch["mask"].sum())
      if k + 1 >= input_batches:
        break
    return count / (time.perf_counter() - begin)

  input_1 = input_only(0)
  input_n = input_only(threads)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), np.uint8))
  x = x if args_dtype == "uint8" else x.astype(jnp.float32) / 255.0
  y, mask = zeros[1], zeros[2]
  jax.block_until_ready(step(params, x, y, mask))
  begin = time.perf_counter()
  for _ in range(5):
    out = step(params, x, y, mask)
  jax.block_until_ready(out)
  step_ips = 5 * batch_size / (time.perf_counter() - begin)
  return {"folder": folder, "images": len(splits["train"]) + len(splits["test"]),
          "task0_train": len(task.train), "steps": steps, "index_s": round(setup_index_s, 2),
          "rss_setup_mb": round(rss_setup), "peak_rss_mb": round(peak_epoch),
          "epoch_s": round(epoch_s, 1), "epoch_ips": round(seen / epoch_s, 1),
          "input_ips_1thread": round(input_1, 1), f"input_ips_{threads}threads": round(input_n, 1),
          "step_ips": round(step_ips, 1), "dtype": args_dtype, "cpu": os.cpu_count(),
          "rss_per_step_mb": rss_steps}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("folders", nargs="*")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--input-batches", type=int, default=4)
  parser.add_argument("--dtype", default="uint8", choices=("uint8", "float32"),
                      help="batches as uint8 (scaled on device) or float32 (scaled on the host)")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.one:
    print(json.dumps(run_one(args.one, args.batch_size, args.threads, args.input_batches,
                             args.dtype)), flush=True)
    return 0
  if not args.folders:
    parser.error("give at least one image folder (make one with make_synthetic_image_folder.py)")
  rows = []
  for folder in args.folders:  # a fresh process each: ru_maxrss is per process
    out = subprocess.run([sys.executable, __file__, "--one", folder, "--batch-size",
                          str(args.batch_size), "--threads", str(args.threads),
                          "--input-batches", str(args.input_batches), "--dtype", args.dtype],
                         check=False, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if out.returncode:
      print(out.stderr, file=sys.stderr)
      raise SystemExit(f"the measurement of {folder} failed (exit {out.returncode}); see above")
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), flush=True)
  if len(rows) == 2:
    a, b = rows
    print(f"peak RSS {a['peak_rss_mb']} MB ({a['images']} images) vs {b['peak_rss_mb']} MB "
          f"({b['images']} images): {100 * (b['peak_rss_mb'] / a['peak_rss_mb'] - 1):+.1f} %", flush=True)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  raise SystemExit(main())
