"""ViT backbone: parity with timm through both loaders, taps, prompts, dtypes and error paths.

The reference arrays come from ``fixtures/make_vit_reference.py`` (timm 1.0.31,
torch 2.13 CPU): a tiny timm ViT (48×32 images, 3×2 patch grid, d=32, depth 2,
4 heads) with random weights, saved as a timm ``.safetensors`` and an AugReg
``.npz``. No torch is needed here.
"""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from clx.models.base import Backbone
from clx.models.vit import (VARIANTS, ViT, ViTConfig, augreg_npz_params, load_vit_weights,
                            resize_pos_embed, timm_state_dict_params, vit, vit_config, vit_sites)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NPZ = os.path.join(FIXTURES, "vit_tiny_augreg.npz")
SAFETENSORS = os.path.join(FIXTURES, "vit_tiny_timm.safetensors")
SHAPE = (48, 32, 3)
TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(FIXTURES, "vit_tiny_reference.npz")) as f:
    return dict(f)


@pytest.fixture(scope="module")
def npz_arrays():
  with np.load(NPZ) as f:
    return dict(f)


@pytest.fixture(scope="module")
def timm_sd():
  return safetensors.numpy.load_file(SAFETENSORS)


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


# ----------------------------------------------------------------------------
# Parity with timm
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [NPZ, SAFETENSORS], ids=["augreg_npz", "timm_safetensors"])
def test_features_and_logits_match_timm(ref, weights):
  backbone, head = vit(SHAPE, variant="test", weights=weights, return_head=True)
  feats = np.asarray(jax.jit(backbone.apply)(backbone.params, ref["images"]))
  assert feats.shape == (3, 32) and feats.dtype == np.float32
  err = _max_err(feats, ref["features"])
  logits = feats @ head["kernel"] + head["bias"]
  err_logits = _max_err(logits, ref["logits"])
  print(f"{os.path.basename(weights)}: max|features - timm| = {err:.2e}, "
        f"max|logits - timm| = {err_logits:.2e}")
  assert err < TOL and err_logits < TOL
  assert head["kernel"].shape == (32, 10) and head["bias"].shape == (10,)


def test_both_loaders_give_identical_params(npz_arrays, timm_sd):
  config = vit_config("test", SHAPE)
  a, head_a = load_vit_weights(NPZ, config)
  b, head_b = load_vit_weights(SAFETENSORS, config)
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
  np.testing.assert_array_equal(head_a["kernel"], head_b["kernel"])
  # In-memory mappings in either layout work too.
  c, _ = load_vit_weights(npz_arrays, config)
  d, _ = load_vit_weights(timm_sd, config)
  for k in fa:
    np.testing.assert_array_equal(_flat(c)[k], fa[k])
    np.testing.assert_array_equal(_flat(d)[k], fa[k])


def test_site_inputs_match_timm_hooks(ref):
  backbone = vit(SHAPE, variant="test", weights=NPZ)
  _, taps = backbone.apply(backbone.params, ref["images"], taps="inputs")
  roles = ("q", "k", "v", "o", "mlp_in", "mlp_out")
  assert set(taps) == {p for role in roles for p in backbone.sites[role]}
  for i in range(2):
    for site, key in [("attn/query", "qkv"), ("attn/key", "qkv"), ("attn/value", "qkv"),
                      ("attn/out", "proj"), ("mlp/fc1", "fc1"), ("mlp/fc2", "fc2")]:
      got = taps[f"blocks/{i}/{site}/kernel"]
      assert got.shape == ref[f"tap_{i}_{key}"].shape  # (n, 1 + 6 tokens, d_in)
      assert _max_err(got, ref[f"tap_{i}_{key}"]) < TOL, (i, site)


@pytest.mark.parametrize("fc_norm,key",
                         [(True, "features_avg_fcnorm"), (False, "features_avg_norm")])
def test_avg_pool_matches_timm(ref, fc_norm, key):
  backbone = vit(SHAPE, variant="test", weights=NPZ, pool="avg", fc_norm=fc_norm)
  assert _max_err(backbone.apply(backbone.params, ref["images"]), ref[key]) < TOL


def test_avg_pool_timm_fc_norm_state_dict(ref, timm_sd):
  renamed = {("fc_" + k if k.startswith("norm.") else k): v for k, v in timm_sd.items()}
  backbone = vit(SHAPE, variant="test", weights=renamed, pool="avg")  # fc_norm defaults to True
  assert _max_err(backbone.apply(backbone.params, ref["images"]), ref["features_avg_fcnorm"]) < TOL
  with pytest.raises(ValueError, match=r"fc_norm=True"):
    vit(SHAPE, variant="test", weights=renamed)  # token pooling expects norm.*


