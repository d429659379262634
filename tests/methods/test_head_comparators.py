"""SimpleCIL, RanPAC and SD-LoRA on a tiny stream: they learn, and their defining parts act."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.methods import build
from clx.methods import sd_lora as sd_lib
from clx.methods.base import TaskInfo
from clx.ops.tree import to_key
from tests.methods.comparator_fixtures import run, tiny_bert, token_stream


@pytest.mark.slow
def test_simplecil_prototypes_are_the_class_means_and_classify():
  stream = token_stream(num_tasks=2)
  backbone = tiny_bert()
  state, acc = run(build("simplecil", backbone), stream)
  assert np.nanmean(acc[-1]) > 60, acc
  x, y = stream.tasks[1].train.x, stream.tasks[1].train.y
  f = np.asarray(backbone.apply(backbone.params, jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(np.asarray(state["prototypes"])[2], f[y == 2].mean(0), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.slow
def test_ranpac_random_projection_and_ridge_head():
  stream = token_stream(num_tasks=2)
  state, acc = run(build("ranpac", tiny_bert(), rp_dim=256), stream)
  assert np.nanmean(acc[-1]) > 60, acc
  assert state["w_rand"].shape == (32, 256) and state["gram"].shape == (256, 256)
  assert set(state["ridge_lambda"]) == {"0", "1"}
  # rp_dim=0 is the code's no-projection branch: the head is a ridge on the features
  plain, _ = run(build("ranpac", tiny_bert(), rp_dim=0), stream)
  assert "w_rand" not in plain and plain["gram"].shape == (32, 32)


@pytest.mark.slow
def test_sd_lora_learns_and_freezes_directions_but_learns_magnitudes():
  stream = token_stream(num_tasks=2)
  backbone = tiny_bert()
  state, acc = run(build("sd_lora", backbone, lora_rank=2), stream)
  # task 0 is learned (chance 50 %); class-IL with the code's current-classes-only
  # cross-entropy then favours the older head rows on this tiny stream (no assertion on the
  # final average). The official SimpleLinear head (kernel U(±√(3/d)), bias 0) reaches 81 %
  # here in 3 epochs (measured); the bound was 90 % when the head was nn.Linear's.
  assert acc[0, 0] >= 75, acc
  assert set(state["directions"]) == {"0", "1"} and state["lora"] == {}
  bytes_per_task = sd_lib.state_bytes_per_task(state)
  # q and v of 2 layers, A (32, 2) and B (2, 32) float32 each
  assert bytes_per_task == {"0": 4 * 2 * 2 * (32 * 2 + 2 * 32), "1": 4 * 2 * 2 * (32 * 2 + 2 * 32)}
  # on task 1 the earlier direction is not a trainable param, but its magnitude gets a gradient
  method = build("sd_lora", backbone, lora_rank=2)
  params = {"head": state["head"], "lora": state["directions"]["1"],
            "magnitudes": state["magnitudes"]}
  info = TaskInfo(1, _spec(stream))
  assert set(method.trainable({**state, "lora": params["lora"]}, info)) == set(params)
  split = stream.tasks[1].train
  batch = {"x": jnp.asarray(split.x[:16]), "y": jnp.asarray(split.y[:16]), "mask": jnp.ones(16)}
  grad = jax.jit(jax.grad(lambda p, base: method.loss(
      p, state, base, batch, None, info)[0]))(params, backbone.params)
  g = np.abs(np.asarray(grad["magnitudes"]))
  assert g[0] > 0 and g[1] > 0


def _spec(stream):
  from clx.methods.base import StreamSpec  # pylint: disable=import-outside-toplevel
  return StreamSpec.from_stream(stream)


def test_sd_lora_trainable_reads_the_task_lora_back_after_combine():
  """``trainable(combine(state, p, info), info) == p``: after ``combine`` the task's LoRA lives
  in ``directions``, and a count of the trained parameters from a checkpoint must still see it
  (the old ``trainable`` returned the emptied ``lora`` slot: head + magnitudes only)."""
  stream = token_stream(num_tasks=2)
  spec = _spec(stream)
  method = build("sd_lora", tiny_bert(), lora_rank=2)
  state = method.init(jax.random.PRNGKey(0), spec)
  for t in range(2):
    info = TaskInfo(t, spec)
    ctx = type("Ctx", (), {"rng": jax.random.PRNGKey(10 + t), "task_index": t})()
    state = method.begin_task(state, ctx)
    params = method.trainable(state, info)
    bumped = jax.tree.map(lambda v: v + 1.0, params)  # what training returns
    state = method.combine(state, bumped, info)
    assert state["lora"] == {}
    back = method.trainable(state, info)
    assert jax.tree.structure(back) == jax.tree.structure(bumped)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(bumped)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # q and v of 2 layers, A (32, 2) + B (2, 32), the (32 → 4) head and 2 magnitudes
  assert sum(np.size(v) for v in jax.tree.leaves(back)) == 2 * 2 * (64 + 64) + 32 * 4 + 4 + 2


def _states_per_task(method, stream):
  """The state after each task (``clx.train.run`` yields one per task)."""
  from clx.train import loop  # pylint: disable=import-outside-toplevel
  from clx.train.sharding import make_mesh  # pylint: disable=import-outside-toplevel
  from tests.methods.comparator_fixtures import CFG  # pylint: disable=import-outside-toplevel
  states = [jax.device_get(r.state) for r in loop.run(method, stream, CFG, mesh=make_mesh(1),
                                                      quiet=True, progress=False)]
  return states


def _class_means(feats, y, num_classes):
  return np.stack([feats[y == c].mean(0) if np.any(y == c) else np.zeros(feats.shape[1])
                   for c in range(num_classes)])


@pytest.mark.slow
def test_aper_first_session_adaptation_trains_on_task_0_then_concatenates_features():
  """APER: a LoRA + head trained on task 0 only (frozen afterwards), prototypes over
  ``[f_pretrained, f_adapted]``, checked against float64 class means of both backbones."""
  from clx.ops import lora as lora_ops  # pylint: disable=import-outside-toplevel
  stream = token_stream(num_tasks=2)
  backbone = tiny_bert()
  method = build("simplecil", backbone, adapt_rank=2)
  s0, s1 = _states_per_task(method, stream)
  b = np.concatenate([np.ravel(v["b"]) for v in s0["adapter"].values()])
  assert np.abs(b).max() > 1e-4  # b starts at 0: task 0 trained the LoRA
  for key in s0["adapter"]:  # and task 1 left it alone
    np.testing.assert_array_equal(s1["adapter"][key]["a"], s0["adapter"][key]["a"])
    np.testing.assert_array_equal(s1["adapter"][key]["b"], s0["adapter"][key]["b"])
  assert method.trainable(s1, TaskInfo(1, _spec(stream))) == {}
  adapted = lora_ops.apply_adapters(
      backbone.params, {p: s1["adapter"][to_key(p)] for p in backbone.site_paths(("q", "v"))})
  xs = np.concatenate([t.train.x for t in stream.tasks])
  ys = np.concatenate([t.train.y for t in stream.tasks])
  f_pre = np.asarray(backbone.apply(backbone.params, jnp.asarray(xs)), np.float64)
  f_ad = np.asarray(backbone.apply(adapted, jnp.asarray(xs)), np.float64)
  want = _class_means(np.concatenate([f_pre, f_ad], 1), ys, stream.num_classes)
  assert s1["prototypes"].shape == (stream.num_classes, 2 * backbone.feature_dim)
  np.testing.assert_allclose(s1["prototypes"], want, rtol=1e-4, atol=1e-5)
  # switched off (the default): the frozen features alone, nothing trained
  plain = build("simplecil", backbone).init(jax.random.PRNGKey(0), _spec(stream))
  assert set(plain) == {"prototypes"} and plain["prototypes"].shape[1] == backbone.feature_dim


@pytest.mark.slow
def test_ranpac_phase_1_builds_the_ridge_statistics_on_the_adapted_features_alone():
  """RanPAC's Phase 1: after task 0's LoRA, G = Σ hhᵀ with h = ReLU(f_adapted W_rand) (no
  concatenation); with the adaptation off G is built on the frozen features."""
  from clx.ops import lora as lora_ops  # pylint: disable=import-outside-toplevel
  stream = token_stream(num_tasks=2)
  backbone = tiny_bert()
  _, s1 = _states_per_task(build("ranpac", backbone, rp_dim=48, adapt_rank=2), stream)
  adapted = lora_ops.apply_adapters(
      backbone.params, {p: s1["adapter"][to_key(p)] for p in backbone.site_paths(("q", "v"))})
  xs = np.concatenate([t.train.x for t in stream.tasks])
  w = np.asarray(s1["w_rand"], np.float64)
  assert w.shape == (backbone.feature_dim, 48)
  f_ad = np.asarray(backbone.apply(adapted, jnp.asarray(xs)), np.float64)
  h = np.maximum(f_ad @ w, 0.0)
  np.testing.assert_allclose(s1["gram"], h.T @ h, rtol=1e-4, atol=1e-3)
  f_pre = np.asarray(backbone.apply(backbone.params, jnp.asarray(xs)), np.float64)
  h_pre = np.maximum(f_pre @ w, 0.0)
  assert np.abs(h_pre.T @ h_pre - h.T @ h).max() > 1e-2  # the adaptation changed the features


@pytest.mark.parametrize("name", ["simplecil", "ranpac"])
def test_first_session_loss_reaches_the_lora_on_task_0_only(name):
  """Task 0's loss has a gradient on the LoRA's ``b`` (zero at init) and on the head; on task 1
  nothing is trainable. Fails if the features stopped the gradient (the query does)."""
  from tests.methods.comparator_fixtures import loss_grads  # pylint: disable=import-outside-toplevel
  stream = token_stream(num_tasks=2)
  kwargs = {"rp_dim": 16} if name == "ranpac" else {}
  method = build(name, tiny_bert(), adapt_rank=2, **kwargs)
  grads = loss_grads(method, stream, task_index=0)
  assert set(grads) == {"adapter", "head"}
  assert all(np.abs(g["b"]).max() > 0 for g in grads["adapter"].values())
  assert np.abs(grads["head"]["kernel"]).max() > 0
  state = method.init(jax.random.PRNGKey(0), _spec(stream))
  assert method.trainable(state, TaskInfo(1, _spec(stream))) == {}


def test_sd_lora_head_is_the_official_simple_linear_by_default():
  """SD-LoRA's head is PILOT's ``SimpleLinear`` (``kaiming_uniform_(nonlinearity='linear')``:
  kernel U(±√(3/d)), bias 0); the old head (``nn.Linear``'s U(±1/√d) kernel and bias) stays as
  ``head_init="torch"``. Fails on the old code, whose default was ``"torch"``."""
  spec = _spec(token_stream(num_tasks=2))
  backbone = tiny_bert()
  d = backbone.feature_dim
  head = build("sd_lora", backbone, lora_rank=2).init(jax.random.PRNGKey(0), spec)["head"]
  kernel, bias = np.asarray(head["kernel"]), np.asarray(head["bias"])
  assert kernel.shape == (d, spec.num_classes)
  np.testing.assert_array_equal(bias, 0.0)
  assert np.abs(kernel).max() <= np.sqrt(3.0 / d)
  assert np.abs(kernel).max() > 1.0 / np.sqrt(d)  # wider than nn.Linear's bound
  np.testing.assert_allclose(kernel.std(), 1.0 / np.sqrt(d), rtol=0.25)  # gain 1: std 1/√d
  old = build("sd_lora", backbone, lora_rank=2, head_init="torch").init(
      jax.random.PRNGKey(0), spec)["head"]
  assert np.abs(np.asarray(old["bias"])).max() > 0
  assert np.abs(np.asarray(old["kernel"])).max() <= 1.0 / np.sqrt(d)
  with pytest.raises(ValueError, match="head_init must be 'simple_linear'"):
    build("sd_lora", backbone, lora_rank=2, head_init="zeros")
