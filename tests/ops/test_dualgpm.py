"""clx.ops.dualgpm against a literal float64 NumPy port of InfLoRA's official code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import dualgpm

# ----------------------------------------------------------------------------
# Float64 reference: the official InfLoRA code (methods/inflora.py), one layer.
# ----------------------------------------------------------------------------


def ref_update(feature, ptype, activation, threshold, dual=True):
  """One layer of the official ``update_DualGPM`` (``update_GPM`` if not dual), float64.

  ``feature`` None is the first task. Called with ``activation`` = the Gram
  matrix C this is the official (σ⁴) rule; with the representation H it is the
  paper's rule (σ²(H)). clx's two documented deviations are marked.
  """
  d = activation.shape[0]
  if feature is None:
    u, s, _ = np.linalg.svd(activation, full_matrices=False)
    sval_total = (s**2).sum()
    sval_ratio = (s**2) / sval_total
    r = np.sum(np.cumsum(sval_ratio) < threshold)
    if not dual or r < d / 2:
      feature, ptype = u[:, 0:max(r, 1)], "remove"
    else:  # clx: the complement (official stores u[:, :r] as 'retain', then asserts)
      feature, ptype = u[:, r:], "retain"
  elif ptype == "remove":
    _, s1, _ = np.linalg.svd(activation, full_matrices=False)
    sval_total = (s1**2).sum()
    act_hat = activation - np.dot(np.dot(feature, feature.T), activation)
    u, s, _ = np.linalg.svd(act_hat, full_matrices=False)
    sval_hat = (s**2).sum()
    sval_ratio = (s**2) / sval_total
    accumulated_sval = (sval_total - sval_hat) / sval_total
    r = 0
    for ii in range(sval_ratio.shape[0]):
      if accumulated_sval < threshold:
        accumulated_sval += sval_ratio[ii]
        r += 1
      else:
        break
    if r > 0:
      ui = np.hstack((feature, u[:, 0:r]))
      feature = ui[:, 0:ui.shape[0]] if ui.shape[1] > ui.shape[0] else ui
  else:
    _, s1, _ = np.linalg.svd(activation, full_matrices=False)
    sval_total = (s1**2).sum()
    act_hat = np.dot(np.dot(feature, feature.T), activation)
    u, s, _ = np.linalg.svd(act_hat, full_matrices=False)
    sval_hat = (s**2).sum()
    sval_ratio = (s**2) / sval_total
    accumulated_sval = sval_hat / sval_total
    r = 0
    for ii in range(sval_ratio.shape[0]):
      if accumulated_sval >= (1 - threshold):
        accumulated_sval -= sval_ratio[ii]
        r += 1
      else:
        break
    r = min(r, feature.shape[1])  # clx: cap (only rounding could pass it)
    if r > 0:
      act_feature = feature - np.dot(np.dot(u[:, 0:r], u[:, 0:r].T), feature)
      ui, _, _ = np.linalg.svd(act_feature)
      feature = ui[:, :feature.shape[1] - r]
  if dual and ptype == "remove" and feature.shape[1] > feature.shape[0] / 2:
    u, _, _ = np.linalg.svd(feature)
    feature, ptype = u[:, feature.shape[1]:], "retain"
  return feature, ptype


def ref_design(activation, feature, ptype, rank, scale=1 / np.sqrt(3)):
  """Official ``_train`` design: top-r left singular vectors of the projected matrix."""
  if feature is None:
    cur = activation
  elif ptype == "remove":
    cur = activation - feature @ feature.T @ activation
  else:
    cur = feature @ feature.T @ activation
  u, _, _ = np.linalg.svd(cur, full_matrices=False)
  return u[:, :rank] * scale


def make_tasks(seed, d=24, n=300, num_tasks=5, new=5, shared=3):
  """Representations H_t (d, n): a few new strong directions per task, some reused."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  hs = []
  for t in range(num_tasks):
    cols = [(t * new + i) % d for i in range(new)] + list(rng.choice(d, shared, replace=False))
    directions = q[:, cols] * rng.uniform(0.6, 1.4, len(cols))
    hs.append(directions @ rng.standard_normal((len(cols), n))
              + 0.05 * rng.standard_normal((d, n)))
  return hs


def projector(basis):
  basis = np.asarray(basis, np.float64)
  return basis @ basis.T


