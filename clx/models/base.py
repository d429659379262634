"""The backbone contract shared by every model in clx.

A :class:`Backbone` bundles an NNX ``graphdef`` with its frozen base parameters
as a plain nested dict with string keys (``params``). Methods never edit model
code: they compute *effective* parameters (base + adapters, or a fine-tuned
copy) and call :meth:`Backbone.apply`, a pure function of
``(params, inputs)``, so the same backbone object serves every method and the
frozen base is loaded once and never checkpointed per task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

Params = dict[str, Any]


def to_str_keys(tree: Mapping) -> Params:
  """Nested mapping → nested dict with string keys (``nnx.List`` gives ints)."""
  return {str(k): to_str_keys(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def split_params(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, Params]:
  """``nnx.split`` a module into graphdef, a state template and pure params."""
  graphdef, state = nnx.split(module, nnx.Param)
  return graphdef, state, to_str_keys(nnx.to_pure_dict(state))


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
  """A frozen feature extractor with a pure ``apply``.

  Attributes:
    name: model name (e.g. ``"mlp-784-100-100"``).
    graphdef: the NNX graph definition.
    template: an ``nnx.State`` whose structure matches ``params`` (values are
      replaced on every call; it is never mutated).
    params: frozen base parameters, nested dict of arrays with string keys.
    feature_dim: size of the pooled feature vector returned by ``apply``.
    call: optional method name to call on the merged module (default
      ``__call__``); it must return ``(features, taps)`` when ``taps=True``.
  """

  name: str
  graphdef: nnx.GraphDef
  template: nnx.State
  params: Params
  feature_dim: int
  input_shape: tuple[int, ...]

  @classmethod
  def from_module(cls, name: str, module: nnx.Module, feature_dim: int,
                  input_shape: tuple[int, ...]) -> "Backbone":
    graphdef, template, params = split_params(module)
    return cls(name, graphdef, template, params, feature_dim, tuple(input_shape))

  def merge(self, params: Params) -> nnx.Module:
    """A module carrying ``params`` (works on tracers inside ``jax.jit``)."""
    state = jax.tree.map(lambda v: v, self.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def apply(self, params: Params, x: jax.Array, *, taps: bool = False):
    """Pooled features ``(n, feature_dim)`` for inputs ``x`` of shape ``(n, *input_shape)``.

    With ``taps=True`` also returns ``{site: input}``, the inputs of every
    adaptation site (used for GPM representation matrices and Gram taps).
    """
    return self.merge(params)(x, taps=taps)

  def num_params(self) -> int:
    return sum(int(v.size) for v in jax.tree.leaves(self.params))


BackboneFactory = Callable[..., Backbone]