# ----------------------------------------------------------------------------
# Other checkpoint layouts
# ----------------------------------------------------------------------------


def _to_big_vision_scanned(arrays, depth=2):
  """AugReg layout → big_vision's (params/ prefix, scanned blocks, MHA_0, LayerNorm_1, ...)."""
  out = {}
  renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
             "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
  blocks = {}
  for k, v in arrays.items():
    if k.startswith("Transformer/encoderblock_"):
      i, rest = k[len("Transformer/encoderblock_"):].split("/", 1)
      for old, new in renames.items():
        rest = rest.replace(old, new)
      blocks.setdefault(rest, [None] * depth)[int(i)] = v
    elif k == "Transformer/posembed_input/pos_embedding":
      out["params/pos_embedding"] = v
    else:
      out["params/" + k] = v
  for rest, vs in blocks.items():
    out["params/Transformer/encoderblock/" + rest] = np.stack(vs)
  return out


def test_big_vision_scanned_and_prefixed_layouts(npz_arrays):
  config = vit_config("test", SHAPE)
  want = _flat(augreg_npz_params(npz_arrays, config)[0])
  scanned = _to_big_vision_scanned(npz_arrays)
  got = _flat(load_vit_weights(scanned, config)[0])
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # 'opt/target/' training checkpoints: keys outside the prefix (optimizer state) are ignored.
  opt = {"opt/target/" + k: v for k, v in npz_arrays.items()}
  opt["opt/state/step"] = np.zeros(())
  got = _flat(load_vit_weights(opt, config)[0])
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_bfloat16_safetensors_are_read(tmp_path, timm_sd):
  path = str(tmp_path / "bf16.safetensors")
  safetensors.numpy.save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in timm_sd.items()}, path)
  params, _ = load_vit_weights(path, vit_config("test", SHAPE))
  kernel = _flat(params)["blocks/0/attn/key/kernel"]
  assert kernel.dtype == np.float32
  want = timm_sd["blocks.0.attn.qkv.weight"][32:64].T
  np.testing.assert_allclose(kernel, want, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------
# Position-embedding resampling
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("method,src,grid,old,key", [
    ("bilinear", "resize_in", (4, 5), None, "resize_bilinear"),
    ("bicubic", "resize_in", (4, 5), None, "resize_bicubic"),
    ("bilinear", "resize_bilinear", (2, 3), (4, 5), "resize_down_bilinear"),
    ("bicubic", "resize_bilinear", (2, 3), (4, 5), "resize_down_bicubic"),
])
def test_resize_pos_embed_matches_timm(ref, method, src, grid, old, key):
  out = resize_pos_embed(ref[src], grid, old_grid=old, method=method)
  assert out.shape == ref[key].shape
  assert _max_err(out, ref[key]) < 1e-5
  np.testing.assert_array_equal(out[:, :1], ref[src][:, :1])  # the CLS row is kept


def test_loader_resamples_pos_embed_only_when_asked(ref, npz_arrays, timm_sd):
  square = {"Transformer/posembed_input/pos_embedding": ref["resize_in"]}  # a 3×3 grid
  arrays = dict(npz_arrays, **square)
  config = vit_config("test", (64, 80, 3))  # grid (4, 5)
  with pytest.raises(ValueError,
                     match=r"pos_embedding.*\(1, 10, 32\).*\(1, 21, 32\).*resize_pos_embed=True"):
    augreg_npz_params(arrays, config)
  params, _ = augreg_npz_params(arrays, config, resize_pos_embed=True)
  assert _max_err(params["pos_embed"], ref["resize_bilinear"]) < 1e-5
  sd = dict(timm_sd, pos_embed=ref["resize_in"])
  params, _ = timm_state_dict_params(sd, config, resize_pos_embed=True)
  assert _max_err(params["pos_embed"], ref["resize_bicubic"]) < 1e-5
  backbone = vit((64, 80, 3), variant="test", weights=sd, resize_pos_embed=True)
  assert backbone.apply(backbone.params, np.zeros((2, 64, 80, 3), np.float32)).shape == (2, 32)
  # The fixture's own 3×2 grid is not square: timm cannot resample it either.
  with pytest.raises(ValueError, match="square"):
    vit((64, 80, 3), variant="test", weights=NPZ, resize_pos_embed=True)


# ----------------------------------------------------------------------------
# Taps, prompts, dtypes, contract
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_vit():
  return vit(SHAPE, variant="test", seed=3)


def test_gram_taps_match_numpy_float64(random_vit):
  x = np.random.default_rng(1).normal(size=(4, *SHAPE)).astype(np.float32)
  apply = jax.jit(random_vit.apply, static_argnames="taps")
  feats_g, grams = apply(random_vit.params, x, taps="gram")
  feats_i, inputs = apply(random_vit.params, x, taps="inputs")
  np.testing.assert_allclose(feats_g, feats_i, rtol=1e-6, atol=1e-6)
  assert grams.keys() == inputs.keys()
  for site, arr in inputs.items():
    rows = np.asarray(arr, np.float64).reshape(-1, arr.shape[-1])
    want = rows.T @ rows
    assert grams[site]["gram"].dtype == jnp.float32
    assert float(grams[site]["count"]) == 4 * 7  # all tokens: CLS + 3×2 patches
    np.testing.assert_allclose(grams[site]["gram"], want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
  np.testing.assert_array_equal(grams["blocks/1/attn/key/kernel"]["gram"],
                                grams["blocks/1/attn/value/kernel"]["gram"])
  assert grams["blocks/0/mlp/fc2/kernel"]["gram"].shape == (128, 128)


def test_prefix_prompts_after_cls(random_vit):
  x = np.random.default_rng(2).normal(size=(2, *SHAPE)).astype(np.float32)
  prompts = np.random.default_rng(3).normal(size=(5, 32)).astype(np.float32)
  module = random_vit.merge(random_vit.params)
  tokens = module.embed(jnp.asarray(x), prompts)
  plain = module.embed(jnp.asarray(x))
  assert tokens.shape == (2, 1 + 5 + 6, 32)
  np.testing.assert_array_equal(tokens[:, 0], plain[:, 0])  # CLS first, with its position embedding
  np.testing.assert_array_equal(tokens[:, 1:6], np.broadcast_to(prompts, (2, 5, 32)))  # none added
  np.testing.assert_array_equal(tokens[:, 6:], plain[:, 1:])
  apply = jax.jit(random_vit.apply, static_argnames="taps")
  shared = apply(random_vit.params, x, prefix=prompts)
  per_example = apply(random_vit.params, x, prefix=np.broadcast_to(prompts, (2, 5, 32)))
  np.testing.assert_allclose(shared, per_example, rtol=1e-6, atol=1e-6)
  assert _max_err(shared, apply(random_vit.params, x)) > 1e-3
  _, grams = apply(random_vit.params, x, taps="gram", prefix=prompts)
  assert float(grams["blocks/0/attn/key/kernel"]["count"]) == 2 * 12
  with pytest.raises(ValueError, match="prefix must be"):
    random_vit.apply(random_vit.params, x, prefix=np.zeros((3, 5, 32), np.float32))
  with pytest.raises(ValueError, match="prefix must be"):
    random_vit.apply(random_vit.params, x, prefix=np.zeros((5, 16), np.float32))


def test_avg_pool_excludes_cls_and_prompts(random_vit):
  avg = vit(SHAPE, variant="test", seed=3, pool="avg", fc_norm=False)
  x = np.random.default_rng(4).normal(size=(2, *SHAPE)).astype(np.float32)
  prompts = np.random.default_rng(5).normal(size=(2, 4, 32)).astype(np.float32)
  module = avg.merge(avg.params)
  h = module.embed(jnp.asarray(x), prompts)
  for block in module.blocks:
    h, _ = block(h)
  want = module.norm(h)[:, 5:].mean(axis=1)
  np.testing.assert_allclose(avg.apply(avg.params, x, prefix=prompts), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_is_close_to_float32(ref):
  full = vit(SHAPE, variant="test", weights=NPZ)
  half = vit(SHAPE, variant="test", weights=NPZ, dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(half.params))
  apply = jax.jit(half.apply, static_argnames="taps")
  feats, grams = apply(half.params, ref["images"], taps="gram")
  assert feats.dtype == jnp.bfloat16
  assert grams["blocks/0/attn/key/kernel"]["gram"].dtype == jnp.float32
  want = np.asarray(full.apply(full.params, ref["images"]))
  err = _max_err(np.asarray(feats, np.float32), want)
  assert err < 0.1 * np.abs(want).max(), err


def test_backbone_contract(random_vit):
  assert isinstance(random_vit, Backbone)
  assert random_vit.feature_dim == 32 and random_vit.input_shape == SHAPE
  assert random_vit.name == "vit-test-48x32"
  flat = _flat(random_vit.params)
  for role, paths in random_vit.sites.items():
    assert len(paths) == (4 if role == "mlp" else 2)
    for p in paths:
      assert p in flat, p
  assert flat["blocks/0/attn/key/kernel"].shape == (32, 32)
  assert flat["blocks/0/mlp/fc1/kernel"].shape == (32, 128)
  assert random_vit.site_paths(("k", "v")) == (
      "blocks/0/attn/key/kernel", "blocks/1/attn/key/kernel",
      "blocks/0/attn/value/kernel", "blocks/1/attn/value/kernel")
  assert vit_sites(2) == random_vit.sites
  # The merged module is a ViT with separate q/k/v kernels.
  module = random_vit.merge(random_vit.params)
  assert isinstance(module, ViT) and module.blocks[0].attn.key.kernel.shape == (32, 32)


def test_standard_configs():
  counts = {"S/16": 21_665_664, "B/16": 85_798_656, "L/16": 303_301_632}  # timm, num_classes=0
  for variant, want in counts.items():
    config = vit_config(variant, (224, 224, 3))
    assert config.num_tokens == 197
    model = nnx.eval_shape(lambda c=config: ViT(c, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == want, (variant, n)
  assert set(VARIANTS) >= {"test", "S/16", "B/16", "L/16"}
  assert vit_config("b16").embed_dim == 768 and vit_config("ViT-L/16").depth == 24


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def test_missing_unexpected_and_mismatched_keys(npz_arrays, timm_sd):
  config = vit_config("test", SHAPE)
  broken = dict(npz_arrays)
  del broken["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/kernel"]
  broken["pre_logits/kernel"] = np.zeros((32, 32), np.float32)
  with pytest.raises(ValueError) as info:
    augreg_npz_params(broken, config)
  msg = str(info.value)
  missing = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/kernel"
  assert f"missing keys (1): {missing}" in msg
  assert "unexpected keys (1): pre_logits/kernel" in msg
  with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight: "
                                       r"checkpoint shape \(96, 32\), config expects \(192, 64\)"):
    timm_state_dict_params(timm_sd, vit_config("test", SHAPE, embed_dim=64))
  with pytest.raises(ValueError, match=r"query/kernel: checkpoint shape \(32, 4, 8\), "
                                       r"config expects \(32, 2, 16\)"):
    augreg_npz_params(npz_arrays, vit_config("test", SHAPE, num_heads=2))
  with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): blocks\.1\."):
    timm_state_dict_params(timm_sd, vit_config("test", SHAPE, depth=1))
  with pytest.raises(ValueError, match=r"missing keys \(\d+\): Transformer/encoderblock_2/"):
    augreg_npz_params(npz_arrays, vit_config("test", SHAPE, depth=3))
  layer_scale = {"blocks.0.ls1.gamma": np.ones(32), "blocks.0.ls2.gamma": np.ones(32)}
  with pytest.raises(ValueError,
                     match=r"unexpected keys \(2\): blocks\.0\.ls1\.gamma, blocks\.0\.ls2\.gamma"):
    timm_state_dict_params(dict(timm_sd, **layer_scale), config)
  with pytest.raises(ValueError, match="neither"):
    load_vit_weights({"foo": np.zeros(1)}, config)


def test_no_downloads_and_bad_paths(tmp_path):
  config = vit_config("test", SHAPE)
  hub = "vit_base_patch16_224.augreg_in21k"
  for name in (hub, f"hf_hub:timm/{hub}", f"{hub}.safetensors"):
    with pytest.raises(FileNotFoundError, match="never downloads.*local path"):
      vit((224, 224, 3), weights=name)
  with pytest.raises(FileNotFoundError, match="no such file"):
    load_vit_weights(str(tmp_path / "missing.npz"), config)
  torch_file = tmp_path / "model.pth"
  torch_file.write_bytes(b"")
  with pytest.raises(ValueError, match="safetensors.torch.save_file"):
    load_vit_weights(str(torch_file), config)


def test_bad_inputs_and_configs(random_vit):
  with pytest.raises(ValueError,
                     match=r"ViT built for images \(n, 48, 32, 3\).*got \(2, 32, 48, 3\)"):
    random_vit.apply(random_vit.params, np.zeros((2, 32, 48, 3), np.float32))
  with pytest.raises(ValueError, match="taps must be"):
    random_vit.merge(random_vit.params)(np.zeros((1, *SHAPE), np.float32), taps="grams")
  with pytest.raises(ValueError, match="unknown ViT variant"):
    vit_config("H/14")
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    vit_config("test", (50, 32, 3))
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    ViTConfig(embed_dim=30, num_heads=4)
  with pytest.raises(ValueError, match="pool='token' needs class_token"):
    vit(SHAPE, variant="test", class_token=False)
  with pytest.raises(ValueError, match="unknown ViTConfig field"):
    vit(SHAPE, variant="test", heads=3)


def test_no_class_token_gap_model():
  backbone = vit(SHAPE, variant="test", class_token=False, pool="avg", fc_norm=False)
  assert "cls_token" not in backbone.params and backbone.params["pos_embed"].shape == (1, 6, 32)
  feats, grams = backbone.apply(backbone.params, np.ones((2, *SHAPE), np.float32), taps="gram")
  assert feats.shape == (2, 32) and float(grams["blocks/0/attn/key/kernel"]["count"]) == 12
