"""Backbone.apply(adapters=...): the factored LoRA branch (x a) b against merged W + a b.

Float64 where the backbone computes in the input dtype (the MLP); the transformer
backbones compute in float32 by construction, so they are compared in float32 with
a tolerance (the two forms differ only in rounding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.models.bert import bert
from clx.models.llama import llama
from clx.models.mlp import mlp
from clx.models.vit import vit
from clx.ops import lora


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _adapters(key, backbone, roles, rank=3, stack=None):
  """Random adapters (non-zero b) on the kernels of ``roles``; a stack axis if ``stack``."""
  out = {}
  for i, path in enumerate(backbone.site_paths(roles)):
    d_in, d_out = np.shape(lora.flatten_paths(backbone.params)[path])
    ka, kb = jax.random.split(jax.random.fold_in(key, i))
    lead = () if stack is None else (stack,)
    out[path] = {"a": 0.3 * jax.random.normal(ka, lead + (d_in, rank)),
                 "b": 0.3 * jax.random.normal(kb, lead + (rank, d_out))}
  return out


def _case(which):
  if which == "bert":
    backbone = bert((8,), seed=1)
    x = jnp.asarray([[101, 5, 6, 7, 9, 102, 0, 0], [101, 8, 11, 102, 0, 0, 0, 0]], jnp.int32)
    return backbone, x, ("k", "v", "mlp_in")
  if which == "vit":
    backbone = vit((16, 16, 3), variant="test", patch_size=8, seed=1)
    return backbone, jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 3)), ("q", "v", "o")
  backbone = llama((8,), seed=1)
  x = jax.random.randint(jax.random.PRNGKey(4), (2, 8), 1, 200).astype(jnp.int32)
  return backbone, x, ("k", "v", "mlp")


@pytest.mark.parametrize("which", ["bert", "vit", "llama"])
def test_factored_equals_merged_features_and_gradients(which):
  backbone, x, roles = _case(which)
  adapters = _adapters(jax.random.PRNGKey(0), backbone, roles)
  scale = 0.8

  def factored(ad):
    return backbone.apply(backbone.params, x, adapters=ad, adapter_scale=scale)

  def merged(ad):
    return backbone.apply(lora.apply_adapters(backbone.params, ad, scale), x)

  f, m = factored(adapters), merged(adapters)
  base = backbone.apply(backbone.params, x)
  assert float(jnp.max(jnp.abs(m - base))) > 1e-3  # the adapters really change the features
  np.testing.assert_allclose(np.asarray(f), np.asarray(m), rtol=2e-5, atol=2e-5)
  w = jax.random.normal(jax.random.PRNGKey(5), f.shape)
  g_f = jax.grad(lambda ad: jnp.sum(factored(ad) * w))(adapters)
  g_m = jax.grad(lambda ad: jnp.sum(merged(ad) * w))(adapters)
  for path in adapters:
    for k in ("a", "b"):
      ref = np.asarray(g_m[path][k])
      np.testing.assert_allclose(np.asarray(g_f[path][k]), ref, rtol=1e-4,
                                 atol=1e-4 * np.abs(ref).max())


def test_mlp_factored_matches_float64_reference(x64):
  """Stacked adapters (InfLoRA's form) through an MLP in float64 against NumPy."""
  backbone = mlp((12,), (10, 7), seed=2)
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), backbone.params)
  adapters = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64),
                          _adapters(jax.random.PRNGKey(1), backbone, ("mlp",), rank=2, stack=3))
  x = np.random.default_rng(0).normal(size=(5, 12))
  got = backbone.apply(params, jnp.asarray(x), adapters=adapters, adapter_scale=0.5)
  h = x
  for name in ("lin1", "lin2"):
    ad = adapters[f"{name}/kernel"]
    w = np.asarray(params[name]["kernel"]) + 0.5 * np.einsum(
        "sir,sro->io", np.asarray(ad["a"]), np.asarray(ad["b"]))
    h = np.maximum(h @ w, 0.0)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), h, rtol=1e-12, atol=1e-12)


def test_factored_adapters_leave_base_and_other_calls_untouched():
  backbone, x, roles = _case("bert")
  before = backbone.apply(backbone.params, x)
  backbone.apply(backbone.params, x, adapters=_adapters(jax.random.PRNGKey(0), backbone, roles))
  np.testing.assert_array_equal(np.asarray(backbone.apply(backbone.params, x)), np.asarray(before))
  zero = jax.tree.map(jnp.zeros_like, _adapters(jax.random.PRNGKey(0), backbone, roles))
  np.testing.assert_allclose(np.asarray(backbone.apply(backbone.params, x, adapters=zero)),
                             np.asarray(before), atol=1e-6)


def test_factored_adapter_errors():
  backbone, x, _ = _case("bert")
  table = "embeddings/word_embeddings/embedding"
  d = backbone.feature_dim
  with pytest.raises(ValueError, match="not the kernel of an nnx.Linear"):
    backbone.apply(backbone.params, x,
                   adapters={table: {"a": jnp.ones((1000, 2)), "b": jnp.ones((2, d))}})
  with pytest.raises(ValueError, match="gives delta"):
    backbone.apply(backbone.params, x, adapters={
        "encoder/layers/0/attention/key/kernel": {"a": jnp.ones((d, 2)), "b": jnp.ones((2, 3))}})
  small = mlp((12,), (10, 7), seed=2)
  with pytest.raises(ValueError, match="both grad_projection and a factored adapter"):
    small.apply(small.params, jnp.ones((2, 12)),
                grad_projection={"lin1/kernel": (jnp.zeros((12, 1)), None)},
                adapters={"lin1/kernel": {"a": jnp.ones((12, 2)), "b": jnp.ones((2, 10))}})
