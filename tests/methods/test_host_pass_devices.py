"""Host passes run their linear algebra once, on one device, whatever the mesh.

With the method state replicated over 8 devices (as the loop places it), a jitted SVD
of replicated inputs ran one copy per device: `clx rehearse cifar100_gpm --devices 8`
spent > 30 min in GPM's memory update. The check runs in a subprocess with 8
simulated CPU devices (XLA_FLAGS must be set before JAX starts), spies on the inputs
of the memory updates / InfLoRA design, and compares with the 1-device result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_RUNNER = r'''
import json, types
import jax, jax.numpy as jnp, numpy as np
from clx.methods import gpm as gpm_lib, inflora as inflora_lib
from clx.methods.base import StreamSpec
from clx.models.mlp import mlp
from clx.train import sharding

assert len(jax.devices()) == 8
mesh = sharding.make_mesh()
out = {}

def devices(tree):
  return sorted({d.id for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)
                 for d in leaf.devices()})

# -- GPM: representation pass + one SVD per site, state replicated on 8 devices ---------------
backbone = mlp((20,), (16, 12), seed=0)
method = gpm_lib.gpm(backbone, threshold=0.9, num_samples=40)
spec = StreamSpec(2, 4, "task", ((0, 1), (2, 3)), (20,))
rng = np.random.default_rng(0)
x = rng.normal(size=(48, 20)).astype(np.float32)
y = rng.integers(0, 2, 48).astype(np.int32)
ctx = types.SimpleNamespace(task_index=0, spec=spec, sample=lambda n, **_: {"x": x[:n], "y": y[:n]},
                            arrays=lambda split="train": {"x": x, "y": y})
seen = []
jitted = gpm_lib._jitted_update
def spy(rule):
  update = jitted(rule)
  def recorded(memory, rep, eps, **kw):
    seen.append(devices((memory, rep)))
    return update(memory, rep, eps, **kw)
  return recorded
gpm_lib._jitted_update = spy
state = method.init(jax.random.PRNGKey(0), spec)
one = method.end_task(state, ctx)
seen.clear()
placed = sharding.place_state(state, mesh)
eight = method.end_task(placed, ctx)
out["gpm_update_devices"] = seen
out["gpm_max_diff"] = max(float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
                          for a, b in zip(jax.tree.leaves(one["memory"]), jax.tree.leaves(eight["memory"])))
out["gpm_ranks"] = [gpm_lib.memory_ranks(one), gpm_lib.memory_ranks(eight)]
out["gpm_memory_devices"] = devices(eight["memory"])
out["gpm_memory_sharding_kept"] = all(
    a.sharding == b.sharding for a, b in zip(jax.tree.leaves(eight["memory"]),
                                             jax.tree.leaves(placed["memory"])))

# -- InfLoRA: design (begin_task) and DualGPM update (end_task) ----------------------------------
ispec = StreamSpec(2, 4, "class", ((0, 1), (2, 3)), (20,))
inf = inflora_lib.inflora(backbone, sites=("mlp",), lora_rank=2)
calls = []
design, update_memory = inflora_lib.design, inflora_lib.update_memory
def design_spy(cfg, memory, gram):
  calls.append(devices((memory, gram)))
  return design(cfg, memory, gram)
def update_spy(cfg, memory, gram, task, num_tasks):
  calls.append(devices((memory, gram)))
  return update_memory(cfg, memory, gram, task, num_tasks)
inflora_lib.design, inflora_lib.update_memory = design_spy, update_spy

def run_inflora(where):
  base = backbone.params if where is None else sharding.place_base(backbone.params, mesh)
  def batches(split="train", batch_size=None):
    for i in range(0, 48, 16):
      b = {"x": jnp.asarray(x[i:i + 16]), "mask": jnp.ones((16,), jnp.float32)}
      yield b if where is None else jax.device_put(b, sharding.data_sharding(mesh))
  c = types.SimpleNamespace(task_index=0, spec=ispec, rng=jax.random.PRNGKey(1), base=base,
                            batches=batches)
  s = inf.init(jax.random.PRNGKey(0), ispec)
  if where is not None:
    s = sharding.place_state(s, mesh)
  s = inf.begin_task(s, c)
  if where is not None:
    s = sharding.place_state(s, mesh)
  s = {**s, "branches": {"0": {**s["branches"]["0"], "b": jax.tree.map(
      lambda v: v + 0.1, s["branches"]["0"]["b"])}}}
  return s, inf.end_task(s, c)

(s1, e1), (s8, e8) = run_inflora(None), run_inflora("mesh")
out["inflora_calls"] = calls[len(calls) // 2:]
def proj(m):
  m = np.asarray(m, np.float64)
  return m @ m.T
out["inflora_a_diff"] = max(float(np.abs(proj(s1["branches"]["0"]["a"][g]) - proj(s8["branches"]["0"]["a"][g])).max())
                            for g in s1["branches"]["0"]["a"])
out["inflora_memory_diff"] = max(float(np.abs(proj(e1["memory"][g]["basis"]) - proj(e8["memory"][g]["basis"])).max())
                                 for g in e1["memory"])
out["inflora_ranks"] = [[int(e1["memory"][g]["rank"]), int(e8["memory"][g]["rank"])] for g in e1["memory"]]
out["inflora_memory_sharding_kept"] = all(
    a.sharding == b.sharding for a, b in zip(jax.tree.leaves(e8["memory"]), jax.tree.leaves(s8["memory"])))

# -- RanPAC / PROTEUS: the ridge head's λ search and solve (M x M), state on the mesh ------------
from clx.methods import build, proteus as proteus_lib
from clx.ops import ridge as ridge_lib
solves = []  # devices of the inputs of each eager λ search / statistics update
select, accumulate = ridge_lib.select_ridge, ridge_lib.accumulate
def concrete(tree):
  return [leaf for leaf in jax.tree.leaves(tree) if not isinstance(leaf, jax.core.Tracer)]
def select_spy(h, y, **kw):
  solves.append(devices(concrete((h, kw.get("base_gram")))))
  return select(h, y, **kw)
def accumulate_spy(stats, h, y, mask=None):
  if concrete(stats["gram"]):
    solves.append(devices(stats["gram"]))
  return accumulate(stats, h, y, mask)
ridge_lib.select_ridge, ridge_lib.accumulate = select_spy, accumulate_spy
rp = build("ranpac", backbone, rp_dim=512)  # G of 2^18 elements: fsdp shards it
rspec = StreamSpec(2, 4, "class", ((0, 1), (2, 3)), (20,))
yr = rng.integers(0, 2, 48).astype(np.int32)
def run_ranpac(mode):
  base = backbone.params if mode is None else sharding.place_base(backbone.params, mesh, mode)
  def batches(split="train", batch_size=None):
    for i in range(0, 48, 16):
      b = {"x": jnp.asarray(x[i:i + 16]), "y": jnp.asarray(yr[i:i + 16]),
           "mask": jnp.ones((16,), jnp.float32)}
      yield b if mode is None else jax.device_put(b, sharding.data_sharding(mesh))
  c = types.SimpleNamespace(task_index=0, spec=rspec, rng=jax.random.PRNGKey(1), base=base,
                            batches=batches)
  s = rp.init(jax.random.PRNGKey(0), rspec)
  if mode is not None:
    s = sharding.place_state(s, mesh, mode)
  return s, rp.end_task(s, c)
r1 = run_ranpac(None)[1]
out["ranpac"] = {}
for mode in ("replicated", "fsdp"):
  solves.clear()
  s8, r8 = run_ranpac(mode)
  out["ranpac"][mode] = {
      "solve_devices": solves[:],
      "w_out_diff": float(np.abs(np.asarray(r1["w_out"]) - np.asarray(r8["w_out"])).max()),
      "sharding_kept": all(a.sharding == b.sharding for k in ("gram", "xty", "w_out")
                           for a, b in [(r8[k], s8[k])])}
feats = rng.normal(size=(48, 20)).astype(np.float32)
pcfg = proteus_lib.ProteusConfig(rp_dim=64)
ridge0 = {"w_rand": jnp.asarray(rng.normal(size=(20, 64)), jnp.float32),
          "gram": jnp.zeros((64, 64)), "xty": jnp.zeros((64, 4)), "count": jnp.zeros((), jnp.int32),
          "w_out": jnp.zeros((64, 4))}
p1, lam1 = proteus_lib.ridge_head_update(pcfg, ridge0, feats, yr, 4, 0)
solves.clear()
placed_ridge = sharding.place_state(ridge0, mesh)
p8, lam8 = proteus_lib.ridge_head_update(pcfg, placed_ridge, feats, yr, 4, 0)
out["proteus"] = {"solve_devices": solves[:], "lam": [float(lam1), float(lam8)],
                  "w_out_diff": float(np.abs(np.asarray(p1["w_out"]) - np.asarray(p8["w_out"])).max()),
                  "sharding_kept": all(p8[k].sharding == placed_ridge[k].sharding
                                       for k in ("gram", "xty", "w_out"))}

# -- BECAME: the diagonal Fisher pass, parameters on the mesh -------------------------------------
from clx.methods import became as became_lib
from clx.ops import merging
fisher_inputs = []
fisher = merging.diagonal_fisher
def fisher_spy(logits_fn, params, inputs, **kw):
  fisher_inputs.append(devices(concrete((params, inputs, kw.get("rng")))))
  return fisher(logits_fn, params, inputs, **kw)
merging.diagonal_fisher = fisher_spy
bec = became_lib.became(backbone, memory="gpm", threshold=0.9, num_samples=40)
bspec = StreamSpec(2, 4, "task", ((0, 1), (2, 3)), (20,))
bctx = types.SimpleNamespace(task_index=0, spec=bspec, rng=jax.random.PRNGKey(2),
                             arrays=lambda split="train": {"x": x, "y": y})
bstate = bec.begin_task(bec.init(jax.random.PRNGKey(0), bspec), bctx)
bparams = gpm_lib.trainable(bstate, types.SimpleNamespace(task=0, task_id=None, spec=bspec))
def run_fisher(p, s, rng):
  return became_lib.current_head_fisher(backbone, "per_task", p, s, bctx, kind="true",
                                        batch_size=16, rng=rng)
f1 = run_fisher(bparams, bstate, jax.random.PRNGKey(3))
fisher_inputs.clear()
placed_params = sharding.place_state(bparams, mesh)
f8 = run_fisher(placed_params, sharding.place_state(bstate, mesh),
                jax.device_put(jax.random.PRNGKey(3), sharding.replicated(mesh)))
out["became"] = {"fisher_devices": fisher_inputs[:],
                 "diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                             for a, b in zip(jax.tree.leaves(f1), jax.tree.leaves(f8))),
                 "sharding_kept": all(a.sharding == b.sharding for a, b in
                                      zip(jax.tree.leaves(f8), jax.tree.leaves(placed_params)))}

# -- InfLoRA+CA: classifier alignment (batched Cholesky of the class covariances) ----------------
from clx.methods import inflora_ca as ca_lib
from clx.ops import alignment
align_inputs = []
align = alignment.align_classifier
def align_spy(heads, rng, means, covs, scale, **kw):
  align_inputs.append(devices(concrete((heads, rng, means, covs))))
  return align(heads, rng, means, covs, scale, **kw)
alignment.align_classifier = align_spy
cspec = StreamSpec(2, 4, "class", ((0, 1), (2, 3)), (20,))
ca_cfg = ca_lib.InfLoRACAConfig(ca_epochs=2, ca_samples=8)
d = 384  # 2 classes x 384 x 384 covariances: >= 2^18 elements, so fsdp splits them
def spd(n):
  a = rng.normal(size=(n, d, d)).astype(np.float32) / np.sqrt(d)
  return jnp.asarray(a @ np.swapaxes(a, 1, 2) + np.eye(d, dtype=np.float32))
ca_state = {"class_stats": {str(k): {"mean": jnp.asarray(rng.normal(size=(2, d)), jnp.float32),
                                     "cov": spd(2)} for k in (0, 1)},
            "heads": {str(k): {"kernel": jnp.asarray(rng.normal(size=(d, 2)) * 0.1, jnp.float32),
                               "bias": jnp.zeros((2,), jnp.float32)} for k in (0, 1)}}
a1 = ca_lib.align_heads(ca_cfg, ca_state, jax.random.PRNGKey(5), cspec, 1)
align_inputs.clear()
ca_placed = sharding.place_state(ca_state, mesh, "fsdp")
assert len(ca_placed["class_stats"]["0"]["cov"].sharding.device_set) == 8
a8 = ca_lib.align_heads(ca_cfg, ca_placed, jax.device_put(jax.random.PRNGKey(5),
                                                         sharding.replicated(mesh)), cspec, 1)
out["inflora_ca"] = {"align_devices": align_inputs[:],
                     "diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                 for a, b in zip(jax.tree.leaves(a1["heads"]), jax.tree.leaves(a8["heads"]))),
                     "sharding_kept": all(a.sharding == b.sharding for a, b in
                                          zip(jax.tree.leaves(a8["heads"]), jax.tree.leaves(ca_placed["heads"])))}
print("RESULT " + json.dumps(out))
'''


def test_host_pass_linear_algebra_runs_once_on_one_device_of_eight():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _RUNNER], env=env, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  # Every SVD of the 8-device run saw inputs on one device (the old code: all 8).
  assert out["gpm_update_devices"] and all(d == [0] for d in out["gpm_update_devices"])
  assert out["inflora_calls"] and all(d == [0] for d in out["inflora_calls"]), out["inflora_calls"]
  # Same memory as on 1 device; the results go back to the mesh placement of what they replace.
  assert out["gpm_max_diff"] == 0.0
  assert out["gpm_ranks"][0] == out["gpm_ranks"][1]
  assert out["gpm_memory_devices"] == list(range(8)) and out["gpm_memory_sharding_kept"]
  assert out["inflora_a_diff"] < 1e-4 and out["inflora_memory_diff"] < 1e-4
  assert all(r1 == r8 for r1, r8 in out["inflora_ranks"])
  assert out["inflora_memory_sharding_kept"]
  # The ridge heads (RanPAC, PROTEUS): every solve of the λ search and the head on one device,
  # the same head as on 1 device, placed back like the state (the old code: all 8 devices, and
  # `clx rehearse vit_proteus --devices 8` spent > 10 min per task in the λ search).
  for name, got in [*[(f"ranpac/{m}", r) for m, r in out["ranpac"].items()],
                    ("proteus", out["proteus"])]:
    assert got["solve_devices"] and all(d == [0] for d in got["solve_devices"]), (name, got)
    assert got["w_out_diff"] < 1e-5 and got["sharding_kept"], (name, got)
  assert out["proteus"]["lam"][0] == out["proteus"]["lam"][1]
  # BECAME's Fisher pass: once, on one device (the old code: all 8), equal, placed back.
  got = out["became"]
  assert got["fisher_devices"] == [[0]], got
  assert got["diff"] < 1e-6 and got["sharding_kept"], got
  # InfLoRA+CA's alignment: on the old code its Cholesky of fsdp-split covariances ran on all 8
  # devices and never returned (`clx rehearse vit_inflora --devices 8 --methods inflora_ca`).
  got = out["inflora_ca"]
  assert got["align_devices"] == [[0]], got
  assert got["diff"] < 1e-5 and got["sharding_kept"], got
