"""L2P: learns a tiny stream; the pull constraint (its key-learning op) moves the keys."""

import jax.numpy as jnp
import numpy as np
import pytest

from clx.methods import l2p as l2p_lib
from clx.ops import prompts as prompt_ops
from tests.methods.comparator_fixtures import run, tiny_bert, token_stream


def _key_query_similarity(state, backbone, stream):
  x = jnp.asarray(np.concatenate([t.train.x for t in stream.tasks]))
  q = backbone.apply(backbone.params, x)
  idx = prompt_ops.select_prompts(prompt_ops.key_similarity(q, state["key"]), top_k=1)
  return float(prompt_ops.pull_constraint(q, state["key"], idx))


def test_l2p_learns_and_pull_constraint_moves_keys():
  backbone, stream = tiny_bert(), token_stream()
  kw = dict(pool_size=6, length=2, top_k=2)
  state, acc = run(l2p_lib.l2p(backbone, **kw), stream)
  assert np.nanmean(acc[-1]) > 100 / 6 + 20, acc          # well above chance over 6 classes
  assert np.asarray(state["usage"]).sum() > 0
  off, _ = run(l2p_lib.l2p(backbone, pull_coeff=0.0, **kw), stream)
  # with the surrogate loss the chosen keys align with the queries; without it the keys
  # only move through nothing (no other loss term reaches them) and stay at their init
  np.testing.assert_array_equal(np.asarray(off["key"]),
                                np.asarray(l2p_lib.init(l2p_lib.L2PConfig(**kw), backbone,
                                                        _init_key(), _spec(stream))["key"]))
  assert _key_query_similarity(state, backbone, stream) > \
      _key_query_similarity(off, backbone, stream) + 0.05


def _init_key():
  import jax  # pylint: disable=import-outside-toplevel
  return jax.random.fold_in(jax.random.PRNGKey(0), 0)


def _spec(stream):
  from clx.methods.base import StreamSpec  # pylint: disable=import-outside-toplevel
  return StreamSpec.from_stream(stream)


def test_l2p_rejects_bad_config():
  with pytest.raises(ValueError, match="top_k"):
    l2p_lib.l2p(tiny_bert(), pool_size=3, top_k=4)
