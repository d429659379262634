"""clx.ops.memory: the Memory value and its rules reproduce the existing ops; float64 references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import dualgpm, memory, sgp, subspace


def _orthonormal(rng, d, k):
  q, _ = np.linalg.qr(rng.standard_normal((d, k)))
  return q


def _padded(q, d):
  return np.pad(q, ((0, 0), (0, d - q.shape[1])))


def _memory(rng, d, k, kind=memory.REMOVE, scale=None):
  q = _orthonormal(rng, d, k)
  s = np.ones(d) if scale is None else scale
  s = np.where(np.arange(d) < k, s, 0.0)
  # Garbage beyond the rank must be ignored by every rule.
  basis = _padded(q, d) + np.where(np.arange(d) < k, 0.0, rng.standard_normal((d, d)))
  return memory.Memory(jnp.asarray(basis), jnp.asarray(k, jnp.int32), jnp.asarray(kind, jnp.int32),
                       jnp.asarray(s)), q, s


def test_empty_memory_leaves_gradients_alone_under_every_rule(x64):
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.standard_normal((6, 3)))
  for rule in (memory.GPM, memory.sgp(10.0), memory.DUALGPM):
    mem = rule.init(6, jnp.float64)
    chex.assert_shape(mem.basis, (6, 6))
    np.testing.assert_allclose(rule.project_grad(g, mem), g, atol=1e-15)
    np.testing.assert_allclose(rule.allowed(mem), np.eye(6), atol=1e-15)


def test_gpm_rule_projects_kernels_and_convs_off_the_memory_float64(x64):
  rng = np.random.default_rng(1)
  mem, q, _ = _memory(rng, 12, 4)
  ref_q = np.eye(12) - q @ q.T
  for shape in [(12, 5), (2, 2, 3, 7)]:  # dense and conv (kh, kw, cin, cout) kernels
    g = rng.standard_normal(shape)
    want = (ref_q @ g.reshape(12, -1)).reshape(shape)
    np.testing.assert_allclose(memory.GPM.project_grad(jnp.asarray(g), mem), want, atol=1e-12)
  np.testing.assert_allclose(memory.GPM.allowed(mem), ref_q, atol=1e-12)


def test_sgp_rule_scales_each_direction_float64(x64):
  rng = np.random.default_rng(2)
  mem, q, s = _memory(rng, 10, 3, scale=rng.uniform(0.2, 1.0, 10))
  g = rng.standard_normal((10, 4))
  ref = (np.eye(10) - q @ np.diag(s[:3]) @ q.T) @ g
  rule = memory.sgp(5.0)
  np.testing.assert_allclose(rule.project_grad(jnp.asarray(g), mem), ref, atol=1e-12)
  np.testing.assert_allclose(rule.allowed(mem) @ g, ref, atol=1e-12)


@pytest.mark.parametrize("kind", [memory.REMOVE, memory.RETAIN])
def test_dualgpm_rule_allowed_space_float64(x64, kind):
  rng = np.random.default_rng(3)
  mem, q, _ = _memory(rng, 8, 3, kind=kind)
  want = np.eye(8) - q @ q.T if kind == memory.REMOVE else q @ q.T
  np.testing.assert_allclose(memory.DUALGPM.allowed(mem), want, atol=1e-12)
  g = rng.standard_normal((8, 5))
  np.testing.assert_allclose(memory.DUALGPM.project_grad(jnp.asarray(g), mem), want @ g,
                             atol=1e-12)


def test_rule_updates_reproduce_the_ops_exactly(x64):
  """Two tasks through each rule equal the direct op calls (bit for bit) on float64 data."""
  rng = np.random.default_rng(4)
  d = 9
  reps = [jnp.asarray(rng.standard_normal((d, 20)) * np.linspace(3, 0.1, d)[:, None])
          for _ in range(2)]
  grams = [r @ r.T / 20 for r in reps]

  mem = memory.GPM.init(d, jnp.float64)
  basis, rank = jnp.zeros((d, d)), jnp.zeros((), jnp.int32)
  for t, r in enumerate(reps):
    mem = memory.GPM.update(mem, r, 0.9, first_task=t == 0)
    basis, rank = subspace.gpm_update_fixed(basis, rank, r, 0.9, first_task=t == 0)
    chex.assert_trees_all_equal((mem.basis, mem.rank), (basis, rank))
    np.testing.assert_array_equal(mem.scale, np.arange(d) < int(rank))

  rule = memory.sgp(7.0)
  mem = rule.init(d, jnp.float64)
  basis, rank, scale = jnp.zeros((d, d)), jnp.zeros((), jnp.int32), jnp.zeros((d,))
  for t, r in enumerate(reps):
    mem = rule.update(mem, r, 0.9, first_task=t == 0)
    basis, rank, scale = sgp.sgp_update_fixed(basis, rank, scale, r, 0.9, scale_coff=7.0,
                                              first_task=t == 0)
    chex.assert_trees_all_equal((mem.basis, mem.rank, mem.scale), (basis, rank, scale))

  for dual in (True, False):
    rule = memory.dualgpm_rule(dual=dual)
    mem = rule.init(d, jnp.float64)
    basis, rank, kind = jnp.zeros((d, d)), jnp.zeros((), jnp.int32), dualgpm.REMOVE
    for t, c in enumerate(grams):
      mem = rule.update(mem, c, 0.6 + 0.3 * t, first_task=t == 0)
      basis, rank, kind = dualgpm.dualgpm_update_fixed(basis, rank, kind, c, 0.6 + 0.3 * t,
                                                       first_task=t == 0, dual=dual)
      chex.assert_trees_all_equal((mem.basis, mem.rank, mem.kind), (basis, rank, kind))


def test_memory_is_a_pytree_that_jits_and_vmaps():
  rng = np.random.default_rng(5)
  reps = jnp.asarray(rng.standard_normal((3, 6, 10)), jnp.float32)
  mems = jax.vmap(lambda _: memory.GPM.init(6))(jnp.arange(3))
  chex.assert_shape(mems.basis, (3, 6, 6))
  new = jax.jit(jax.vmap(lambda m, r: memory.GPM.update(m, r, 0.95, first_task=True)))(mems, reps)
  chex.assert_tree_all_finite(new)
  for i in range(3):
    one = memory.GPM.update(memory.GPM.init(6), reps[i], 0.95, first_task=True)
    np.testing.assert_allclose(new.basis[i], one.basis, atol=1e-5)
    assert int(new.rank[i]) == int(one.rank)


def test_dict_round_trip_and_old_entries():
  rng = np.random.default_rng(6)
  mem, _, _ = _memory(rng, 5, 2)
  chex.assert_trees_all_equal(memory.from_dict(memory.as_dict(mem)), mem)
  old_gpm = {"basis": mem.basis, "rank": mem.rank}  # GPM states before clx.ops.memory
  back = memory.from_dict(old_gpm)
  np.testing.assert_array_equal(back.scale, [1, 1, 0, 0, 0])
  assert int(back.kind) == memory.REMOVE
  with pytest.raises(KeyError, match="rank"):
    memory.from_dict({"basis": mem.basis})


def test_bad_inputs_are_named():
  mem = memory.GPM.init(4)
  with pytest.raises(ValueError, match="does not match the memory's dimension 4"):
    memory.GPM.project_grad(jnp.ones((5, 2)), mem)
  with pytest.raises(ValueError, match="rank ≥ 2"):
    memory.DUALGPM.project_grad(jnp.ones((4,)), mem)
  with pytest.raises(TypeError, match="Memory"):
    memory.GPM.update({"basis": mem.basis}, jnp.ones((4, 3)), 0.9)
  with pytest.raises(ValueError, match="scale_coff"):
    memory.sgp(-1.0)
  with pytest.raises(ValueError, match="energy"):
    memory.dualgpm_rule(energy="cubic")
  with pytest.raises(ValueError, match="positive integer"):
    memory.empty(0)
