"""clx.ops.merging against float64 NumPy/SciPy references and properties."""

from __future__ import annotations

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from clx.ops import merging

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------
# Tiny linear-softmax model and its hand-derived Fisher
# ----------------------------------------------------------------------------


def linear_logits(params, x):
  return x @ params["w"] + params["b"]


def make_problem(seed, n=23, d=4, c=3):
  rng = np.random.default_rng(seed)
  params = {"w": rng.normal(size=(d, c)), "b": rng.normal(size=c)}
  inputs = rng.normal(size=(n, d))
  labels = rng.integers(0, c, size=n)
  return params, inputs, labels


def example_grads(params, x, y):
  """∂CE/∂(w, b) for one example: softmax(z) − e_y, outer x."""
  z = x @ params["w"] + params["b"]
  p = np.exp(z - z.max())
  p /= p.sum()
  err = p.copy()
  err[y] -= 1.0
  return np.outer(x, err), err


def reference_fisher(
    params, inputs, labels, kind, batch_size, per_sample, mask
):
  """The official loop: consecutive batches, F = Σ |b| ḡ_b² / N (or Σ g²/N)."""
  n = len(inputs)
  valid = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
  fisher_w, fisher_b = np.zeros_like(params["w"]), np.zeros_like(params["b"])
  for start in range(0, n, batch_size):
    members = [i for i in range(start, min(start + batch_size, n)) if valid[i]]
    if not members:
      continue
    grads = []
    for i in members:
      logits = inputs[i] @ params["w"] + params["b"]
      y = int(np.argmax(logits)) if kind == "true" else int(labels[i])
      grads.append(example_grads(params, inputs[i], y))
    if per_sample:
      fisher_w += sum(gw**2 for gw, _ in grads)
      fisher_b += sum(gb**2 for _, gb in grads)
    else:
      fisher_w += len(members) * np.mean([gw for gw, _ in grads], 0) ** 2
      fisher_b += len(members) * np.mean([gb for _, gb in grads], 0) ** 2
  return {"w": fisher_w / valid.sum(), "b": fisher_b / valid.sum()}


FISHER_CASES = [
    # kind, batch_size, per_sample, use_mask
    ("true", 64, False, False),  # one padded batch (N = 23 < 64)
    ("true", 5, False, False),  # 4 full batches + 1 padded
    ("empirical", 4, False, True),
    ("true", 6, True, False),
    ("empirical", 7, True, True),
]


@pytest.mark.parametrize("kind,batch_size,per_sample,use_mask", FISHER_CASES)
def test_fisher_matches_reference(x64, kind, batch_size, per_sample, use_mask):
  params, inputs, labels = make_problem(batch_size)
  mask = None
  if use_mask:
    mask = np.random.default_rng(1).uniform(size=len(inputs)) > 0.3
  got = merging.diagonal_fisher(
      linear_logits, params, inputs, labels=labels, kind=kind,
      batch_size=batch_size, per_sample=per_sample, mask=mask,
  )
  ref = reference_fisher(
      params, inputs, labels, kind, batch_size, per_sample, mask
  )
  for name in ("w", "b"):
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-10, atol=1e-14)


def test_fisher_batch_one_equals_per_sample_and_jit(x64):
  params, inputs, labels = make_problem(3)
  batched = merging.diagonal_fisher(linear_logits, params, inputs, batch_size=1)
  exact = merging.diagonal_fisher(
      linear_logits, params, inputs, batch_size=8, per_sample=True
  )
  for name in ("w", "b"):
    np.testing.assert_allclose(batched[name], exact[name], rtol=1e-10)
  wrapped = jax.jit(
      lambda p, x: merging.diagonal_fisher(linear_logits, p, x, batch_size=8)
  )
  eager = merging.diagonal_fisher(linear_logits, params, inputs, batch_size=8)
  for name in ("w", "b"):
    np.testing.assert_allclose(
        wrapped(params, inputs)[name], eager[name], rtol=1e-12
    )


