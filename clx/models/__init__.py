"""Backbones: Flax NNX modules behind one pure-function contract."""

from clx.models.base import Backbone, Params, split_params, to_str_keys
from clx.models.mlp import MLP, mlp
from clx.models.vit import ViT, ViTConfig, load_vit_weights, vit, vit_config

_FACTORIES = {"mlp": mlp, "vit": vit}


def build(name: str, input_shape, **kwargs) -> Backbone:
  """Build a backbone by registry name (``"mlp"``) for inputs of ``input_shape``."""
  if name not in _FACTORIES:
    raise ValueError(f"unknown model {name!r}; known: {sorted(_FACTORIES)}")
  return _FACTORIES[name](input_shape, **kwargs)


__all__ = ["Backbone", "MLP", "Params", "ViT", "ViTConfig", "build", "load_vit_weights", "mlp",
           "split_params", "to_str_keys", "vit", "vit_config"]
