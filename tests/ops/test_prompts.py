"""Prompt-pool ops against float64 NumPy ports of the official code (L2P/DualPrompt, CODA-Prompt)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import prompts

pytestmark = pytest.mark.usefixtures("x64")


def _np_l2n(x, eps=1e-12):
  return x / np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), eps))


def _np_select(query, keys, k, batchwise, prompt_mask=None):
  """models/prompt.py l.216-232, row by row."""
  sim = _np_l2n(query) @ _np_l2n(keys).T
  idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  if batchwise:
    ids, counts = np.unique(idx, return_counts=True)
    order = sorted(range(len(ids)), key=lambda j: (-counts[j], ids[j]))[:k]
    idx = np.tile(ids[order][None], (len(query), 1))
  if prompt_mask is not None:
    idx = prompt_mask
  q = _np_l2n(query)
  reduce_sim = sum(q[i] @ _np_l2n(keys)[j] for i in range(len(query)) for j in idx[i]) / len(query)
  return idx, reduce_sim


@pytest.mark.parametrize("batchwise", [False, True])
def test_selection_and_pull_constraint_match_code(batchwise):
  rng = np.random.default_rng(1)
  query, keys = rng.normal(size=(9, 6)), rng.normal(size=(7, 6))
  ref_idx, ref_sim = _np_select(query, keys, 3, batchwise)
  sim = prompts.key_similarity(jnp.asarray(query), jnp.asarray(keys))
  idx = prompts.select_prompts(sim, top_k=3, batchwise=batchwise)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  got = prompts.pull_constraint(jnp.asarray(query), jnp.asarray(keys), idx)
  np.testing.assert_allclose(float(got), ref_sim, rtol=1e-12)


def test_batchwise_vote_changes_selection_and_ignores_padding():
  rng = np.random.default_rng(2)
  query, keys = rng.normal(size=(16, 5)), rng.normal(size=(10, 5))
  sim = prompts.key_similarity(jnp.asarray(query), jnp.asarray(keys))
  per_row = np.asarray(prompts.select_prompts(sim, top_k=2))
  voted = np.asarray(prompts.select_prompts(sim, top_k=2, batchwise=True))
  assert (voted == voted[:1]).all() and not (per_row == per_row[:1]).all()
  # padding rows (mask 0) do not vote: equal to the vote of the real rows alone
  mask = jnp.asarray([1.0] * 8 + [0.0] * 8)
  masked = prompts.select_prompts(sim, top_k=2, batchwise=True, mask=mask)
  alone = prompts.select_prompts(sim[:8], top_k=2, batchwise=True)
  np.testing.assert_array_equal(np.asarray(masked)[0], np.asarray(alone)[0])


def test_task_prompt_ids_and_gather():
  ids = prompts.task_prompt_ids(2, 3, 4)
  np.testing.assert_array_equal(np.asarray(ids), np.tile([6, 7, 8], (4, 1)))
  rng = np.random.default_rng(3)
  pool = rng.normal(size=(9, 2, 5))
  got = np.asarray(prompts.gather_prompts(jnp.asarray(pool), ids))
  np.testing.assert_array_equal(got[1], np.concatenate([pool[6], pool[7], pool[8]]))


def test_coda_prompt_matches_code_loop():
  """zoo.py l.164-170: a_querry = q*A, normalise, dot with normalised K, weight P."""
  rng = np.random.default_rng(4)
  q, k, a = rng.normal(size=(5, 8)), rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
  comps = rng.normal(size=(6, 4, 8))
  ref = np.zeros((5, 4, 8))
  for i in range(5):
    for m in range(6):
      aq = q[i] * a[m]
      w = (aq / max(np.linalg.norm(aq), 1e-12)) @ (k[m] / max(np.linalg.norm(k[m]), 1e-12))
      ref[i] += w * comps[m]
  got = prompts.coda_prompt(*(jnp.asarray(v) for v in (q, k, a, comps)))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-10, atol=1e-12)
  # the weighting is the defining op: uniform weights (switched off) give another prompt
  assert not np.allclose(ref, comps.sum(0)[None])
  pk, pv = prompts.split_key_value(got)
  assert pk.shape == (5, 2, 8) and pv.shape == (5, 2, 8)


def _np_gram_schmidt(vv, draws, s, f):
  """zoo.py gram_schmidt l.72-130 with the random draws given."""
  vv = vv.reshape(vv.shape[0], -1).T
  uu = np.zeros_like(vv)
  uu[:, :s] = vv[:, :s]
  for n_new, k in enumerate(range(s, f)):
    vk = draws[n_new]
    uk = 0
    for j in range(k):
      uj = uu[:, j]
      uk = uk + (vk * uj).sum() / (uj * uj).sum() * uj
    uu[:, k] = vk - uk
  for k in range(s, f):
    uu[:, k] = uu[:, k] / np.linalg.norm(uu[:, k])
  return uu.T


def test_gram_schmidt_init_matches_code():
  rng = np.random.default_rng(5)
  comps = rng.normal(size=(8, 3, 4))
  key = jax.random.PRNGKey(7)
  got = np.asarray(prompts.gram_schmidt_init(key, jnp.asarray(comps), start=2, stop=4))
  draws = np.asarray(jax.random.normal(key, (2, 12), jnp.float64))
  ref = _np_gram_schmidt(comps, draws, 2, 4).reshape(comps.shape)
  np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
  flat = got.reshape(8, -1)
  np.testing.assert_array_equal(flat[4:], 0.0)                       # future rows zero
  # classic Gram-Schmidt against rows that are not orthogonal themselves (learned ones): the
  # new rows are unit but only orthogonal to the old ones when those are orthogonal; from a
  # fresh pool (start=0) the new rows are orthonormal
  np.testing.assert_allclose(np.linalg.norm(flat[2:4], axis=1), 1.0, rtol=1e-12)
  first = np.asarray(prompts.gram_schmidt_init(key, jnp.asarray(comps), start=0, stop=4))
  first = first.reshape(8, -1)
  np.testing.assert_allclose(first[:4] @ first[:4].T, np.eye(4), atol=1e-10)
  with pytest.raises(ValueError, match="start"):
    prompts.gram_schmidt_init(key, jnp.asarray(comps), start=3, stop=2)


def test_ortho_penalty_zero_on_orthonormal_rows():
  q, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(6, 4)))
  assert float(prompts.ortho_penalty(jnp.asarray(q.T))) < 1e-20
  t = np.random.default_rng(7).normal(size=(3, 5))
  np.testing.assert_allclose(float(prompts.ortho_penalty(jnp.asarray(t))),
                             np.mean((t @ t.T - np.eye(3)) ** 2), rtol=1e-12)


def test_select_prompts_rejects_bad_top_k():
  with pytest.raises(ValueError, match="top_k"):
    prompts.select_prompts(jnp.zeros((2, 3)), top_k=4)
