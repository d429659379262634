"""Multi-layer perceptron backbones (the GPM/BECAME PMNIST network and friends)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clx.models.base import Backbone


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
  With ``taps=True`` the call also returns each layer's input (the GPM
  representation of that layer), keyed by layer name.
  """

  def __init__(self, in_features: int, hidden: Sequence[int] = (100, 100), *,
               use_bias: bool = False, rngs: nnx.Rngs):
    self.names = tuple(f"lin{i + 1}" for i in range(len(hidden)))
    sizes = (in_features, *hidden)
    for name, d_in, d_out in zip(self.names, sizes[:-1], sizes[1:]):
      setattr(self, name, nnx.Linear(
          d_in, d_out, use_bias=use_bias, rngs=rngs,
          kernel_init=torch_linear_init(d_in), bias_init=torch_linear_init(d_in)))

  def __call__(self, x: jax.Array, *, taps: bool = False):
    h = x.reshape(x.shape[0], -1)
    inputs = {}
    for name in self.names:
      inputs[name] = h
      h = jax.nn.relu(getattr(self, name)(h))
    return (h, inputs) if taps else h


def mlp(input_shape: Sequence[int], hidden: Sequence[int] = (100, 100), *,
        use_bias: bool = False, seed: int = 0) -> Backbone:
  """An MLP backbone with PyTorch-default initialisation from ``seed``."""
  in_features = int(math.prod(input_shape))
  if in_features <= 0 or not hidden or min(hidden) <= 0:
    raise ValueError(f"mlp needs positive sizes, got input {tuple(input_shape)} hidden {tuple(hidden)}")
  module = MLP(in_features, tuple(hidden), use_bias=use_bias, rngs=nnx.Rngs(seed))
  name = "mlp-" + "-".join(str(s) for s in (in_features, *hidden))
  return Backbone.from_module(name, module, int(hidden[-1]), tuple(input_shape))
