"""Multi-layer perceptron backbones (the GPM/BECAME PMNIST network and friends)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clx.models.base import Backbone
from clx.ops.gradient_projection import projected_dense


def torch_linear_init(fan_in: int):
  """PyTorch ``nn.Linear`` default: U(-1/√fan_in, 1/√fan_in) (kaiming_uniform, a=√5).

  The official GPM/BECAME/InfLoRA code uses PyTorch defaults, so we match them.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class MLP(nnx.Module):
  """``x → flatten → [Linear → ReLU] × len(hidden)``; features = last hidden layer.

  Layers are named ``lin1``, ``lin2``, … as in the official GPM ``MLPNet``.
  With ``taps="inputs"`` the call also returns each layer's input (the GPM
  representation of that layer) keyed by its site ``"linK/kernel"``; with
  ``taps="gram"`` the Gram matrix XᵀX and row count of each.
  ``grad_projection={site: (basis, scale)}`` projects that site's kernel
  gradient off ``span(basis)`` through its input (see
  :mod:`clx.ops.gradient_projection`); the forward value is unchanged.
  """

  def __init__(self, in_features: int, hidden: Sequence[int] = (100, 100), *,
               use_bias: bool = False, rngs: nnx.Rngs):
    self.names = tuple(f"lin{i + 1}" for i in range(len(hidden)))
    sizes = (in_features, *hidden)
    for name, d_in, d_out in zip(self.names, sizes[:-1], sizes[1:]):
      setattr(self, name, nnx.Linear(
          d_in, d_out, use_bias=use_bias, rngs=rngs,
          kernel_init=torch_linear_init(d_in), bias_init=torch_linear_init(d_in)))

  def __call__(self, x: jax.Array, *, taps: str | None = None, grad_projection=None):
    h = x.reshape(x.shape[0], -1)
    inputs = {}
    grad_projection = grad_projection or {}
    for name in self.names:
      site = f"{name}/kernel"
      inputs[site] = h
      layer = getattr(self, name)
      if site in grad_projection:
        basis, scale = grad_projection[site]
        out = projected_dense(h, layer.kernel[...], basis, scale)
        if layer.bias is not None:
          out = out + layer.bias[...]
      else:
        out = layer(h)
      h = jax.nn.relu(out)
    if taps is None:
      return h
    if taps == "inputs":
      return h, inputs
    return h, {k: {"gram": v.T.astype(jnp.float32) @ v.astype(jnp.float32),
                   "count": jnp.asarray(v.shape[0], jnp.float32)} for k, v in inputs.items()}


def mlp(input_shape: Sequence[int], hidden: Sequence[int] = (100, 100), *,
        use_bias: bool = False, seed: int = 0) -> Backbone:
  """An MLP backbone with PyTorch-default initialisation from ``seed``."""
  in_features = int(math.prod(input_shape))
  if in_features <= 0 or not hidden or min(hidden) <= 0:
    raise ValueError(f"mlp needs positive sizes, got input {tuple(input_shape)} hidden {tuple(hidden)}")
  module = MLP(in_features, tuple(hidden), use_bias=use_bias, rngs=nnx.Rngs(seed))
  name = "mlp-" + "-".join(str(s) for s in (in_features, *hidden))
  sites = {"mlp": tuple(f"{n}/kernel" for n in module.names)}
  return Backbone.from_module(name, module, int(hidden[-1]), tuple(input_shape), sites,
                              supports_grad_projection=True)
