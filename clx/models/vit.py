"""Vision Transformers (ViT-Ti/S/B/L /16) with loaders for AugReg ``.npz`` and timm weights.

The architecture is the original ViT (Dosovitskiy et al. 2021) as implemented by
``big_vision``/``vision_transformer`` and timm's ``VisionTransformer``:

    x (n, H, W, C) → patches (p×p, non-overlapping) → linear patch embedding
      → [CLS, patch tokens] + learned position embeddings
      → depth × pre-LN block:  t = t + out(MHSA(LN₁ t));  t = t + fc2(GELU(fc1(LN₂ t)))
      → final LayerNorm → pooled features (CLS token, or the mean of the patch tokens)

LayerNorm ε = 1e-6, GELU is the exact (erf) form, attention is softmax(q kᵀ/√d_h) v.
The q, k and v projections are SEPARATE kernels (checkpoints store them fused;
the loaders split them) so adapters can target k and v independently, as
InfLoRA does. The classifier head is not part of the backbone: ``vit(...,
return_head=True)`` also returns the checkpoint's head ``{"kernel": (d, C),
"bias": (C,)}`` when there is one.

``vit_base_patch16_224_in21k`` (the InfLoRA backbone, timm ≥ 0.5 incl. 0.6.7;
``vit_base_patch16_224.augreg_in21k`` in timm 1.x) is ``variant="B/16"`` at 224
with the AugReg checkpoint
``B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz``: class token,
CLS pooling, no pre-logits (representation) layer, 21843-way head. (timm < 0.5
mapped that name to the original ViT weights, which had a 768-d tanh pre-logits
layer; those are not supported.)

Parameter tree (kernel paths are the adapter site names)::

    patch_embed/{kernel (p, p, C, d), bias (d,)}
    cls_token (1, 1, d)                       # absent when class_token=False
    pos_embed (1, num_prefix + gh·gw, d)      # num_prefix = 1 with a class token
    blocks/<i>/norm1/{scale, bias}
    blocks/<i>/attn/{query, key, value, out}/{kernel (d, d), bias (d,)}
    blocks/<i>/norm2/{scale, bias}
    blocks/<i>/mlp/fc1/{kernel (d, m), bias}, blocks/<i>/mlp/fc2/{kernel (m, d), bias}
    norm/{scale, bias}

Site roles: ``q``/``k``/``v`` (input: the ``norm1`` output), ``o`` (input: the
concatenated attention heads), ``mlp_in`` (``fc1``, input: the ``norm2``
output), ``mlp_out`` (``fc2``, input: the GELU output) and ``mlp`` (both).

No weights can be downloaded by clx (no network access is assumed); pass a local
file to ``weights=``: a big_vision/AugReg ``.npz`` (the layouts timm's
``_load_weights`` reads) or a timm ``.safetensors`` state dict.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clx.models.base import Backbone, Params, compute_dtype, shared_input_groups, to_str_keys

_HIGHEST = jax.lax.Precision.HIGHEST
Head = dict[str, np.ndarray]

# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, int]] = {
    # A tiny model for tests (same code paths, ~50k parameters).
    "test": dict(patch_size=16, embed_dim=32, depth=2, num_heads=4, mlp_dim=128),
    "Ti/16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_dim=768),
    "S/16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "B/16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "L/16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
}
"""Standard ViT sizes (Dosovitskiy et al. 2021, Table 1; Ti from DeiT/AugReg)."""


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Static architecture of a :class:`ViT`.

  Attributes:
    img_size: input image ``(H, W)``; both must be multiples of ``patch_size``.
    patch_size: side of the square, non-overlapping patches.
    embed_dim: token width ``d``.
    depth: number of transformer blocks.
    num_heads: attention heads (``embed_dim % num_heads == 0``).
    mlp_dim: hidden width ``m`` of the block MLPs.
    in_chans: image channels ``C``.
    class_token: prepend a learned CLS token (all AugReg/timm ViTs do).
    pool: ``"token"`` (the CLS token, timm ``global_pool='token'``) or ``"avg"``
      (mean over the patch tokens only, excluding CLS and prompts, as timm's
      ``global_pool='avg'`` and big_vision's ``'gap'``).
    fc_norm: apply the final LayerNorm after pooling instead of to every token
      (timm's default for ``global_pool='avg'``, whose checkpoints store it as
      ``fc_norm.*``; big_vision ``gap`` models normalise first, i.e. ``False``).
      Irrelevant for ``pool="token"`` (LayerNorm acts per token).
    ln_eps: LayerNorm epsilon (1e-6 in ViT/timm).
  """

  img_size: tuple[int, int] = (224, 224)
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  in_chans: int = 3
  class_token: bool = True
  pool: str = "token"
  fc_norm: bool = False
  ln_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
    if len(self.img_size) != 2 or min(self.img_size) <= 0:
      raise ValueError(f"img_size must be (H, W) > 0, got {self.img_size}")
    if any(s % self.patch_size for s in self.img_size):
      raise ValueError(
          f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
    if min(self.embed_dim, self.depth, self.num_heads, self.mlp_dim, self.in_chans) <= 0:
      raise ValueError(f"ViT sizes must be positive: {self}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
    if self.pool not in ("token", "avg"):
      raise ValueError(f"pool must be 'token' or 'avg', got {self.pool!r}")
    if self.pool == "token" and not self.class_token:
      raise ValueError("pool='token' needs class_token=True; use pool='avg'")

  @property
  def grid_size(self) -> tuple[int, int]:
    return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

  @property
  def num_patches(self) -> int:
    return self.grid_size[0] * self.grid_size[1]

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patches that carry a position embedding (the CLS token)."""
    return int(self.class_token)

  @property
  def num_tokens(self) -> int:
    return self.num_prefix_tokens + self.num_patches

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads


def vit_config(variant: str = "B/16", input_shape: Sequence[int] = (224, 224, 3),
               **overrides) -> ViTConfig:
  """The :class:`ViTConfig` of a named size for images of ``input_shape``.

  Args:
    variant: a key of :data:`VARIANTS` (``"test"``, ``"Ti/16"``, ``"S/16"``,
      ``"B/16"``, ``"L/16"``; case-insensitive, ``"b16"`` also works).
    input_shape: ``(H, W, C)``.
    **overrides: any other :class:`ViTConfig` field (``pool="avg"``, ...).

  Returns:
    The config.
  """
  key = _variant_key(variant)
  input_shape = tuple(int(s) for s in input_shape)
  if len(input_shape) != 3:
    raise ValueError(f"ViT input_shape must be (H, W, C), got {input_shape}")
  fields = dict(VARIANTS[key], img_size=input_shape[:2], in_chans=input_shape[2])
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ViTConfig)}
  if unknown:
    raise ValueError(f"unknown ViTConfig field(s) {sorted(unknown)}")
  fields.update(overrides)
  return ViTConfig(**fields)


def _variant_key(variant: str) -> str:
  norm = {k.lower().replace("/", ""): k for k in VARIANTS}
  key = norm.get(str(variant).lower().replace("/", "").replace("-", "").replace("vit", ""))
  if key is None:
    raise ValueError(f"unknown ViT variant {variant!r}; known: {sorted(VARIANTS)}")
  return key


# ----------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
  """Non-overlapping ``p×p`` patches → ``d`` (a stride-``p`` conv as reshape + matmul).

  ``kernel`` is ``(p, p, C, d)`` (Flax HWIO, as the AugReg ``embedding/kernel``);
  patches are flattened in ``(row, col, channel)`` order and tokens in
  row-major ``(gh, gw)`` order, as ``Conv2d(...).flatten(2)`` in timm.
  """

  def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *,
               dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.patch_size, self.dtype = patch_size, dtype
    # lecun_normal over fan_in = p·p·C (timm's 'jax' init of the patch conv).
    self.kernel = nnx.Param(jax.nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)(
        rngs.params(), (patch_size, patch_size, in_chans, embed_dim), param_dtype))
    self.bias = nnx.Param(jnp.zeros((embed_dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(n, H, W, C)`` → ``(n, (H/p)·(W/p), d)``."""
    n, h, w, c = x.shape
    p = self.patch_size
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, (h // p) * (w // p), p * p * c)
    kernel = self.kernel[...].astype(self.dtype).reshape(p * p * c, -1)
    return x @ kernel + self.bias[...].astype(self.dtype)


def _linear(d_in: int, d_out: int, dtype, param_dtype, rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    kernel_init=jax.nn.initializers.truncated_normal(0.02))


class Attention(nnx.Module):
  """Multi-head self-attention with separate ``query``/``key``/``value`` kernels and ``out``."""

  def __init__(self, dim: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads, self.dtype = num_heads, dtype
    self.query = _linear(dim, dim, dtype, param_dtype, rngs)
    self.key = _linear(dim, dim, dtype, param_dtype, rngs)
    self.value = _linear(dim, dim, dtype, param_dtype, rngs)
    self.out = _linear(dim, dim, dtype, param_dtype, rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x (n, T, d)`` → ``(output (n, T, d), concatenated heads (n, T, d))``.

    Head ``h`` owns features ``h·d_h … (h+1)·d_h − 1`` of q, k, v and of the
    ``out`` input (timm's and big_vision's layout). Softmax runs in float32.
    """
    n, t, d = x.shape
    heads = self.num_heads
    split = lambda y: y.reshape(n, t, heads, d // heads)
    q = split(self.query(x)) * jnp.asarray((d // heads) ** -0.5, x.dtype)
    k, v = split(self.key(x)), split(self.value(x))
    logits = jnp.einsum("nqhc,nkhc->nhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    heads_out = jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, t, d)
    return self.out(heads_out), heads_out


class MlpBlock(nnx.Module):
  """``fc1 → GELU (exact, erf) → fc2``."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype, param_dtype, rngs)
    self.fc2 = _linear(hidden, dim, dtype, param_dtype, rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(n, T, d)`` → ``(output (n, T, d), fc2 input (n, T, m))``."""
    h = jax.nn.gelu(self.fc1(x), approximate=False)
    return self.fc2(h), h


class Block(nnx.Module):
  """Pre-LN transformer block: ``t + attn(norm1 t)``, then ``t + mlp(norm2 t)``."""

  def __init__(self, config: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = config.embed_dim
    ln = lambda: nnx.LayerNorm(d, epsilon=config.ln_eps, dtype=dtype, param_dtype=param_dtype,
                               use_fast_variance=False, rngs=rngs)
    self.norm1 = ln()
    self.attn = Attention(d, config.num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = ln()
    self.mlp = MlpBlock(d, config.mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(n, T, d)`` → ``(n, T, d)`` and the inputs of its sites, keyed by role."""
    h = self.norm1(x)
    a, heads = self.attn(h)
    x = x + a
    h2 = self.norm2(x)
    m, hidden = self.mlp(h2)
    return x + m, {"qkv": h, "o": heads, "mlp_in": h2, "mlp_out": hidden}


_ROLE_KERNELS = {"q": ("attn/query",), "k": ("attn/key",), "v": ("attn/value",),
                 "o": ("attn/out",), "mlp_in": ("mlp/fc1",), "mlp_out": ("mlp/fc2",)}
_TAP_KERNELS = {"qkv": ("attn/query", "attn/key", "attn/value"), "o": ("attn/out",),
                "mlp_in": ("mlp/fc1",), "mlp_out": ("mlp/fc2",)}


def vit_sites(depth: int) -> dict[str, tuple[str, ...]]:
  """Site roles → kernel paths for a ViT of ``depth`` blocks (see the module docstring)."""
  sites = {role: tuple(f"blocks/{i}/{name}/kernel" for i in range(depth) for name in names)
           for role, names in _ROLE_KERNELS.items()}
  sites["mlp"] = tuple(p for i in range(depth)
                       for p in (f"blocks/{i}/mlp/fc1/kernel", f"blocks/{i}/mlp/fc2/kernel"))
  return sites


class ViT(nnx.Module):
  """A ViT feature extractor following the clx backbone contract.

  Args:
    config: the architecture.
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision); LayerNorm
      statistics, the attention softmax and Gram taps are always float32.
    param_dtype: parameter dtype (float32).
    rngs: initialisation RNG (truncated-normal(0.02) dense kernels, as timm).
  """

  def __init__(self, config: ViTConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config, self.dtype = config, compute_dtype(dtype, "ViT")
    d = config.embed_dim
    self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, d, dtype=self.dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    if config.class_token:
      self.cls_token = nnx.Param(jnp.zeros((1, 1, d), param_dtype))
    self.pos_embed = nnx.Param(jax.nn.initializers.truncated_normal(0.02)(
        rngs.params(), (1, config.num_tokens, d), param_dtype))
    self.blocks = nnx.List([Block(config, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(config.depth)])
    self.norm = nnx.LayerNorm(d, epsilon=config.ln_eps, dtype=self.dtype, param_dtype=param_dtype,
                              use_fast_variance=False, rngs=rngs)

  def embed(self, x: jax.Array, prefix: jax.Array | None = None) -> jax.Array:
    """Input tokens: ``[CLS, *prefix, *patches]`` with position embeddings.

    Args:
      x: images ``(n, H, W, C)``, float (any real dtype; cast to the compute dtype).
      prefix: optional prompt tokens ``(p, d)`` (shared) or ``(n, p, d)``,
        inserted right after the CLS token (before the patch tokens; first when
        there is no CLS token). They get NO position embedding (the pretrained
        table has no slots for them), as in VPT / L2P / DualPrompt.

    Returns:
      ``(n, T, d)`` with ``T = num_prefix_tokens + p + num_patches``.
    """
    cfg = self.config
    x = jnp.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != (*cfg.img_size, cfg.in_chans):
      raise ValueError(
          f"ViT built for images (n, {cfg.img_size[0]}, {cfg.img_size[1]}, {cfg.in_chans}) (NHWC), "
          f"got {tuple(x.shape)}; build it with input_shape={tuple(x.shape[1:])} "
          "(load with resize_pos_embed=True to resample pretrained position embeddings)")
    n = x.shape[0]
    tokens = self.patch_embed(x.astype(self.dtype))
    pos = self.pos_embed[...].astype(self.dtype)
    lead = []
    if cfg.class_token:
      cls = self.cls_token[...].astype(self.dtype) + pos[:, :1]
      lead.append(jnp.broadcast_to(cls, (n, 1, cfg.embed_dim)))
    tokens = tokens + pos[:, cfg.num_prefix_tokens:]
    if prefix is not None:
      lead.append(_check_prefix(prefix, n, cfg.embed_dim).astype(self.dtype))
    return jnp.concatenate([*lead, tokens], axis=1) if lead else tokens

  def __call__(self, x: jax.Array, *, taps: str | None = None, prefix: jax.Array | None = None):
    """Pooled features, optionally with per-site input taps.

    Args:
      x: images ``(n, H, W, C)`` (NHWC, float).
      taps: ``None``; ``"inputs"`` → also ``{site: (n, T, d_in)}`` (q/k/v share
        one array, the ``norm1`` output); ``"gram"`` → also ``{site: {"gram":
        XᵀX (d_in, d_in) float32, "count": n·T}}`` over ALL ``T`` tokens of the
        batch (CLS, prompts and patches; InfLoRA's input matrix is ``gram /
        count``).
      prefix: optional prompt tokens ``(p, d)`` or ``(n, p, d)``, see :meth:`embed`.

    Returns:
      ``features (n, d)`` in the compute dtype (the CLS token after the final
      LayerNorm, or the mean of the patch tokens for ``pool="avg"``), and the
      taps dict when ``taps`` is given.
    """
    if taps not in (None, "inputs", "gram"):
      raise ValueError(f"taps must be None, 'inputs' or 'gram', got {taps!r}")
    cfg = self.config
    h = self.embed(x, prefix)
    recorded = []
    for i, block in enumerate(self.blocks):
      h, inputs = block(h)
      if taps is not None:
        recorded += [(tuple(f"blocks/{i}/{k}/kernel" for k in _TAP_KERNELS[role]), arr)
                     for role, arr in inputs.items()]
    num_lead = h.shape[1] - cfg.num_patches  # CLS + prompts
    if cfg.pool == "token":
      feats = self.norm(h[:, 0])
    elif cfg.fc_norm:
      feats = self.norm(h[:, num_lead:].astype(jnp.float32).mean(axis=1).astype(h.dtype))
    else:
      feats = self.norm(h)[:, num_lead:].astype(jnp.float32).mean(axis=1).astype(h.dtype)
    if taps is None:
      return feats
    if taps == "inputs":
      return feats, {path: arr for paths, arr in recorded for path in paths}
    out = {}
    for paths, arr in recorded:
      stat = gram_tap(arr)  # once for q, k and v (one input); a separate dict per site
      out.update({path: dict(stat) for path in paths})
    return feats, out


def gram_tap(x: jax.Array) -> dict[str, jax.Array]:
  """``{"gram": XᵀX (d, d) float32, "count": rows}`` over all leading axes of ``x (..., d)``."""
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return {"gram": jnp.matmul(rows.T, rows, precision=_HIGHEST),
          "count": jnp.asarray(rows.shape[0], jnp.float32)}


def _check_prefix(prefix, n: int, d: int) -> jax.Array:
  prefix = jnp.asarray(prefix)
  if prefix.ndim == 2:
    prefix = prefix[None]
  if prefix.ndim != 3 or prefix.shape[-1] != d or prefix.shape[0] not in (1, n):
    raise ValueError(f"prefix must be (p, {d}) or ({n}, p, {d}), got {tuple(prefix.shape)}")
  return jnp.broadcast_to(prefix, (n, *prefix.shape[1:]))


# ----------------------------------------------------------------------------
# Position-embedding resampling
# ----------------------------------------------------------------------------


def resize_pos_embed(pos_embed: np.ndarray, new_grid: Sequence[int], *, num_prefix_tokens: int = 1,
                     old_grid: Sequence[int] | None = None, method: str = "bilinear",
                     antialias: bool | None = None) -> np.ndarray:
  """Resample a learned position-embedding table to a new patch grid.

  The prefix (CLS) rows are kept; the grid rows are reshaped to
  ``(gh, gw, d)`` and resized with ``jax.image.resize`` (half-pixel centres,
  like ``F.interpolate(align_corners=False)``). The two timm paths are
  reproduced (checked to < 1e-6 for up- and downsampling): ``"bilinear"``
  without antialiasing is what timm's ``_load_weights`` does for ``.npz``
  checkpoints, ``"bicubic"`` with antialiasing (Keys a = −0.5 in both torch's
  antialiased kernel and JAX) what ``resample_abs_pos_embed`` does for state dicts.

  Args:
    pos_embed: ``(1, num_prefix_tokens + gh·gw, d)``.
    new_grid: ``(new_gh, new_gw)``.
    num_prefix_tokens: leading rows that are not part of the grid.
    old_grid: ``(gh, gw)``; inferred as square when omitted (as timm does).
    method: ``"bilinear"`` or ``"bicubic"``.
    antialias: antialias when downsampling; ``None`` → ``method == "bicubic"``
      (timm's choice for each method).

  Returns:
    ``(1, num_prefix_tokens + new_gh·new_gw, d)`` float32 NumPy array.
  """
  pos_embed = np.asarray(pos_embed, np.float32)
  if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
    raise ValueError(f"pos_embed must be (1, tokens, d), got {pos_embed.shape}")
  prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
  if old_grid is None:
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
      raise ValueError(
          f"cannot infer a square grid from {grid.shape[0]} position rows; pass old_grid")
    old_grid = (side, side)
  old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
  if old_grid[0] * old_grid[1] != grid.shape[0]:
    raise ValueError(f"old_grid {old_grid} does not match {grid.shape[0]} position rows")
  methods = {"bilinear": "linear", "bicubic": "cubic"}
  if method not in methods:
    raise ValueError(f"method must be 'bilinear' or 'bicubic', got {method!r}")
  antialias = method == "bicubic" if antialias is None else bool(antialias)
  if old_grid != new_grid:
    grid = np.asarray(jax.image.resize(
        jnp.asarray(grid.reshape(*old_grid, -1)), (*new_grid, grid.shape[-1]), methods[method],
        antialias=antialias, precision=_HIGHEST)).reshape(-1, grid.shape[-1])
  return np.concatenate([prefix, grid[None]], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------
# Checkpoint loading
# ----------------------------------------------------------------------------


class _Reader:
  """Reads arrays by key, checking shapes, and reports every problem at once."""

  def __init__(self, arrays: Mapping[str, Any], keys: Sequence[str], source: str):
    self.arrays, self.keys, self.source = arrays, set(keys), source
    self.used, self.missing, self.mismatched = set(), [], []
    self._stacked: dict[str, np.ndarray] = {}  # scanned arrays, read once for all blocks

  def get(self, key: str, shape: tuple[int, ...] | None, idx: int | None = None):
    """The array at ``key`` (``[idx]`` for stacked layouts), or None after recording a problem."""
    self.used.add(key)
    if key not in self.keys:
      self.missing.append(key)
      return None
    if idx is not None:
      if key not in self._stacked:
        self._stacked[key] = np.asarray(self.arrays[key])
      arr = self._stacked[key]
      if arr.ndim == 0 or arr.shape[0] <= idx:
        self.mismatched.append(f"{key}: stacked shape {arr.shape} has no block {idx}")
        return None
      arr = arr[idx]
    else:
      arr = np.asarray(self.arrays[key])
    if shape is not None and tuple(arr.shape) != tuple(shape):
      where = f"{key}[{idx}]" if idx is not None else key
      self.mismatched.append(
          f"{where}: checkpoint shape {tuple(arr.shape)}, config expects {tuple(shape)}")
      return None
    return arr.astype(np.float32)

  def check(self, config: ViTConfig, hint: str = ""):
    unexpected = sorted(self.keys - self.used)
    problems = []
    if self.missing:
      problems.append(f"missing keys ({len(self.missing)}): {_short(sorted(set(self.missing)))}")
    if unexpected:
      problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    if self.mismatched:
      problems.append(f"shape mismatches ({len(self.mismatched)}): {_short(self.mismatched)}")
    if problems:
      raise ValueError(
          f"{self.source} does not match ViT config (embed_dim={config.embed_dim}, "
          f"depth={config.depth}, num_heads={config.num_heads}, mlp_dim={config.mlp_dim}, "
          f"patch_size={config.patch_size}, img_size={config.img_size}, "
          f"class_token={config.class_token}, fc_norm={config.fc_norm}):\n  "
          + "\n  ".join(problems) + hint)


def _short(items: Sequence[str], limit: int = 12) -> str:
  items = list(items)
  more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def _pos_embed(reader: _Reader, key: str, config: ViTConfig, resize: bool | str,
               default_method: str):
  """Reads the position table, resampling it to the config grid when allowed."""
  want = (1, config.num_tokens, config.embed_dim)
  if key not in reader.keys:
    return reader.get(key, want)
  arr = np.asarray(reader.arrays[key])
  if arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[2] != config.embed_dim or arr.shape == want:
    return reader.get(key, want)
  reader.used.add(key)
  if not resize:
    reader.mismatched.append(
        f"{key}: checkpoint shape {arr.shape}, config expects {want} (the image size differs from "
        "the checkpoint's; pass resize_pos_embed=True to resample the position embeddings)")
    return None
  method = default_method if resize is True else resize
  try:
    return resize_pos_embed(arr, config.grid_size, num_prefix_tokens=config.num_prefix_tokens,
                            method=method)
  except ValueError as err:
    reader.mismatched.append(f"{key}: cannot resample {arr.shape} to {want}: {err}")
    return None


def _nest(params: dict[str, Any]) -> Params:
  """Flat ``{"a/b": array}`` → nested dict with string keys."""
  nested: dict[str, Any] = {}
  for path, value in params.items():
    node = nested
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return to_str_keys(nested)


def _read_head(reader: _Reader, kernel_key: str, bias_key: str, transpose: bool) -> Head | None:
  if kernel_key not in reader.keys and bias_key not in reader.keys:
    return None
  kernel = reader.get(kernel_key, None)
  bias = reader.get(bias_key, None)
  if kernel is None or bias is None:
    return None
  kernel = kernel.T if transpose else kernel
  if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
    reader.mismatched.append(
        f"head: kernel {kernel.shape} and bias {bias.shape} do not fit together")
    return None
  return {"kernel": kernel, "bias": bias}


def augreg_npz_params(arrays: Mapping[str, Any], config: ViTConfig, *,
                      resize_pos_embed: bool | str = False,
                      source: str = "npz checkpoint") -> tuple[Params, Head | None]:
  """Maps a big_vision / AugReg ``.npz`` onto clx ViT parameters.

  Follows timm's ``_load_weights`` (timm 1.0.x, ``vision_transformer.py``):
  an optional key prefix (``opt/target/``, ``params/``, ``params/img/``;
  keys outside it are ignored), the ``vision_transformer``/AugReg layout
  (``Transformer/encoderblock_<i>/{LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3}``, ``Transformer/posembed_input/pos_embedding``)
  and the big_vision layout (``{LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0}``, top-level ``pos_embedding``, optionally scanned:
  one ``Transformer/encoderblock/...`` array stacked over blocks).

  Shapes: ``embedding/kernel (p, p, C, d)``; ``query|key|value/kernel (d, heads,
  d_h)`` and ``bias (heads, d_h)`` → ``(d, d)``/``(d,)``; ``out/kernel (heads,
  d_h, d)`` → ``(d, d)``; ``MlpBlock/Dense_0|1`` kernels are already ``(in,
  out)``; ``head/kernel (d, classes)``.

  Args:
    arrays: key → array (an ``np.load`` result works; arrays are read lazily).
    config: the target architecture; every shape is checked against it.
    resize_pos_embed: resample the position table when the checkpoint's grid
      differs from ``config.grid_size`` (``True`` = bilinear, as timm's npz
      loader, or ``"bilinear"``/``"bicubic"``, see :func:`resize_pos_embed`);
      otherwise that is an error. The checkpoint grid must be square.
    source: name used in error messages.

  Returns:
    ``(params, head)``: nested params for :class:`ViT` (float32 NumPy) and the
    head ``{"kernel": (d, classes), "bias": (classes,)}`` or ``None``.

  Raises:
    ValueError: listing all missing / unexpected keys and shape mismatches
      (``pre_logits/*`` of pre-AugReg in21k checkpoints shows up as unexpected:
      the representation layer is not supported).
  """
  all_keys = list(arrays.keys())
  prefix = ""
  for cand in ("opt/target/", "params/", "params/img/"):  # timm's order
    if f"{cand}embedding/kernel" in all_keys:
      prefix = cand
      break
  if f"{prefix}embedding/kernel" not in all_keys:
    raise ValueError(f"{source} is not a ViT .npz: no 'embedding/kernel' (with prefix '', "
                     "'opt/target/', 'params/' or 'params/img/'); "
                     f"keys: {_short(sorted(all_keys), 8)}")
  keys = [k for k in all_keys if k.startswith(prefix)]
  view = {k[len(prefix):]: _Lazy(arrays, k) for k in keys}
  reader = _Reader(view, list(view), source)
  big_vision = (prefix.startswith("params/") or "pos_embedding" in view
                or "Transformer/encoderblock/LayerNorm_0/scale" in view)
  scanned = "Transformer/encoderblock/LayerNorm_0/scale" in view
  mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
  c = config
  d, hd, nh, p = c.embed_dim, c.head_dim, c.num_heads, c.patch_size
  out: dict[str, Any] = {}
  out["patch_embed/kernel"] = reader.get("embedding/kernel", (p, p, c.in_chans, d))
  out["patch_embed/bias"] = reader.get("embedding/bias", (d,))
  if c.class_token:
    out["cls_token"] = reader.get("cls", (1, 1, d))
  pos_key = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
  out["pos_embed"] = _pos_embed(reader, pos_key, c, resize_pos_embed, "bilinear")
  out["norm/scale"] = reader.get("Transformer/encoder_norm/scale", (d,))
  out["norm/bias"] = reader.get("Transformer/encoder_norm/bias", (d,))
  for i in range(c.depth):
    if scanned:  # one array per parameter, stacked over blocks
      blk, idx = "Transformer/encoderblock/", i
    else:
      blk, idx = f"Transformer/encoderblock_{i}/", None
    att = f"{blk}MultiHeadDotProductAttention_{mha}/"
    dst = f"blocks/{i}/"
    for name, ln in (("norm1", "LayerNorm_0"), ("norm2", f"LayerNorm_{ln2}")):
      out[f"{dst}{name}/scale"] = reader.get(f"{blk}{ln}/scale", (d,), idx)
      out[f"{dst}{name}/bias"] = reader.get(f"{blk}{ln}/bias", (d,), idx)
    for name in ("query", "key", "value"):
      kernel = reader.get(f"{att}{name}/kernel", (d, nh, hd), idx)
      bias = reader.get(f"{att}{name}/bias", (nh, hd), idx)
      out[f"{dst}attn/{name}/kernel"] = None if kernel is None else kernel.reshape(d, d)
      out[f"{dst}attn/{name}/bias"] = None if bias is None else bias.reshape(d)
    kernel = reader.get(f"{att}out/kernel", (nh, hd, d), idx)
    out[f"{dst}attn/out/kernel"] = None if kernel is None else kernel.reshape(d, d)
    out[f"{dst}attn/out/bias"] = reader.get(f"{att}out/bias", (d,), idx)
    for j, (name, shape) in enumerate((("fc1", (d, c.mlp_dim)), ("fc2", (c.mlp_dim, d)))):
      dense = f"{blk}MlpBlock_{mlp}/Dense_{j}/"
      out[f"{dst}mlp/{name}/kernel"] = reader.get(f"{dense}kernel", shape, idx)
      out[f"{dst}mlp/{name}/bias"] = reader.get(f"{dense}bias", shape[1:], idx)
  head = _read_head(reader, "head/kernel", "head/bias", transpose=False)
  reader.check(c)
  return _nest(out), head


class _Lazy:
  """Defers ``arrays[key]`` (an ``NpzFile`` decompresses on access) until read."""

  def __init__(self, arrays, key):
    self.arrays, self.key = arrays, key

  def __array__(self, dtype=None, copy=None):
    arr = np.asarray(self.arrays[self.key])
    return arr if dtype is None else arr.astype(dtype)


def timm_state_dict_params(state_dict: Mapping[str, Any], config: ViTConfig, *,
                           resize_pos_embed: bool | str = False,
                           source: str = "timm state dict") -> tuple[Params, Head | None]:
  """Maps a timm ``VisionTransformer`` state dict onto clx ViT parameters.

  Keys (timm 0.6–1.0): ``patch_embed.proj.weight (d, C, p, p)`` → HWIO;
  ``cls_token (1, 1, d)``; ``pos_embed (1, T, d)``; ``blocks.<i>.norm1|norm2.
  weight|bias``; ``blocks.<i>.attn.qkv.weight (3d, d)`` split row-wise into q,
  k, v (each transposed to ``(d, d)``) and ``qkv.bias (3d,)``;
  ``blocks.<i>.attn.proj``, ``blocks.<i>.mlp.fc1|fc2`` (``(out, in)`` →
  transposed); ``norm.weight|bias`` (or ``fc_norm.*`` when ``config.fc_norm``);
  optional ``head.weight (classes, d)``/``head.bias``. Variants clx does not
  implement (layer scale ``ls1``, ``q_norm``, register tokens, ``norm_pre``,
  pre-logits, attention pooling) surface as unexpected keys.

  Args:
    state_dict: key → array (NumPy or anything ``np.asarray`` accepts).
    config: the target architecture; every shape is checked against it.
    resize_pos_embed: see :func:`augreg_npz_params` (``True`` = ``"bicubic"``
      with antialiasing here, as timm does for state dicts).
    source: name used in error messages.

  Returns:
    ``(params, head)`` as :func:`augreg_npz_params`.
  """
  reader = _Reader(state_dict, list(state_dict.keys()), source)
  c = config
  d, p = c.embed_dim, c.patch_size
  out: dict[str, Any] = {}
  w = reader.get("patch_embed.proj.weight", (d, c.in_chans, p, p))
  out["patch_embed/kernel"] = None if w is None else w.transpose(2, 3, 1, 0)
  out["patch_embed/bias"] = reader.get("patch_embed.proj.bias", (d,))
  if c.class_token:
    out["cls_token"] = reader.get("cls_token", (1, 1, d))
  out["pos_embed"] = _pos_embed(reader, "pos_embed", c, resize_pos_embed, "bicubic")
  norm = "fc_norm" if c.fc_norm else "norm"
  out["norm/scale"] = reader.get(f"{norm}.weight", (d,))
  out["norm/bias"] = reader.get(f"{norm}.bias", (d,))
  for i in range(c.depth):
    src, dst = f"blocks.{i}.", f"blocks/{i}/"
    for name in ("norm1", "norm2"):
      out[f"{dst}{name}/scale"] = reader.get(f"{src}{name}.weight", (d,))
      out[f"{dst}{name}/bias"] = reader.get(f"{src}{name}.bias", (d,))
    qkv_w = reader.get(f"{src}attn.qkv.weight", (3 * d, d))
    qkv_b = reader.get(f"{src}attn.qkv.bias", (3 * d,))
    for j, name in enumerate(("query", "key", "value")):
      rows = slice(j * d, (j + 1) * d)
      out[f"{dst}attn/{name}/kernel"] = (None if qkv_w is None
                                         else np.ascontiguousarray(qkv_w[rows].T))
      out[f"{dst}attn/{name}/bias"] = None if qkv_b is None else qkv_b[rows]
    for name, key, shape in (("attn/out", "attn.proj", (d, d)),
                             ("mlp/fc1", "mlp.fc1", (c.mlp_dim, d)),
                             ("mlp/fc2", "mlp.fc2", (d, c.mlp_dim))):
      weight = reader.get(f"{src}{key}.weight", shape)
      out[f"{dst}{name}/kernel"] = None if weight is None else np.ascontiguousarray(weight.T)
      out[f"{dst}{name}/bias"] = reader.get(f"{src}{key}.bias", shape[:1])
  head = _read_head(reader, "head.weight", "head.bias", transpose=True)
  other = "norm" if c.fc_norm else "fc_norm"
  hint = ""
  if f"{other}.weight" in state_dict:
    hint = (f"\n  (the checkpoint has '{other}.*': build with fc_norm={not c.fc_norm}"
            + (", pool='avg'" if not c.fc_norm else "") + ")")
  reader.check(c, hint)
  return _nest(out), head


_HUB_HINT = (
    "clx never downloads weights (no network or model hub is assumed). Download the checkpoint "
    "elsewhere and pass its local path: a big_vision/AugReg .npz (e.g. "
    "https://storage.googleapis.com/vit_models/augreg/"
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz, timm's "
    "vit_base_patch16_224_in21k / vit_base_patch16_224.augreg_in21k) or a timm .safetensors "
    "state dict (model.safetensors from the hub repo timm/vit_base_patch16_224.augreg_in21k).")


def load_vit_weights(weights: str | os.PathLike | Mapping[str, Any], config: ViTConfig, *,
                     resize_pos_embed: bool | str = False) -> tuple[Params, Head | None]:
  """Loads ViT weights from a local ``.npz`` / ``.safetensors`` file or an in-memory mapping.

  Args:
    weights: a path ending in ``.npz`` (big_vision / AugReg, see
      :func:`augreg_npz_params`) or ``.safetensors`` (timm state dict, see
      :func:`timm_state_dict_params`), or a mapping of arrays in either layout
      (detected by ``embedding/kernel`` vs ``patch_embed.proj.weight``).
    config: the target architecture.
    resize_pos_embed: resample position embeddings to ``config.img_size``.

  Returns:
    ``(params, head)``.

  Raises:
    FileNotFoundError: the path does not exist (hub names such as
      ``"vit_base_patch16_224.augreg_in21k"`` land here, with instructions).
    ValueError: unsupported file type or a checkpoint that does not match.
  """
  if isinstance(weights, Mapping):
    keys = list(weights.keys())
    if any(k.endswith("embedding/kernel") for k in keys):
      return augreg_npz_params(weights, config, resize_pos_embed=resize_pos_embed,
                               source="npz mapping")
    if "patch_embed.proj.weight" in weights:
      return timm_state_dict_params(weights, config, resize_pos_embed=resize_pos_embed)
    raise ValueError("weights mapping is neither a big_vision/AugReg layout ('embedding/kernel') "
                     "nor a timm state dict ('patch_embed.proj.weight'); "
                     f"keys: {_short(sorted(keys), 8)}")
  path = os.fspath(weights)
  if not os.path.isfile(path):
    is_file_name = (path.endswith((".npz", ".safetensors"))
                    and not path.startswith(("hf_hub:", "hf-hub:")))
    what = ("no such file" if is_file_name
            else "not a local file (model-hub names are not supported)")
    raise FileNotFoundError(f"ViT weights {path!r}: {what}. {_HUB_HINT}")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as arrays:
      return augreg_npz_params(arrays, config, resize_pos_embed=resize_pos_embed, source=path)
  if path.endswith(".safetensors"):
    return timm_state_dict_params(_read_safetensors(path), config,
                                  resize_pos_embed=resize_pos_embed, source=path)
  raise ValueError(f"unsupported ViT weights file {path!r}: expected a .npz (big_vision/AugReg) or "
                   ".safetensors (timm) file; convert PyTorch .pth/.bin with "
                   "safetensors.torch.save_file(model.state_dict(), 'model.safetensors').")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ImportError(f"reading {path} needs the 'safetensors' package "
                      "(a core dependency of clx: pip install safetensors)") from err

  out = {}
  with safe_open(path, framework="flax") as f:  # "flax" handles bfloat16/float16 too
    for key in f.keys():
      out[key] = np.asarray(f.get_tensor(key), np.float32)
  return out


# ----------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------


def vit(input_shape: Sequence[int] = (224, 224, 3), *, variant: str = "B/16",
        weights: str | os.PathLike | Mapping[str, Any] | None = None, pool: str = "token",
        fc_norm: bool | None = None, class_token: bool = True, dtype: Any = jnp.float32,
        resize_pos_embed: bool | str = False, return_head: bool = False, seed: int = 0,
        **config_overrides):
  """A ViT backbone, randomly initialised or loaded from a local checkpoint.

  Args:
    input_shape: image shape ``(H, W, C)`` (NHWC inputs ``(n, H, W, C)``).
    variant: ``"test"``, ``"Ti/16"``, ``"S/16"``, ``"B/16"`` or ``"L/16"``.
    weights: local ``.npz`` / ``.safetensors`` path or a mapping of arrays
      (see :func:`load_vit_weights`); ``None`` → random init from ``seed``.
    pool: ``"token"`` (CLS) or ``"avg"`` (mean of the patch tokens).
    fc_norm: final LayerNorm after pooling; ``None`` → timm's default
      (``pool == "avg"``). Use ``False`` with ``pool="avg"`` for big_vision gap models.
    class_token: whether the model has a CLS token.
    dtype: compute dtype (parameters stay float32).
    resize_pos_embed: allow resampling pretrained position embeddings to ``input_shape``.
    return_head: also return the checkpoint's classifier head (``None`` if absent).
    seed: initialisation seed (ignored when ``weights`` is given).
    **config_overrides: other :class:`ViTConfig` fields (``embed_dim=...``, ...).

  Returns:
    A :class:`~clx.models.base.Backbone` (``feature_dim = embed_dim``, sites as
    in :func:`vit_sites`), or ``(backbone, head)`` with ``return_head=True``.
  """
  fc_norm = (pool == "avg") if fc_norm is None else bool(fc_norm)
  config = vit_config(variant, input_shape, pool=pool, fc_norm=fc_norm, class_token=class_token,
                      **config_overrides)
  size = "x".join(str(s) for s in config.img_size)
  name = f"vit-{_variant_key(variant).lower().replace('/', '')}-{size}"
  sites = vit_sites(config.depth)
  head = None
  if weights is None:
    module = ViT(config, dtype=dtype, rngs=nnx.Rngs(seed))
    backbone = Backbone.from_module(name, module, config.embed_dim, tuple(input_shape), sites,
                                    site_groups=shared_input_groups(sites))
  else:
    params, head = load_vit_weights(weights, config, resize_pos_embed=resize_pos_embed)
    abstract = nnx.eval_shape(lambda: ViT(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, template = nnx.split(abstract, nnx.Param)
    params = jax.tree.map(jnp.asarray, params)
    nnx.replace_by_pure_dict(template, params)
    backbone = Backbone(name, graphdef, template, params, config.embed_dim, tuple(input_shape),
                        sites, None, site_groups=shared_input_groups(sites))
  return (backbone, head) if return_head else backbone


__all__ = [
    "VARIANTS", "Attention", "Block", "MlpBlock", "PatchEmbed", "ViT", "ViTConfig",
    "augreg_npz_params", "gram_tap", "load_vit_weights", "resize_pos_embed",
    "timm_state_dict_params", "vit", "vit_config", "vit_sites",
]