def test_fisher_float32_and_nonlinear_model():
  params, inputs, labels = make_problem(4, n=30)
  ref = reference_fisher(params, inputs, labels, "true", 8, False, None)
  p32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  got = merging.diagonal_fisher(
      linear_logits, p32, inputs.astype(np.float32), batch_size=8
  )
  for name in ("w", "b"):
    assert got[name].dtype == jnp.float32
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-7)
  # A two-layer model: batch_size 1 equals the per-sample form; both ≥ 0.
  rng = np.random.default_rng(5)
  mlp = {"h": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
         "o": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
  mlp_fn = lambda p, x: jnp.tanh(x @ p["h"]) @ p["o"]
  x32 = inputs.astype(np.float32)
  one = merging.diagonal_fisher(mlp_fn, mlp, x32, batch_size=1)
  exact = merging.diagonal_fisher(mlp_fn, mlp, x32, per_sample=True)
  for name in ("h", "o"):
    np.testing.assert_allclose(one[name], exact[name], rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(exact[name]) >= 0)


def test_fisher_errors():
  params, inputs, labels = make_problem(6)
  fisher = merging.diagonal_fisher
  with pytest.raises(ValueError, match="kind must be 'true' or 'empirical'"):
    fisher(linear_logits, params, inputs, kind="exact")
  with pytest.raises(ValueError, match="kind='empirical' needs labels"):
    fisher(linear_logits, params, inputs, kind="empirical")
  with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(23"):
    fisher(linear_logits, params, inputs, labels=labels[:5], kind="empirical")
  with pytest.raises(ValueError, match="labels must be integer class ids"):
    fisher(linear_logits, params, inputs, labels=labels * 1.0, kind="empirical")
  with pytest.raises(ValueError, match=r"mask must have shape \(N,\)"):
    fisher(linear_logits, params, inputs, mask=np.ones(3, bool))
  with pytest.raises(ValueError, match="mask excludes every example"):
    fisher(linear_logits, params, inputs, mask=np.zeros(23, bool))
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    fisher(linear_logits, params, inputs, batch_size=0)
  with pytest.raises(ValueError, match=r"inputs must be \(N, ...\) with N ≥ 1"):
    fisher(linear_logits, params, np.zeros((0, 4)))
  bad = inputs.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="inputs must be finite"):
    fisher(linear_logits, params, bad)
  with pytest.raises(ValueError, match=r"logits_fn must return \(batch, cla"):
    fisher(lambda p, x: x @ p["w"][:, 0], params, inputs)


# ----------------------------------------------------------------------------
# BECAME coefficient, objective, interpolation
# ----------------------------------------------------------------------------


def make_merge_trees(rng, scale_old=1.0):
  shapes = {"conv": (3, 3, 2, 4), "dense": {"kernel": (5, 3), "bias": (3,)}}
  is_shape = lambda s: isinstance(s, tuple)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
  def tree(fn):
    return jax.tree.unflatten(treedef, [fn(s) for s in leaves])
  gp = tree(lambda s: rng.normal(size=s))
  hat = tree(lambda s: rng.normal(size=s))
  f_cur = tree(lambda s: rng.exponential(size=s))
  f_old = tree(lambda s: scale_old * rng.exponential(size=s))
  return gp, hat, f_cur, f_old


def leaf_quads(*trees):
  return zip(*(jax.tree.leaves(t) for t in trees))


def reference_lambda(gp, hat, f_cur, f_old):
  num = den = 0.0
  for g, h, fc, fo in leaf_quads(gp, hat, f_cur, f_old):
    num += np.sum(fc * (h - g) ** 2)
    den += np.sum((fc + fo) * (h - g) ** 2)
  return num / den


def reference_objective(lam, gp, hat, f_cur, f_old):
  total = 0.0
  for g, h, fc, fo in leaf_quads(gp, hat, f_cur, f_old):
    theta = (1 - lam) * g + lam * h
    total += np.sum(fc * (theta - h) ** 2 + fo * (theta - g) ** 2)
  return total


def test_became_coefficient_matches_reference(x64):
  trees = make_merge_trees(np.random.default_rng(10))
  lam = merging.became_coefficient(*trees)
  assert lam.shape == ()
  np.testing.assert_allclose(lam, reference_lambda(*trees), rtol=1e-12)
  per_leaf = merging.became_coefficient(*trees, per_leaf=True)
  assert jax.tree.structure(per_leaf) == jax.tree.structure(trees[0])
  for leaf_lam, *leaf in zip(
      jax.tree.leaves(per_leaf), *(jax.tree.leaves(t) for t in trees)
  ):
    np.testing.assert_allclose(
        leaf_lam, reference_lambda(*leaf), rtol=1e-12
    )
  np.testing.assert_allclose(
      merging.became_objective(lam, *trees),
      reference_objective(float(lam), *trees),
      rtol=1e-12,
  )
  np.testing.assert_allclose(jax.jit(merging.became_coefficient)(*trees), lam)


def test_became_coefficient_edge_cases(x64):
  gp, hat, f_cur, f_old = make_merge_trees(np.random.default_rng(11))
  # θ̂ = θ_GP: objective constant in λ, λ defined as 0.
  assert float(merging.became_coefficient(gp, gp, f_cur, f_old)) == 0.0
  zeros = jax.tree.map(np.zeros_like, f_cur)
  assert float(merging.became_coefficient(gp, hat, zeros, zeros)) == 0.0
  # No old-task Fisher: λ = 1 (take θ̂); no current Fisher: λ = 0 (keep θ_GP).
  assert float(merging.became_coefficient(gp, hat, f_cur, zeros)) == 1.0
  assert float(merging.became_coefficient(gp, hat, zeros, f_old)) == 0.0
  # Zeroing both Fishers of a leaf is the same as dropping it.
  sub = [{"dense": t["dense"]} for t in (gp, hat, f_cur, f_old)]
  f_cur_z = dict(f_cur, conv=np.zeros_like(f_cur["conv"]))
  f_old_z = dict(f_old, conv=np.zeros_like(f_old["conv"]))
  np.testing.assert_allclose(
      merging.became_coefficient(gp, hat, f_cur_z, f_old_z),
      merging.became_coefficient(*sub),
      rtol=1e-12,
  )


def test_became_float32():
  trees = make_merge_trees(np.random.default_rng(12))
  trees32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trees)
  lam = merging.became_coefficient(*trees32)
  assert lam.dtype == jnp.float32
  np.testing.assert_allclose(lam, reference_lambda(*trees), rtol=1e-5)


