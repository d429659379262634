"""InfLoRA+CA end to end on a small class-incremental stream (MLP backbone)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from clx import methods
from clx.methods import inflora as inflora_lib
from clx.methods import inflora_ca as ca_lib
from clx.methods.base import StreamSpec
from clx.models.mlp import mlp
from clx.train.loop import TrainConfig, run_method
from clx.train.sharding import make_mesh
from tests.helpers import make_gaussian_stream

CFG = TrainConfig(epochs=3, batch_size=16, learning_rate=1e-2, eval_batch_size=128)


@functools.cache
def runs():
  # Overlapping blobs (separation 1): per-task heads compete at class-IL inference.
  stream = make_gaussian_stream(num_tasks=3, classes_per_task=2, dim=16, n_train=128,
                                n_test=100, seed=0, separation=1.0)
  backbone = mlp(stream.input_shape, (32,), seed=0)
  out = {}
  for align in (True, False):
    method = methods.build("inflora_ca", backbone, lora_rank=4, sites="mlp", lamb=0.9, align=align)
    out[align] = (method, run_method(method, stream, CFG, mesh=make_mesh(1), quiet=True))
  return stream, backbone, out


def test_runs_end_to_end_with_gpm_memory_and_per_class_statistics():
  stream, backbone, out = runs()
  method, result = out[True]
  state = result.state
  assert method.name == "inflora_ca"
  assert sorted(state["class_stats"]) == ["0", "1", "2"]
  for stats in state["class_stats"].values():
    assert stats["mean"].shape == (2, 32) and stats["cov"].shape == (2, 32, 32)
  assert {kind for _, kind in inflora_lib.memory_summary(state).values()} == {"remove"}
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state["heads"]))
  assert np.all(np.isfinite(result.acc_matrix[np.tril_indices(3)]))
  assert all(result.acc_matrix[t, t] > 60 for t in range(3))


def test_class_statistics_are_those_of_the_features_after_each_task():
  """float64 NumPy mean / unbiased covariance + 1e-4·I of the task's final features."""
  stream, backbone, out = runs()
  state = out[True][1].state
  site_group = inflora_lib.site_groups(backbone, "mlp")
  for t in range(3):
    upto = {"branches": {k: v for k, v in state["branches"].items() if int(k) <= t}}
    params = inflora_lib.params_for(upto, backbone.params, site_group)
    feats = np.asarray(backbone.apply(params, stream.tasks[t].train.x), np.float64)
    y = stream.tasks[t].train.y
    for i, c in enumerate(stream.tasks[t].classes):
      f = feats[y == c]
      np.testing.assert_allclose(state["class_stats"][str(t)]["mean"][i], f.mean(0), atol=1e-4)
      np.testing.assert_allclose(state["class_stats"][str(t)]["cov"][i],
                                 np.cov(f.T) + 1e-4 * np.eye(32), atol=1e-4, rtol=1e-4)


def test_switching_alignment_off_loses_old_task_accuracy():
  """Same stream, seed and training; only the alignment differs."""
  _, _, out = runs()
  on, off = out[True][1].acc_matrix, out[False][1].acc_matrix
  # The diagonal before alignment (task 0 is never aligned) is identical.
  assert on[0, 0] == off[0, 0]
  old_on, old_off = on[-1, :2].mean(), off[-1, :2].mean()
  assert old_on > old_off + 10, (on, off)   # measured: 84.0 vs 58.0
  assert on[-1].mean() > off[-1].mean() + 8, (on, off)  # ACC 87.7 vs 69.3


def test_bad_arguments_are_named():
  backbone = mlp((16,), (24,), seed=0)
  with pytest.raises(ValueError, match="head_mode"):
    ca_lib.inflora_ca(backbone, sites="mlp", lora_rank=2, head_mode="shared")
  with pytest.raises(ValueError, match="logit_norm"):
    ca_lib.inflora_ca(backbone, sites="mlp", lora_rank=2, logit_norm=0.0)
  with pytest.raises(ValueError, match="ca_samples"):
    ca_lib.inflora_ca(backbone, sites="mlp", lora_rank=2, ca_samples=0)
  method = ca_lib.inflora_ca(backbone, sites="mlp", lora_rank=2)
  spec = StreamSpec(2, 2, "domain", ((0, 1), (0, 1)), (16,))
  with pytest.raises(ValueError, match="domain-incremental"):
    method.init(jax.random.PRNGKey(0), spec)
