"""MiniLM LoRA train step: clx vs PyTorch in the same run, FLOP/s vs a large matmul, tap overhead.

Command:   python experiments/bench_minilm_lora.py --torch-python /path/to/python-with-torch
           [--batch 32] [--seq 64] [--rank 10] [--steps 10] [--dtype float32|bfloat16]
           [--compute merged factored] [--skip-taps]
Hardware:  2 CPU cores (or a GPU: the clx side runs on JAX's default device; the PyTorch side
           runs on CPU unless --torch-device cuda).
Run time:  about 2-3 minutes on 2 cores.
Prints:    (1) peak FLOP/s of a 2048² float32 matmul in JAX, measured here; (2) clx's LoRA train
           step (all-MiniLM-L6-v2, LoRA rank r on key and value of every layer, everything
           else frozen, Adam) in s/step, tokens/s and achieved FLOP/s, once per LoRA form
           (``merged``: W + a·b formed per site, ``factored``: the branch (x·a)·b), and the
           adapted forward of each form (predict); (3) the same step in
           PyTorch (transformers BertModel + the same LoRA, torch threads = cores) and the
           ratio clx/PyTorch (goal ≤ 0.6); (4) forward throughput with and without Gram
           taps on k/v inputs (goal: taps cost ≤ 10 %); (5) compiled peak temp memory.

FLOPs counted: 2·(matmul params)·tokens for the forward pass plus the attention products,
and the same again for the backward activation gradients (frozen weights get no weight
gradients; LoRA's own flops are negligible at r = 10).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import textwrap
import time

TORCH_STEP = textwrap.dedent("""
    import json, sys, time
    sys.modules.setdefault("torchvision", None)
    import torch
    from transformers import BertModel
    folder, batch, seq, rank, steps, device, threads = sys.argv[1:8]
    batch, seq, rank, steps = int(batch), int(seq), int(rank), int(steps)
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    model = BertModel.from_pretrained(folder, add_pooling_layer=False).to(device)
    model.eval()
    for p in model.parameters():
      p.requires_grad_(False)
    class LoRALinear(torch.nn.Module):
      def __init__(self, base, r):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.empty(r, base.in_features, device=device).uniform_(-base.in_features ** -0.5, base.in_features ** -0.5))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, r, device=device))
      def forward(self, x):
        return self.base(x) + (x @ self.a.T) @ self.b.T
    for layer in model.encoder.layer:
      layer.attention.self.key = LoRALinear(layer.attention.self.key, rank)
      layer.attention.self.value = LoRALinear(layer.attention.self.value, rank)
    head = torch.nn.Linear(model.config.hidden_size, 2).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    ids = torch.randint(1000, 2000, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    y = torch.randint(0, 2, (batch,), device=device)
    def step():
      opt.zero_grad()
      h = model(input_ids=ids, attention_mask=mask).last_hidden_state
      feats = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
      loss = torch.nn.functional.cross_entropy(head(feats), y)
      loss.backward()
      opt.step()
    for _ in range(2):
      step()
    if device == "cuda":
      torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
      step()
    if device == "cuda":
      torch.cuda.synchronize()
    print(json.dumps({"s_per_step": (time.perf_counter() - t) / steps}))
""")


def _time(fn, *args, steps: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def matmul_peak(n: int = 2048, dtype="float32") -> float:
  import jax
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  return 2 * n ** 3 / _time(f, a, steps=5)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch-python", default=None)
  parser.add_argument("--torch-device", default="cpu")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--rank", type=int, default=10)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--compute", nargs="+", default=["merged", "factored"],
                      choices=["merged", "factored"],
                      help="LoRA forward forms to time: W + a b merged per site, or (x a) b")
  parser.add_argument("--skip-taps", action="store_true", help="skip the Gram-tap forward timing")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import optax

  from clx.models import bert as bert_lib
  from clx.models import hub
  from clx.ops import lora

  threads = os.cpu_count() or 1
  peak = matmul_peak(dtype=args.dtype)
  print(f"matmul peak (2048², {args.dtype}, JAX): {peak / 1e9:.1f} GFLOP/s")

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  backbone = bert_lib.from_pretrained("all-MiniLM-L6-v2", dtype=dtype)
  sites = backbone.site_paths(("k", "v"))
  adapters = lora.init_lora(jax.random.PRNGKey(0), backbone.params, list(sites), args.rank)
  head = {"kernel": jnp.zeros((backbone.feature_dim, 2)), "bias": jnp.zeros((2,))}
  params = {"adapters": adapters, "head": head}
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)
  ids = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq), 1000, 2000).astype(jnp.int32)
  y = jax.random.randint(jax.random.PRNGKey(2), (args.batch,), 0, 2)

  def features(p, base, ids, compute):
    if compute == "factored":  # (x a) b at each site, W untouched
      return backbone.apply(base, ids, adapters=p["adapters"])
    return backbone.apply(lora.apply_adapters(base, p["adapters"]), ids)  # W + a b per site

  def loss_fn(p, base, ids, y, compute):
    feats = features(p, base, ids, compute)
    logits = feats.astype(jnp.float32) @ p["head"]["kernel"] + p["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @functools.partial(jax.jit, static_argnames="compute")
  def train_step(p, s, base, ids, y, compute):
    loss, g = jax.value_and_grad(loss_fn)(p, base, ids, y, compute)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  flat = lora.flatten_paths(backbone.params)
  matmul_params = sum(v.size for k, v in flat.items() if k.endswith("kernel") and v.ndim == 2)
  layers = sum(1 for s in sites if s.endswith("key/kernel"))
  tokens = args.batch * args.seq
  d = backbone.feature_dim
  attn = 2 * 2 * args.batch * args.seq * args.seq * d * layers
  flops = 2 * (2 * matmul_params * tokens + attn)
  step_times = {}
  for compute in args.compute:
    step_s = step_times[compute] = _time(
        lambda p, s, c=compute: train_step(p, s, backbone.params, ids, y, c), params, opt_state,
        steps=args.steps)
    print(f"clx LoRA step, {compute} (batch {args.batch}, seq {args.seq}, r {args.rank} on k,v): "
          f"{step_s * 1e3:.1f} ms/step, {tokens / step_s:,.0f} tokens/s, "
          f"{flops / step_s / 1e9:.1f} GFLOP/s = {flops / step_s / peak:.2f} of matmul peak")
    compiled = train_step.lower(params, opt_state, backbone.params, ids, y, compute).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
      print(f"  compiled temp memory: {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
            f"arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:  # XLA's count for the compiled step: load-independent
      print(f"  compiled step: {cost['flops'] / 1e9:.2f} GFLOP (XLA cost analysis)")
  if len(step_times) == 2:
    print(f"ratio factored / merged step time: "
          f"{step_times['factored'] / step_times['merged']:.3f}")
  eval_times = {}
  for compute in args.compute:
    fwd_ad = jax.jit(lambda p, base, ids, c=compute: features(p, base, ids, c))
    eval_times[compute] = _time(fwd_ad, params, backbone.params, ids, steps=args.steps)
    print(f"adapted forward (predict), {compute}: {tokens / eval_times[compute]:,.0f} tokens/s")

  if not args.skip_taps:
    fwd = jax.jit(lambda base, ids: backbone.apply(base, ids))
    fwd_taps = jax.jit(lambda base, ids: backbone.apply(base, ids, taps="gram", tap_sites=("k", "v")))
    fwd_all = jax.jit(lambda base, ids: backbone.apply(base, ids, taps="gram"))
    t_fwd = _time(fwd, backbone.params, ids, steps=args.steps)
    t_taps = _time(fwd_taps, backbone.params, ids, steps=args.steps)
    t_all = _time(fwd_all, backbone.params, ids, steps=args.steps)
    print(f"forward: {tokens / t_fwd:,.0f} tokens/s; with Gram taps on the k/v inputs (InfLoRA): "
          f"{tokens / t_taps:,.0f} tokens/s -> tap overhead {100 * (t_taps / t_fwd - 1):.1f} %; "
          f"taps on all sites incl. the 1536-d MLP input: {100 * (t_all / t_fwd - 1):.1f} %")

  if args.torch_python:
    folder = str(hub.resolve("all-MiniLM-L6-v2").path)
    out = subprocess.run([args.torch_python, "-c", TORCH_STEP, folder, str(args.batch), str(args.seq),
                          str(args.rank), str(args.steps), args.torch_device, str(threads)],
                         capture_output=True, text=True)
    if out.returncode != 0:
      print("PyTorch reference failed:", out.stderr[-2000:])
      return
    ref = json.loads(out.stdout.strip().splitlines()[-1])["s_per_step"]
    print(f"PyTorch LoRA step (same shapes): {ref * 1e3:.1f} ms/step, "
          f"{flops / ref / 1e9:.1f} GFLOP/s = {flops / ref / peak:.2f} of matmul peak")
    for compute, step_s in step_times.items():
      print(f"ratio clx ({compute}) / PyTorch step time: {step_s / ref:.2f} (goal <= 0.6)")


if __name__ == "__main__":
  main()
