"""Every experiment's ``get_config()`` builds its methods with the current keyword names.

Old keyword names (``rank``, ``targets``, ``scale``, ``gram_batch_size``, ...) still work for one
release with a :class:`DeprecationWarning`; an experiment that still passes one would break when
they go. Each config's methods are built through :func:`clx.methods.build` on a small
random-weight twin of the config's backbone (same sites and roles, fewer layers and channels:
the builds check names and sites, not numbers), with DeprecationWarning raised as an error.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest

from clx import methods, models
from clx.experiment import _load_module, experiments_dir
from clx.rehearse import TINY_LLAMA, rehearsal_method_args, rehearsal_model

# The twin of MiniLM (``minilm``/``bert``): a random BERT with its roles (q/k/v sites) and depth
# (6 layers: DualPrompt uses layers 2-4), wide enough for SPARC's 100 PCA components. ViT and
# Llama twins are clx.rehearse's tiny random-weight architectures.
TINY_BERT = {"vocab_size": TINY_LLAMA["vocab_size"], "hidden_size": 128, "num_hidden_layers": 6,
             "num_attention_heads": 2, "intermediate_size": 256}


def _experiment_files() -> list[Path]:
  return [path for path in sorted(experiments_dir().glob("*.py"))
          if not path.name.startswith("_") and "def get_config(" in path.read_text()]


def _tiny_backbone(config: dict):
  """A random-weight backbone with the sites and roles of ``config``'s model, kept small."""
  model = dict(config["model"])
  name = model.pop("name")
  if name in ("minilm", "bert"):
    return models.build("bert", (16,), config=TINY_BERT, seed=0)
  if name in ("vit", "llama_pretrained"):
    model, _ = rehearsal_model(config, tiny=True)
    name = model.pop("name")
    shape = (32, 32, 3) if name == "vit" else (16,)
    return models.build(name, shape, **model)
  if name == "mlp":
    return models.build(name, (784,), **model)
  if name == "alexnet":
    return models.build(name, (32, 32, 3), **{"channels": (8, 8, 8), "hidden": 32, **model})
  if name == "resnet18":
    return models.build(name, (32, 32, 3), **{**model, "nf": 4})
  raise AssertionError(f"no tiny twin for model {name!r}; add one to this test")


@pytest.mark.parametrize("path", _experiment_files(), ids=lambda p: p.stem)
def test_experiment_methods_build_without_deprecated_names(path: Path):
  config = _load_module(path).get_config()
  backbone = _tiny_backbone(config)
  # Label words given as strings need the real tokenizer: fixed ids of the tiny vocabulary
  # (the BERT and Llama twins share one vocabulary size).
  method_args = rehearsal_method_args(config, TINY_BERT["vocab_size"])
  for name in config["methods"]:
    args = copy.deepcopy(method_args.get(name, {}))
    with warnings.catch_warnings():
      warnings.simplefilter("error", DeprecationWarning)
      try:
        methods.build(name, backbone, **args)
      except DeprecationWarning as e:
        pytest.fail(f"{path.name}: method_args.{name} uses a deprecated name: {e}")


def test_sparc_and_proteus_old_names_warn_like_the_other_methods():
  """SPARC/PROTEUS map old names through ``methods.base.renamed`` (one helper for every
  factory), which warns, so the test above sees their old names too."""
  from clx.methods import base, proteus, sparc
  with pytest.warns(DeprecationWarning, match="'pca_batch_size' is renamed 'aux_batch_size'"):
    assert sparc.SPARCConfig(**sparc._renamed({"pca_batch_size": 7})).aux_batch_size == 7
  with pytest.warns(DeprecationWarning, match="'alpha' is renamed 'transfer_alpha'"):
    assert proteus.ProteusConfig(**proteus._renamed({"alpha": 0.5})).transfer_alpha == 0.5
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert base.renamed({"lora_rank": 2}, {"rank": "lora_rank"}, "proteus") == {"lora_rank": 2}
