"""clx.ops.lora against float64 NumPy references and properties."""

from __future__ import annotations

import re

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import lora

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


def make_params(rng, dtype=np.float64):
  return {
      "encoder": {
          "layer_0": {
              "attn": {
                  "query": {"kernel": rng.normal(size=(8, 6)).astype(dtype),
                            "bias": np.zeros(6, dtype)},
                  "value": {"kernel": rng.normal(size=(8, 6)).astype(dtype)},
              },
              "mlp": {"kernel": rng.normal(size=(8, 12)).astype(dtype)},
          },
      },
      "head": {"kernel": rng.normal(size=(8, 3)).astype(dtype)},
  }


def random_adapter(rng, d_in, d_out, rank, stack=None):
  lead = () if stack is None else (stack,)
  return {
      "a": rng.normal(size=lead + (d_in, rank)),
      "b": rng.normal(size=lead + (rank, d_out)),
  }


# ----------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------


def test_path_roundtrip():
  params = make_params(np.random.default_rng(0))
  flat = lora.flatten_paths(params)
  assert set(flat) == {
      "encoder/layer_0/attn/query/kernel",
      "encoder/layer_0/attn/query/bias",
      "encoder/layer_0/attn/value/kernel",
      "encoder/layer_0/mlp/kernel",
      "head/kernel",
  }
  back = lora.unflatten_paths(flat)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  chex.assert_trees_all_equal(back, params)
  leaves, _ = jax.tree_util.tree_flatten_with_path({"a": {"b": 1}})
  assert lora.path_str(leaves[0][0]) == "a/b"


def test_path_errors():
  with pytest.raises(ValueError, match="only dict keys are supported"):
    lora.flatten_paths({"layers": [np.ones(2)]})
  with pytest.raises(ValueError, match="contains '/'"):
    lora.flatten_paths({"a/b": np.ones(2)})
  with pytest.raises(ValueError, match="conflicts"):
    lora.unflatten_paths({"a/b": 1, "a/b/c": 2})
  with pytest.raises(ValueError, match="conflicts"):
    lora.unflatten_paths({"a/b/c": 1, "a/b": 2})


def test_match_paths_glob_and_regex():
  params = make_params(np.random.default_rng(1))
  assert lora.match_paths(params, "*/query/kernel") == [
      "encoder/layer_0/attn/query/kernel"
  ]
  assert lora.match_paths(params, ["*/query/*", "head/kernel"]) == [
      "encoder/layer_0/attn/query/bias",
      "encoder/layer_0/attn/query/kernel",
      "head/kernel",
  ]
  assert lora.match_paths(params, "re:.*/(query|value)/kernel") == [
      "encoder/layer_0/attn/query/kernel",
      "encoder/layer_0/attn/value/kernel",
  ]
  assert lora.match_paths(params, re.compile(r"head/.*")) == ["head/kernel"]
  assert lora.match_paths(params, "re:kernel") == []  # fullmatch, not search
  with pytest.raises(ValueError, match="pattern must be a str or re.Pattern"):
    lora.match_paths(params, [3])


# ----------------------------------------------------------------------------
# Deltas and application
# ----------------------------------------------------------------------------


def test_lora_delta_matches_numpy(x64):
  rng = np.random.default_rng(2)
  adapter = random_adapter(rng, 8, 6, 3)
  np.testing.assert_allclose(
      lora.lora_delta(adapter, 0.5),
      0.5 * adapter["a"] @ adapter["b"],
      atol=1e-12,
  )
  stacked = random_adapter(rng, 8, 6, 3, stack=4)
  expected = np.einsum("sir,sro->sio", stacked["a"], stacked["b"])
  np.testing.assert_allclose(lora.lora_delta(stacked), expected, atol=1e-12)
  vmapped = jax.vmap(lora.lora_delta)(stacked)
  np.testing.assert_allclose(vmapped, expected, atol=1e-12)


