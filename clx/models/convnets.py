"""The convolutional nets of the GPM/BECAME papers: 5-layer AlexNet and reduced ResNet-18.

Both follow the official code's layer shapes (``sahagobinda/GPM`` ``main_cifar100.py``
and ``main_five_dataset.py``; BECAME ``GPM-based/model.py``): no biases anywhere,
batch norm *without running statistics* (PyTorch ``track_running_stats=False``,
so the statistics of the current batch normalise in training **and** in
evaluation), dropout in the AlexNet, per-task heads added by the method.

Layout: inputs are NHWC float images (the official code is NCHW); kernels are
Flax HWIO. A PyTorch state dict maps over by transposing conv kernels
``(O, I, kh, kw) → (kh, kw, I, O)`` and permuting the first linear layer's
input axis from ``(C, H, W)`` to ``(H, W, C)`` order
(:func:`alexnet_params_from_torch`, :func:`resnet18_params_from_torch`); the
parity tests check logits against PyTorch with the same weights.

GPM sites: every conv kernel and (AlexNet) the two hidden linear kernels. The
representation of a conv site is the matrix of the **patches** its kernel sees
(im2col, as the official ``get_representation_matrix``), one row per output
position, flattened in the kernel's ``(kh, kw, C_in)`` order so a basis of that
space projects the Flax kernel reshaped to ``(kh·kw·C_in, C_out)``. With
``taps="inputs"`` a conv site gives ``(n, positions, kh·kw·C_in)``; with
``taps="gram"`` the patch Gram matrix and the number of patches.

Training-time extras (the :class:`~clx.models.base.Backbone` forwards them):
``rng`` turns dropout on (evaluation passes no rng: dropout off, as
``model.eval()``), ``mask`` (n,) excludes padding rows from the batch
statistics (the loop pads the last batch of an epoch to a fixed shape).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clx.models.base import Backbone
from clx.models.mlp import torch_linear_init
from clx.ops.gradient_projection import projected_dense

BN_EPS = 1e-5  # PyTorch BatchNorm default


class BatchStatNorm(nnx.Module):
  """Batch norm that always uses the current batch's statistics (no running stats).

  ``y = (x − mean) / sqrt(var + eps) · scale + bias`` with the mean and the
  biased variance over every axis but the last (channels), weighted by
  ``mask`` (n,) when given so padding rows do not count. PyTorch init:
  scale 1, bias 0.
  """

  def __init__(self, features: int, *, eps: float = BN_EPS):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bf16 → f32; f64 stays
    if mask is None:
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
    else:
      w = mask.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
      count = jnp.maximum(jnp.sum(w) * math.prod(x.shape[1:-1]), 1.0)
      mean = jnp.sum(xf * w, axes) / count
      var = jnp.sum(jnp.square(xf - mean) * w, axes) / count
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout (PyTorch ``nn.Dropout``); identity when ``rng`` is None."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
  """``nn.MaxPool2d(window)`` on NHWC (floor mode: trailing rows/cols dropped)."""
  return nnx.max_pool(x, (window, window), strides=(window, window), padding="VALID")


def conv_patches(x: jax.Array, kernel_size: int, stride: int = 1, padding: int = 0) -> jax.Array:
  """The patches a conv kernel sees: ``(n, positions, kh·kw·C)`` in (kh, kw, C) order.

  The GPM representation of a conv layer (official ``get_representation_matrix``
  builds the same columns with loops, in PyTorch's (C, kh, kw) order).
  """
  n, c = x.shape[0], x.shape[-1]
  p = jax.lax.conv_general_dilated_patches(
      x, (kernel_size, kernel_size), (stride, stride), [(padding, padding)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # XLA orders the patch features (C, kh, kw); the Flax kernel is (kh, kw, C).
  p = p.reshape(n, -1, c, kernel_size * kernel_size).swapaxes(-1, -2)
  return p.reshape(n, p.shape[1], kernel_size * kernel_size * c)


def _conv(d_in: int, d_out: int, k: int, stride: int, padding: int, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(d_in, d_out, (k, k), strides=(stride, stride), padding=[(padding, padding)] * 2,
                  use_bias=False, kernel_init=torch_linear_init(d_in * k * k), rngs=rngs)


def _dense(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=torch_linear_init(d_in), rngs=rngs)


class _Taps:
  """Collects site inputs during a forward pass and turns them into taps."""

  def __init__(self, mode: str | None, mask: jax.Array | None):
    self.mode, self.mask, self.out = mode, mask, {}

  def conv(self, site: str, x: jax.Array, k: int, stride: int, padding: int):
    if self.mode is not None:
      self._add(site, conv_patches(x, k, stride, padding))

  def dense(self, site: str, x: jax.Array):
    if self.mode is not None:
      self._add(site, x)

  def _add(self, site, rows):
    if self.mode == "inputs":
      self.out[site] = rows
      return
    flat = rows.reshape(-1, rows.shape[-1]).astype(jnp.float32)
    per_example = flat.shape[0] // rows.shape[0]
    if self.mask is not None:
      w = jnp.repeat(self.mask.astype(jnp.float32), per_example)
      flat, count = flat * w[:, None], jnp.sum(w)
    else:
      count = jnp.asarray(flat.shape[0], jnp.float32)
    self.out[site] = {"gram": flat.T @ flat, "count": count}


def _linear(layer: nnx.Linear, site: str, h: jax.Array, grad_projection) -> jax.Array:
  if site in grad_projection:
    basis, scale = grad_projection[site]
    return projected_dense(h, layer.kernel[...], basis, scale)
  return layer(h)


def _rng(rng, i):
  return None if rng is None else jax.random.fold_in(rng, i)


class AlexNet(nnx.Module):
  """GPM's 5-layer AlexNet for 32×32 CIFAR: 3 conv + 2 FC, bias-free, batch-stat BN.

  conv 4×4 (64) → BN → ReLU → dropout 0.2 → maxpool 2 → conv 3×3 (128) → BN →
  ReLU → dropout 0.2 → maxpool → conv 2×2 (256) → BN → ReLU → dropout 0.5 →
  maxpool → flatten (2·2·256) → fc 2048 → BN → ReLU → dropout 0.5 → fc 2048 →
  BN → ReLU → dropout 0.5 = features (n, 2048). Heads (bias-free linear per
  task) belong to the method.
  """

  def __init__(self, input_shape: Sequence[int] = (32, 32, 3), *,
               channels: Sequence[int] = (64, 128, 256), kernels: Sequence[int] = (4, 3, 2),
               hidden: int = 2048, drop_conv: float = 0.2, drop_fc: float = 0.5, rngs: nnx.Rngs):
    h, w, c = input_shape
    self.kernels = tuple(kernels)
    self.drops = (drop_conv, drop_conv, drop_fc)
    self.drop_fc = drop_fc
    sizes = (c, *channels)
    for i, (d_in, d_out, k) in enumerate(zip(sizes[:-1], sizes[1:], kernels), start=1):
      setattr(self, f"conv{i}", _conv(d_in, d_out, k, 1, 0, rngs))
      setattr(self, f"bn{i}", BatchStatNorm(d_out))
      h, w = (h - k + 1) // 2, (w - k + 1) // 2
    if h < 1 or w < 1:
      raise ValueError(f"input {tuple(input_shape)} is too small for kernels {tuple(kernels)}")
    self.flat = h * w * channels[-1]
    self.fc1, self.bn4 = _dense(self.flat, hidden, rngs), BatchStatNorm(hidden)
    self.fc2, self.bn5 = _dense(hidden, hidden, rngs), BatchStatNorm(hidden)

  def __call__(self, x, *, taps=None, grad_projection=None, rng=None, mask=None):
    grad_projection = grad_projection or {}
    tap = _Taps(taps, mask)
    for i, k in enumerate(self.kernels, start=1):
      tap.conv(f"conv{i}/kernel", x, k, 1, 0)
      x = getattr(self, f"conv{i}")(x)
      x = jax.nn.relu(getattr(self, f"bn{i}")(x, mask))
      x = max_pool(dropout(x, self.drops[i - 1], _rng(rng, i)))
    h = x.reshape(x.shape[0], -1)
    for i, (fc, bn) in enumerate(((self.fc1, self.bn4), (self.fc2, self.bn5)), start=1):
      site = f"fc{i}/kernel"
      tap.dense(site, h)
      h = jax.nn.relu(bn(_linear(fc, site, h, grad_projection), mask))
      h = dropout(h, self.drop_fc, _rng(rng, 10 + i))
    return h if taps is None else (h, tap.out)


class BasicBlock(nnx.Module):
  """ResNet basic block with batch-stat BN and a 1×1 conv shortcut when the shape changes."""

  def __init__(self, d_in: int, d_out: int, stride: int, rngs: nnx.Rngs):
    self.stride = stride
    self.conv1, self.bn1 = _conv(d_in, d_out, 3, stride, 1, rngs), BatchStatNorm(d_out)
    self.conv2, self.bn2 = _conv(d_out, d_out, 3, 1, 1, rngs), BatchStatNorm(d_out)
    self.has_shortcut = stride != 1 or d_in != d_out
    if self.has_shortcut:
      self.shortcut, self.bn_shortcut = _conv(d_in, d_out, 1, stride, 0, rngs), BatchStatNorm(d_out)

  def __call__(self, x, tap: _Taps, prefix: str, mask):
    tap.conv(f"{prefix}/conv1/kernel", x, 3, self.stride, 1)
    out = jax.nn.relu(self.bn1(self.conv1(x), mask))
    tap.conv(f"{prefix}/conv2/kernel", out, 3, 1, 1)
    out = self.bn2(self.conv2(out), mask)
    if self.has_shortcut:
      tap.conv(f"{prefix}/shortcut/kernel", x, 1, self.stride, 0)
      x = self.bn_shortcut(self.shortcut(x), mask)
    return jax.nn.relu(out + x)


class ResNet18(nnx.Module):
  """The reduced ResNet-18 of GPM/BECAME (nf = 20): 4 stages × 2 basic blocks.

  conv 3×3 (nf, stride ``stem_stride``: 2 for 84×84 miniImageNet as BECAME, 1
  for 32×32 as GPM's 5-datasets) → BN → ReLU → stages of nf, 2nf, 4nf, 8nf
  channels (strides 1, 2, 2, 2) → average pool 2 → flatten in (C, H, W) order
  (as PyTorch) = features (n, 8nf·h·w): 1440 for 84×84, 640 for 32×32.
  """

  def __init__(self, input_shape: Sequence[int] = (84, 84, 3), *, nf: int = 20,
               stem_stride: int | None = None, blocks: Sequence[int] = (2, 2, 2, 2),
               rngs: nnx.Rngs):
    h, w, c = input_shape
    self.stem_stride = stem_stride if stem_stride is not None else (2 if h > 32 else 1)
    self.conv1, self.bn1 = _conv(c, nf, 3, self.stem_stride, 1, rngs), BatchStatNorm(nf)
    h, w = _out(h, 3, self.stem_stride, 1), _out(w, 3, self.stem_stride, 1)
    d_in, stages = nf, []
    for i, n_blocks in enumerate(blocks):
      d_out, stride = nf * 2**i, 1 if i == 0 else 2
      stage = []
      for b in range(n_blocks):
        stage.append(BasicBlock(d_in, d_out, stride if b == 0 else 1, rngs))
        d_in = d_out
      h, w = _out(h, 3, stride, 1), _out(w, 3, stride, 1)
      stages.append(nnx.List(stage))
    self.layers = nnx.List(stages)
    h, w = h // 2, w // 2
    if h < 1 or w < 1:
      raise ValueError(f"input {tuple(input_shape)} is too small for ResNet-18")
    self.feature_dim = h * w * d_in

  def __call__(self, x, *, taps=None, grad_projection=None, rng=None, mask=None):
    del grad_projection, rng  # all sites are convs (projected in transform_grads); no dropout
    tap = _Taps(taps, mask)
    tap.conv("conv1/kernel", x, 3, self.stem_stride, 1)
    out = jax.nn.relu(self.bn1(self.conv1(x), mask))
    for i, stage in enumerate(self.layers):
      for b, block in enumerate(stage):
        out = block(out, tap, f"layers/{i}/{b}", mask)
    out = nnx.avg_pool(out, (2, 2), strides=(2, 2), padding="VALID")
    # (C, H, W) flattening as PyTorch's ``view``, so official heads load as they are.
    feats = out.transpose(0, 3, 1, 2).reshape(out.shape[0], -1)
    return feats if taps is None else (feats, tap.out)


def _out(size: int, k: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - k) // stride + 1


def conv_sites(module: nnx.Module) -> tuple[str, ...]:
  """Kernel paths of every conv/linear kernel in forward order (official param order)."""
  _, state = nnx.split(module, nnx.Param)
  paths = ["/".join(str(p) for p in path) for path, _ in nnx.to_flat_state(state)]
  return tuple(p for p in paths if p.endswith("kernel"))


def alexnet(input_shape: Sequence[int] = (32, 32, 3), *, channels: Sequence[int] = (64, 128, 256),
            hidden: int = 2048, drop_conv: float = 0.2, drop_fc: float = 0.5,
            seed: int = 0) -> Backbone:
  """GPM's AlexNet backbone with PyTorch-default init from ``seed``; features (n, hidden)."""
  if len(input_shape) != 3:
    raise ValueError(f"alexnet needs NHWC images (H, W, C), got input shape {tuple(input_shape)}")
  module = AlexNet(tuple(input_shape), channels=tuple(channels), hidden=hidden,
                   drop_conv=drop_conv, drop_fc=drop_fc, rngs=nnx.Rngs(seed))
  sites = {"conv": tuple(f"conv{i}/kernel" for i in (1, 2, 3)), "mlp": ("fc1/kernel", "fc2/kernel")}
  return Backbone.from_module(
      "alexnet", module, hidden, tuple(input_shape), sites, supports_grad_projection=True,
      grad_projection_sites=("fc1/kernel", "fc2/kernel"), train_kwargs=("rng", "mask"))


def resnet18(input_shape: Sequence[int] = (84, 84, 3), *, nf: int = 20,
             stem_stride: int | None = None, seed: int = 0) -> Backbone:
  """The reduced ResNet-18 backbone (nf 20) with PyTorch-default init from ``seed``."""
  if len(input_shape) != 3:
    raise ValueError(f"resnet18 needs NHWC images (H, W, C), got input shape {tuple(input_shape)}")
  module = ResNet18(tuple(input_shape), nf=nf, stem_stride=stem_stride, rngs=nnx.Rngs(seed))
  sites = {"conv": conv_sites(module)}
  return Backbone.from_module(f"resnet18-nf{nf}", module, module.feature_dim, tuple(input_shape),
                              sites, train_kwargs=("mask",))


def alexnet_gpm_samples() -> dict[str, int]:
  """Examples per site in the official AlexNet representation (``batch_list``)."""
  return {"conv1/kernel": 24, "conv2/kernel": 100, "conv3/kernel": 100,
          "fc1/kernel": 125, "fc2/kernel": 125}


def resnet18_gpm_samples(backbone: Backbone) -> dict[str, int]:
  """Examples per site in the official ResNet-18 representation (``batch_list``).

  The official list gives, per block input in forward order, 10 for the stem
  and the first three blocks' convs, 50 for stage 3's convs … (scaled to fit
  memory); a shortcut uses its block's first conv's count.
  """
  counts = [10, 10, 10, 10, 10, 10, 10, 10, 50, 50, 50, 100, 100, 100, 100, 100, 100]
  out, i = {}, 0
  for site in backbone.sites["conv"]:
    if site.endswith("shortcut/kernel"):
      out[site] = out[site.replace("shortcut", "conv1")]
      continue
    out[site] = counts[min(i, len(counts) - 1)]
    i += 1
  return out


# -- PyTorch state dicts (official module names) → clx params ---------------------------


def _conv_from_torch(w) -> np.ndarray:
  return np.asarray(w, np.float32).transpose(2, 3, 1, 0)


def _flatten_perm(channels: int, h: int, w: int) -> np.ndarray:
  """Row permutation taking a (C, H, W)-flattened input axis to (H, W, C) order."""
  return np.arange(channels * h * w).reshape(channels, h, w).transpose(1, 2, 0).reshape(-1)


def alexnet_params_from_torch(state_dict, backbone: Backbone) -> dict:
  """clx params from an official AlexNet ``state_dict`` (conv1…3, bn1…5, fc1, fc2).

  Heads (``fc3.*``) are not part of the backbone: convert them with
  ``np.asarray(w).T`` per task.
  """
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  need = [f"conv{i}.weight" for i in (1, 2, 3)] + ["fc1.weight", "fc2.weight"] + [
      f"bn{i}.{p}" for i in range(1, 6) for p in ("weight", "bias")]
  missing = [k for k in need if k not in sd]
  if missing:
    raise KeyError(f"AlexNet state dict lacks {missing}")
  params = {f"conv{i}": {"kernel": _conv_from_torch(sd[f"conv{i}.weight"])} for i in (1, 2, 3)}
  c = sd["conv3.weight"].shape[0]
  side = int(round(math.sqrt(sd["fc1.weight"].shape[1] // c)))
  params["fc1"] = {"kernel": sd["fc1.weight"].T[_flatten_perm(c, side, side)]}
  params["fc2"] = {"kernel": sd["fc2.weight"].T}
  for i in range(1, 6):
    params[f"bn{i}"] = {"scale": sd[f"bn{i}.weight"], "bias": sd[f"bn{i}.bias"]}
  _check_shapes(params, backbone.params, "AlexNet")
  return params


def resnet18_params_from_torch(state_dict, backbone: Backbone) -> dict:
  """clx params from an official ResNet-18 ``state_dict`` (conv1, bn1, layerS.B.*)."""
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  params = {"conv1": {"kernel": _conv_from_torch(sd["conv1.weight"])},
            "bn1": {"scale": sd["bn1.weight"], "bias": sd["bn1.bias"]}, "layers": {}}
  for s, stage in backbone.params["layers"].items():
    params["layers"][s] = {}
    for b, block in stage.items():
      pre = f"layer{int(s) + 1}.{b}."
      out = {"conv1": {"kernel": _conv_from_torch(sd[pre + "conv1.weight"])},
             "conv2": {"kernel": _conv_from_torch(sd[pre + "conv2.weight"])},
             "bn1": {"scale": sd[pre + "bn1.weight"], "bias": sd[pre + "bn1.bias"]},
             "bn2": {"scale": sd[pre + "bn2.weight"], "bias": sd[pre + "bn2.bias"]}}
      if "shortcut" in block:
        out["shortcut"] = {"kernel": _conv_from_torch(sd[pre + "shortcut.0.weight"])}
        out["bn_shortcut"] = {"scale": sd[pre + "shortcut.1.weight"],
                              "bias": sd[pre + "shortcut.1.bias"]}
      params["layers"][s][b] = out
  _check_shapes(params, backbone.params, "ResNet-18")
  return params


def _check_shapes(got, want, who: str) -> None:
  got_flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(got)}
  want_flat = {jax.tree_util.keystr(k): v.shape
               for k, v in jax.tree_util.tree_leaves_with_path(want)}
  if got_flat.keys() != want_flat.keys():
    raise KeyError(f"{who}: converted keys differ: missing {sorted(want_flat.keys() - got_flat.keys())}, "
                   f"unexpected {sorted(got_flat.keys() - want_flat.keys())}")
  bad = {k: (got_flat[k], want_flat[k]) for k in want_flat if got_flat[k] != want_flat[k]}
  if bad:
    raise ValueError(f"{who}: shape mismatches (got, expected): {bad}")
