"""InfLoRA on a tiny random BERT over a synthetic token stream (and the MLP)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.checkpoint import TaskCheckpointer
from clx.data.types import ArraySplit, Stream, Task
from clx.methods import inflora as inflora_lib
from clx.methods.base import StreamSpec, TaskInfo
from clx.methods.sequential import lora
from clx.models import bert
from clx.models.mlp import mlp
from clx.ops import dualgpm
from clx.ops import tree as tree_ops
from clx.ops.lora import apply_adapters
from clx.train.loop import TrainConfig, run_method
from clx.train.sharding import make_mesh
from tests.helpers import make_gaussian_stream
from tests.ops.test_dualgpm import ref_design, ref_update

RANK = 4
LAMB = 0.99
LENGTH = 16
CFG = TrainConfig(epochs=4, batch_size=16, learning_rate=1e-2, eval_batch_size=64)
TINY = bert.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=LENGTH)
KV = ("*attention/key/kernel", "*attention/value/kernel")


def token_stream(num_tasks=3, classes_per_task=2, n_train=128, n_test=32, seed=0) -> Stream:
  """Right-padded token ids (pad 0); each class over-samples its own 6 keyword tokens."""
  rng = np.random.default_rng(seed)
  num_classes = num_tasks * classes_per_task
  keywords = [rng.choice(np.arange(1, TINY.vocab_size), 6, replace=False)
              for _ in range(num_classes)]
  tasks = []
  for t in range(num_tasks):
    classes = tuple(range(t * classes_per_task, (t + 1) * classes_per_task))

    def split(n):
      y = rng.choice(np.array(classes), n).astype(np.int32)
      x = np.zeros((n, LENGTH), np.int32)
      for i in range(n):
        length = rng.integers(LENGTH // 2, LENGTH + 1)
        tokens = rng.integers(1, TINY.vocab_size, length)
        hit = rng.random(length) < 0.6
        tokens[hit] = rng.choice(keywords[y[i]], hit.sum())
        x[i, :length] = tokens
      return ArraySplit({"x": x, "y": y})

    tasks.append(Task(f"classes {classes[0]}-{classes[-1]}", split(n_train), split(n_test),
                      classes))
  return Stream("tokens", tuple(tasks), "task", num_classes)


def restore_all(method, stream, directory, seed=0):
  """States after every task, replayed from a run's checkpoints."""
  init = method.init(jax.random.fold_in(jax.random.PRNGKey(seed), 0),
                     StreamSpec.from_stream(stream))
  with TaskCheckpointer(directory) as ckpt:
    return [jax.device_get(ckpt.restore_state(t, init)[0]) for t in range(len(stream.tasks))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  stream = token_stream()
  backbone = bert.bert((LENGTH,), config=TINY, seed=0)
  method = inflora_lib.inflora(backbone, lora_rank=RANK, lamb=LAMB)
  base_before = jax.device_get(backbone.params)
  directory = tmp_path_factory.mktemp("inflora") / "ckpt"
  result = run_method(method, stream, CFG, mesh=make_mesh(1), checkpoint_dir=str(directory),
                      quiet=True)
  # Sequential LoRA on the first two tasks (enough to measure drift, one compile less).
  seq = lora(backbone, rank=RANK, targets=KV)
  seq_stream = Stream(stream.name, stream.tasks[:2], stream.scenario, stream.num_classes)
  seq_dir = tmp_path_factory.mktemp("lora") / "ckpt"
  run_method(seq, seq_stream, CFG, mesh=make_mesh(1), checkpoint_dir=str(seq_dir), quiet=True)
  return {"stream": stream, "backbone": backbone, "method": method, "result": result,
          "states": restore_all(method, stream, directory), "dir": directory,
          "base_before": base_before, "lora": seq, "seq_stream": seq_stream,
          "lora_states": restore_all(seq, seq_stream, seq_dir)}


def kernel(params, site):
  for part in site.split("/"):
    params = params[part]
  return np.asarray(params, np.float64)


def bias(params, site):
  return kernel(params, site.rsplit("/", 1)[0] + "/bias")


def test_state_layout_and_groups(runs):
  method, states = runs["method"], runs["states"]
  final = states[-1]
  groups = inflora_lib.input_groups(runs["backbone"], runs["backbone"].site_paths(("k", "v")))
  assert groups == {f"encoder.layers.{i}.attention.key+value": (
      f"encoder/layers/{i}/attention/key/kernel", f"encoder/layers/{i}/attention/value/kernel")
      for i in range(2)}
  assert set(final) == {"heads", "branches", "memory"}
  assert sorted(final["branches"]) == ["0", "1", "2"] and sorted(final["heads"]) == ["0", "1", "2"]
  for branch in final["branches"].values():
    assert set(branch["a"]) == set(groups)
    assert all(a.shape == (32, RANK) for a in branch["a"].values())
    assert all(b.shape == (RANK, 32) and "/" not in k for k, b in branch["b"].items())
  summary = inflora_lib.memory_summary(final)
  assert all(0 < rank <= 16 for rank, _ in summary.values())
  assert method.trainable(final, TaskInfo(2, StreamSpec.from_stream(runs["stream"]))).keys() == {
      "b", "head"}
  # The stream exercised both memory kinds (remove, then retain after the d/2 switch).
  kinds = {kind for s in states for _, kind in inflora_lib.memory_summary(s).values()}
  assert kinds == {"remove", "retain"}


def test_interference_free_on_old_memory_subspace(runs):
  """(a) For X in the memory built up to task t−1, X a_t b_t ≈ 0 at every adapted site."""
  states, backbone = runs["states"], runs["backbone"]
  groups = inflora_lib.input_groups(backbone, backbone.site_paths(("k", "v")))
  rng = np.random.default_rng(0)
  checked = 0
  for t in (1, 2):
    before, after = states[t - 1], states[t]
    for g, members in groups.items():
      mem = before["memory"][g]
      protected = np.asarray(dualgpm.protected_projector(mem["basis"], mem["rank"], mem["kind"]),
                             np.float32)
      x = (protected @ rng.standard_normal((32, 64)).astype(np.float32)).T  # rows in span
      a_t = after["branches"][str(t)]["a"][g]
      for site in members:
        w = kernel(backbone.params, site).astype(np.float32)
        for j in range(t):
          old = after["branches"][str(j)]
          w = w + old["a"][g] @ old["b"][tree_ops.to_key(site)]
        delta = a_t @ after["branches"][str(t)]["b"][tree_ops.to_key(site)]
        y_before = x @ w + bias(backbone.params, site).astype(np.float32)
        y_after = x @ (w + delta) + bias(backbone.params, site).astype(np.float32)
        rel = np.linalg.norm(y_after - y_before) / np.linalg.norm(y_before)
        assert rel <= 1e-5, (t, site, rel)
        # ...while the branch does change the layer on generic inputs.
        generic = rng.standard_normal((64, 32)).astype(np.float32)
        assert np.linalg.norm(generic @ delta) > 1e-3 * np.linalg.norm(generic @ w)
        checked += 1
  assert checked == 8


@functools.cache
def _head_logits_fn(backbone):
  return jax.jit(lambda params, head, x: backbone.apply(params, x) @ head["kernel"] + head["bias"])


def head0_logits(backbone, params, state, stream):
  """Head 0's logits on task 0's test inputs for effective backbone ``params``."""
  x = jnp.asarray(stream.tasks[0].test.x)
  return np.asarray(_head_logits_fn(backbone)(params, state["heads"]["0"], x))


def test_old_task_logits_drift_far_less_than_sequential_lora(runs):
  """(b) Head 0's logits on task 0 after task 1 vs right after task 0, same stream."""
  backbone, stream = runs["backbone"], runs["stream"]
  ours = [head0_logits(backbone, effective_params(backbone, s["branches"]), s, stream)
          for s in runs["states"]]
  seq = [head0_logits(backbone, apply_adapters(backbone.params, s["adapters"]), s, stream)
         for s in runs["lora_states"]]

  def drift(first, later):
    return np.linalg.norm(later - first) / np.linalg.norm(first)

  assert drift(ours[0], ours[1]) < 0.25 * drift(seq[0], seq[1]), (ours, seq)
  assert drift(ours[0], ours[2]) < 0.5 * drift(seq[0], seq[1])
  res = runs["result"].acc_matrix
  assert res[0, 0] > 60 and res[1, 1] > 60 and res[2, 2] > 60  # it learns each task
  # The method's own prediction agrees with the hand-built forward used above.
  predict = jax.jit(functools.partial(runs["method"].predict,
                                      info=TaskInfo(2, StreamSpec.from_stream(stream))))
  logits = np.asarray(predict(runs["states"][2], backbone.params,
                              jnp.asarray(stream.tasks[0].test.x)))
  np.testing.assert_allclose(logits[:, list(stream.tasks[0].classes)], ours[2], atol=1e-4)


@functools.cache
def _inputs_fn(backbone):
  return jax.jit(lambda p, x: backbone.apply(p, x, taps="inputs"))


def numpy_gram(backbone, params, x):
  """float64 mean Gram matrix of the attention input over non-padding tokens."""
  _, taps = _inputs_fn(backbone)(params, jnp.asarray(x))
  mask = np.asarray(x) != 0
  grams = {}
  for i in range(TINY.num_hidden_layers):
    h = np.asarray(taps[f"encoder/layers/{i}/attention/key/kernel"], np.float64)[mask]
    grams[f"encoder.layers.{i}.attention.key+value"] = h.T @ h / len(h)
  return grams


def test_design_and_memory_match_float64_reference(runs):
  """(c) Each task's a_t and memory against the literal official algorithm in float64."""
  stream, backbone, states = runs["stream"], runs["backbone"], runs["states"]
  features = {g: (None, None) for g in states[0]["memory"]}
  num_tasks = len(stream.tasks)
  for t in range(num_tasks):
    prev = states[t - 1] if t else {"branches": {}}
    state = states[t]
    x = stream.tasks[t].train.x
    effective = effective_params(backbone, prev["branches"])
    pre = numpy_gram(backbone, effective, x)
    post = numpy_gram(backbone, effective_params(backbone, state["branches"]), x)
    for g in features:
      feature, ptype = features[g]
      a_ref = ref_design(pre[g], feature, ptype, RANK)
      a = state["branches"][str(t)]["a"][g]
      np.testing.assert_allclose(3 * a @ a.T, 3 * a_ref @ a_ref.T, atol=2e-3)
      eps = dualgpm.task_threshold(t, num_tasks, LAMB, 1.0)
      feature, ptype = ref_update(feature, ptype, post[g], eps)
      features[g] = (feature, ptype)
      mem = state["memory"][g]
      assert (int(mem["rank"]), dualgpm.KIND_NAMES[int(mem["kind"])]) == (feature.shape[1],
                                                                          ptype), (t, g)
      basis = np.asarray(mem["basis"], np.float64)[:, :int(mem["rank"])]
      np.testing.assert_allclose(basis @ basis.T, feature @ feature.T, atol=2e-3)


def effective_params(backbone, branches):
  """The public forward of a state's branches (all active) on the base params."""
  return inflora_lib.params_for({"branches": branches}, backbone.params,
                                inflora_lib.site_groups(backbone, ("k", "v")))


def test_gram_pass_matches_float64_reference(runs):
  """The public Gram pass over ragged host batches (mask given or not) = float64 X^T X / n."""
  backbone, states, stream = runs["backbone"], runs["states"], runs["stream"]
  params = effective_params(backbone, states[0]["branches"])
  x = stream.tasks[1].train.x[:100]
  groups = inflora_lib.input_groups(backbone, backbone.site_paths(("k", "v")))
  batches = [{"x": x[:48]}, {"x": x[48:96]},
             {"x": np.concatenate([x[96:], x[:12]]), "mask": np.r_[np.ones(4), np.zeros(12)]}]
  grams = inflora_lib.gram_pass(backbone, params, batches, groups, task_index=1)
  reference = numpy_gram(backbone, params, x)
  assert grams.keys() == reference.keys()
  for g, gram in grams.items():
    assert gram.shape == (32, 32) and gram.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(gram, np.float64), reference[g], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="task 1: the Gram pass saw no valid token"):
    inflora_lib.gram_pass(backbone, params, [{"x": x[:4], "mask": np.zeros(4)}], groups,
                          task_index=1)


