"""GPM/BECAME conv nets: parity with PyTorch, im2col taps, masked batch statistics.

The PyTorch outputs come from ``fixtures/make_convnets_reference.py`` (torch
2.13 CPU) on the seeded weights of ``convnet_weights.py``; this test needs no torch.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.models import convnets
from tests.models.convnet_weights import random_images, random_state_dict

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "convnets_reference.npz")


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURE))


def _torch_weights(ref, name):
  shapes = json.loads(str(ref[f"{name}_shapes"]))
  return random_state_dict(shapes, int(ref[f"{name}_seed"]))


def _converted(ref, name, size):
  sd = _torch_weights(ref, name)
  if name == "alexnet":
    backbone = convnets.alexnet((size, size, 3))
    return sd, backbone, convnets.alexnet_params_from_torch(sd, backbone)
  backbone = convnets.resnet18((size, size, 3))
  return sd, backbone, convnets.resnet18_params_from_torch(sd, backbone)


@pytest.mark.parametrize("name,size,n", [("alexnet", 32, 6), ("resnet18", 84, 4)])
def test_float64_features_and_logits_equal_pytorch(ref, name, size, n):
  """The architecture: float64 on both sides, agreement to ~1e-12."""
  sd, backbone, params = _converted(ref, name, size)
  images = random_images(n, size, int(ref[f"{name}_images_seed"]))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)
    feats = np.asarray(backbone.apply(p64, jnp.asarray(images, jnp.float64)))
  assert feats.dtype == np.float64
  np.testing.assert_allclose(feats, ref[f"{name}_features_f64"], rtol=1e-9, atol=1e-9)
  logits = feats @ sd["head.weight"].astype(np.float64).T
  np.testing.assert_allclose(logits, ref[f"{name}_logits_f64"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,size,n", [("alexnet", 32, 6), ("resnet18", 84, 4)])
def test_float32_features_match_pytorch_float32(ref, name, size, n):
  """float32 vs float32: both sides' rounding, amplified by batch statistics of
  4-6 examples (normalising by small variances), stays below 1e-4."""
  sd, backbone, params = _converted(ref, name, size)
  images = random_images(n, size, int(ref[f"{name}_images_seed"]))
  feats = np.asarray(jax.jit(backbone.apply)(params, images))
  np.testing.assert_allclose(feats, ref[f"{name}_features"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(feats, ref[f"{name}_features_f64"], rtol=1e-4, atol=1e-4)
  logits = feats @ sd["head.weight"].T
  np.testing.assert_allclose(logits, ref[f"{name}_logits"], rtol=1e-4, atol=1e-4)


def _patches_reference(x_nchw, k, stride, pad):
  """The official im2col loop (columns in PyTorch's (C, kh, kw) order), float64."""
  x = np.pad(x_nchw, ((0, 0), (0, 0), (pad, pad), (pad, pad))).astype(np.float64)
  n, c, h, w = x.shape
  s = (h - k) // stride + 1
  cols = []
  for b in range(n):
    for i in range(s):
      for j in range(s):
        cols.append(x[b, :, stride * i:stride * i + k, stride * j:stride * j + k].reshape(-1))
  return np.stack(cols, 1)  # (C·k·k, n·s·s)


@pytest.mark.parametrize("k,stride,pad", [(4, 1, 0), (3, 2, 1), (1, 2, 0), (2, 1, 0)])
def test_conv_patches_match_official_loop(k, stride, pad):
  rng = np.random.default_rng(k * 10 + stride)
  x = rng.standard_normal((3, 9, 9, 5)).astype(np.float32)
  got = np.asarray(convnets.conv_patches(jnp.asarray(x), k, stride, pad), np.float64)
  want = _patches_reference(x.transpose(0, 3, 1, 2), k, stride, pad)  # (C,kh,kw) rows
  c = x.shape[-1]
  # clx rows are (kh, kw, C): permute the reference's rows to compare.
  perm = np.arange(c * k * k).reshape(c, k, k).transpose(1, 2, 0).reshape(-1)
  np.testing.assert_allclose(got.reshape(-1, c * k * k).T, want[perm], atol=1e-6)


def test_patch_basis_projects_flax_kernel_like_official_torch_layout():
  """GPM on a conv layer: the projected Flax kernel gradient equals the official
  ``g − g.view(O, −1) @ M Mᵀ`` on the PyTorch layout, and leaves the layer's
  response to the memory's patches unchanged."""
  rng = np.random.default_rng(0)
  c, k, o = 4, 3, 6
  x = rng.standard_normal((2, 7, 7, c)).astype(np.float32)
  rep_torch = _patches_reference(x.transpose(0, 3, 1, 2), k, 1, 0)  # (C·k·k, n)
  u, _, _ = np.linalg.svd(rep_torch[:, :20], full_matrices=False)
  m_torch = u[:, :10]                                                # torch-row basis
  perm = np.arange(c * k * k).reshape(c, k, k).transpose(1, 2, 0).reshape(-1)
  m_flax = m_torch[perm]                                             # same space, clx rows
  g_torch = rng.standard_normal((o, c, k, k))
  g_proj_torch = g_torch - (g_torch.reshape(o, -1) @ m_torch @ m_torch.T).reshape(g_torch.shape)
  g_flax = g_torch.transpose(2, 3, 1, 0)                             # HWIO
  from clx.ops import subspace
  g_proj_flax = np.asarray(subspace.project_kernel_gradient(jnp.asarray(g_flax), jnp.asarray(m_flax)))
  np.testing.assert_allclose(g_proj_flax, g_proj_torch.transpose(2, 3, 1, 0), atol=1e-5)
  # Patches in span(M) see no change from the projected update.
  patches = np.asarray(convnets.conv_patches(jnp.asarray(x), k)).reshape(-1, c * k * k)
  in_span = patches @ m_flax @ m_flax.T
  np.testing.assert_allclose(in_span @ g_proj_flax.reshape(-1, o), 0.0, atol=1e-4)


@pytest.mark.parametrize("factory,size", [(convnets.alexnet, 32), (convnets.resnet18, 40)])
def test_padding_rows_do_not_change_batch_statistics(factory, size):
  backbone = factory((size, size, 3), seed=1)
  x = random_images(5, size, 3)
  padded = np.concatenate([x, np.repeat(x[:1], 3, 0)])
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  want = backbone.apply(backbone.params, x)
  got = backbone.apply(backbone.params, padded, mask=mask)[:5]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  unmasked = backbone.apply(backbone.params, padded)[:5]
  assert not np.allclose(np.asarray(unmasked), np.asarray(want), atol=1e-3)


def test_gram_taps_equal_patch_second_moments_float64():
  backbone = convnets.alexnet((32, 32, 3), channels=(8, 16, 16), hidden=32, seed=2)
  x = random_images(3, 32, 4)
  mask = np.array([1, 1, 0], np.float32)
  _, inputs = backbone.apply(backbone.params, x, taps="inputs")
  _, grams = backbone.apply(backbone.params, x, taps="gram", mask=mask)
  _, inputs_masked = backbone.apply(backbone.params, x, taps="inputs", mask=mask)
  for site, rows in inputs_masked.items():
    r = np.asarray(rows, np.float64)[:2].reshape(-1, rows.shape[-1])
    np.testing.assert_allclose(np.asarray(grams[site]["gram"]), r.T @ r, rtol=2e-5, atol=1e-3)
    assert float(grams[site]["count"]) == r.shape[0]
  assert inputs["conv1/kernel"].shape == (3, 29 * 29, 4 * 4 * 3)
  assert inputs["fc1/kernel"].shape == (3, 2 * 2 * 16)


def test_dropout_only_with_rng_and_inverted_scaling():
  backbone = convnets.alexnet((32, 32, 3), channels=(8, 16, 16), hidden=64, seed=3)
  x = random_images(16, 32, 5)
  a = backbone.apply(backbone.params, x)
  b = backbone.apply(backbone.params, x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  key = jax.random.PRNGKey(0)
  d1 = np.asarray(backbone.apply(backbone.params, x, rng=key))
  d2 = np.asarray(backbone.apply(backbone.params, x, rng=jax.random.PRNGKey(1)))
  assert not np.allclose(d1, d2)
  # Last layer: dropout 0.5 zeroes about half of the positive features.
  frac = np.mean(d1 == 0) - np.mean(np.asarray(a) == 0)
  assert 0.25 < frac < 0.6
  # Inverted dropout on the final layer only.
  y = jnp.ones((4000,))
  kept = np.asarray(convnets.dropout(y, 0.5, key))
  assert set(np.unique(kept)) <= {0.0, 2.0} and abs(kept.mean() - 1.0) < 0.1


def test_official_sample_counts_and_sites():
  r = convnets.resnet18()
  counts = convnets.resnet18_gpm_samples(r)
  assert len(r.sites["conv"]) == 20 and len(counts) == 20
  assert counts["layers/1/0/shortcut/kernel"] == counts["layers/1/0/conv1/kernel"] == 10
  assert counts["layers/2/0/shortcut/kernel"] == 50 and counts["layers/3/1/conv2/kernel"] == 100
  assert r.feature_dim == 160 * 3 * 3
  a = convnets.alexnet()
  assert set(convnets.alexnet_gpm_samples()) == set(a.sites["conv"] + a.sites["mlp"])
  assert a.projects_through_inputs("fc1/kernel") and not a.projects_through_inputs("conv1/kernel")


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="NHWC"):
    convnets.alexnet((784,))
  with pytest.raises(ValueError, match="too small"):
    convnets.alexnet((8, 8, 3))
  backbone = convnets.alexnet()
  with pytest.raises(KeyError, match="fc1.weight"):
    convnets.alexnet_params_from_torch({"conv1.weight": np.zeros((64, 3, 4, 4))}, backbone)
  with pytest.raises(ValueError, match="cannot project"):
    backbone.apply(backbone.params, random_images(2, 32, 0),
                   grad_projection={"conv1/kernel": (jnp.zeros((48, 48)), None)})
