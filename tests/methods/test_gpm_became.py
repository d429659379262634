"""GPM / SGP / BECAME: the properties the methods promise, against independent references."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.data.types import ArraySplit, Stream
from clx.methods import became as became_lib
from clx.methods import build
from clx.ops.tree import to_key as site_key
from clx.models.mlp import mlp
from clx.ops import sgp as sgp_ops
from clx.train.loop import TrainConfig, run_method
from clx.train.sharding import make_mesh
from tests.helpers import make_gaussian_stream

CFG = TrainConfig(epochs=3, batch_size=8, optimizer="sgd", learning_rate=0.05)


def _domain_stream(num_tasks=2, seed=0):
  """Gaussian tasks relabelled into one shared 2-way label space (domain scenario)."""
  st = make_gaussian_stream(num_tasks=num_tasks, classes_per_task=2, seed=seed, separation=1.5)
  tasks = tuple(dataclasses.replace(
      t, classes=(0, 1), train=ArraySplit({"x": t.train.x, "y": t.train.y % 2}),
      test=ArraySplit({"x": t.test.x, "y": t.test.y % 2})) for t in st.tasks)
  return Stream("gauss-domain", tasks, "domain", 2)


def _run(name, stream, **kw):
  backbone = mlp(stream.input_shape, (24, 24), seed=0)
  method = build(name, backbone, threshold=0.97, num_samples=64, **kw)
  return run_method(method, stream, CFG, mesh=make_mesh(1), quiet=True)


def test_gpm_keeps_layer_responses_on_old_memory_inputs():
  """After task 2, each projected layer maps inputs in the task-1 memory span exactly as before."""
  stream = _domain_stream()
  one = _run("gpm", dataclasses.replace(stream, tasks=stream.tasks[:1]))
  two = _run("gpm", stream)
  rng = np.random.default_rng(0)
  sites = {"lin1/kernel": ("backbone", "lin1", "kernel"), "lin2/kernel": ("backbone", "lin2", "kernel"),
           "head/kernel": ("heads", "shared", "kernel")}
  for site, path in sites.items():
    mem = one.state["memory"][site_key(site)]
    k = int(mem["rank"])
    assert k > 0, f"{site} kept no memory"
    basis = np.asarray(mem["basis"])[:, :k]
    x = rng.normal(size=(32, k)) @ basis.T               # inputs inside span(M)
    w_old = np.asarray(one.state[path[0]][path[1]][path[2]])
    w_new = np.asarray(two.state[path[0]][path[1]][path[2]])
    before, after = x @ w_old, x @ w_new
    rel = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert rel < 1e-4, f"{site}: relative change {rel:.2e} on old-memory inputs"
    # ... while the weights did change (the test could not pass vacuously).
    assert np.abs(w_new - w_old).max() > 1e-3


def test_input_side_projection_equals_gradient_projection():
  stream = _domain_stream()
  fast = _run("gpm", stream)
  slow = _run("gpm", stream, fast_projection=False)
  chex.assert_trees_all_close(jax.device_get(fast.state), jax.device_get(slow.state),
                              rtol=1e-4, atol=1e-5)


def test_two_task_became_run_is_bitwise_reproducible():
  stream = _domain_stream()
  a = _run("became_gpm", stream, verbose=False)
  b = _run("became_gpm", stream, verbose=False)
  chex.assert_trees_all_equal(jax.device_get(a.state), jax.device_get(b.state))


def test_became_merge_matches_float64_reference(monkeypatch):
  """λ = ΣF_cur Δ² / Σ(F_cur+F_old)Δ² ∈ [0,1] and θ_t = (1−λ)θ_GP + λθ̂, recomputed in NumPy."""
  captured = {}
  real = became_lib.merging.became_coefficient

  def spy(theta_gp, theta_hat, f_cur, f_old, per_leaf=False):
    captured.update(theta_gp=jax.device_get(theta_gp), theta_hat=jax.device_get(theta_hat),
                    f_cur=jax.device_get(f_cur), f_old=jax.device_get(f_old))
    return real(theta_gp, theta_hat, f_cur, f_old, per_leaf=per_leaf)

  monkeypatch.setattr(became_lib.merging, "became_coefficient", spy)
  res = _run("became_gpm", _domain_stream(), verbose=False)
  leaves = lambda k: [np.asarray(v, np.float64) for v in jax.tree.leaves(captured[k])]  # noqa: E731
  gp, hat, fc, fo = leaves("theta_gp"), leaves("theta_hat"), leaves("f_cur"), leaves("f_old")
  num = sum(np.sum(c * (h - g) ** 2) for g, h, c in zip(gp, hat, fc))
  den = sum(np.sum((c + o) * (h - g) ** 2) for g, h, c, o in zip(gp, hat, fc, fo))
  lam_ref = num / den
  lam = float(res.state["lambdas"][1])
  assert 0.0 <= lam <= 1.0 and 0.0 < lam_ref < 1.0
  assert lam == pytest.approx(lam_ref, rel=1e-5)
  # θ_t: the final backbone/head equal the interpolation (the memory update does not touch them).
  merged = {"backbone": res.state["backbone"], "head": res.state["heads"]["shared"]}
  for m, g, h in zip(jax.tree.leaves(jax.device_get(merged)), gp, hat):
    np.testing.assert_allclose(np.asarray(m, np.float64), (1 - lam_ref) * g + lam_ref * h,
                               rtol=1e-5, atol=1e-6)
  # λ minimises the merge objective: a brute-force grid search agrees.
  grid = np.linspace(0, 1, 2001)
  obj = [sum(np.sum(c * ((g + l * (h - g)) - h) ** 2 + o * (l * (h - g)) ** 2)
             for g, h, c, o in zip(gp, hat, fc, fo)) for l in grid]
  assert abs(grid[int(np.argmin(obj))] - lam_ref) <= 1e-3


# ----------------------------------------------------------------------------
# SGP against a literal float64 port of the official update_SGP.


def _official_sgp(mats, thresholds, scale_coff):
  feature_list, importance_list = [], []
  history = []
  for task, activation in enumerate(mats):
    u1, s1, _ = np.linalg.svd(activation, full_matrices=False)
    if task == 0:
      sval_total = (s1 ** 2).sum()
      r = np.sum(np.cumsum((s1 ** 2) / sval_total) < thresholds[task])
      feature_list = u1[:, :r]
      importance_list = ((scale_coff + 1) * s1[:r]) / (scale_coff * s1[:r] + max(s1[:r]))
    else:
      sval_total = (s1 ** 2).sum()
      act_proj = feature_list @ feature_list.T @ activation
      r_old = feature_list.shape[1]
      uc, sc, _ = np.linalg.svd(act_proj, full_matrices=False)
      inno = np.sqrt(((feature_list.T @ uc[:, :r_old]) ** 2) @ (sc[:r_old] ** 2))
      u, s, _ = np.linalg.svd(activation - act_proj, full_matrices=False)
      ratio = (s ** 2) / sval_total
      acc = (sval_total - (s ** 2).sum()) / sval_total
      r = 0
      for ii in range(ratio.shape[0]):
        if acc < thresholds[task]:
          acc += ratio[ii]
          r += 1
        else:
          break
      imp = inno if r == 0 else np.hstack((inno, s[:r]))
      imp = ((scale_coff + 1) * imp) / (scale_coff * imp + max(imp))
      imp[:r_old] = np.clip(imp[:r_old] + importance_list[:r_old], 0, 1)
      if r:
        feature_list = np.hstack((feature_list, u[:, :r]))
      importance_list = imp
    history.append((feature_list.copy(), importance_list.copy()))
  return history


@pytest.mark.parametrize("seed", [0, 1])
def test_sgp_update_matches_official_port(seed):
  rng = np.random.default_rng(seed)
  d, n = 20, 30
  mats = [rng.normal(size=(d, 4)) @ rng.normal(size=(4, n)) * s + 0.05 * rng.normal(size=(d, n))
          for s in (3.0, 2.0, 1.0)]
  thresholds = [0.9, 0.93, 0.95]
  ref = _official_sgp(mats, thresholds, scale_coff=5.0)
  with jax.enable_x64(True):
    basis, rank, scale = jnp.zeros((d, d)), jnp.zeros((), jnp.int32), jnp.zeros((d,))
    for task, (mat, eps) in enumerate(zip(mats, thresholds)):
      basis, rank, scale = sgp_ops.sgp_update_fixed(basis, rank, scale, jnp.asarray(mat), eps,
                                                    scale_coff=5.0, first_task=task == 0)
      ref_basis, ref_imp = ref[task]
      k = int(rank)
      assert k == ref_basis.shape[1]
      # Singular vectors are defined up to sign: compare projectors and importances.
      got = np.asarray(basis)[:, :k]
      np.testing.assert_allclose(got @ got.T, ref_basis @ ref_basis.T, atol=1e-8)
      np.testing.assert_allclose(np.asarray(scale)[:k], ref_imp, rtol=1e-8, atol=1e-10)
      assert np.all(np.asarray(scale)[k:] == 0)
      assert np.all((np.asarray(scale) >= 0) & (np.asarray(scale) <= 1 + 1e-12))


# ----------------------------------------------------------------------------
# Component switched off → the asserted outcome changes.


def _old_memory_response_change(one_state, two_state, rng_seed=0):
  """max over projected sites of ‖x(W₂ − W₁)‖/‖xW₁‖ for inputs x inside task 1's memory."""
  rng = np.random.default_rng(rng_seed)
  worst = 0.0
  for site in ("lin1/kernel", "lin2/kernel"):
    mem = one_state["memory"][site_key(site)]
    basis = np.asarray(mem["basis"])[:, :int(mem["rank"])]
    x = rng.normal(size=(32, basis.shape[1])) @ basis.T
    w_old = np.asarray(one_state["backbone"][site.split("/")[0]]["kernel"])
    w_new = np.asarray(two_state["backbone"][site.split("/")[0]]["kernel"])
    worst = max(worst, np.linalg.norm(x @ (w_new - w_old)) / np.linalg.norm(x @ w_old))
  return worst