def test_only_current_b_and_head_train(runs):
  """(d) Gradients reach b_t and the head only; earlier branches and heads never move."""
  method, states, backbone = runs["method"], runs["states"], runs["backbone"]
  chex.assert_trees_all_equal(runs["base_before"], jax.device_get(backbone.params))
  for t in range(1, 3):
    for j in range(t):
      chex.assert_trees_all_equal(states[t]["branches"][str(j)], states[j]["branches"][str(j)])
      chex.assert_trees_all_equal(states[t]["heads"][str(j)], states[j]["heads"][str(j)])
  final = states[-1]
  info = TaskInfo(2, StreamSpec.from_stream(runs["stream"]))
  params = method.trainable(final, info)
  # Exactly the current task's b (one per adapted site) and head are optimised.
  assert params["b"] is final["branches"]["2"]["b"] and params["head"] is final["heads"]["2"]
  assert len(params["b"]) == 4 and set(params["head"]) == {"kernel", "bias"}
  stream = runs["stream"]
  batch = {"x": jnp.asarray(stream.tasks[2].train.x[:16]),
           "y": jnp.asarray(stream.tasks[2].train.y[:16]), "mask": jnp.ones(16)}
  loss = functools.partial(method.loss, info=info)
  grads = jax.jit(jax.grad(lambda p: loss(p, final, backbone.params, batch, None)[0]))(params)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
  assert all(np.abs(b).max() > 0 for b in params["b"].values())  # b_t was trained


