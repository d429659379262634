"""Compute-dtype policy (issue 13): bfloat16 activations/matmuls, float32 masters, grads and taps.

For ViT, BERT and Llama: the same float32 parameters run with ``dtype="bfloat16"``
give features close to the float32 forward (bf16 keeps 8 mantissa bits, so a
few percent relative error after a few layers), float32 parameter gradients
close to the float32 ones, and float32 Gram taps close to float32 references
computed in float64 from the float32 model's raw inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.models import bert, llama, vit
from clx.models.base import COMPUTE_DTYPES, compute_dtype

# Features through 2 layers in bfloat16: relative L2 error well below this.
FEATURE_RTOL = 5e-2
GRAD_COSINE = 0.99


def _vit(dtype):
  return vit.vit((32, 32, 3), variant="test", seed=3, dtype=dtype)


def _bert(dtype):
  return bert.bert((16,), seed=3, dtype=dtype)


def _llama(dtype):
  return llama.llama((16,), seed=3, dtype=dtype)


def _inputs(name, rng):
  if name == "vit":
    return jnp.asarray(rng.normal(size=(6, 32, 32, 3)).astype(np.float32))
  ids = rng.integers(1, 200, size=(6, 16)).astype(np.int32)
  pad = 0 if name == "bert" else -1
  ids[:, 12:] = pad  # padded tail: taps must count only the valid tokens
  if name == "llama":
    ids[:, 12:] = _llama("float32").pad_id
  return jnp.asarray(ids)


BUILDERS = {"vit": _vit, "bert": _bert, "llama": _llama}


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair(request):
  name = request.param
  f32, bf16 = BUILDERS[name]("float32"), BUILDERS[name]("bfloat16")
  x = _inputs(name, np.random.default_rng(7))
  return name, f32, bf16, x


def test_params_stay_float32_and_identical(pair):
  _, f32, bf16, _ = pair
  for a, b in zip(jax.tree.leaves(f32.params), jax.tree.leaves(bf16.params), strict=True):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_forward_close_to_f32(pair):
  name, f32, bf16, x = pair
  ref = jax.jit(f32.apply)(f32.params, x)
  got = jax.jit(bf16.apply)(bf16.params, x)
  err = _rel(got, ref)
  assert err < FEATURE_RTOL, (name, err)
  assert err > 0  # the bf16 path really ran in bf16 (float32 would be bit-identical)


def test_bf16_grads_float32_and_close(pair):
  name, f32, bf16, x = pair
  w = jnp.asarray(np.random.default_rng(1).normal(size=(f32.feature_dim,)).astype(np.float32))

  def loss(backbone):
    return lambda p: jnp.sum(jnp.tanh(backbone.apply(p, x).astype(jnp.float32) @ w))

  g32 = jax.jit(jax.grad(loss(f32)))(f32.params)
  g16 = jax.jit(jax.grad(loss(bf16)))(bf16.params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  flat32 = np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(g32)])
  flat16 = np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(g16)])
  cosine = flat32 @ flat16 / (np.linalg.norm(flat32) * np.linalg.norm(flat16))
  assert cosine > GRAD_COSINE, (name, cosine)


def test_bf16_gram_taps_float32(pair):
  name, f32, bf16, x = pair
  _, grams = jax.jit(lambda p: bf16.apply(p, x, taps="gram"))(bf16.params)
  _, inputs = jax.jit(lambda p: f32.apply(p, x, taps="inputs"))(f32.params)
  if name == "vit":
    valid = np.ones(x.shape[0] * (inputs[next(iter(inputs))].shape[1]), bool)
  else:
    valid = np.asarray(x != (bf16.pad_id)).ravel()
  assert set(grams) == set(inputs)
  for site, tap in grams.items():
    assert tap["gram"].dtype == jnp.float32, site
    rows = np.asarray(inputs[site], np.float64).reshape(-1, np.shape(inputs[site])[-1])[valid]
    ref = rows.T @ rows  # float64 reference from the float32 model's inputs
    assert float(tap["count"]) == rows.shape[0], site
    assert _rel(tap["gram"], ref) < FEATURE_RTOL, (name, site, _rel(tap["gram"], ref))


def test_adapter_merge_on_bf16_backbone_has_float32_grads():
  """A LoRA branch merged into the float32 kernel (W + a·b) trains in float32."""
  backbone = _vit("bfloat16")
  site = "blocks/0/attn/key/kernel"
  kernel = backbone.params["blocks"]["0"]["attn"]["key"]["kernel"]
  rng = np.random.default_rng(0)
  adapter = {"a": jnp.asarray(rng.normal(size=(kernel.shape[0], 2)).astype(np.float32)),
             "b": jnp.asarray(rng.normal(size=(2, kernel.shape[1])).astype(np.float32)) * 0.1}
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)).astype(np.float32))

  def loss(adapter):
    merged = adapter["a"] @ adapter["b"]
    assert merged.dtype == jnp.float32  # the merge runs on float32 masters
    params = jax.tree.map(lambda v: v, backbone.params)
    params["blocks"]["0"]["attn"]["key"]["kernel"] = kernel + merged
    return jnp.sum(backbone.apply(params, x).astype(jnp.float32) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(adapter)
  assert value.dtype == jnp.float32 and np.isfinite(float(value)), site
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("dtype", ["bf16", "int8", "float64", jnp.int32])
def test_bad_compute_dtype_is_rejected(dtype):
  with pytest.raises(ValueError, match="compute dtype"):
    _vit(dtype)
  with pytest.raises(ValueError, match="compute dtype"):
    _bert(dtype)
  with pytest.raises(ValueError, match="compute dtype"):
    _llama(dtype)


def test_compute_dtype_names():
  for name in COMPUTE_DTYPES:
    assert compute_dtype(name).name == name
  assert compute_dtype(jnp.bfloat16) == jnp.bfloat16