def test_interpolate(x64):
  rng = np.random.default_rng(13)
  a = {"x": rng.normal(size=(3, 2)), "y": {"z": rng.normal(size=4)}}
  b = jax.tree.map(lambda v: v + rng.normal(size=v.shape), a)
  for lam, end in ((0.0, a), (1.0, b)):  # exact at the ends
    got = merging.interpolate(a, b, lam)
    chex.assert_trees_all_equal(got, end)
  lams = {"x": 0.25, "y": {"z": 0.75}}
  out = merging.interpolate(a, b, lams)
  close = lambda x, y: np.testing.assert_allclose(x, y, atol=1e-14)
  close(out["x"], 0.75 * a["x"] + 0.25 * b["x"])
  close(out["y"]["z"], 0.25 * a["y"]["z"] + 0.75 * b["y"]["z"])
  jitted = jax.jit(merging.interpolate)(a, b, jnp.float64(0.3))
  close(jitted["x"], 0.7 * a["x"] + 0.3 * b["x"])
  a32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), a)
  assert merging.interpolate(a32, a32, 0.5)["x"].dtype == jnp.float32


def test_merging_errors():
  gp, hat, f_cur, f_old = make_merge_trees(np.random.default_rng(14))
  with pytest.raises(ValueError, match="theta_hat has tree structure"):
    merging.became_coefficient(gp, {"conv": hat["conv"]}, f_cur, f_old)
  bad_shape = dict(hat, conv=np.ones((3, 3, 2, 5)))
  with pytest.raises(ValueError, match=r"theta_hat leaf 0 has shape \(3, 3"):
    merging.became_coefficient(gp, bad_shape, f_cur, f_old)
  negative = dict(f_old, conv=-f_old["conv"])
  with pytest.raises(ValueError, match="fisher_old must be non-negative"):
    merging.became_coefficient(gp, hat, f_cur, negative)
  nan = dict(f_cur, conv=np.full_like(f_cur["conv"], np.nan))
  with pytest.raises(ValueError, match="fisher_cur must be finite"):
    merging.became_coefficient(gp, hat, nan, f_old)
  with pytest.raises(ValueError, match="lam must be a scalar or a pytree"):
    merging.interpolate(gp, hat, np.ones(3))
  with pytest.raises(ValueError, match="lam must be a scalar or a pytree"):
    merging.interpolate(gp, hat, {"conv": 0.5})
  lams = jax.tree.map(lambda v: np.ones(2), gp)
  with pytest.raises(ValueError, match="per-leaf lam must hold scalars"):
    merging.interpolate(gp, hat, lams)


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------


@SETTINGS
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-3.0, 3.0)
)
def test_property_lambda_is_the_objective_minimiser(seed, log_scale):
  with jax.enable_x64(True):
    trees = make_merge_trees(np.random.default_rng(seed), 10.0**log_scale)
    lam = float(merging.became_coefficient(*trees))
    assert 0.0 <= lam <= 1.0
    objective = lambda t: float(merging.became_objective(t, *trees))
    best = scipy.optimize.minimize_scalar(
        objective, bounds=(0.0, 1.0), method="bounded",
        options={"xatol": 1e-10},
    )
    assert lam == pytest.approx(best.x, abs=1e-6)
    grid = np.linspace(0.0, 1.0, 41)
    values = np.array([reference_objective(t, *trees) for t in grid])
    assert objective(lam) <= values.min() * (1 + 1e-12)
    # Per-leaf λ minimise the separable objective leaf by leaf.
    per_leaf = merging.became_coefficient(*trees, per_leaf=True)
    base = float(merging.became_objective(per_leaf, *trees))
    for index in range(len(jax.tree.leaves(per_leaf))):
      for step in (-1e-3, 1e-3):
        leaves = [float(v) for v in jax.tree.leaves(per_leaf)]
        leaves[index] += step
        moved = jax.tree.unflatten(jax.tree.structure(per_leaf), leaves)
        assert float(merging.became_objective(moved, *trees)) >= base