def run_sequence(hs, energy, dual, dtype, lamb=0.9, rank=4):
  """(reference history, clx history) over the tasks; each entry is a dict."""
  d = hs[0].shape[0]
  feature, ptype = None, None
  basis, k, kind = jnp.zeros((d, d), dtype), 0, dualgpm.REMOVE
  ours, ref = [], []
  for t, h in enumerate(hs):
    gram = h @ h.T / h.shape[1]
    activation = gram if energy == "official" else h
    a_ref = ref_design(activation, feature, ptype, rank)
    allowed = d if feature is None else (d - feature.shape[1] if ptype == "remove"
                                         else feature.shape[1])
    a = dualgpm.design_down_projection(jnp.asarray(gram, dtype), basis, kind, rank,
                                       memory_rank=k, form=energy)
    eps = dualgpm.task_threshold(t, len(hs), lamb, 1.0)
    feature, ptype = ref_update(feature, ptype, activation, eps, dual=dual)
    basis, k, kind = dualgpm.dualgpm_update_fixed(basis, k, kind, jnp.asarray(gram, dtype), eps,
                                                  first_task=t == 0, energy=energy, dual=dual)
    ref.append({"a": a_ref, "allowed": allowed, "basis": feature, "kind": ptype})
    ours.append({"a": np.asarray(a, np.float64), "basis": np.asarray(basis, np.float64),
                 "rank": int(k), "kind": dualgpm.KIND_NAMES[int(kind)]})
  return ref, ours


# ----------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("energy", ["official", "paper"])
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_dualgpm_sequence_matches_reference_float64(x64, energy, seed):
  ref, ours = run_sequence(make_tasks(seed), energy, True, jnp.float64)
  kinds = [r["kind"] for r in ref]
  assert "remove" in kinds and "retain" in kinds  # the sequence covers the switch
  assert any(a["kind"] == b["kind"] == "retain" for a, b in zip(ref, ref[1:]))  # retain update
  for t, (r, o) in enumerate(zip(ref, ours)):
    assert (o["rank"], o["kind"]) == (r["basis"].shape[1], r["kind"]), t
    np.testing.assert_allclose(projector(o["basis"][:, :o["rank"]]), projector(r["basis"]),
                               atol=1e-10)
    assert np.all(o["basis"][:, o["rank"]:] == 0)
    cols = min(r["allowed"], 4)  # beyond the allowed dimension clx returns zeros
    np.testing.assert_allclose(projector(o["a"][:, :cols]), projector(r["a"][:, :cols]),
                               atol=1e-9)
    np.testing.assert_allclose(o["a"][:, cols:], 0, atol=1e-12)


@pytest.mark.parametrize("energy", ["official", "paper"])
def test_gpm_variant_matches_reference_and_never_switches(x64, energy):
  ref, ours = run_sequence(make_tasks(0), energy, False, jnp.float64)
  assert ref[-1]["basis"].shape[1] > 12  # grows past d/2 without switching
  for r, o in zip(ref, ours):
    assert (o["rank"], o["kind"]) == (r["basis"].shape[1], "remove")
    np.testing.assert_allclose(projector(o["basis"][:, :o["rank"]]), projector(r["basis"]),
                               atol=1e-10)
  gram = make_tasks(0)[0] @ make_tasks(0)[0].T / 300
  host = dualgpm.gpm_update_from_gram(None, gram, 0.9, energy=energy)
  np.testing.assert_allclose(projector(host), projector(ref[0]["basis"]), atol=1e-10)


def test_float32_matches_reference():
  ref, ours = run_sequence(make_tasks(2), "official", True, jnp.float32)
  for r, o in zip(ref, ours):
    assert (o["rank"], o["kind"]) == (r["basis"].shape[1], r["kind"])
    np.testing.assert_allclose(projector(o["basis"][:, :o["rank"]]), projector(r["basis"]),
                               atol=2e-5)
    np.testing.assert_allclose(3 * projector(o["a"]), 3 * projector(r["a"]), atol=2e-4)