def test_gpm_projection_switched_off_changes_old_task_responses():
  from clx.methods.base import identity_grads
  stream = _domain_stream()
  backbone = mlp(stream.input_shape, (24, 24), seed=0)
  method = build("gpm", backbone, threshold=0.97, num_samples=64)
  # Projection off: no projection through the inputs (fast path) and none in transform_grads.
  off = build("gpm", backbone, threshold=0.97, num_samples=64,
              fast_projection=False)._replace(transform_grads=identity_grads)
  one = run_method(method, dataclasses.replace(stream, tasks=stream.tasks[:1]), CFG,
                   mesh=make_mesh(1), quiet=True)
  on_two = run_method(method, stream, CFG, mesh=make_mesh(1), quiet=True)
  off_two = run_method(off, stream, CFG, mesh=make_mesh(1), quiet=True)
  assert _old_memory_response_change(one.state, on_two.state) < 1e-4
  assert _old_memory_response_change(one.state, off_two.state) > 1e-2


def test_became_merge_switched_off_changes_old_task_responses(monkeypatch):
  """λ = 0 keeps θ_GP (GPM's guarantee on old-memory inputs), λ = 1 keeps the
  unconstrained θ̂; the real merge lands strictly between, by the factor λ."""
  stream = _domain_stream()
  one = _run("became_gpm", dataclasses.replace(stream, tasks=stream.tasks[:1]), verbose=False)
  merged = _run("became_gpm", stream, verbose=False)
  lam = float(merged.state["lambdas"][1])
  changes = {"merge": _old_memory_response_change(one.state, merged.state)}
  for forced in (0.0, 1.0):
    monkeypatch.setattr(became_lib.merging, "became_coefficient",
                        lambda *a, forced=forced, **k: jnp.float32(forced))
    changes[forced] = _old_memory_response_change(
        one.state, _run("became_gpm", stream, verbose=False).state)
  assert changes[0.0] < 1e-4                    # merge off towards θ_GP: GPM
  assert changes[1.0] > 1e-2                    # merge off towards θ̂: unconstrained
  assert 0.0 < lam < 0.999
  assert changes["merge"] == pytest.approx(lam * changes[1.0], rel=1e-3)


