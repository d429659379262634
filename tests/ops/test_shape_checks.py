"""Entry checks of the shaped ops (chex): a wrong shape, rank or dtype fails at trace time.

Before the checks, part of these cases ran silently and gave a wrong number (a (1,) scale or
mean broadcast over every direction, float labels matching no class, a memory of the wrong
width never read in the forward pass, NaN features choosing λ) and the rest failed deep inside
a matmul with a message naming no argument; each now raises at the op's entry, also under
``jax.jit`` (chex's shape checks read static shapes, so they run while tracing and add nothing
to the compiled program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import gradient_projection, pca, prompts, prototypes, retrieval, ridge, sgp


def _normal(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _orthonormal(d, k, seed=0):
  return jnp.asarray(np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))[0],
                     jnp.float32)


def test_sgp_projection_refuses_a_scale_that_would_broadcast():
  grad, basis = _normal(6, 3), jnp.pad(_orthonormal(6, 2), ((0, 0), (0, 4)))
  good = sgp.scaled_projection_out(grad, basis, 2, jnp.ones(6))
  free = grad - basis @ (basis.T @ grad)
  np.testing.assert_allclose(good, free, atol=1e-6)
  with pytest.raises(AssertionError, match="assert_shape"):
    sgp.scaled_projection_out(grad, basis, 2, jnp.ones(1))  # (1,) broadcast over all directions
  with pytest.raises(AssertionError, match="assert_shape"):
    jax.jit(sgp.scaled_projection_out)(_normal(5, 3), basis, 2, jnp.ones(6))  # d 5 vs memory 6


def test_projected_dense_checks_its_memory_under_grad_and_jit():
  x, kernel, basis = _normal(4, 6), _normal(6, 3, seed=1), _orthonormal(6, 2)

  def loss(k, scale):
    return jnp.sum(gradient_projection.projected_dense(x, k, basis, scale) ** 2)

  grad = jax.grad(loss)(kernel, jnp.ones(2))
  np.testing.assert_allclose(basis.T @ grad, 0.0, atol=1e-5)  # off span(basis)
  with pytest.raises(AssertionError, match="assert_shape"):
    jax.jit(jax.grad(loss))(kernel, jnp.ones(1))
  with pytest.raises(AssertionError, match="assert_axis_dimension"):
    gradient_projection.projected_dense(x, kernel, _orthonormal(5, 2), None)


def test_class_sums_refuses_float_labels_and_ragged_rows():
  feats = _normal(5, 3)
  sums, counts = prototypes.class_sums(feats, jnp.array([0, 1, 1, 2, 0]), 3)
  np.testing.assert_allclose(sums[1], feats[1] + feats[2], rtol=1e-6)
  np.testing.assert_array_equal(counts, [2, 2, 1])
  with pytest.raises(AssertionError, match="assert_type"):
    prototypes.class_sums(feats, jnp.array([0.0, 1.0, 1.5, 2.0, 0.0]), 3)  # 1.5 → no class
  with pytest.raises(AssertionError, match="assert_shape"):
    prototypes.class_sums(feats, jnp.array([0, 1, 1, 2]), 3)
  with pytest.raises(AssertionError, match="assert_axis_dimension"):
    prototypes.cosine_logits(feats, _normal(3, 4))


def test_retrieval_scores_must_be_rows_by_tasks():
  scores = _normal(4, 3)
  np.testing.assert_array_equal(retrieval.retrieve(scores), np.argmax(scores, axis=-1))
  with pytest.raises(AssertionError, match="assert_rank"):
    retrieval.retrieve(scores[0])  # (T,): a scalar instead of a task per row
  with pytest.raises(AssertionError, match="assert_rank"):
    jax.jit(lambda s: retrieval.top_candidates(s, 2))(scores[0])


def test_pca_projection_refuses_a_mean_of_the_wrong_length():
  x, comps = _normal(4, 5), _orthonormal(5, 2)
  mean = jnp.mean(x, axis=0)
  np.testing.assert_allclose(pca.project(x, mean, comps), (x - mean) @ comps, rtol=1e-5)
  with pytest.raises(AssertionError, match="assert_shape"):
    pca.project(x, mean[:1], comps)  # (1,) would broadcast as one shared offset
  with pytest.raises(AssertionError, match="assert_shape"):
    pca.residual_fraction(x, mean[:1], comps)
  with pytest.raises(AssertionError, match="assert_axis_dimension"):
    pca.reconstruct(_normal(4, 3), mean, comps)


def test_ridge_checks_shapes_and_refuses_non_finite_features():
  h, y = jnp.abs(_normal(20, 6)), jax.nn.one_hot(jnp.arange(20) % 3, 3)
  stats = ridge.accumulate(ridge.init_statistics(6, 3), h, y)
  np.testing.assert_allclose(stats["gram"], h.T @ h, rtol=1e-5)
  with pytest.raises(AssertionError, match="assert_shape"):
    ridge.accumulate(ridge.init_statistics(6, 3), h, y[:19])
  with pytest.raises(AssertionError, match="assert_shape"):
    ridge.solve(stats["gram"][:5], stats["xty"], 1.0)
  with pytest.raises(AssertionError, match="finite"):
    ridge.select_ridge(h.at[3, 2].set(jnp.nan), y)  # argmin over NaN losses picked λ silently


def test_prompt_ops_check_pool_and_component_shapes():
  query, keys = _normal(4, 8), _normal(5, 8, seed=1)
  idx = prompts.select_prompts(prompts.key_similarity(query, keys), top_k=2)
  assert idx.shape == (4, 2)
  with pytest.raises(AssertionError, match="assert_type"):
    prompts.pull_constraint(query, keys, idx.astype(jnp.float32))
  with pytest.raises(AssertionError, match="assert_axis_dimension"):
    prompts.coda_prompt(query, keys, _normal(5, 8), _normal(6, 3, 8))  # 6 components vs 5 keys
  with pytest.raises(AssertionError, match="assert_equal_shape"):
    prompts.coda_weights(query, keys, _normal(4, 8))


def test_memory_fields_are_checked_by_every_rule():
  from clx.ops import memory
  grad, rule = _normal(6, 3), memory.sgp()
  empty = memory.empty(6)
  np.testing.assert_allclose(rule.project_grad(grad, empty), grad)
  with pytest.raises(AssertionError, match="Memory.rank and Memory.kind are integers"):
    rule.project_grad(grad, empty._replace(rank=jnp.asarray(2.0)))  # compared to columns silently
  with pytest.raises(AssertionError, match="one entry per basis column"):
    jax.jit(rule.project_grad)(grad, empty._replace(scale=jnp.ones(1)))  # would broadcast