# ----------------------------------------------------------------------------
# Fisher on a batch-norm + dropout model (AlexNet), ragged last batch
# ----------------------------------------------------------------------------

_DROPS = {1: 0.2, 2: 0.2, 3: 0.5, 11: 0.5, 12: 0.5}  # convnets.AlexNet key tags → rates


def _ref_alexnet_logits(p, x, rng, padded_rows):
  """Float64 AlexNet forward written out here: batch norm over the rows given
  (the batch alone, as the official loop), dropout masks drawn as clx documents
  them (``bernoulli(fold_in(rng, tag), keep, padded batch shape)``, first rows)."""
  n = x.shape[0]

  def bn(h, q):
    axes = tuple(range(h.ndim - 1))
    mean = h.mean(axes)
    var = ((h - mean) ** 2).mean(axes)
    return (h - mean) / jnp.sqrt(var + 1e-5) * q["scale"] + q["bias"]

  def drop(h, tag):
    # float32 p: under x64 a float64 p would draw different uniforms than the model.
    keep = jax.random.bernoulli(jax.random.fold_in(rng, tag), jnp.float32(1 - _DROPS[tag]),
                                (padded_rows, *h.shape[1:]))[:n]
    return jnp.where(keep, h / (1 - _DROPS[tag]), 0.0)

  for i in (1, 2, 3):
    x = jax.lax.conv_general_dilated(x, p["backbone"][f"conv{i}"]["kernel"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = drop(jax.nn.relu(bn(x, p["backbone"][f"bn{i}"])), i)
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    x = x[:, :2 * h2, :2 * w2].reshape(n, h2, 2, w2, 2, x.shape[-1]).max((2, 4))
  h = x.reshape(n, -1)
  for i in (1, 2):
    h = h @ p["backbone"][f"fc{i}"]["kernel"]
    h = drop(jax.nn.relu(bn(h, p["backbone"][f"bn{i + 3}"])), 10 + i)
  return h @ p["head"]


def _ref_became_fisher(params, x, batch_size, rng):
  """Official ``compute_fisher_matrix_diag``: consecutive batches (the last one alone),
  true labels = argmax of the same forward, F += grad²·len(batch), then / N."""
  def loss(p, xb, key):
    logits = _ref_alexnet_logits(p, xb, key, batch_size)
    y = jnp.argmax(jax.lax.stop_gradient(logits), -1)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))

  grad = jax.jit(jax.grad(loss))  # one compilation per batch shape (full, last)
  total = jax.tree.map(jnp.zeros_like, params)
  for b, start in enumerate(range(0, len(x), batch_size)):
    xb = x[start:start + batch_size]
    g = grad(params, xb, jax.random.fold_in(rng, b))
    total = jax.tree.map(lambda t, gi: t + len(xb) * gi**2, total, g)
  return jax.tree.map(lambda t: t / len(x), total)


def test_fisher_on_alexnet_matches_official_loop_with_dropout_and_ragged_batch():
  from clx.models.convnets import alexnet
  backbone = alexnet((32, 32, 3), channels=(4, 6, 8), hidden=12, seed=3)
  rng = np.random.default_rng(5)
  params = {"backbone": backbone.params,
            "head": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)}
  x = rng.normal(size=(11, 32, 32, 3)).astype(np.float32)  # batches of 4, 4 and 3 alone
  key = jax.random.PRNGKey(7)

  def logits_fn(p, xb, mask=None, rng=None):
    return backbone.apply(p["backbone"], xb, mask=mask, rng=rng) @ p["head"]

  got = merging.diagonal_fisher(logits_fn, params, x, batch_size=4, pass_mask=True, rng=key)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    want = jax.device_get(_ref_became_fisher(p64, jnp.asarray(x, jnp.float64), 4, key))
  scale = max(float(np.max(w)) for w in jax.tree.leaves(want))
  chex.assert_trees_all_close(jax.device_get(got), want, rtol=2e-3, atol=1e-5 * scale)
  # The old pass (padding rows inside the batch statistics) is measurably off.
  old = merging.diagonal_fisher(logits_fn, params, x, batch_size=4, pass_mask=False, rng=key)
  total = lambda tree: sum(float(np.sum(a)) for a in jax.tree.leaves(tree))  # noqa: E731
  assert abs(total(old) - total(want)) > 1e-2 * total(want)


def test_fisher_per_sample_rejects_batch_options():
  params, inputs, _ = make_problem(0)
  with pytest.raises(ValueError, match="per_sample"):
    merging.diagonal_fisher(linear_logits, params, inputs, per_sample=True, pass_mask=True)