def test_apply_adapters_matches_numpy(x64):
  rng = np.random.default_rng(3)
  params = make_params(rng)
  q_path, v_path = "encoder/layer_0/attn/query/kernel", "head/kernel"
  single = random_adapter(rng, 8, 6, 2)
  per_task = [random_adapter(rng, 8, 3, 1) for _ in range(3)]
  out = lora.apply_adapters(params, {q_path: single, v_path: per_task}, 0.25)
  flat_in, flat_out = lora.flatten_paths(params), lora.flatten_paths(out)
  np.testing.assert_allclose(
      flat_out[q_path],
      flat_in[q_path] + 0.25 * single["a"] @ single["b"],
      atol=1e-12,
  )
  expected = flat_in[v_path] + 0.25 * sum(t["a"] @ t["b"] for t in per_task)
  np.testing.assert_allclose(flat_out[v_path], expected, atol=1e-12)
  for path in set(flat_in) - {q_path, v_path}:  # untouched leaves
    np.testing.assert_array_equal(flat_out[path], flat_in[path])
  # A stack axis inside one adapter means the same as a list.
  stacked = {
      "a": np.stack([t["a"] for t in per_task]),
      "b": np.stack([t["b"] for t in per_task]),
  }
  out_stacked = lora.apply_adapters(params, {v_path: stacked}, 0.25)
  np.testing.assert_allclose(
      lora.flatten_paths(out_stacked)[v_path], expected, atol=1e-12
  )
  folded = lora.fold_adapters(params, {q_path: single}, 0.25)
  np.testing.assert_allclose(
      lora.flatten_paths(folded)[q_path], flat_out[q_path], atol=1e-12
  )


def test_apply_adapters_jit_grad_and_dtype():
  rng = np.random.default_rng(4)
  params = jax.tree.map(jnp.asarray, make_params(rng, np.float32))
  path = "encoder/layer_0/mlp/kernel"
  adapters = {path: jax.tree.map(jnp.asarray, random_adapter(rng, 8, 12, 2))}
  adapters = jax.tree.map(lambda x: x.astype(jnp.float32), adapters)
  eager = lora.apply_adapters(params, adapters, 2.0)
  jitted = jax.jit(lora.apply_adapters)(params, adapters, 2.0)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
  # Gradients reach the adapters: loss = Σ x (W + s a b) ⇒ ∂/∂a = s G bᵀ.
  x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)

  def loss(ad):
    kernel = lora.flatten_paths(lora.apply_adapters(params, ad, 2.0))[path]
    return jnp.sum(x @ kernel)

  grads = jax.grad(loss)(adapters)[path]
  g = np.asarray(x).sum(0)[:, None] * np.ones((1, 12))  # ∂loss/∂W
  a, b = (np.asarray(adapters[path][k], np.float64) for k in "ab")
  np.testing.assert_allclose(grads["a"], 2.0 * g @ b.T, rtol=1e-5)
  np.testing.assert_allclose(grads["b"], 2.0 * a.T @ g, rtol=1e-5, atol=1e-5)
  # bf16 base keeps its dtype; the f32 delta is cast down.
  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  out = lora.apply_adapters(bf16, adapters)
  assert lora.flatten_paths(out)[path].dtype == jnp.bfloat16


def test_apply_adapters_errors():
  rng = np.random.default_rng(5)
  params = make_params(rng)
  with pytest.raises(ValueError, match="'encoder/layer_0/attn/key/kernel' not"):
    key_path = "encoder/layer_0/attn/key/kernel"
    lora.apply_adapters(params, {key_path: random_adapter(rng, 8, 6, 2)})
  with pytest.raises(ValueError, match=r"gives delta \(8, 5\) but the kernel"):
    lora.apply_adapters(params, {"head/kernel": random_adapter(rng, 8, 5, 2)})
  with pytest.raises(ValueError, match=r"points at shape \(6,\)"):
    lora.apply_adapters(
        params,
        {"encoder/layer_0/attn/query/bias": random_adapter(rng, 8, 6, 2)},
    )
  with pytest.raises(ValueError, match="needs a \\(d_in, r\\) and b"):
    lora.apply_adapters(
        params, {"head/kernel": {"a": np.ones((8, 2)), "b": np.ones((3, 3))}}
    )
  with pytest.raises(ValueError, match="keys 'a' and 'b'"):
    lora.apply_adapters(params, {"head/kernel": {"a": np.ones((8, 2))}})
  with pytest.raises(ValueError, match="empty adapter list"):
    lora.apply_adapters(params, {"head/kernel": []})


# ----------------------------------------------------------------------------
# init_lora
# ----------------------------------------------------------------------------


