"""PROTEUS: composition, penalties (vs finite differences), retrieval, checkpoints."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx import checkpoint as ckpt
from clx.methods import proteus as proteus_lib
from clx.methods.base import StreamSpec, TaskInfo
from clx.models.mlp import mlp
from clx.ops import lora as lora_ops
from clx.train.loop import TrainConfig, run_method
from tests.helpers import make_gaussian_stream

SITES = ("lin1/kernel", "lin2/kernel")


def small_parts(backbone, **kw):
  kw = {"sites": SITES, "n_components": 4, "rp_dim": 96, "max_iter": 50, **kw}
  return proteus_lib.ProteusParts(backbone, **kw)


def ctx_for(t, spec, seed=0):
  return types.SimpleNamespace(task_index=t, spec=spec, rng=jax.random.PRNGKey(100 + seed + t))


def state_after_two_tasks(parts, spec, seed=0):
  """A state with trained-looking (random, non-zero) units for tasks 0 and 1, in task 2."""
  rng = np.random.default_rng(seed)
  state = parts.init(jax.random.PRNGKey(0), spec)
  for t in range(3):
    state = parts.begin_task(state, ctx_for(t, spec))
    entry = dict(state["tasks"][str(t)])
    entry["unit"] = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3), entry["unit"])
    if t > 0:
      entry["weights"] = jax.tree.map(lambda w: jnp.asarray(rng.uniform(0.2, 1.5, w.shape)),
                                      entry["weights"])
    state = {**state, "tasks": {**state["tasks"], str(t): entry}}
  return state


def spec3():
  return StreamSpec(3, 6, "class", ((0, 1), (2, 3), (4, 5)), (7,))


def test_composed_delta_is_the_weighted_sum_of_units():
  with jax.enable_x64(True):
    bb = mlp((7,), (5, 4))
    parts = small_parts(bb, alpha=0.3, scale=0.1)
    state = state_after_two_tasks(parts, spec3())
    deltas = parts.deltas(state, 3)
    for s in SITES:
      k = proteus_lib.site_key(s)
      u = [state["tasks"][str(j)]["unit"][k] for j in range(3)]
      w2 = np.asarray(state["tasks"]["2"]["weights"][k])
      ref = 0.1 * (0.3 * (w2[0] * u[0]["a"] @ u[0]["b"] + w2[1] * u[1]["a"] @ u[1]["b"])
                   + u[2]["a"] @ u[2]["b"])
      np.testing.assert_allclose(deltas[s][2], ref, rtol=1e-10)
      np.testing.assert_allclose(deltas[s][0], 0.1 * u[0]["a"] @ u[0]["b"], rtol=1e-10)
    # the training forward (apply_adapters over the frozen pool) is the same network
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 7)))
    base = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), bb.params)
    entry = state["tasks"]["2"]
    train = jax.jit(lambda st, b, x: bb.apply(lora_ops.apply_adapters(
        b, parts.training_adapters(st, 2, entry["unit"], entry["weights"]), 0.1), x))(state, base, x)
    one_task = jax.jit(parts.task_features, static_argnums=(3, 4))
    np.testing.assert_allclose(one_task(state, base, x, 2, 3), train, rtol=1e-10)
    # all tasks at once (vmap) and per-example tasks agree with one task at a time
    every = jax.jit(parts.all_task_features, static_argnums=3)(state, base, x, 3)
    tasks = [2, 0, 1, 1, 0]
    per_ex = jax.jit(parts.per_example_features, static_argnums=4)(state, base, x,
                                                                  jnp.asarray(tasks), 3)
    np.testing.assert_allclose(every[2], one_task(state, base, x, 2, 3), rtol=1e-10)
    np.testing.assert_allclose(per_ex, every[jnp.asarray(tasks), jnp.arange(5)], rtol=1e-10)


def test_task_deltas_and_features_with_are_task_features_up_to_rounding():
  # end_task's features (the task as data, padded to the stream's task count) against the
  # per-task compiled task_features the old end_task ran (num_tasks = t + 1), in float32.
  bb = mlp((7,), (5, 4))
  parts = small_parts(bb, alpha=0.3, scale=0.1)
  state = state_after_two_tasks(parts, spec3())
  x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 7)), jnp.float32)
  old_fn = jax.jit(parts.task_features, static_argnums=(3,))
  deltas_fn, feat_fn = jax.jit(parts.task_deltas), jax.jit(parts.features_with)
  for t in range(3):
    inputs = parts.task_delta_inputs(state, t, 5)  # padded beyond the tasks seen
    assert inputs[proteus_lib.site_key(SITES[0])]["coef"].shape == (5,)
    d_t = deltas_fn(inputs)
    for s in SITES:
      np.testing.assert_allclose(d_t[s], parts.deltas(state, t + 1)[s][t], rtol=1e-6, atol=1e-7)
    old, new = old_fn(state, bb.params, x, t), feat_fn(bb.params, d_t, x)
    np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="width 2 must exceed task_index 2"):
    parts.task_delta_inputs(state, 2, 2)


def test_end_task_compiles_the_feature_pass_once_for_every_task(monkeypatch):
  # The old end_task jitted task_features once per task index: one trace (and compilation)
  # of the backbone per task, 26-40 s each for ViT-B/16 on a loaded CPU. Counted here as
  # traces of params_with during end_task: 3 tasks -> 1 trace (old code: 3).
  stream = make_gaussian_stream(num_tasks=3, classes_per_task=2, dim=16, n_train=48, n_test=16)
  parts = small_parts(mlp(stream.input_shape, (24, 16)))
  traces, inside = [], [False]
  real = proteus_lib.params_with

  def counting(base, deltas_t):
    if inside[0]:
      traces.append(1)
    return real(base, deltas_t)

  monkeypatch.setattr(proteus_lib, "params_with", counting)
  method = parts.method()

  def end_task(state, ctx):
    inside[0] = True
    try:
      return method.end_task(state, ctx)
    finally:
      inside[0] = False

  res = run_method(method._replace(end_task=end_task), stream,
                   TrainConfig(epochs=1, batch_size=16, learning_rate=5e-3, eval_batch_size=64),
                   quiet=True)
  assert np.all(np.isfinite(res.acc_matrix[np.tril_indices(3)]))
  assert len(traces) == 1, traces


def test_loss_gradients_match_finite_differences():
  with jax.enable_x64(True):
    bb = mlp((7,), (5, 4))
    spec = spec3()
    parts = small_parts(bb, reg_weight=0.05, ortho_weight=0.3, ortho_factors="ab")
    state = state_after_two_tasks(parts, spec, seed=3)
    state = {**state, "heads": jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state["heads"])}
    params = parts.trainable(state, TaskInfo(2, spec))
    base = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), bb.params)
    rng = np.random.default_rng(4)
    batch = {"x": jnp.asarray(rng.normal(size=(9, 7))), "y": jnp.asarray(rng.choice([4, 5], 9)),
             "mask": jnp.ones((9,))}

    proj = jnp.asarray(rng.normal(size=(9, 4)))

    # The training forward through the composed adapters and both penalties, in float64
    # (the cross-entropy itself is computed in float32 by clx.methods.heads).
    @jax.jit
    def f(p):
      adapters = parts.training_adapters(state, 2, p["unit"], p["weights"])
      feats = bb.apply(lora_ops.apply_adapters(base, adapters, parts.scale), batch["x"])
      return (jnp.sum(jnp.tanh(feats) * proj) + parts.reg_weight * parts.l1_penalty(p["weights"])
              + parts.ortho_weight * parts.ortho_penalty(state, 2, p["unit"]))

    def full_loss(p):
      return parts.loss(p, state, base, batch, None, TaskInfo(2, spec))[0]

    grads = jax.grad(f)(params)
    flat_p, unravel = jax.flatten_util.ravel_pytree(params)
    flat_g, _ = jax.flatten_util.ravel_pytree(grads)
    # every transfer weight and a sample of the unit's entries
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    sizes = [int(np.size(v)) for _, v in leaves]
    offsets = np.cumsum([0] + sizes)
    picks = []
    for (path, _), off, size in zip(leaves, offsets, sizes):
      name = jax.tree_util.keystr(path)
      if "weights" in name:
        picks += list(range(off, off + size))
      elif "unit" in name:
        picks += list(rng.choice(np.arange(off, off + size), 3, replace=False))
    eps = 1e-6
    for i in picks:
      e = np.zeros_like(flat_p)
      e[i] = eps
      fd = (f(unravel(flat_p + e)) - f(unravel(flat_p - e))) / (2 * eps)
      np.testing.assert_allclose(flat_g[i], fd, rtol=1e-6, atol=1e-9)
    # the method's loss (float32 cross-entropy) agrees to float32 accuracy
    full_g, _ = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(full_loss))(params))
    full = jax.jit(full_loss)
    for i in picks[:6]:
      e = np.zeros_like(flat_p)
      e[i] = 1e-3
      fd = (full(unravel(flat_p + e)) - full(unravel(flat_p - e))) / 2e-3
      np.testing.assert_allclose(full_g[i], fd, rtol=2e-2, atol=2e-4)


@pytest.mark.parametrize("factors", ["b", "a", "ab"])
def test_penalty_gradients(factors):
  with jax.enable_x64(True):
    bb = mlp((7,), (5, 4))
    parts = small_parts(bb, ortho_factors=factors)
    state = state_after_two_tasks(parts, spec3(), seed=5)
    unit = state["tasks"]["2"]["unit"]
    g = jax.grad(lambda u: parts.ortho_penalty(state, 2, u))(unit)
    for s in SITES:
      k = proteus_lib.site_key(s)
      a_new, b_new = np.asarray(unit[k]["a"]), np.asarray(unit[k]["b"])
      old = [{f: np.asarray(state["tasks"][str(j)]["unit"][k][f]) for f in "ab"} for j in range(2)]
      # d/da_k Σ_j ‖a_jᵀa_k‖² = 2 Σ_j a_j a_jᵀ a_k;  d/db_k Σ_j ‖b_j b_kᵀ‖² = 2 Σ_j b_k b_jᵀ b_j
      ref_a = sum(2 * o["a"] @ o["a"].T @ a_new for o in old)
      ref_b = sum(2 * b_new @ o["b"].T @ o["b"] for o in old)
      np.testing.assert_allclose(g[k]["a"], ref_a if "a" in factors else 0.0, rtol=1e-10)
      np.testing.assert_allclose(g[k]["b"], ref_b if "b" in factors else 0.0, rtol=1e-10)
    w = state["tasks"]["2"]["weights"]
    gw = jax.grad(parts.l1_penalty)(w)
    for k in w:
      np.testing.assert_array_equal(gw[k], np.sign(np.asarray(w[k])))
    # orthogonality gradient is zero for the first task (nothing to be orthogonal to)
    g0 = jax.grad(lambda u: parts.ortho_penalty(state, 0, u))(state["tasks"]["0"]["unit"])
    assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(g0))


def test_new_unit_sides_and_defaults_follow_the_code():
  """The code: input-side ``*_lora_pool_B`` = 0, output-side ``*_lora_pool_A`` ~ N(0, 0.01²);
  main ImageNet-R config: no orthogonality weight, α 0.3, ℓ1 0.006."""
  bb = mlp((300,), (200, 4))
  parts = proteus_lib.ProteusParts(bb, sites=("lin1/kernel",), rp_dim=8)
  unit = parts.new_unit(jax.random.PRNGKey(3), 0)["lin1.kernel"]
  assert unit["a"].shape == (300, 4) and unit["b"].shape == (4, 200)
  assert float(jnp.abs(unit["a"]).max()) == 0.0                    # input side: zeros
  b = np.asarray(unit["b"])
  assert abs(b.std() - 0.01) < 0.0005 and abs(b.mean()) < 0.0005   # output side: N(0, 0.01²)
  assert parts.ortho_weight == 0.0 and parts.ortho_factors == "b"
  assert parts.alpha == 0.3 and parts.reg_weight == 0.006 and parts.scale == 0.1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  stream = make_gaussian_stream(num_tasks=3, classes_per_task=2, dim=16, n_train=96, n_test=40,
                                separation=3.0)
  bb = mlp(stream.input_shape, (24, 16))
  parts = small_parts(bb, screen_signatures=True)   # exhaustive in the loop, screening measured
  workdir = tmp_path_factory.mktemp("proteus")
  res = run_method(parts.method(), stream, TrainConfig(epochs=2, batch_size=16,
                                                       learning_rate=5e-3, eval_batch_size=64),
                   quiet=True, checkpoint_dir=str(workdir))
  return stream, bb, parts, res, workdir


def test_learns_retrieves_and_reports(trained):
  stream, bb, parts, res, _ = trained
  state = jax.device_get(res.state)
  acc = res.acc_matrix
  assert np.all(np.isfinite(acc[np.tril_indices(3)]))
  assert acc[-1].mean() > 80, acc       # class-IL: retrieval + ridge head
  report = parts.retrieval_report(state, bb.params, stream, screen_m=(1,), bound_samples=48,
                                  batch_size=64, ablations={"kmeans": {"signature": "kmeans"}})
  mean = report["mean"]
  assert mean["retrieval_acc"] >= 95, report
  assert mean["screen_1"] >= mean["retrieval_acc"] - 5, report
  assert mean["kmeans_retrieval_acc"] >= 90, report
  assert mean["acc"] > 80 and mean["oracle_acc"] >= mean["acc"] - 5
  for row in report["tasks"]:
    for side in ("bound_train", "bound_test"):
      assert row[side]["clusters"] >= 1 and np.isfinite(row[side]["delta_min"])
    # separated tasks: other tasks' clusters are far, the task's own are near
    assert row["bound_train"]["delta_min"] > row["bound_train"]["delta_self"]
  diag = parts.diagnostics(state)
  assert set(diag["tasks"]) == {"0", "1", "2"}
  assert all(d["components"] >= 1 for d in diag["tasks"].values())
  # task-incremental prediction uses the given task's backbone
  x = jnp.asarray(stream.tasks[1].test.x[:8])
  logits = jax.jit(parts.predict, static_argnames=("info",))(
      state, bb.params, x, info=TaskInfo(2, StreamSpec.from_stream(stream), 1))
  assert logits.shape == (8, 6) and np.all(np.isfinite(np.asarray(logits)))


def test_checkpoint_per_task_holds_weights_unit_signature_and_head(trained):
  stream, bb, parts, res, workdir = trained
  spec = StreamSpec.from_stream(stream)
  init = parts.init(jax.random.fold_in(jax.random.PRNGKey(0), 0), spec)
  with ckpt.TaskCheckpointer(workdir) as c:
    delta, _ = c.restore_delta(1)
    restored, _ = c.restore_state(2, init)
  assert set(delta["tasks"]) == {"1"}
  assert set(delta["tasks"]["1"]) == {"unit", "weights", "signature", "screen"}
  assert {"gram", "xty", "w_out"} <= set(delta["ridge"])
  assert "w_rand" not in delta["ridge"]        # drawn once at init from the seed
  final = jax.device_get(res.state)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, final)


def test_kmeans_ablation_signature():
  # retrieval with centroid signatures is covered by the report's "kmeans" ablation above
  bb = mlp((7,), (5, 4))
  method = proteus_lib.proteus_kmeans(bb, sites=SITES, kmeans_clusters=3, rp_dim=8)
  assert method.name == "proteus_kmeans"
  parts = small_parts(bb, signature="kmeans", kmeans_clusters=3)
  feats = np.random.default_rng(7).normal(size=(30, 4)).astype(np.float32)
  sig, fit = parts.fit_signature(feats, jax.random.PRNGKey(0))
  assert sig["centers"].shape == (3, 4) and fit["components"] == 3
  assert bool(np.all(np.asarray(sig["valid"])))


def test_bad_configuration():
  bb = mlp((7,), (5,))
  with pytest.raises(ValueError, match="no site role"):
    proteus_lib.proteus(bb)                      # the MLP has no q/v sites
  with pytest.raises(ValueError, match="signature"):
    proteus_lib.proteus(bb, sites=("lin1/kernel",), signature="gmm")
  with pytest.raises(ValueError, match="not a 2-D kernel"):
    proteus_lib.proteus(bb, sites=("lin1/bias",))
  with pytest.raises(ValueError, match="ortho_factors"):
    proteus_lib.proteus(bb, sites=("lin1/kernel",), ortho_factors="c")


# ----------------------------------------------------------------------------
# Component switched off: composition and retrieval must change an outcome.
# ----------------------------------------------------------------------------


def _direction_stream(directions, offsets, n_train=96, n_test=64, dim=6, seed=0):
  """Class-IL stream: task t has classes (2t, 2t+1) split by the side of x along the unit
  vector directions[t] (pushed ±1 along it: a margin), inputs otherwise N(offsets[t], I)."""
  from clx.data.types import ArraySplit, Stream, Task
  rng = np.random.default_rng(seed)
  tasks = []
  for t, (u, off) in enumerate(zip(directions, offsets)):
    def split(n):
      x = rng.normal(size=(n, dim))
      side = (x @ u > 0).astype(np.int32)
      x = x + off + np.where(side, 1.0, -1.0)[:, None] * u   # a margin of 2 along u
      y = 2 * t + side
      return ArraySplit({"x": x.astype(np.float32), "y": y.astype(np.int32)})
    tasks.append(Task(f"t{t}", split(n_train), split(n_test), (2 * t, 2 * t + 1)))
  return Stream("directions", tuple(tasks), "class", 2 * len(directions))


def _blank_mlp(dim=6):
  """An MLP whose *base* features carry no information about x: the adapted first kernel is
  zero and its bias 1, so h = relu(relu(1 + x ΔW) W2 + b2) is constant until a unit moves ΔW."""
  import dataclasses
  bb = mlp((dim,), (12, 8), use_bias=True)
  params = jax.tree.map(lambda a: a, bb.params)
  params["lin1"]["kernel"] = jnp.zeros_like(params["lin1"]["kernel"])
  params["lin1"]["bias"] = jnp.ones_like(params["lin1"]["bias"])
  return dataclasses.replace(bb, params=params)


def _train(parts, stream, epochs=3):
  return run_method(parts.method(), stream, TrainConfig(epochs=epochs, batch_size=16,
                                                        learning_rate=5e-2, eval_batch_size=64),
                    quiet=True)


@pytest.mark.parametrize("alpha", [0.3, 0.0])
def test_composition_carries_an_earlier_unit_into_a_new_task(alpha):
  """Task 1 asks the same direction as task 0 (new labels, shifted inputs). Right after
  ``begin_task`` (the new unit is still zero on its input side), task 1's backbone is
  base + α·w·unit_0: with composition it already separates task 1's classes (the ridge head
  fitted on it reaches ≥ 90 %); with α = 0 it is the blank base (constant features, chance)."""
  u = np.eye(6)[0]
  stream = _direction_stream([u, u], [np.zeros(6), 0.5 * np.eye(6)[3]])
  bb = _blank_mlp()
  parts = small_parts(bb, sites=("lin1/kernel",), alpha=alpha, rp_dim=64, n_components=2,
                      unit_init_std=0.5)
  first = type(stream)(stream.name, stream.tasks[:1], "class", stream.num_classes)
  res = _train(parts, first)
  assert res.acc_matrix[0, 0] >= 90, res.acc_matrix      # unit 0 learned the direction
  spec = StreamSpec.from_stream(stream)
  state = parts.begin_task(jax.device_get(res.state), ctx_for(1, spec))
  task = stream.tasks[1]
  feats = jax.jit(parts.task_features, static_argnums=(3, 4))
  f_train = np.asarray(feats(state, bb.params, jnp.asarray(task.train.x), 1, 2))
  f_test = np.asarray(feats(state, bb.params, jnp.asarray(task.test.x), 1, 2))
  # a ridge head of task 1 alone, read over task 1's two classes (the features are the point)
  fresh = parts.init(jax.random.PRNGKey(0), spec)["ridge"]
  ridge, _ = parts.ridge_head_update(fresh, f_train, np.asarray(task.train.y), spec.num_classes, 1)
  logits = np.asarray(parts.head_logits({"ridge": ridge}, f_test, spec, 1))
  pred = 2 + logits[:, 2:4].argmax(-1)
  acc = 100 * np.mean(pred == np.asarray(task.test.y))
  if alpha:
    assert acc >= 90, acc
  else:
    assert np.ptp(f_test, axis=0).max() < 1e-6           # nothing but the blank base
    assert acc <= 70, acc


def test_retrieval_routes_each_input_to_the_backbone_that_knows_its_task():
  """Independent units (α = 0) on orthogonal directions with separated inputs: each task's
  classes are readable only through its own backbone and the head is restricted to the
  routed task's classes. Signature retrieval finds the task (≥ 90 %) and the class-IL
  accuracy follows; always routing to the last task, or to a random task, does not."""
  dirs = [np.eye(6)[0], np.eye(6)[1]]
  offs = [3.0 * np.eye(6)[4], -3.0 * np.eye(6)[4]]
  stream = _direction_stream(dirs, offs)
  bb = _blank_mlp()
  parts = small_parts(bb, sites=("lin1/kernel",), alpha=0.0, rp_dim=64, n_components=2,
                      unit_init_std=0.5, restrict_head=True)
  res = _train(parts, stream)
  state = jax.device_get(res.state)
  spec = StreamSpec.from_stream(stream)
  x = jnp.asarray(np.concatenate([t.test.x for t in stream.tasks]))
  y = np.concatenate([t.test.y for t in stream.tasks])
  true_task = np.concatenate([np.full(len(t.test.y), i) for i, t in enumerate(stream.tasks)])
  every = jax.jit(parts.all_task_features, static_argnums=3)(state, bb.params, x, 2)
  chosen, feats, _ = jax.jit(parts.route, static_argnums=3)(state, bb.params, x, 2)

  def acc_with(tasks):
    tasks = jnp.asarray(tasks, jnp.int32)
    f = every[tasks, jnp.arange(len(y))]
    pred = np.asarray(parts.head_logits(state, f, spec, 1, tasks)).argmax(-1)
    return 100 * np.mean(pred == y)

  retrieval_acc = 100 * np.mean(np.asarray(chosen) == true_task)
  acc_retrieved = acc_with(chosen)
  acc_last = acc_with(np.ones_like(true_task))
  acc_random = acc_with(np.random.default_rng(0).integers(0, 2, len(y)))
  assert retrieval_acc >= 90, retrieval_acc
  assert acc_retrieved >= 85, acc_retrieved
  np.testing.assert_allclose(res.acc_matrix[-1].mean(), acc_retrieved, atol=1e-3)  # = the loop's
  assert acc_last <= 60 and acc_random <= 70, (acc_last, acc_random)
  assert acc_retrieved - max(acc_last, acc_random) >= 20


def test_inflora_effective_params_match_its_forward():
  """experiments/text_proteus.py rebuilds InfLoRA's network for the head-matched row (InfLoRA +
  the RanPAC head) from InfLoRA's state; its features must be InfLoRA's own."""
  import importlib.util
  from pathlib import Path

  from clx.methods import heads as heads_lib
  from clx.methods import inflora
  path = Path(__file__).resolve().parents[2] / "experiments" / "text_proteus.py"
  spec_ = importlib.util.spec_from_file_location("text_proteus_under_test", path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  stream = make_gaussian_stream(num_tasks=2, classes_per_task=2, dim=8, n_train=48, n_test=16)
  bb = mlp(stream.input_shape, (12, 10))
  sites = ("lin1/kernel", "lin2/kernel")
  method = inflora.inflora(bb, rank=2, sites=sites)
  res = run_method(method, stream, TrainConfig(epochs=1, batch_size=16, learning_rate=1e-2,
                                               eval_batch_size=32), quiet=True)
  state = jax.device_get(res.state)
  assert any(float(np.abs(b).max()) > 0 for b in jax.tree.leaves(state["branches"]["1"]["b"]))
  params = module.inflora_effective_params(bb, state, bb.params, sites)
  x = jnp.asarray(stream.tasks[0].test.x)
  spec = StreamSpec.from_stream(stream)
  feats = bb.apply(params, x)
  assert float(jnp.abs(feats - bb.apply(bb.params, x)).max()) > 1e-6   # the branches act
  mine = heads_lib.global_logits(state["heads"], feats, spec, "per_task", 1)
  theirs = method.predict(state, bb.params, x, TaskInfo(1, spec))
  np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def test_vit_proteus_config_is_the_authors_main_config():
  """experiments/vit_proteus.py: the main ImageNet-R config (lr 1e-3, no orthogonality), pixels
  in [0, 1], the authors' crop/flip transforms named, the original in21k weights; a stream
  asked for transforms it cannot apply refuses to run instead of silently dropping them."""
  import importlib.util
  from pathlib import Path
  path = Path(__file__).resolve().parents[2] / "experiments" / "vit_proteus.py"
  spec_ = importlib.util.spec_from_file_location("vit_proteus_under_test", path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  config = module.get_config()
  assert config["train"]["learning_rate"] == 1e-3
  assert config["method_args"]["proteus"]["ortho_weight"] == 0.0
  assert config["stream"]["pixel_range"] == "0,1"
  assert config["stream"]["train_transform"] == "rrc224_s005_flip"
  assert config["stream"]["test_transform"] == "resize256bicubic_center224"
  assert config["model"]["weights"].endswith("ViT-B_16.npz")
  args = {k: v for k, v in config["stream"].items() if k != "name"}
  with pytest.raises(NotImplementedError, match="rrc224_s005_flip"):  # the in-memory builder
    module.vit_split_stream(**{**args, "source": "tfds_resized"})


def test_config_is_validated_once_and_old_names_still_read():
  bb = mlp((7,), (5, 4))
  parts = proteus_lib.ProteusParts(bb, sites=SITES, rank=2, scale=0.2, alpha=0.5,
                                   feature_batch=64)
  assert parts.cfg == proteus_lib.ProteusConfig(sites=SITES, lora_rank=2, lora_scale=0.2,
                                                transfer_alpha=0.5, aux_batch_size=64)
  assert (parts.rank, parts.scale, parts.alpha) == (2, 0.2, 0.5)
  with pytest.raises(TypeError, match="got both"):
    proteus_lib.proteus(bb, sites=SITES, rank=2, lora_rank=2)
  with pytest.raises(ValueError, match="lora_rank"):
    proteus_lib.ProteusConfig(lora_rank=0)
  with pytest.raises(ValueError, match="delta_form"):
    proteus_lib.ProteusConfig(delta_form="median")
  with pytest.raises(AttributeError, match="no attribute"):
    parts.not_an_option  # pylint: disable=pointless-statement


def test_public_fit_signature_and_route_are_the_methods_own():
  # the module functions are what the method runs: a trained state routed by the public
  # route() gives the method's class-IL prediction
  stream = make_gaussian_stream(num_tasks=2, classes_per_task=2, dim=8, n_train=48, n_test=16,
                                separation=4.0)
  bb = mlp(stream.input_shape, (12, 8))
  parts = small_parts(bb)
  res = run_method(parts.method(), stream, TrainConfig(epochs=1, batch_size=16,
                                                       learning_rate=5e-3, eval_batch_size=32),
                   quiet=True)
  state = jax.device_get(res.state)
  spec = StreamSpec.from_stream(stream)
  x = jnp.asarray(np.concatenate([t.test.x for t in stream.tasks]))
  tasks, feats, scores = proteus_lib.route(parts.setup, state, bb.params, x, 2)
  assert scores.shape == (x.shape[0], 2)
  np.testing.assert_array_equal(tasks, np.argmax(np.asarray(scores), 1))
  want = parts.method().predict(state, bb.params, x, TaskInfo(1, spec))
  got = proteus_lib.head_logits(parts.cfg, state, feats, spec, 1, tasks)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  x0 = jnp.asarray(stream.tasks[0].train.x)
  feats0 = np.asarray(proteus_lib.task_features(parts.setup, state, bb.params, x0, 0, 2))
  # params_for: the task's composed backbone, the one task_features runs
  np.testing.assert_allclose(
      bb.apply(parts.method().params_for(state, bb.params, TaskInfo(0, spec)), x0), feats0,
      rtol=1e-6, atol=1e-6)
  sig, fit = proteus_lib.fit_signature(parts.cfg, feats0, jax.random.PRNGKey(0))
  assert fit["components"] == sig["means"].shape[0] >= 1
