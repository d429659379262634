"""SD-LoRA's decoupled update, SimpleCIL prototypes and RanPAC's ridge head update against
float64 NumPy ports of the official code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import prototypes, ridge, sd_lora

pytestmark = pytest.mark.usefixtures("x64")


def _adapter(rng, d_in=6, r=2, d_out=5):
  return {"a": rng.normal(size=(d_in, r)), "b": rng.normal(size=(r, d_out))}


def test_decoupled_update_matches_code_forward():
  """lora.py l.161-191: new_q = Σ α_i B_i(A_i x)/(‖B_i‖‖A_i‖) + α_t B_t(A_t x)."""
  rng = np.random.default_rng(0)
  past, cur = [_adapter(rng) for _ in range(3)], _adapter(rng)
  mags, mag_t = rng.normal(size=3), 0.8
  x = rng.normal(size=(4, 6))
  ref = sum(m * (x @ p["a"] @ p["b"]) / (np.linalg.norm(p["b"]) * np.linalg.norm(p["a"]))
            for p, m in zip(past, mags)) + mag_t * (x @ cur["a"] @ cur["b"])
  j = lambda t: jax.tree.map(jnp.asarray, t)
  delta = sd_lora.decoupled_delta(j(past), jnp.asarray(mags), j(cur), mag_t)
  np.testing.assert_allclose(x @ np.asarray(delta), ref, rtol=1e-10)
  # the decoupling: a past direction's scale is irrelevant (only its magnitude counts) ...
  scaled = [dict(past[0], a=3.0 * past[0]["a"])] + past[1:]
  np.testing.assert_allclose(np.asarray(sd_lora.decoupled_delta(j(scaled), jnp.asarray(mags),
                                                                j(cur), mag_t)),
                             np.asarray(delta), rtol=1e-10)
  # ... while without it (plain summed LoRA) it is not
  plain = lambda ps: sum(p["a"] @ p["b"] for p in ps)
  assert not np.allclose(plain(scaled), plain(past))
  with pytest.raises(ValueError, match="magnitudes"):
    sd_lora.decoupled_adapters(j(past), jnp.asarray(mags[:2]), None, 0.0)


def test_prototypes_and_cosine_logits_match_loops():
  rng = np.random.default_rng(1)
  f, y = rng.normal(size=(20, 4)), rng.integers(0, 3, 20)
  mask = (np.arange(20) < 17).astype(np.float64)
  sums, counts = prototypes.class_sums(jnp.asarray(f), jnp.asarray(y), 5, jnp.asarray(mask))
  protos = np.asarray(prototypes.prototypes(sums, counts))
  for c in range(3):
    np.testing.assert_allclose(protos[c], f[:17][y[:17] == c].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(protos[3:], 0.0)
  logits = np.asarray(prototypes.cosine_logits(jnp.asarray(f), jnp.asarray(protos)))
  ref = np.array([[fi @ p / (np.linalg.norm(fi) * max(np.linalg.norm(p), 1e-12)) for p in protos]
                  for fi in f])
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-7)


def test_update_head_matches_code_replace_fc():
  """RanPAC.py l.115-150: λ by MSE on the last 20 % of the task's rows, then G, Q, solve."""
  rng = np.random.default_rng(2)
  m, c = 8, 3
  h0, y0 = np.abs(rng.normal(size=(30, m))), np.eye(c)[rng.integers(0, c, 30)]
  h1, y1 = np.abs(rng.normal(size=(25, m))), np.eye(c)[rng.integers(0, c, 25)]
  grid = 10.0 ** np.arange(-3, 4)

  def code(g, q, h, y):
    n_fit = int(len(h) * 0.8)
    gv, qv = h[:n_fit].T @ h[:n_fit], h[:n_fit].T @ y[:n_fit]
    losses = [np.mean((h[n_fit:] @ np.linalg.solve(gv + lam * np.eye(m), qv) - y[n_fit:]) ** 2)
              for lam in grid]
    lam = grid[int(np.argmin(losses))]
    g, q = g + h.T @ h, q + h.T @ y
    return g, q, np.linalg.solve(g + lam * np.eye(m), q), lam

  g, q, w, lam0 = code(np.zeros((m, m)), np.zeros((m, c)), h0, y0)
  g, q, w, lam1 = code(g, q, h1, y1)
  stats = ridge.init_statistics(m, c, jnp.float64)
  stats, got0 = ridge.update_head(stats, jnp.asarray(h0), jnp.asarray(y0), grid=tuple(grid))
  stats, got1 = ridge.update_head(stats, jnp.asarray(h1), jnp.asarray(y1), grid=tuple(grid))
  assert (got0, got1) == (lam0, lam1)
  np.testing.assert_allclose(np.asarray(stats["gram"]), g, rtol=1e-10)
  np.testing.assert_allclose(np.asarray(stats["w_out"]), w, rtol=1e-7, atol=1e-9)
  assert int(stats["count"]) == 55


def test_ridge_one_hot_refuses_out_of_range_concrete_labels():
  rng = np.random.default_rng(11)
  labels = rng.integers(0, 7, size=20)
  got = np.asarray(ridge.one_hot(jnp.asarray(labels), 7))
  np.testing.assert_array_equal(got, np.eye(7)[labels])
  for bad in (7, -1):
    with pytest.raises(ValueError, match=r"outside \[0, 7\)"):
      ridge.one_hot(jnp.asarray(np.append(labels, bad)), 7)
  with pytest.raises(ValueError, match=r"must be \(n,\)"):
    ridge.one_hot(jnp.asarray(labels.reshape(4, 5)), 7)
  # Traced labels cannot be checked: the documented zero row, not an error.
  traced = jax.jit(lambda y: ridge.one_hot(y, 7))(jnp.asarray([1, 9]))
  np.testing.assert_array_equal(np.asarray(traced), [np.eye(7)[1], np.zeros(7)])
