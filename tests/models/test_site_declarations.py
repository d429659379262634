"""Backbones declare which sites share an input (``site_groups``) and where the token embedding is."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from clx.models import bert, llama, mlp, vit
from clx.models.base import shared_input_groups
from clx.ops import tree


def _tiny(name):
  if name == "bert":
    return bert.bert((8,), config=bert.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16))
  if name == "llama":
    return llama.llama((8,))
  return vit.vit((16, 16, 3), variant="test")


@pytest.mark.parametrize("name", ["bert", "llama", "vit"])
def test_grouped_sites_really_read_one_input(name):
  """The declaration is the contract InfLoRA's shared Gram pass relies on: every member of a
  group sees the same input array (checked on the model's own input taps)."""
  backbone = _tiny(name)
  assert backbone.site_groups, "a transformer backbone groups its q/k/v kernels"
  shape = backbone.input_shape
  x = (jnp.asarray(np.random.default_rng(0).integers(3, 40, (2, *shape)), jnp.int32)
       if backbone.pad_id is not None or name == "llama"
       else jnp.asarray(np.random.default_rng(0).normal(size=(2, *shape)), jnp.float32))
  _, taps = backbone.apply(backbone.params, x, taps="inputs")
  for group, members in backbone.site_groups.items():
    assert len(members) >= 2 and all(backbone.group_of(m) == group for m in members)
    first = np.asarray(taps[members[0]])
    for m in members[1:]:
      np.testing.assert_array_equal(np.asarray(taps[m]), first)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_text_backbones_name_their_token_embedding(name):
  backbone = _tiny(name)
  table = tree.get(backbone.params, backbone.embedding)
  assert np.ndim(table) == 2 and np.shape(table)[1] == backbone.feature_dim


def test_models_without_shared_inputs_declare_none():
  backbone = mlp.mlp((6,), (5, 4))
  assert backbone.site_groups == {} and backbone.embedding is None
  assert backbone.group_of(backbone.sites["mlp"][0]) is None


def test_shared_input_groups_and_bad_declarations():
  sites = {"q": ("b/0/att/q/kernel", "b/1/att/q/kernel"), "k": ("b/0/att/k/kernel",
                                                                 "b/1/att/k/kernel")}
  assert shared_input_groups(sites) == {"b/0/att": ("b/0/att/q/kernel", "b/0/att/k/kernel"),
                                        "b/1/att": ("b/1/att/q/kernel", "b/1/att/k/kernel")}
  backbone = mlp.mlp((6,), (5,))
  with pytest.raises(ValueError, match="not sites"):
    dataclasses.replace(backbone, site_groups={"g": ("nope/kernel",)})