def test_host_wrapper_and_first_task_retain(x64):
  rng = np.random.default_rng(5)
  h = rng.standard_normal((10, 400))  # flat spectrum: the first task keeps r >= d/2
  gram = h @ h.T / 400
  basis, kind = dualgpm.dualgpm_update(None, "remove", gram, 0.95)
  feature, ptype = ref_update(None, None, gram, 0.95)
  assert kind == ptype == "retain" and basis.shape == feature.shape
  np.testing.assert_allclose(projector(basis), projector(feature), atol=1e-10)
  # A later retain update with the host wrapper (dynamic widths).
  h2 = rng.standard_normal((10, 400)) * np.linspace(2, 0.1, 10)[:, None]
  gram2 = h2 @ h2.T / 400
  basis2, kind2 = dualgpm.dualgpm_update(basis, kind, gram2, 0.97)
  feature2, ptype2 = ref_update(feature, ptype, gram2, 0.97)
  assert kind2 == ptype2 and basis2.shape == feature2.shape
  np.testing.assert_allclose(projector(basis2), projector(feature2), atol=1e-10)


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------


def test_design_is_orthogonal_to_memory_in_float32():
  """Even for directions with tiny energy (where an SVD of Ĉ leaks), a ⟂ M to float eps."""
  rng = np.random.default_rng(0)
  d = 64
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  spectrum = np.geomspace(1.0, 1e-6, d)
  gram = jnp.asarray((q * spectrum) @ q.T, jnp.float32)
  memory = jnp.asarray(q[:, :40], jnp.float32)  # protects the high-energy directions
  a = dualgpm.design_down_projection(gram, memory, "remove", 8)
  assert float(jnp.max(jnp.abs(memory.T @ a))) < 1e-6
  np.testing.assert_allclose(np.asarray(a.T @ a), np.eye(8) / 3, atol=1e-5)
  complement = jnp.asarray(q[:, 40:], jnp.float32)  # the same memory stored as RETAIN
  a2 = dualgpm.design_down_projection(gram, complement, "retain", 8)
  assert float(jnp.max(jnp.abs(memory.T @ a2))) < 1e-6
  np.testing.assert_allclose(3 * projector(a2), 3 * projector(a), atol=1e-4)


def test_design_first_task_is_top_eigenvectors_and_deterministic(x64):
  rng = np.random.default_rng(1)
  h = rng.standard_normal((12, 50)) * np.linspace(3, 0.2, 12)[:, None]
  gram = h @ h.T / 50
  a = np.asarray(dualgpm.design_down_projection(gram, None, rank=3, scale=1.0))
  _, vecs = np.linalg.eigh(gram)
  np.testing.assert_allclose(projector(a), projector(vecs[:, ::-1][:, :3]), atol=1e-10)
  peaks = a[np.argmax(np.abs(a), axis=0), np.arange(3)]
  assert np.all(peaks > 0)  # sign convention
  b = np.asarray(dualgpm.design_down_projection(jnp.asarray(gram), jnp.zeros((12, 12)),
                                                "remove", 3, memory_rank=0, scale=1.0))
  np.testing.assert_array_equal(a, b)


def test_design_zero_columns_when_too_few_directions_remain(x64):
  rng = np.random.default_rng(2)
  h = rng.standard_normal((8, 100))
  gram = h @ h.T / 100
  complement = np.linalg.qr(rng.standard_normal((8, 2)))[0]
  a = np.asarray(dualgpm.design_down_projection(gram, complement, "retain", 4))
  assert np.abs(a[:, 2:]).max() == 0
  np.testing.assert_allclose(projector(a[:, :2]) * 3, projector(complement), atol=1e-10)


def test_projected_gram_and_protected_projector(x64):
  rng = np.random.default_rng(3)
  gram = rng.standard_normal((6, 6))
  gram = gram @ gram.T
  m = np.linalg.qr(rng.standard_normal((6, 2)))[0]
  np.testing.assert_allclose(dualgpm.projected_gram(gram, m, "remove"), gram - m @ m.T @ gram,
                             atol=1e-12)
  np.testing.assert_allclose(dualgpm.projected_gram(gram, m, "retain"), m @ m.T @ gram,
                             atol=1e-12)
  padded = np.pad(m, ((0, 0), (0, 4)))
  np.testing.assert_allclose(dualgpm.protected_projector(padded, 2, "remove"), m @ m.T,
                             atol=1e-12)
  np.testing.assert_allclose(dualgpm.protected_projector(padded, 2, dualgpm.RETAIN),
                             np.eye(6) - m @ m.T, atol=1e-12)


