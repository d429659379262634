"""Adam-NSCL and BECAME-NSCL end to end on a small task-incremental stream (MLP)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from clx import methods
from clx.data.types import Stream
from clx.methods import became_nscl as nscl_lib
from clx.models.mlp import mlp
from clx.ops import merging
from clx.train.loop import TrainConfig, run_method
from clx.train.sharding import make_mesh
from tests.helpers import make_gaussian_stream

CFG = TrainConfig(epochs=2, batch_size=16, learning_rate=1e-3, eval_batch_size=128)
RATES = {"first": 1e-2, "body": 1e-2, "head": 1e-2, "norm": 1e-2}
THRESHOLD = 10.0


def _stream(num_tasks):
  s = make_gaussian_stream(num_tasks=3, classes_per_task=2, dim=16, n_train=96, n_test=60,
                           seed=0, separation=1.0)
  return Stream(s.name, s.tasks[:num_tasks], "task", s.num_classes)


@functools.cache
def runs():
  backbone = mlp((16,), (32, 32), seed=0)
  su = nscl_lib.setup(backbone, nscl_lib.NSCLConfig(
      threshold=THRESHOLD, covariance="batch_mean", learning_rates=RATES, weight_decay=5e-5))
  projected = nscl_lib.method(su, "adam_nscl")
  # Projection switched off: the same groups and learning rates, the update left as is.
  unprojected = nscl_lib.method(su, "adam_unprojected", transform_updates=nscl_lib.scale_updates)
  out = {}
  for key, method, tasks in (("after0", projected, 1), ("nscl", projected, 2),
                             ("off", unprojected, 2)):
    out[key] = run_method(method, _stream(tasks), CFG, mesh=make_mesh(1), quiet=True)
  return backbone, out


def _old_span(cov):
  """The old inputs' span: eigenvectors of the old covariance with non-negligible energy.

  (The batch-mean covariance of 6 batches has rank <= 6; its other eigenvalues are
  float32 noise, among which the official rule picks the null space.)
  """
  u, s, _ = np.linalg.svd(np.asarray(cov, np.float64))
  return u[:, s > 1e-5 * s[0]]


@pytest.mark.parametrize("site", ["lin1.kernel", "lin2.kernel"])
def test_task1_update_stays_out_of_the_old_input_span_and_not_without_projection(site):
  _, out = runs()
  before = out["after0"].state
  span = _old_span(before["cov"][site])
  assert 0 < span.shape[1] < span.shape[0]
  rel = {}
  for key in ("nscl", "off"):
    delta = (np.asarray(out[key].state["backbone"][site.split(".")[0]]["kernel"], np.float64)
             - np.asarray(before["backbone"][site.split(".")[0]]["kernel"], np.float64))
    assert np.linalg.norm(delta) > 1e-4, key  # it did train
    rel[key] = np.linalg.norm(span.T @ delta) / np.linalg.norm(delta)
  assert rel["nscl"] < 1e-4, rel
  assert rel["off"] > 0.3, rel


def test_adam_nscl_state_learning_rates_and_null_dims():
  _, out = runs()
  state = out["nscl"].state
  assert set(state["projector"]) == {"lin1.kernel", "lin2.kernel"}
  dims = nscl_lib.null_dims(state)
  assert all(0 < k < d for k, d in zip(dims.values(), (16, 32))), dims
  # Per-group multipliers: lr_group / train.learning_rate.
  assert {k: float(v) for k, v in state["lr_scale"].items()} == pytest.approx(
      {"body": 10.0, "head": 10.0, "norm": 10.0})
  acc = out["nscl"].acc_matrix
  assert acc[0, 0] > 60 and acc[1, 1] > 60


def test_became_nscl_merges_with_a_backbone_only_fisher(monkeypatch):
  backbone, _ = runs()
  seen = []
  original = merging.became_coefficient

  def spy(theta_gp, theta_hat, f_cur, f_old, **kw):
    seen.append((theta_gp, f_cur, f_old))
    return original(theta_gp, theta_hat, f_cur, f_old, **kw)

  monkeypatch.setattr(merging, "became_coefficient", spy)
  method = methods.build("became_nscl", backbone, threshold=THRESHOLD, learning_rates=RATES,
                         verbose=False, stage2={"epochs": 1})
  result = run_method(method, _stream(2), CFG, mesh=make_mesh(1), quiet=True)
  assert len(seen) == 1  # task 1 only
  theta_gp, f_cur, f_old = seen[0]
  # Heads are not in the coefficient (the code's Fisher skips ``last*``).
  assert set(theta_gp) == set(backbone.params) == {"lin1", "lin2"}
  assert jax.tree.structure(f_cur) == jax.tree.structure(backbone.params)
  assert all(np.all(np.asarray(f) >= 0) for f in jax.tree.leaves(f_old))
  assert sum(float(np.sum(f)) for f in jax.tree.leaves(f_old)) > 0  # F(θ_0) was accumulated
  lam = np.asarray(result.state["lambdas"])
  assert lam[0] == 1.0 and 0.0 <= lam[1] <= 1.0
  assert set(result.state["fisher"]) == {"lin1", "lin2"}
  assert np.all(np.isfinite(result.acc_matrix[np.tril_indices(2)]))


def test_bad_arguments_are_named():
  backbone = mlp((16,), (24,), seed=0)
  with pytest.raises(ValueError, match="threshold"):
    nscl_lib.adam_nscl(backbone, threshold=0.5)
  with pytest.raises(ValueError, match="covariance"):
    nscl_lib.adam_nscl(backbone, covariance="centred")
  with pytest.raises(ValueError, match="learning_rates"):
    nscl_lib.adam_nscl(backbone, learning_rates={"body": 1e-3})
  with pytest.raises(ValueError, match="train.weight_decay=0"):
    run_method(nscl_lib.adam_nscl(backbone), _stream(1),
               dataclasses.replace(CFG, weight_decay=1e-4), mesh=make_mesh(1), quiet=True)
