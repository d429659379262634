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
import dataclasses
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


def _step_rates(log_dir: Path, min_epoch: int) -> list[float]:
  """examples/s of every logged training step from epoch ``min_epoch`` on (metrics.jsonl)."""
  rates = []
  for line in (log_dir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if record.get("kind") == "step" and record["epoch"] >= min_epoch:
      rates.append(record["examples_per_s"])
  return rates


def run_loop(folder: str, batch_size: int, threads: int, input_batches: int) -> dict:
  """One folder through the training loop itself (``clx.train.run_method``), in this process.

  InfLoRA (rank 4 on k and v) on a tiny random-weight ViT at 224² (``variant="test"``: 2
  blocks of width 32, so the step is cheap and the figures are about the input side) trains
  task 0 of the ImageNet-R stream for one epoch, streamed from the folder
  (``clx.data.pipeline.streaming_stream``: RandomResizedCrop(224) + flip for the epoch and
  both Gram passes, Resize(256) + CenterCrop(224) for the evaluation).
  """
  import tempfile

  import numpy as np
  from clx import methods
  from clx.data import images, pipeline
  from clx.data.types import ArraySplit, Stream, Task
  from clx.models.vit import vit
  from clx.train import logging as run_logging
  from clx.train.batches import is_streaming
  from clx.train.loop import TrainConfig, run_method

  t0 = time.perf_counter()
  image_stream = pipeline.official_image_stream("imagenet_r", root=folder, num_tasks=10)
  full = pipeline.streaming_stream(image_stream, num_threads=threads, prefetch=2)
  stream = Stream(full.name, full.tasks[:1], full.scenario, full.num_classes)
  index_s = time.perf_counter() - t0
  task = stream.tasks[0]
  assert is_streaming(task.train)
  backbone = vit(stream.input_shape, variant="test", seed=0)
  method = methods.build("inflora", backbone, lora_rank=4, sites=["k", "v"])
  cfg = TrainConfig(epochs=1, batch_size=batch_size, optimizer="adam", learning_rate=5e-4,
                    eval_batch_size=batch_size, steps_per_call=1)
  rss_setup = _rss_mb()
  with tempfile.TemporaryDirectory() as tmp:
    logger = run_logging.RunLogger(Path(tmp) / "stream", tensorboard=False, enabled=True)
    start = time.perf_counter()
    result = run_method(method, stream, cfg, seed=0, quiet=True, logger=logger)
    task_s = time.perf_counter() - start
    peak = _peak_mb()
    loop_rates = _step_rates(Path(tmp) / "stream", 0)[1:]  # the first step compiles

    def input_only(num_threads: int) -> float:
      split = dataclasses.replace(task.train, num_threads=num_threads)
      full_batches = max(1, min(input_batches, len(split) // batch_size))
      rows = np.arange(full_batches * batch_size).reshape(-1, batch_size) % len(split)
      begin = time.perf_counter()
      count = sum(int(b["mask"].sum()) for b in split.step_batches(rows, (0, 0, 0, 1)))
      return count / (time.perf_counter() - begin)

    input_1, input_n = input_only(0), input_only(threads)
    # The step alone: the same method and step on 2 resident batches of random pixels, epoch 2.
    rng = np.random.default_rng(0)
    n = 2 * batch_size
    x = rng.random((n, *stream.input_shape), dtype=np.float32)
    y = np.resize(np.asarray(task.train.y, np.int32), n)
    resident = Stream("random", (Task(task.name, ArraySplit({"x": x, "y": y}),
                                      ArraySplit({"x": x[:8], "y": y[:8]}), task.classes),),
                      stream.scenario, stream.num_classes)
    logger = run_logging.RunLogger(Path(tmp) / "resident", tensorboard=False, enabled=True)
    run_method(method, resident, dataclasses.replace(cfg, epochs=3), seed=0, quiet=True,
               logger=logger)
    step_rates = _step_rates(Path(tmp) / "resident", 1)
  steps = -(-len(task.train) // batch_size)
  # images decoded in the task: 2 Gram passes + 1 epoch over train, 1 evaluation over test
  decoded = 3 * len(task.train) + len(task.test)
  return {"folder": folder, "mode": "loop", "images": sum(len(t.train) + len(t.test)
                                                          for t in full.tasks),
          "task0_train": len(task.train), "task0_test": len(task.test), "steps": steps,
          "index_s": round(index_s, 2), "rss_setup_mb": round(rss_setup),
          "peak_rss_mb": round(peak), "task_s": round(task_s, 1),
          "task_decoded_ips": round(decoded / task_s, 1),
          "loop_step_ips_median": round(float(np.median(loop_rates)), 1) if loop_rates else None,
          "input_ips_1thread": round(input_1, 1), f"input_ips_{threads}threads": round(input_n, 1),
          "step_ips_median": round(float(np.median(step_rates)), 1),
          "acc": float(result.acc_matrix[0, 0]), "cpu": os.cpu_count()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("folders", nargs="*")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--input-batches", type=int, default=4)
  parser.add_argument("--dtype", default="uint8", choices=("uint8", "float32"),
                      help="batches as uint8 (scaled on device) or float32 (scaled on the host)")
  parser.add_argument("--loop", action="store_true",
                      help="measure the training loop itself (run_method, InfLoRA on a tiny ViT) "
                      "streaming the folder, instead of a minimal step over image_batches")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.one:
    row = (run_loop(args.one, args.batch_size, args.threads, args.input_batches) if args.loop
           else run_one(args.one, args.batch_size, args.threads, args.input_batches, args.dtype))
    print(json.dumps(row), flush=True)
    return 0
  if not args.folders:
    parser.error("give at least one image folder (make one with make_synthetic_image_folder.py)")
  rows = []
  for folder in args.folders:  # a fresh process each: ru_maxrss is per process
    out = subprocess.run([sys.executable, __file__, "--one", folder, "--batch-size",
                          str(args.batch_size), "--threads", str(args.threads),
                          "--input-batches", str(args.input_batches), "--dtype", args.dtype,
                          *(["--loop"] if args.loop else [])],
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