def test_zero_gram_keeps_memory_and_first_task_keeps_one_column(x64):
  d = 6
  basis, k, kind = dualgpm.dualgpm_update_fixed(jnp.zeros((d, d)), 0, "remove",
                                                jnp.zeros((d, d)), 0.9)
  assert (int(k), int(kind)) == (1, dualgpm.REMOVE)  # official: r = 0 → U[:, :1]
  m = np.linalg.qr(np.random.default_rng(0).standard_normal((d, 2)))[0]
  padded = jnp.asarray(np.pad(m, ((0, 0), (0, d - 2))))
  for code in (dualgpm.REMOVE, dualgpm.RETAIN):
    new, k2, kind2 = dualgpm.dualgpm_update_fixed(padded, 2, code, jnp.zeros((d, d)), 0.9)
    np.testing.assert_array_equal(new, padded)
    assert (int(k2), int(kind2)) == (2, code)


def test_jit_and_vmap_over_layers_match_loop():
  hs = make_tasks(4, d=16, num_tasks=2)
  grams = jnp.stack([jnp.asarray(h @ h.T / h.shape[1], jnp.float32) for h in hs])
  first = [dualgpm.dualgpm_update_fixed(jnp.zeros((16, 16)), 0, 0, g, 0.9) for g in grams]
  bases = jnp.stack([f[0] for f in first])
  ranks = jnp.stack([f[1] for f in first])
  kinds = jnp.stack([f[2] for f in first])

  @jax.jit
  def step(bases, ranks, kinds, grams):
    update = jax.vmap(lambda b, k, kd, g: dualgpm.dualgpm_update_fixed(b, k, kd, g, 0.95))
    design = jax.vmap(lambda b, k, kd, g: dualgpm.design_down_projection(
        g, b, kd, 3, memory_rank=k))
    return update(bases, ranks, kinds, grams[::-1]), design(bases, ranks, kinds, grams[::-1])

  (new_b, new_k, new_kind), a = step(bases, ranks, kinds, grams)
  for i in range(2):
    ref_b, ref_k, ref_kind = dualgpm.dualgpm_update_fixed(bases[i], ranks[i], kinds[i],
                                                          grams[1 - i], 0.95)
    assert int(new_k[i]) == int(ref_k) and int(new_kind[i]) == int(ref_kind)
    np.testing.assert_allclose(projector(new_b[i]), projector(ref_b), atol=1e-5)
    ref_a = dualgpm.design_down_projection(grams[1 - i], bases[i], kinds[i], 3,
                                           memory_rank=ranks[i])
    np.testing.assert_allclose(a[i], ref_a, atol=1e-5)


def test_task_threshold_and_bad_inputs():
  assert dualgpm.task_threshold(0, 10, 0.95) == 0.95
  assert dualgpm.task_threshold(5, 10, 0.95, 1.0) == pytest.approx(0.975)
  with pytest.raises(ValueError, match="task_index"):
    dualgpm.task_threshold(10, 10)
  gram = jnp.eye(4)
  with pytest.raises(ValueError, match="kind"):
    dualgpm.design_down_projection(gram, None, "keep", 2)
  with pytest.raises(ValueError, match="rank"):
    dualgpm.design_down_projection(gram, None, "remove", 5)
  with pytest.raises(ValueError, match="form"):
    dualgpm.design_down_projection(gram, None, "remove", 2, form="svd")
  with pytest.raises(ValueError, match="square"):
    dualgpm.design_down_projection(jnp.ones((4, 3)), None, "remove", 2)
  with pytest.raises(ValueError, match="finite"):
    dualgpm.dualgpm_update_fixed(jnp.zeros((4, 4)), 0, 0, gram * jnp.nan, 0.9)
  with pytest.raises(ValueError, match="energy"):
    dualgpm.dualgpm_update_fixed(jnp.zeros((4, 4)), 0, 0, gram, 0.9, energy="sigma4")
  with pytest.raises(ValueError, match=r"\(d, d\)"):
    dualgpm.dualgpm_update_fixed(jnp.zeros((4, 2)), 0, 0, gram, 0.9)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    dualgpm.dualgpm_update_fixed(jnp.zeros((4, 4)), 0, 0, gram, 1.5)
