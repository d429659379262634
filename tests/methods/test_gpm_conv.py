"""GPM/BECAME on the conv nets: conv kernels projected off their patch memory,
batch norm frozen after the first task, official per-site sample counts."""

import dataclasses

import jax
import numpy as np
import pytest

from clx.data.types import ArraySplit, Stream, Task
from clx.methods import build
from clx.ops.tree import to_key as site_key
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
  real = gpm_lib.representations

  def spy(*args, **kw):
    reps = real(*args, **kw)
    seen.update({rep.shape[0]: rep.shape for rep in reps.values()})
    return reps

  monkeypatch.setattr(gpm_lib, "representations", spy)
  stream = _image_stream(num_tasks=1)
  kw = dict(threshold=0.9, num_samples=20, site_samples={"conv1/kernel": 3})
  run_method(build("gpm", _alexnet(), **kw), stream, CFG, mesh=make_mesh(1), quiet=True)
  # conv1: 4×4×3 = 48 rows; 20 − 4 + 1 = 17 → 289 positions × 3 examples.
  assert seen[48] == (48, 289 * 3)
  # fc2: 24 inputs, one row per example of all 20.
  assert seen[24] == (24, 20)


def test_bad_site_samples_are_named():
  with pytest.raises(ValueError, match="not projected"):
    build("gpm", _alexnet(), site_samples={"nope/kernel": 3})
  with pytest.raises(ValueError, match="num_samples"):
    build("gpm", _alexnet(), num_samples=10, site_samples={"conv1/kernel": 30})


# ----------------------------------------------------------------------------
# BECAME stage 2 and the models its Fishers are computed on (AlexNet: BN, dropout).


_FISHER_BACKBONE = _alexnet()


def _head_logits(p, xb, mask=None, rng=None):
  # One function object: every recomputed Fisher below shares one compilation.
  return _FISHER_BACKBONE.apply(p["backbone"], xb, mask=mask, rng=rng) @ p["head"]["kernel"]


def _fisher_at(params, x, task_rng, pass_index):
  """The official Fisher (dropout on, batches of 16 in order, the last one alone via
  the real-row mask) at ``params``, recomputed here with the op directly."""
  from clx.methods import became as became_lib
  from clx.ops import merging
  return jax.device_get(merging.diagonal_fisher(
      _head_logits, params, x, batch_size=CFG.batch_size, pass_mask=True,
      rng=became_lib.fisher_rng(task_rng, pass_index)))


def _rel_diff(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  num = sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(a, b))
  return np.sqrt(num / sum(float(np.sum(np.asarray(y) ** 2)) for y in b))


def test_became_stage_two_is_unprojected_trains_bn_and_fishers_use_the_right_models(monkeypatch):
  from clx.methods import became as became_lib
  from clx.methods import gpm as gpm_lib
  captured, after_task = {}, []
  real = became_lib.merging.became_coefficient
  real_update = gpm_lib.update_memory

  def memory_spy(su, state, ctx):  # the state at the end of each task (θ_t, memory)
    out = real_update(su, state, ctx)
    after_task.append(jax.device_get(out))
    return out

  def spy(theta_gp, theta_hat, f_cur, f_old, per_leaf=False):
    captured.update(gp=jax.device_get(theta_gp), hat=jax.device_get(theta_hat),
                    f_cur=jax.device_get(f_cur), f_old=jax.device_get(f_old))
    return real(theta_gp, theta_hat, f_cur, f_old, per_leaf=per_leaf)

  stream = _image_stream(n=40)  # 40 = 2·16 + 8: a ragged last Fisher batch
  kw = dict(threshold=0.9, num_samples=20, verbose=False,
            site_samples={"conv1/kernel": 4, "conv2/kernel": 10, "conv3/kernel": 10})
  monkeypatch.setattr(became_lib.merging, "became_coefficient", spy)
  monkeypatch.setattr(gpm_lib, "update_memory", memory_spy)
  two = run_method(build("became_gpm", _alexnet(), **kw), stream, CFG, mesh=make_mesh(1),
                   quiet=True)
  gp, hat = captured["gp"]["backbone"], captured["hat"]["backbone"]
  one = after_task[0]
  theta0 = one["backbone"]
  # Stage 1 froze BN; stage 2 (from θ_GP) trains it.
  for bn in ("bn1", "bn2", "bn3", "bn4", "bn5"):
    np.testing.assert_array_equal(_get(gp, f"{bn}/scale"), _get(theta0, f"{bn}/scale"))
    assert np.abs(_get(hat, f"{bn}/scale") - _get(gp, f"{bn}/scale")).max() > 1e-4, bn
  # Stage 2 is unprojected: its update has a real component inside the task-1 memory,
  # where stage 1's has none.
  for site in _alexnet().sites["conv"] + _alexnet().sites["mlp"]:
    mem = one["memory"][site_key(site)]
    basis = np.asarray(mem["basis"])[:, :int(mem["rank"])]
    w0 = _get(theta0, site)
    stage1 = (_get(gp, site) - w0).reshape(-1, w0.shape[-1])
    stage2 = (_get(hat, site) - _get(gp, site)).reshape(-1, w0.shape[-1])
    assert np.linalg.norm(basis.T @ stage1) < 1e-4 * np.linalg.norm(stage1), site
    assert np.linalg.norm(basis.T @ stage2) > 0.05 * np.linalg.norm(stage2), site
  # The Fishers, recomputed independently on the models the official code uses:
  # F_cur at θ̂, F_old = F(θ_0) on task 1, the stored F = F(θ_t) + F_old at the merged θ_t.
  x1 = stream.tasks[1].train.x
  key = jax.random.PRNGKey(0)
  f_hat = _fisher_at(captured["hat"], x1, jax.random.fold_in(key, 2), 0)
  f_gp = _fisher_at(captured["gp"], x1, jax.random.fold_in(key, 2), 0)
  assert _rel_diff(captured["f_cur"], f_hat) < 1e-4
  assert _rel_diff(f_gp, f_hat) > 1e-2  # so F at θ_GP would have been caught
  theta0_params = {"backbone": theta0, "head": one["heads"]["0"]}
  f0 = _fisher_at(theta0_params, stream.tasks[0].train.x, jax.random.fold_in(key, 1), 0)
  assert _rel_diff(captured["f_old"]["backbone"], f0["backbone"]) < 1e-4
  merged = {"backbone": jax.device_get(two.state["backbone"]),
            "head": jax.device_get(two.state["heads"]["1"])}
  f_t = _fisher_at(merged, x1, jax.random.fold_in(key, 2), 1)
  want = jax.tree.map(lambda a, b: a + b, f_t["backbone"], f0["backbone"])
  assert _rel_diff(two.state["fisher"]["backbone"], want) < 1e-4
  assert _rel_diff(captured["f_cur"]["backbone"], f_t["backbone"]) > 1e-2
  # (Subsumes the former smoke test: λ logged in (0, 1], finite accuracies.)
  assert 0.0 < float(np.asarray(two.state["lambdas"])[1]) <= 1.0
  assert np.all(np.isfinite(two.acc_matrix[np.tril_indices(2)]))
