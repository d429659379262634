"""clx.ops.metrics against hand-written loops and a published run."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.ops import metrics

SETTINGS = hypothesis.settings(max_examples=40, deadline=None)

# Official GPM, 10-task Permuted MNIST, seed 2, run on this project's CPU
# (shared/research/gpm_pmnist_peer.md); the script printed ACC 93.40, BWT −3.50.
GPM_PMNIST = np.array([
    [97.33] + [np.nan] * 9,
    [97.13, 97.41] + [np.nan] * 8,
    [96.72, 97.18, 97.29] + [np.nan] * 7,
    [96.52, 96.87, 97.01, 97.00] + [np.nan] * 6,
    [96.10, 96.34, 96.59, 96.66, 96.84] + [np.nan] * 5,
    [95.51, 95.71, 95.83, 96.15, 96.23, 96.60] + [np.nan] * 4,
    [95.10, 95.23, 95.18, 95.71, 95.44, 95.97, 96.36] + [np.nan] * 3,
    [94.62, 94.57, 94.59, 94.36, 94.58, 95.10, 95.46, 96.27] + [np.nan] * 2,
    [93.92, 94.22, 93.98, 93.85, 93.60, 94.34, 94.31, 95.42, 95.68, np.nan],
    [92.77, 92.86, 92.85, 93.11, 92.29, 93.18, 93.11, 94.19, 94.90, 94.77],
])


def reference_summary(a, reference=None):
  """Every metric written out as explicit loops over the lower triangle."""
  t_count = a.shape[0]
  last = t_count - 1
  acc = sum(a[last, i] for i in range(t_count)) / t_count
  curve = [sum(a[t, i] for i in range(t + 1)) / (t + 1) for t in range(t_count)]
  out = {"acc": acc, "aia": sum(curve) / t_count, "bwt": 0.0, "forgetting": 0.0}
  forgetting = []
  for i in range(last):
    best = max(a[t, i] for t in range(i, last))
    forgetting.append(best - a[last, i])
  if last > 0:
    out["bwt"] = sum(a[last, i] - a[i, i] for i in range(last)) / last
    out["forgetting"] = sum(forgetting) / last
  if reference is not None:
    out["fwt"] = sum(a[i, i] - reference[i] for i in range(t_count)) / t_count
  ratio = []
  for i in range(t_count):
    best = max(a[t, i] for t in range(i, t_count))
    ratio.append(1.0 if best == 0 else a[last, i] / best)
  return out, np.array(curve), np.array(forgetting), np.array(ratio)


def random_matrix(rng, t_count, fill=np.nan):
  a = rng.uniform(0.0, 1.0, size=(t_count, t_count))
  a[np.triu_indices(t_count, 1)] = fill  # unseen tasks: ignored
  return a


def assert_matches_reference(a, reference, atol):
  expected, curve, forgetting, ratio = reference_summary(a, reference)
  got = metrics.summarize_to_floats(a, reference)
  assert set(got) == set(expected)
  for key, value in expected.items():
    assert isinstance(got[key], float)
    assert got[key] == pytest.approx(value, abs=atol), key
  close = lambda x, y: np.testing.assert_allclose(x, y, atol=atol)
  close(metrics.average_accuracy_curve(a), curve)
  close(metrics.per_task_forgetting(a), forgetting)
  close(metrics.forgetting_ratio(a), ratio)


def test_gpm_pmnist_published_numbers(x64):
  got = metrics.summarize_to_floats(GPM_PMNIST)
  assert round(got["acc"], 2) == 93.40
  assert round(got["bwt"], 2) == -3.50
  assert_matches_reference(GPM_PMNIST, None, 1e-10)


def test_summary_matches_loops_float64(x64):
  rng = np.random.default_rng(0)
  for t_count in (1, 2, 5):
    a = random_matrix(rng, t_count)
    assert_matches_reference(a, rng.uniform(size=t_count), 1e-12)


def test_single_task_and_percent_units():
  got = metrics.summarize_to_floats(np.array([[87.5]]), np.array([80.0]))
  assert got == {
      "acc": 87.5, "aia": 87.5, "bwt": 0.0, "forgetting": 0.0, "fwt": 7.5
  }
  assert metrics.per_task_forgetting(np.array([[0.5]])).shape == (0,)


def test_jit_float32_and_integer_input():
  rng = np.random.default_rng(1)
  a = random_matrix(rng, 4).astype(np.float32)
  reference = rng.uniform(size=4).astype(np.float32)
  eager = metrics.summarize(a, reference)
  jitted = jax.jit(metrics.summarize)(a, reference)
  for key in eager:
    assert jitted[key].dtype == jnp.float32
    np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6)
  assert_matches_reference(a.astype(np.float64), reference, 1e-6)
  for fn in (metrics.average_accuracy_curve, metrics.per_task_forgetting,
             metrics.forgetting_ratio):
    np.testing.assert_allclose(jax.jit(fn)(a), fn(a), rtol=1e-6)
  counts = np.tril(rng.integers(0, 100, size=(3, 3)))
  assert metrics.summarize(counts)["acc"].dtype == jnp.float32


def test_forgetting_ratio_zero_best_is_one():
  a = np.array([[0.0, np.nan], [0.0, 0.8]])
  np.testing.assert_allclose(metrics.forgetting_ratio(a), [1.0, 1.0])


def test_metric_errors():
  with pytest.raises(ValueError, match="accuracy matrix must be 2-D"):
    metrics.summarize(np.ones(3))
  with pytest.raises(ValueError, match=r"must be square \(T, T\)"):
    metrics.summarize(np.ones((2, 3)))
  with pytest.raises(ValueError, match=r"must be square \(T, T\) with T ≥ 1"):
    metrics.summarize(np.ones((0, 0)))
  bad = np.tril(np.ones((3, 3)))
  bad[2, 1] = np.nan
  with pytest.raises(ValueError, match="on or below the diagonal.*1 NaN"):
    metrics.summarize(bad)
  bad[2, 1] = np.inf
  with pytest.raises(ValueError, match="1 Inf"):
    metrics.per_task_forgetting(bad)
  with pytest.raises(ValueError, match=r"reference must have shape \(T,\)"):
    metrics.summarize(np.eye(3), reference=np.ones(2))
  with pytest.raises(ValueError, match="reference must be finite"):
    metrics.summarize(np.eye(3), reference=np.array([1.0, np.nan, 0.0]))


@SETTINGS
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    t_count=st.integers(1, 6),
    fill=st.sampled_from([np.nan, 0.0, 7.0]),
    with_reference=st.booleans(),
)
def test_property_summary_matches_loops(seed, t_count, fill, with_reference):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    a = random_matrix(rng, t_count, fill)
    reference = rng.uniform(size=t_count) if with_reference else None
    assert_matches_reference(a, reference, 1e-12)
    got = metrics.summarize_to_floats(a)
    # Invariants: AIA and ACC are averages of accuracies; forgetting ≥ −BWT
    # contribution-wise since best ≥ a[i, i].
    assert 0.0 <= got["acc"] <= 1.0 and 0.0 <= got["aia"] <= 1.0
    assert got["forgetting"] >= -got["bwt"] - 1e-12
    jitted = jax.jit(metrics.summarize)(a)
    for key, value in got.items():
      assert float(jitted[key]) == pytest.approx(value, abs=1e-12)


def test_accuracy_over_samples_is_the_share_of_all_seen_test_examples_correct(x64):
  rng = np.random.default_rng(11)
  t = 5
  counts = rng.integers(20, 400, t)
  correct = np.tril((rng.random((t, t)) * counts).astype(int))
  a = 100.0 * correct / counts                     # a[s, i] = 100 · correct / n_i
  want = 100.0 * correct[-1].sum() / counts.sum()  # official toolkit: over all samples
  got = float(metrics.accuracy_over_samples(a, counts))
  assert got == pytest.approx(want, rel=1e-12)
  # Unequal tasks: differs from the task mean; equal tasks: the same number.
  assert abs(got - float(metrics.summarize(a)["acc"])) > 1e-3
  same = float(metrics.accuracy_over_samples(a, np.full(t, 7)))
  assert same == pytest.approx(float(metrics.summarize(a)["acc"]), rel=1e-12)


def test_accuracy_over_samples_rejects_bad_counts():
  a = np.eye(3) * 50
  with pytest.raises(ValueError, match="shape"):
    metrics.accuracy_over_samples(a, [1, 2])
  with pytest.raises(ValueError, match=">= 1"):
    metrics.accuracy_over_samples(a, [1, 0, 2])


def test_accuracy_over_samples_reads_only_the_last_row():
  """Rows before the last may be unmeasured (evaluate_after="last_task"); the last must not."""
  a = np.full((3, 3), np.nan)
  a[2] = [50.0, 60.0, 90.0]
  np.testing.assert_allclose(float(metrics.accuracy_over_samples(a, [1, 1, 2])), 72.5)
  a[2, 1] = np.nan
  with pytest.raises(ValueError, match="last row"):
    metrics.accuracy_over_samples(a, [1, 1, 2])
