"""GPM/BECAME on the conv nets: conv kernels projected off their patch memory,
batch norm frozen after the first task, official per-site sample counts."""

import dataclasses

import jax
import numpy as np
import pytest

from clx.data.types import ArraySplit, Stream, Task
from clx.methods import build
from clx.methods.gpm import site_key
from clx.models import convnets
from clx.train.loop import TrainConfig, run_method
from clx.train.sharding import make_mesh

CFG = TrainConfig(epochs=2, batch_size=16, optimizer="sgd", learning_rate=0.05,
                  eval_batch_size=64)


def _image_stream(num_tasks=2, n=48, size=20, seed=0):
  """Task-incremental tasks of coloured-noise images whose class sets the mean colour."""
  rng = np.random.default_rng(seed)
  tasks = []
  for t in range(num_tasks):
    classes = (2 * t, 2 * t + 1)
    colours = rng.random((2, 3)).astype(np.float32)

    def split(m):
      y = rng.integers(0, 2, m)
      x = colours[y][:, None, None, :] + 0.3 * rng.standard_normal((m, size, size, 3))
      return ArraySplit({"x": x.astype(np.float32), "y": (y + 2 * t).astype(np.int32)})

    tasks.append(Task(f"task {t}", split(n), split(24), classes))
  return Stream("noise-images", tuple(tasks), "task", 2 * num_tasks)


def _alexnet():
  return convnets.alexnet((20, 20, 3), channels=(6, 8, 8), hidden=24, seed=0)


def _get(tree, path):
  for p in path.split("/"):
    tree = tree[p]
  return np.asarray(tree)


@pytest.mark.parametrize("name", ["gpm", "sgp"])
def test_conv_and_fc_updates_stay_off_the_memory_and_bn_is_frozen(name):
  stream = _image_stream()
  kw = dict(threshold=0.9, num_samples=20,
            site_samples={"conv1/kernel": 4, "conv2/kernel": 10, "conv3/kernel": 10})
  one = run_method(build(name, _alexnet(), **kw), dataclasses.replace(stream, tasks=stream.tasks[:1]),
                   CFG, mesh=make_mesh(1), quiet=True)
  two = run_method(build(name, _alexnet(), **kw), stream, CFG, mesh=make_mesh(1), quiet=True)
  backbone = _alexnet()
  for site in backbone.sites["conv"] + backbone.sites["mlp"]:
    mem = one.state["memory"][site_key(site)]
    k = int(mem["rank"])
    basis = np.asarray(mem["basis"])[:, :k]
    assert 0 < k < basis.shape[0], f"{site}: rank {k}"
    w0 = _get(one.state["backbone"], site.replace("/kernel", "")  + "/kernel")
    w1 = _get(two.state["backbone"], site)
    delta = (w1 - w0).reshape(-1, w0.shape[-1])  # (kh·kw·C_in, C_out) for a conv
    assert np.abs(delta).max() > 1e-4, f"{site} did not train on task 2"
    inside = basis.T @ delta
    if name == "gpm":  # hard projection: no component inside the memory at all
      assert np.linalg.norm(inside) / np.linalg.norm(delta) < 1e-4, site
    else:  # SGP keeps a scaled component: less inside than outside
      assert np.linalg.norm(inside) < np.linalg.norm(delta)
  for bn in ("bn1", "bn2", "bn3", "bn4", "bn5"):
    for p in ("scale", "bias"):
      np.testing.assert_array_equal(_get(two.state["backbone"], f"{bn}/{p}"),
                                    _get(one.state["backbone"], f"{bn}/{p}"))
  # Task 1 did train batch norm (the freeze starts at the second task).
  assert not np.allclose(_get(one.state["backbone"], "bn1/scale"), 1.0)


def test_conv_representation_uses_official_sample_counts(monkeypatch):
  """conv1's representation holds every patch of its first k examples (im2col)."""
  from clx.methods import gpm as gpm_lib
  seen = {}
  real = gpm_lib._gpm_update

  def spy(basis, rank, rep, eps, **kw):
    seen[rep.shape[0]] = rep.shape
    return real(basis, rank, rep, eps, **kw)

  monkeypatch.setattr(gpm_lib, "_gpm_update", spy)
  stream = _image_stream(num_tasks=1)
  kw = dict(threshold=0.9, num_samples=20, site_samples={"conv1/kernel": 3})
  run_method(build("gpm", _alexnet(), **kw), stream, CFG, mesh=make_mesh(1), quiet=True)
  # conv1: 4×4×3 = 48 rows; 20 − 4 + 1 = 17 → 289 positions × 3 examples.
  assert seen[48] == (48, 289 * 3)
  # fc2: 24 inputs, one row per example of all 20.
  assert seen[24] == (24, 20)


def test_became_on_alexnet_trains_stage_two_and_logs_lambda():
  stream = _image_stream()
  method = build("became_gpm", _alexnet(), threshold=0.9, num_samples=20, verbose=False)
  result = run_method(method, stream, CFG, mesh=make_mesh(1), quiet=True)
  lam = float(np.asarray(result.state["lambdas"])[1])
  assert 0.0 < lam <= 1.0
  assert np.all(np.isfinite(result.acc_matrix[np.tril_indices(2)]))


def test_bad_site_samples_are_named():
  with pytest.raises(ValueError, match="not projected"):
    build("gpm", _alexnet(), site_samples={"nope/kernel": 3})
  with pytest.raises(ValueError, match="num_samples"):
    build("gpm", _alexnet(), num_samples=10, site_samples={"conv1/kernel": 30})