def test_init_lora_shapes_bounds_and_zero_delta():
  rng = np.random.default_rng(6)
  params = jax.tree.map(jnp.asarray, make_params(rng, np.float32))
  key = jax.random.key(0)
  adapters = lora.init_lora(key, params, ["*/attn/*", "head/kernel"], 2)
  assert sorted(adapters) == [
      "encoder/layer_0/attn/query/kernel",  # the query bias is skipped
      "encoder/layer_0/attn/value/kernel",
      "head/kernel",
  ]
  for ad in adapters.values():
    assert ad["a"].shape == (8, 2) and ad["a"].dtype == jnp.float32
    assert np.all(np.abs(ad["a"]) <= 1 / np.sqrt(8))  # kaiming_uniform(a=√5)
    np.testing.assert_array_equal(ad["b"], 0.0)
  applied = lora.apply_adapters(params, adapters)  # b = 0: model unchanged
  chex.assert_trees_all_equal(applied, params)
  # Per-path keys: an adapter's init does not depend on the other selections.
  alone = lora.init_lora(key, params, "head/kernel", 2)
  np.testing.assert_array_equal(
      alone["head/kernel"]["a"], adapters["head/kernel"]["a"]
  )
  he = lora.init_lora(key, params, "head/kernel", 2, a_init="he_uniform")
  assert np.abs(he["head/kernel"]["a"]).max() > 1 / np.sqrt(8)
  assert np.all(np.abs(he["head/kernel"]["a"]) <= np.sqrt(6 / 8))
  custom = lora.init_lora(
      key, params, "head/kernel", 2, a_init="zeros",
      b_init=jax.nn.initializers.ones, dtype=jnp.bfloat16,
  )
  assert custom["head/kernel"]["b"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(custom["head/kernel"]["b"], 1.0)
  normal = lora.init_lora(key, params, "*/mlp/kernel", 2, a_init="normal")
  assert normal["encoder/layer_0/mlp/kernel"]["a"].shape == (8, 2)
  # Abstract params (e.g. from jax.eval_shape) are enough: only shapes are read.
  abstract = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params
  )
  from_abstract = lora.init_lora(key, abstract, ["*/attn/*", "head/kernel"], 2)
  np.testing.assert_array_equal(
      from_abstract["head/kernel"]["a"], adapters["head/kernel"]["a"]
  )


def test_init_lora_is_jittable():
  params = jax.tree.map(jnp.asarray, make_params(np.random.default_rng(7)))
  init = jax.jit(lora.init_lora, static_argnames=("patterns", "rank"))
  jitted = init(jax.random.key(1), params, patterns="*/kernel", rank=3)
  eager = lora.init_lora(jax.random.key(1), params, "*/kernel", 3)
  chex.assert_trees_all_equal(jitted, eager)


def test_init_lora_errors():
  params = make_params(np.random.default_rng(8))
  key = jax.random.key(0)
  with pytest.raises(
      ValueError,
      match=r"rank 4 is larger than min\(d_in, d_out\) = 3 for 'head/kernel' "
      r"with kernel \(d_in, d_out\) = \(8, 3\)",
  ):
    lora.init_lora(key, params, "*kernel", 4)
  with pytest.raises(ValueError, match="rank must be a positive int"):
    lora.init_lora(key, params, "*kernel", 0)
  with pytest.raises(ValueError, match="matched no 2-D kernel"):
    lora.init_lora(key, params, "*/key/kernel", 2)
  with pytest.raises(ValueError, match="matched no 2-D kernel"):
    lora.init_lora(key, params, "*/bias", 2)
  with pytest.raises(ValueError, match="a_init must be one of"):
    lora.init_lora(key, params, "*kernel", 2, a_init="glorot")


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------


@SETTINGS
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    n_adapters=st.integers(1, 3),
    scale=st.floats(-2.0, 2.0),
)
def test_property_apply_is_linear_and_fold_matches(seed, n_adapters, scale):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    params = make_params(rng)
    path = "encoder/layer_0/attn/value/kernel"
    adapters = [random_adapter(rng, 8, 6, 2) for _ in range(n_adapters)]
    together = lora.apply_adapters(params, {path: adapters}, scale)
    one_by_one = params
    for adapter in adapters:
      one_by_one = lora.apply_adapters(one_by_one, {path: adapter}, scale)
    chex.assert_trees_all_close(together, one_by_one, rtol=1e-7, atol=1e-10)
    # Removing what was added restores the base (−scale undoes +scale).
    undone = lora.fold_adapters(together, {path: adapters}, -scale)
    chex.assert_trees_all_close(undone, params, rtol=1e-7, atol=1e-10)
    jitted = jax.jit(lora.apply_adapters)(params, {path: adapters}, scale)
    chex.assert_trees_all_close(jitted, together, rtol=1e-7, atol=1e-12)


@SETTINGS
@hypothesis.given(
    keys=st.lists(
        st.text("abcxyz_0123", min_size=1, max_size=4), min_size=1, max_size=4,
        unique=True,
    ),
    depth=st.integers(1, 3),
)
def test_property_flatten_unflatten_roundtrip(keys, depth):
  tree = {}
  for i, key in enumerate(keys):
    node = tree
    for level in range(depth - 1):
      node = node.setdefault(f"{key}{level}", {})
    node[key] = np.full((2,), float(i))
  flat = lora.flatten_paths(tree)
  assert len(flat) == len(keys)
  assert all(len(p.split("/")) == depth for p in flat)
  back = lora.unflatten_paths(flat)
  assert jax.tree.structure(back) == jax.tree.structure(tree)


