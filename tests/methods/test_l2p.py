"""L2P: learns a tiny stream; the pull constraint (its key-learning op) is what moves the keys."""

import numpy as np
import pytest

from clx.methods import l2p as l2p_lib
from tests.methods.comparator_fixtures import loss_grads, run, tiny_bert, token_stream

KW = dict(pool_size=6, length=2, top_k=2)


def _key_grad(method, stream):
  return np.abs(np.asarray(loss_grads(method, stream)["key"])).sum()


@pytest.mark.slow
def test_l2p_learns_a_tiny_stream():
  stream = token_stream(num_tasks=2)
  state, acc = run(l2p_lib.l2p(tiny_bert(), **KW), stream)
  assert np.nanmean(acc[-1]) > 100 / 4 + 25, acc          # well above chance over 4 classes
  usage = np.asarray(state["usage"])
  assert usage.shape == (2, 6) and (usage.sum(1) == 2 * 64).all()  # top-2 ids of 64 rows


def test_pull_constraint_is_the_only_key_gradient():
  stream = token_stream(num_tasks=2)
  assert _key_grad(l2p_lib.l2p(tiny_bert(), **KW), stream) > 1e-3
  assert _key_grad(l2p_lib.l2p(tiny_bert(), pull_coeff=0.0, **KW), stream) == 0.0


def test_l2p_rejects_bad_config():
  with pytest.raises(ValueError, match="top_k"):
    l2p_lib.l2p(tiny_bert(), pool_size=3, top_k=4)