@pytest.mark.parametrize("variant", ["gpm", "sgp"])
def test_thresholds_above_one_are_capped_and_memory_stays_a_projector(variant):
  """ε_t = 0.98 + 0.02·t reaches 1.0 at t = 1 and 1.02 at t = 2 (as 0.97 + 0.003·t does
  from task 10 of the 20-split). The official update then appends every remaining
  column of Û, null directions included, and its M Mᵀ stops being a projector;
  clx caps ε at 1, so the memory stays orthonormal and P = M Mᵀ idempotent."""
  stream = _domain_stream(num_tasks=3)
  backbone = mlp(stream.input_shape, (24, 24), seed=0)
  method = build(variant, backbone, threshold=0.98, threshold_increment=0.02, num_samples=12)
  res = run_method(method, stream, CFG, mesh=make_mesh(1), quiet=True)
  for key, mem in res.state["memory"].items():
    basis = np.asarray(mem["basis"], np.float64)
    k = int(mem["rank"])
    assert 0 < k <= basis.shape[0], key
    m = basis[:, :k]
    np.testing.assert_allclose(m.T @ m, np.eye(k), atol=1e-4, err_msg=key)
    p = m @ m.T
    np.testing.assert_allclose(p @ p, p, atol=1e-4, err_msg=key)
    assert np.all(basis[:, k:] == 0), key  # nothing beyond the rank