def test_mixed_ranks_and_disagreeing_adapters(x64):
  rng = np.random.default_rng(9)
  params = make_params(rng)
  mixed = [random_adapter(rng, 8, 6, 1), random_adapter(rng, 8, 6, 3, stack=2)]
  path = "encoder/layer_0/attn/value/kernel"
  out = lora.flatten_paths(lora.apply_adapters(params, {path: mixed}))
  expected = lora.flatten_paths(params)[path] + (
      mixed[0]["a"] @ mixed[0]["b"]
      + np.einsum("sir,sro->io", mixed[1]["a"], mixed[1]["b"])
  )
  np.testing.assert_allclose(out[path], expected, atol=1e-12)
  bad = [random_adapter(rng, 8, 6, 1), random_adapter(rng, 8, 3, 1)]
  with pytest.raises(ValueError, match="disagree on the delta shape"):
    lora.apply_adapters(params, {"head/kernel": bad})


def test_lora_branch_matches_numpy_and_merged_delta(x64):
  """(x a) b in float64 equals x (a b) for one adapter, a list and a stack, with the scale."""
  rng = np.random.default_rng(11)
  x = rng.normal(size=(3, 5, 8))
  one = random_adapter(rng, 8, 6, 3)
  stacked = random_adapter(rng, 8, 6, 2, stack=4)
  listed = [one, stacked, random_adapter(rng, 8, 6, 1)]
  for spec in (one, stacked, listed):
    parts = [spec] if isinstance(spec, dict) else spec
    delta = sum(np.matmul(p["a"], p["b"]).reshape(-1, 8, 6).sum(0) for p in parts)
    got = np.asarray(lora.lora_branch(jnp.asarray(x), spec, 0.7))
    np.testing.assert_allclose(got, 0.7 * x @ delta, rtol=1e-12, atol=1e-12)
    merged = lora.apply_adapters({"w": {"kernel": np.zeros((8, 6))}}, {"w/kernel": spec}, 0.7)
    np.testing.assert_allclose(got, x @ np.asarray(merged["w"]["kernel"]), rtol=1e-12, atol=1e-12)


def test_lora_branch_gradients_match_merged(x64):
  """d/da and d/db of a loss through (x a) b equal those through x (W + a b) (float64)."""
  rng = np.random.default_rng(12)
  x, w = jnp.asarray(rng.normal(size=(7, 8))), jnp.asarray(rng.normal(size=(8, 6)))
  adapter = {k: jnp.asarray(v) for k, v in random_adapter(rng, 8, 6, 3).items()}
  target = jnp.asarray(rng.normal(size=(7, 6)))

  def factored(ad):
    return jnp.sum(jnp.tanh(x @ w + lora.lora_branch(x, ad, 1.3)) * target)

  def merged(ad):
    eff = lora.apply_adapters({"w": {"kernel": w}}, {"w/kernel": ad}, 1.3)["w"]["kernel"]
    return jnp.sum(jnp.tanh(x @ eff) * target)

  g_f, g_m = jax.grad(factored)(adapter), jax.grad(merged)(adapter)
  for k in ("a", "b"):
    np.testing.assert_allclose(np.asarray(g_f[k]), np.asarray(g_m[k]), rtol=1e-12, atol=1e-12)


def test_lora_branch_and_check_adapters_errors():
  x = jnp.ones((2, 5))
  with pytest.raises(ValueError, match="expects inputs with 8 features"):
    lora.lora_branch(x, {"a": jnp.ones((8, 2)), "b": jnp.ones((2, 3))}, path="p/kernel")
  params = make_params(np.random.default_rng(0))
  with pytest.raises(ValueError, match="not found"):
    lora.check_adapters(params, {"encoder/nope/kernel": {"a": np.ones((8, 2)), "b": np.ones((2, 6))}})
  with pytest.raises(ValueError, match="gives delta"):
    lora.check_adapters(params, {"head/kernel": {"a": np.ones((8, 2)), "b": np.ones((2, 6))}})
  with pytest.raises(ValueError, match="2-D"):
    lora.check_adapters(params, {"encoder/layer_0/attn/query/bias": {"a": np.ones((8, 2)),
                                                                     "b": np.ones((2, 6))}})
