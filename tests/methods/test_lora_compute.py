"""lora_compute="factored" vs "merged": same loss, gradients and predictions (float tolerance).

Sequential LoRA and InfLoRA (several branches, optionally folded) on a small BERT, with
non-zero adapters so the branch matters; the merged form is the reference (it is the
forward every earlier result used)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.methods import inflora as inflora_lib
from clx.methods.base import StreamSpec, TaskInfo
from clx.methods.sequential import lora
from clx.models.bert import bert

SPEC = StreamSpec(2, 4, "class", ((0, 1), (2, 3)), (8,))
X = jnp.asarray([[101, 5, 6, 7, 9, 102, 0, 0], [101, 8, 11, 102, 0, 0, 0, 0],
                 [101, 15, 16, 17, 19, 12, 13, 102], [101, 3, 102, 0, 0, 0, 0, 0]], jnp.int32)
BATCH = {"x": X, "y": jnp.asarray([0, 1, 1, 0]), "mask": jnp.asarray([1.0, 1.0, 1.0, 0.0])}


def _perturb(tree, key):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [v + 0.2 * jax.random.normal(k, v.shape, v.dtype)
                                      for v, k in zip(leaves, keys)])


def _with_heads(state, d):
  heads = {str(t): {"kernel": 0.1 * jax.random.normal(jax.random.PRNGKey(10 + t), (d, 2)),
                    "bias": jnp.zeros((2,))} for t in range(SPEC.num_tasks)}
  return {**state, "heads": heads}


def _compare(methods, state, params, info, base):
  outs = {}
  for compute, method in methods.items():
    (value, aux), grads = jax.value_and_grad(method.loss, has_aux=True)(
        params, state, base, BATCH, jax.random.PRNGKey(0), info)
    outs[compute] = (value, grads, method.predict(state, base, X, info))
  (v_f, g_f, p_f), (v_m, g_m, p_m) = outs["factored"], outs["merged"]
  np.testing.assert_allclose(float(v_f), float(v_m), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_m)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-4 * float(np.abs(np.asarray(b)).max() + 1e-12))
  np.testing.assert_allclose(np.asarray(p_f), np.asarray(p_m), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(g_m["head"]["kernel"]))) > 0


def test_sequential_lora_factored_matches_merged():
  backbone = bert((8,), seed=4)
  methods = {c: lora(backbone, lora_rank=3, sites=("k", "v"), lora_alpha=6.0, lora_compute=c)
             for c in ("factored", "merged")}
  state = methods["merged"].init(jax.random.PRNGKey(0), SPEC)
  state = _with_heads({**state, "adapters": _perturb(state["adapters"], jax.random.PRNGKey(1))},
                      backbone.feature_dim)
  info = TaskInfo(0, SPEC)
  params = methods["merged"].trainable(state, info)
  _compare(methods, state, params, info, backbone.params)


@pytest.mark.parametrize("fold", [False, True])
def test_inflora_factored_matches_merged_with_two_branches(fold):
  backbone = bert((8,), seed=5)
  methods = {c: inflora_lib.inflora(backbone, lora_rank=2, fold=fold, lora_compute=c)
             for c in ("factored", "merged")}
  layout = inflora_lib.site_layout(backbone, ("k", "v"), 2)
  state = methods["merged"].init(jax.random.PRNGKey(0), SPEC)
  key = jax.random.PRNGKey(2)
  branches = {}
  for t in range(2):
    key, ka, kb = jax.random.split(key, 3)
    branches[str(t)] = {
        "a": {g: 0.3 * jax.random.normal(jax.random.fold_in(ka, i), (d, 2))
              for i, (g, d) in enumerate(layout.group_dim.items())},
        "b": {inflora_lib.tree_ops.to_key(s): 0.3 * jax.random.normal(jax.random.fold_in(kb, i),
                                                                       (2, layout.shapes[s][1]))
              for i, s in enumerate(layout.sites)}}
  state = _with_heads({**state, "branches": branches}, backbone.feature_dim)
  if fold:  # task 0 folded into the dense delta, branch 1 live
    state = inflora_lib.fold_branch(state, layout, 0)
  info = TaskInfo(1, SPEC)
  params = methods["merged"].trainable(state, info)
  _compare(methods, state, params, info, backbone.params)


def test_lora_compute_is_validated_and_factored_needs_linear_sites():
  backbone = bert((8,), seed=4)
  with pytest.raises(ValueError, match="lora_compute must be one of"):
    lora(backbone, lora_rank=2, sites=("k",), lora_compute="fused")
  with pytest.raises(ValueError, match="lora_compute must be one of"):
    inflora_lib.inflora(backbone, lora_compute="fused")
  table = backbone.embedding  # a 2-D parameter, but no nnx.Linear computes x @ it
  with pytest.raises(ValueError, match="not the kernel of an nnx.Linear"):
    inflora_lib.inflora(backbone, sites=(table,), lora_rank=2, lora_compute="factored")
  inflora_lib.inflora(backbone, sites=(table,), lora_rank=2)  # merged (the default) is fine
  assert inflora_lib.InfLoRAConfig().lora_compute == "merged"