def test_checkpoint_resume_gives_the_same_run(runs, tmp_path):
  """(e) Cut the checkpoints after task 1, resume: same accuracies, same final state."""
  directory = tmp_path / "ckpt"
  shutil.copytree(runs["dir"], directory)
  with TaskCheckpointer(directory) as ckpt:
    ckpt.delete_after(1)
    assert ckpt.latest_task() == 1
  resumed = run_method(runs["method"], runs["stream"], CFG, mesh=make_mesh(1),
                       checkpoint_dir=str(directory), quiet=True)
  assert resumed.resumed_from == 1
  np.testing.assert_array_equal(resumed.acc_matrix, runs["result"].acc_matrix)
  chex.assert_trees_all_close(jax.device_get(resumed.state), jax.device_get(runs["result"].state),
                              atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------
# MLP: folding, the GPM variant, paper forms, padded Gram batches, 4 devices.
# ----------------------------------------------------------------------------


@functools.cache
def mlp_runs():
  # Gram batches of 64 over 90 examples: a short last batch (padded rows on 4 devices).
  stream = make_gaussian_stream(num_tasks=2, n_train=90)
  backbone = mlp(stream.input_shape, (24, 24), seed=0)
  cfg = TrainConfig(epochs=2, batch_size=16, learning_rate=1e-2, eval_batch_size=64)
  out = {}
  paper_gpm = {"memory": "gpm", "energy": "paper", "design": "paper", "design_scale": 1.0}
  for name, fold, devices in (("plain", False, 4), ("fold", True, 1)):
    method = inflora_lib.inflora(backbone, lora_rank=2, sites="mlp", lamb=0.9, fold=fold,
                                 **paper_gpm)
    out[name] = (method, run_method(method, stream, cfg, mesh=make_mesh(devices), quiet=True))
  return stream, backbone, out


def test_fold_matches_unfolded_predictions():
  stream, backbone, out = mlp_runs()
  (plain, plain_res), (folded, fold_res) = out["plain"], out["fold"]
  assert fold_res.state["branches"] == {} and set(fold_res.state["folded"]) == {
      "lin1.kernel", "lin2.kernel"}
  np.testing.assert_allclose(fold_res.acc_matrix, plain_res.acc_matrix, atol=5.0)
  x = jnp.asarray(stream.tasks[0].test.x)
  spec = StreamSpec.from_stream(stream)
  kw = dict(info=TaskInfo(1, spec))
  a = np.asarray(plain.predict(plain_res.state, backbone.params, x, **kw))
  b = np.asarray(folded.predict(fold_res.state, backbone.params, x, **kw))
  seen = np.isfinite(a) & (a > -1e29)
  np.testing.assert_allclose(b[seen], a[seen], atol=1e-3, rtol=1e-3)
  # Folding the unfolded run's branches by hand gives its predictions exactly (up to rounding).
  state = plain_res.state
  manual = {"heads": state["heads"], "branches": {}, "memory": state["memory"],
            "folded": {k: sum(br["a"][k] @ br["b"][k] for br in state["branches"].values())
                       for k in ("lin1.kernel", "lin2.kernel")}}
  c = np.asarray(folded.predict(manual, backbone.params, x, **kw))
  np.testing.assert_allclose(c[seen], a[seen], atol=1e-5, rtol=1e-5)


def test_gpm_variant_with_paper_forms_runs_and_protects():
  stream, backbone, out = mlp_runs()
  method, res = out["plain"]
  summary = inflora_lib.memory_summary(res.state)
  assert set(summary) == {"lin1.kernel", "lin2.kernel"}
  assert all(kind == "remove" and rank > 0 for rank, kind in summary.values())
  assert res.acc_matrix[0, 0] > 60 and res.acc_matrix[1, 1] > 60
  for branch in res.state["branches"].values():
    for a in branch["a"].values():
      np.testing.assert_allclose(a.T @ a, np.eye(2), atol=1e-5)  # scale 1.0: orthonormal


def test_bad_arguments_are_named():
  backbone = mlp((16,), (24,), seed=0)
  with pytest.raises(ValueError, match="memory"):
    inflora_lib.inflora(backbone, sites="mlp", memory="triple")
  with pytest.raises(ValueError, match="site role"):
    inflora_lib.inflora(backbone, sites="nope")
  with pytest.raises(ValueError, match="rank"):
    inflora_lib.inflora(backbone, sites="mlp", lora_rank=30)
  with pytest.raises(ValueError, match="energy"):
    inflora_lib.inflora(backbone, sites="mlp", energy="sigma4")
  with pytest.raises(ValueError, match="no site role"):
    inflora_lib.inflora_b5(backbone)
  with pytest.raises(ValueError, match="head_mode"):
    inflora_lib.inflora(backbone, sites="mlp", head_mode="per_class")
  with pytest.raises(ValueError, match="aux_batch_size"):
    inflora_lib.inflora(backbone, sites="mlp", aux_batch_size=0)
  with pytest.raises(ValueError, match="lora_rank must be a positive int"):
    inflora_lib.InfLoRAConfig(lora_rank=True)
  with pytest.raises(TypeError):  # unknown names fail when the config is checked (before data)
    inspect.signature(inflora_lib.inflora).bind(backbone, ranks=4)


def test_config_is_frozen_and_old_names_still_work():
  cfg = inflora_lib.InfLoRAConfig(sites=["k", "v"], lora_rank=4)
  assert cfg.sites == ("k", "v") and hash(cfg) == hash(inflora_lib.InfLoRAConfig(lora_rank=4))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.lora_rank = 5
  backbone = mlp((16,), (24,), seed=0)
  with pytest.warns(DeprecationWarning, match="'rank' is renamed 'lora_rank'"):
    old = inflora_lib.inflora(backbone, sites="mlp", rank=3, scale=1.0, gram_batch_size=8)
  new = inflora_lib.inflora(backbone, sites="mlp", lora_rank=3, design_scale=1.0,
                            aux_batch_size=8)
  spec = StreamSpec(1, 2, "task", ((0, 1),), (16,))
  chex.assert_trees_all_equal(old.init(jax.random.PRNGKey(0), spec),
                              new.init(jax.random.PRNGKey(0), spec))
  assert old.begin_task.args[0].cfg == new.begin_task.args[0].cfg
  with pytest.raises(TypeError, match="got both 'rank'"):  # one name, as every factory
    inflora_lib.inflora(backbone, sites="mlp", rank=3, lora_rank=3)


def test_input_groups_follow_the_backbones_declaration():
  """Groups come from ``Backbone.site_groups`` (not from path strings), and the Gram pass
  refuses a declared group whose members do not read one input."""
  backbone = mlp((16,), (16, 16), seed=0)
  assert inflora_lib.input_groups(backbone, ("lin1/kernel", "lin2/kernel")) == {
      "lin1.kernel": ("lin1/kernel",), "lin2.kernel": ("lin2/kernel",)}
  declared = dataclasses.replace(
      backbone, sites={**backbone.sites, "pair": ("lin1/kernel", "lin2/kernel")},
      site_groups={"body": ("lin1/kernel", "lin2/kernel")})
  groups = inflora_lib.input_groups(declared, ("lin1/kernel", "lin2/kernel"))
  assert groups == {"body.lin1+lin2": ("lin1/kernel", "lin2/kernel")}
  x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
  with pytest.raises(ValueError, match="different Gram matrices"):
    inflora_lib.gram_pass(declared, declared.params, [{"x": x}], groups)
