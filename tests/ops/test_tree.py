"""clx.ops.tree: one tuple form and one string form for sites; get/set/filter on nested dicts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import tree

PARAMS = {"lin1": {"kernel": np.ones((3, 4)), "bias": np.zeros(4)},
          "blocks": {"0": {"attn": {"key": {"kernel": np.ones((4, 4))}}}}}


def test_spellings_agree():
  site = ("blocks", "0", "attn", "key", "kernel")
  for spelling in (site, list(site), "blocks/0/attn/key/kernel", "blocks.0.attn.key.kernel",
                   ("blocks", 0, "attn", "key", "kernel")):
    assert tree.as_site(spelling) == site
  assert tree.to_key(site) == "blocks.0.attn.key.kernel"
  assert tree.from_key(tree.to_key(site)) == site
  assert tree.to_path(site) == "blocks/0/attn/key/kernel"


def test_key_form_matches_the_state_keys_stored_before():
  # Checkpoints store memory under the old site_key escaping ('/' → '.'): same string.
  for path in ("lin1/kernel", "encoder/layers/3/attention/key/kernel", "conv1/kernel"):
    assert tree.to_key(path) == path.replace("/", ".")


def test_get_set_add_do_not_mutate():
  assert tree.get(PARAMS, "lin1/kernel") is PARAMS["lin1"]["kernel"]
  new = tree.set(PARAMS, ("lin1", "kernel"), 5)
  assert new["lin1"]["kernel"] == 5 and PARAMS["lin1"]["kernel"].shape == (3, 4)
  assert new["blocks"] is PARAMS["blocks"]  # only the path is copied
  deep = tree.set({}, "a/b/c", 1)
  assert deep == {"a": {"b": {"c": 1}}}
  added = tree.add(PARAMS, "lin1/bias", np.ones(4))
  np.testing.assert_array_equal(added["lin1"]["bias"], np.ones(4))


def test_set_works_on_traced_trees():
  params = {"a": {"w": jnp.ones((2, 2))}, "b": jnp.zeros(2)}
  out = jax.jit(lambda p: tree.set(p, "a/w", p["a"]["w"] * 3))(params)
  np.testing.assert_array_equal(out["a"]["w"], 3 * np.ones((2, 2)))


def test_filter_and_glob():
  assert tree.filter_sites(PARAMS, "*kernel") == (("blocks", "0", "attn", "key", "kernel"),
                                                  ("lin1", "kernel"))
  assert tree.filter_sites(PARAMS, ["lin1/*"]) == (("lin1", "bias"), ("lin1", "kernel"))
  assert tree.matches("blocks/*/attn/key/kernel", "blocks.0.attn.key.kernel")
  assert not tree.matches("blocks/*/attn/value/kernel", "blocks/0/attn/key/kernel")


def test_bad_paths_are_named():
  with pytest.raises(KeyError, match="no 'kernal' at lin1.*present: \\['bias', 'kernel'\\]"):
    tree.get(PARAMS, "lin1/kernal")
  with pytest.raises(ValueError, match="not a site path"):
    tree.as_site("a//b")
  with pytest.raises(ValueError, match="not a site path"):
    tree.as_site(())
  with pytest.raises(ValueError, match="containing"):
    tree.as_site(("a.b", "c"))
  with pytest.raises(TypeError, match="string key"):
    tree.from_key(("a", "b"))
