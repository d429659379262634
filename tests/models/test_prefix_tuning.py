"""Prefix-tuning (per-layer key/value prompts) in ViT and BERT: float64 reference and no-op."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.models.bert import bert
from clx.models.vit import vit


def _np_attention(x, wq, bq, wk, bk, wv, bv, heads, pk, pv, bias=None):
  """softmax(q [pk; k]ᵀ / √d_h + bias) [pv; v], per head, float64."""
  n, t, d = x.shape
  dh = d // heads
  q = (x @ wq + bq).reshape(n, t, heads, dh)
  k = np.concatenate([pk, x @ wk + bk], 1).reshape(n, -1, heads, dh)
  v = np.concatenate([pv, x @ wv + bv], 1).reshape(n, -1, heads, dh)
  s = np.einsum("nqhc,nkhc->nhqk", q, k) / np.sqrt(dh)
  if bias is not None:
    s = s + bias
  s = np.exp(s - s.max(-1, keepdims=True))
  s = s / s.sum(-1, keepdims=True)
  return np.einsum("nhqk,nkhc->nqhc", s, v).reshape(n, t, d)


def _w(p):
  return [np.asarray(p[name][leaf], np.float64) for name in ("query", "key", "value")
          for leaf in ("kernel", "bias")]


def test_vit_attention_prefix_matches_reference():
  backbone = vit((16, 16, 3), variant="test", patch_size=8, seed=1)
  module = backbone.merge(backbone.params)
  attn = module.blocks[0].attn
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, attn.query.in_features)).astype(np.float32)
  pk, pv = (rng.normal(size=(2, 3, x.shape[-1])).astype(np.float32) for _ in range(2))
  _, heads_out = attn(jnp.asarray(x), (jnp.asarray(pk), jnp.asarray(pv)))
  p = backbone.params["blocks"]["0"]["attn"]
  ref = _np_attention(x.astype(np.float64), *_w(p), attn.num_heads, pk, pv)
  np.testing.assert_allclose(np.asarray(heads_out), ref, rtol=1e-4, atol=1e-5)


def test_bert_attention_prefix_matches_reference_with_padding():
  backbone = bert((6,), seed=2)
  module = backbone.merge(backbone.params)
  attn = module.encoder.layers[1].attention
  rng = np.random.default_rng(1)
  d = attn.query.in_features
  x = rng.normal(size=(2, 6, d)).astype(np.float32)
  mask = np.array([[1] * 6, [1] * 4 + [0] * 2], bool)
  bias = np.where(mask, 0.0, np.finfo(np.float32).min)[:, None, None, :].astype(np.float32)
  pk, pv = (rng.normal(size=(3, d)).astype(np.float32) for _ in range(2))   # shared (p, d)
  _, context = attn(jnp.asarray(x), jnp.asarray(bias), (jnp.asarray(pk), jnp.asarray(pv)))
  p = backbone.params["encoder"]["layers"]["1"]["attention"]
  full_bias = np.concatenate([np.zeros((2, 1, 1, 3)), bias.astype(np.float64)], -1)
  ref = _np_attention(x.astype(np.float64), *_w(p), attn.num_heads,
                      np.broadcast_to(pk, (2, 3, d)), np.broadcast_to(pv, (2, 3, d)), full_bias)
  np.testing.assert_allclose(np.asarray(context), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["vit", "bert"])
def test_prefix_changes_features_only_when_given(which):
  if which == "vit":
    backbone = vit((16, 16, 3), variant="test", patch_size=8, seed=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    d, layers = backbone.feature_dim, 2
  else:
    backbone = bert((6,), seed=3)
    x = jnp.asarray([[101, 5, 6, 7, 102, 0], [101, 8, 102, 0, 0, 0]], jnp.int32)
    d, layers = backbone.feature_dim, 2
  module = backbone.merge(backbone.params)
  plain = module(x)
  np.testing.assert_array_equal(np.asarray(module(x, kv_prefix={})), np.asarray(plain))
  np.testing.assert_array_equal(np.asarray(backbone.apply(backbone.params, x)), np.asarray(plain))
  pk = jax.random.normal(jax.random.PRNGKey(1), (4, d))
  prompted = module(x, kv_prefix={layers - 1: (pk, pk)})
  assert prompted.shape == plain.shape
  assert not np.allclose(np.asarray(prompted), np.asarray(plain))
  with pytest.raises(ValueError, match="kv_prefix layers"):
    module(x, kv_prefix={layers: (pk, pk)})
  with pytest.raises(ValueError, match="prefix must"):
    module(x, kv_prefix={0: (pk[:, :3], pk[:, :3])})
