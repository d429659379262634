"""SPARC and sequential prompt tuning on a tiny BERT whose token embeddings live in known subspaces.

Token groups have embeddings confined to known coordinate blocks of R^32, so
the PCA subspace of a task (and its overlap with another task) is known in
advance: group A (ids 1-40) spans dims 0-9, B (41-80) dims 10-19, C (81-120)
dims 5-14 (half of A's, half of B's). The known blocks are in the word table,
so the tests that rely on them run SPARC on table rows (:func:`table_sparc`);
the default geometry (post-LayerNorm inputs, special tokens left out) has its
own float64 reference test.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.data.types import ArraySplit, Stream, Task
from clx.methods import sparc as sparc_lib
from clx.methods.base import StreamSpec, TaskInfo
from clx.models import bert, llama, mlp
from clx.train import loop
from clx.train.sharding import make_mesh

L = 16
GROUPS = {"A": (1, 41, slice(0, 10)), "B": (41, 81, slice(10, 20)), "C": (81, 121, slice(5, 15))}
CFG = loop.TrainConfig(epochs=1, batch_size=16, learning_rate=1e-2, eval_batch_size=64)


@functools.lru_cache(maxsize=None)
def tiny_bert():
  backbone = bert.bert((L,), config=bert.BertConfig(
      vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=32))
  rng = np.random.default_rng(0)
  table = np.zeros((128, 32), np.float32)
  for lo, hi, dims in GROUPS.values():
    table[lo:hi, dims] = rng.normal(size=(hi - lo, dims.stop - dims.start))
  params = jax.tree.map(lambda v: v, backbone.params)
  params["embeddings"]["word_embeddings"]["embedding"] = jnp.asarray(table)
  return dataclasses.replace(backbone, params=params)


@functools.lru_cache(maxsize=None)
def pooled_prefix_bert():
  return bert.bert((L,), config=bert.BertConfig(
      vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=32), pool_prefix=True)


def _split(rng, n, group, classes):
  lo, hi, _ = GROUPS[group]
  x = np.zeros((n, L), np.int32)
  y = rng.choice(np.asarray(classes), n).astype(np.int32)
  for i, length in enumerate(rng.integers(4, L + 1, n)):
    x[i, :length] = rng.integers(lo, hi, length)
    x[i, 0] = lo + (y[i] - classes[0])  # a label-bearing first token
  return ArraySplit({"x": x, "y": y})


def make_stream(groups, scenario="task", n_train=48, n_test=24, same_data=()):
  """One task per group; ``same_data`` lists tasks that copy task 0's data exactly."""
  rng = np.random.default_rng(1)
  tasks = []
  for t, g in enumerate(groups):
    classes = (0, 1) if scenario == "domain" else (2 * t, 2 * t + 1)
    if t in same_data:
      src = tasks[0]
      shift = classes[0] - src.classes[0]
      train = ArraySplit({"x": src.train.x, "y": src.train.y + shift})
      test = ArraySplit({"x": src.test.x, "y": src.test.y + shift})
    else:
      train, test = _split(rng, n_train, g, classes), _split(rng, n_test, g, classes)
    tasks.append(Task(f"{g}{t}", train, test, classes))
  num_classes = 2 if scenario == "domain" else 2 * len(groups)
  return Stream("synthetic_text", tuple(tasks), scenario, num_classes)


def table_sparc(backbone=None, **kwargs):
  """SPARC whose PCA runs on word-table rows with every token kept (the known-block fixture)."""
  return sparc_lib.sparc(backbone or tiny_bert(), embedding_source="table", special_tokens="none",
                         **kwargs)


def drive(method, stream, *, train=True, cfg=CFG):
  """The loop's protocol calls; returns the state after each task.

  ``train``: True/False, or the indices of the tasks to train (others keep their init).
  """
  mesh = make_mesh(1)
  spec = StreamSpec.from_stream(stream)
  fitter = loop.Fitter(mesh, quiet=True)
  key = jax.random.PRNGKey(0)
  base = method.backbone.params
  state = method.init(jax.random.fold_in(key, 0), spec)
  states = []
  for t, task in enumerate(stream.tasks):
    ctx = loop._Context(t, spec, jax.random.fold_in(key, 1 + t), base, fitter, task.train,
                        {"test": task.test, "val": None}, cfg, (0, t))
    state = method.begin_task(state, ctx)
    params = method.trainable(state, ctx.info)
    if train is True or (train and t in train):
      params = ctx.fit(params, functools.partial(method.loss, info=ctx.info),
                       transform_grads=method.transform_grads, state=state, phase=0)
    state = method.end_task(method.combine(state, params, ctx.info), ctx)
    states.append(jax.device_get(state))
  return states, spec


def prompt(state, t, use_mean=False):
  entry = state["tasks"][str(t)]
  basis = entry.get("basis", entry["pca"]["components"])
  p = np.asarray(entry["z"], np.float64) @ np.asarray(basis, np.float64).T
  return p + np.asarray(entry["pca"]["mean"]) if use_mean else p


def in_span_residual(rows, basis):
  basis = np.asarray(basis, np.float64)
  return np.linalg.norm(rows - rows @ basis @ basis.T) / max(np.linalg.norm(rows), 1e-30)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_mean,train", [(True, (1,)), (False, False)])
def test_prompt_lies_in_the_task_pca_span_after_training(use_mean, train):
  method = table_sparc(num_prompt_tokens=3, num_components=4, use_mean=use_mean)
  states, _ = drive(method, make_stream("AB"), train=train)
  for t in range(2):
    entry = states[-1]["tasks"][str(t)]
    u = np.asarray(entry["pca"]["components"])
    np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-5)
    assert in_span_residual(prompt(states[-1], t, use_mean) - (
        np.asarray(entry["pca"]["mean"]) if use_mean else 0.0), u) < 1e-5
    # The PCA span is the task's token block: A in dims 0-9, B in dims 10-19.
    dims = GROUPS["AB"[t]][2]
    assert np.linalg.norm(np.delete(u, np.r_[dims], axis=0)) < 1e-4


def test_overlap_is_one_for_same_data_and_zero_for_orthogonal_subspaces():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 20)) * np.linspace(2, 0.5, 20)
  from clx.ops import pca
  u1 = np.asarray(pca.pca(jnp.asarray(x, jnp.float32), 5)["components"])
  u2 = np.asarray(pca.pca(jnp.asarray(x[::-1].copy(), jnp.float32), 5)["components"])
  q = np.linalg.qr(rng.normal(size=(20, 10)))[0]
  a, b = q[:, :5], q[:, 5:]  # orthogonal synthetic subspaces
  for kind in sparc_lib.OVERLAPS:
    assert sparc_lib.overlap_score(u1, u2, kind) == pytest.approx(1.0, abs=1e-4)
    assert sparc_lib.overlap_score(a, b, kind) == pytest.approx(0.0, abs=1e-5)
    assert 0.0 < sparc_lib.overlap_score(a, np.linalg.qr(a + 0.5 * b)[0], kind) < 1.0
  with pytest.raises(ValueError, match="overlap must be one of"):
    sparc_lib.overlap_score(a, b, "dot")


@pytest.mark.parametrize("tau,expected", [(0.9, [False, True, False]), (float("inf"), [False] * 3),
                                          (0.0, [False, True, True])])
def test_reuse_or_new_follows_the_threshold(tau, expected):
  method = table_sparc(num_prompt_tokens=2, num_components=4, overlap="subspace",
                       overlap_threshold=tau)
  states, _ = drive(method, make_stream("AAB", same_data=(1,)), train=False)
  last = states[-1]["tasks"]
  assert [bool(last[str(t)]["overlap"]["reused"]) for t in range(3)] == expected
  np.testing.assert_allclose(last["1"]["overlap"]["scores"][:1], [1.0], atol=1e-4)  # same data
  np.testing.assert_allclose(last["2"]["overlap"]["scores"][:2], [0.0, 0.0], atol=1e-4)
  assert int(last["1"]["overlap"]["matched"]) == 0 and int(last["0"]["overlap"]["matched"]) == -1
  if expected[1]:  # re-used: task 1 starts from task 0's prompt expressed in its own basis
    np.testing.assert_allclose(prompt(states[-1], 1), prompt(states[0], 0), atol=1e-5)
  diag = method.diagnostics(states[-1])
  assert diag["reuse_decisions"] == expected


def test_new_prompt_is_orthogonal_to_stored_prompts_inside_its_subspace():
  method = table_sparc(num_prompt_tokens=2, num_components=6, overlap_threshold=1.0)
  states, _ = drive(method, make_stream("AC"), train=False)  # C half-overlaps A
  p0, p1 = prompt(states[-1], 0), prompt(states[-1], 1)
  u1 = states[-1]["tasks"]["1"]["pca"]["components"]
  assert np.abs(p1 @ p0.T).max() < 1e-5 * np.linalg.norm(p1) * np.linalg.norm(p0)
  assert in_span_residual(p1, u1) < 1e-5
  assert np.linalg.norm(p1) > 0.1
  assert sparc_lib.overlap_score(states[-1]["tasks"]["0"]["pca"]["components"], u1) > 0.0


def test_orthogonal_penalty_is_added_and_stored():
  method = sparc_lib.sparc(tiny_bert(), num_prompt_tokens=2, num_components=6,
                           overlap_threshold=1.0, orthogonal_penalty=10.0)
  stream = make_stream("AC")
  states, spec = drive(method, stream, train=False)
  state = states[-1]
  q = state["tasks"]["1"]["ortho"]
  assert q.shape[0] == 32 and np.allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-5)
  train = stream.tasks[1].train
  batch = {"x": jnp.asarray(train.x[:8]), "y": jnp.asarray(train.y[:8]), "mask": jnp.ones(8)}

  @jax.jit
  def penalty_fn(params):
    _, aux = method.loss(params, state, method.backbone.params, batch, None, TaskInfo(1, spec))
    return aux["orthogonal_penalty"]

  penalty = lambda params: float(penalty_fn(params))  # noqa: E731

  params = method.trainable(state, TaskInfo(1, spec))
  assert penalty(params) < 1e-8  # orthogonal at initialisation
  u1 = np.asarray(state["tasks"]["1"]["pca"]["components"])
  toward_old = np.asarray(prompt(state, 0)) @ u1  # the old prompt seen in the new basis
  assert penalty({**params, "z": params["z"] + jnp.asarray(toward_old, jnp.float32)}) > 1e-3


def test_task_il_old_predictions_are_bit_identical_with_lora():
  stream = make_stream("ABC")
  method = sparc_lib.sparc(tiny_bert(), num_prompt_tokens=2, num_components=4, lora_rank=2)
  states, spec = drive(method, stream)
  base = method.backbone.params
  for s in range(2):
    x = jnp.asarray(stream.tasks[s].test.x)
    outs = [np.asarray(jax.jit(functools.partial(method.predict, info=TaskInfo(t, spec, s)))(states[t], base, x))
            for t in range(s, 3)]
    for later in outs[1:]:
      assert np.array_equal(outs[0], later)
    assert np.all(outs[0][:, list(spec.task_classes[s])] > -1e29)
  assert all("lora" in states[-1]["tasks"][str(t)] for t in range(3))
  a0 = states[-1]["tasks"]["0"]["lora"]
  assert all("." in key and "/" not in key for key in a0)


def test_prompt_tuning_baseline_shares_one_drifting_prompt():
  stream = make_stream("AB")
  method = sparc_lib.prompt_tuning(tiny_bert(), num_prompt_tokens=2)
  states, spec = drive(method, stream, train=(1,))
  assert not np.array_equal(states[0]["prompt"], states[1]["prompt"])  # task 1 moved it
  diag = method.diagnostics(states[-1])
  assert diag["trainable_params_per_task"] == 2 * 32


def test_domain_il_subspace_selection_picks_the_matching_task_prompt():
  stream = make_stream("AB", scenario="domain")
  for lora_rank in (0, 2):
    method = table_sparc(num_prompt_tokens=2, num_components=4, lora_rank=lora_rank)
    states, spec = drive(method, stream, train=False)
    assert set(states[-1]["heads"]) == {"shared"}
    base = method.backbone.params
    x = jnp.asarray(np.concatenate([stream.tasks[s].test.x for s in range(2)]))
    owner = np.repeat([0, 1], len(stream.tasks[0].test))

    @jax.jit
    def both(state, x, method=method):
      free = method.predict(state, base, x, TaskInfo(1, spec))
      given = [method.predict(state, base, x, TaskInfo(1, spec, s))
               for s in range(2)]
      return free, jnp.where(jnp.asarray(owner)[:, None] == 0, given[0], given[1])

    free, given = both(states[-1], x)  # a mixed batch: every example finds its own task
    np.testing.assert_allclose(free, given, rtol=1e-5, atol=1e-5)
  latest = table_sparc(num_prompt_tokens=2, num_components=4, selection="latest")
  free, last = jax.jit(lambda state, x: [
      latest.predict(state, base, x, TaskInfo(1, spec, t)) for t in (None, 1)])(
          states[-1], x)
  np.testing.assert_allclose(free, last)


def test_trainable_parameter_percentage():
  backbone = tiny_bert()
  method = sparc_lib.sparc(backbone, num_prompt_tokens=3, num_components=4, lora_rank=2)
  states, _ = drive(method, make_stream("A"), train=False)
  diag = method.diagnostics(states[-1])
  lora = 1 * 2 * 2 * (32 + 32)  # layers × (q, v) × r·(d_in + d_out)
  assert diag["tasks"]["0"]["prompt_params"] == 3 * 4
  assert diag["tasks"]["0"]["lora_params"] == lora
  assert diag["trainable_pct"] == pytest.approx(100 * (12 + lora) / backbone.num_params(), abs=1e-5)
  assert diag["trainable_pct_with_head"] > diag["trainable_pct"]
  basis = sparc_lib.sparc(backbone, num_prompt_tokens=3, num_components=4, train_basis=True,
                          pooling="mean")
  states, _ = drive(basis, make_stream("A"), train=False)
  assert basis.diagnostics(states[-1])["tasks"]["0"]["prompt_params"] == 3 * 4 + 32 * 4


def test_label_word_scoring_on_a_decoder_lm():
  backbone = llama.llama((L,), pad_id=0, vocab_size=128, hidden_size=32, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
  method = sparc_lib.sparc(backbone, num_prompt_tokens=2, num_components=4, lora_rank=2,
                           label_words=[10, 11, 12, 13])
  stream = make_stream("AB")
  states, spec = drive(method, stream, train=(1,))  # one training phase (compile time)
  assert "heads" not in states[-1]
  logits = jax.jit(functools.partial(method.predict, info=TaskInfo(1, spec, 1)))(
      states[-1], backbone.params, jnp.asarray(stream.tasks[1].test.x))
  assert logits.shape == (24, 4) and np.all(np.asarray(logits[:, :2]) < -1e29)
  assert np.all(np.isfinite(np.asarray(logits[:, 2:])))
  with pytest.raises(ValueError, match="one label word per global class"):
    sparc_lib.sparc(backbone, num_components=4, label_words=[1, 2]).init(
        jax.random.PRNGKey(0), spec)


def test_bad_arguments_are_named():
  backbone = tiny_bert()
  with pytest.raises(ValueError, match="pooling"):
    sparc_lib.sparc(backbone, pooling="max")
  with pytest.raises(ValueError, match="num_components"):
    sparc_lib.sparc(backbone, num_components=33)
  with pytest.raises(ValueError, match="selection"):
    sparc_lib.sparc(backbone, num_components=4, selection="oracle")
  with pytest.raises(ValueError, match="neither a site role"):
    sparc_lib.sparc(backbone, num_components=4, lora_rank=2, lora_sites=("qq",))
  with pytest.raises(ValueError, match="pad_id"):
    sparc_lib.sparc(mlp.mlp((8,), hidden=(4,)), num_components=2)
  with pytest.raises(ValueError, match="label_word_scores"):
    sparc_lib.sparc(backbone, num_components=4, label_words=[1, 2])


def test_superglue_experiment_stream_formats_truncates_and_maps_labels(tmp_path, monkeypatch):
  """The pod experiment's stream on fake TFDS records and a tiny word-level tokenizer."""
  import importlib.util
  import json
  import pathlib

  from tokenizers import Tokenizer, models, pre_tokenizers, processors

  from clx.data import catalog

  root = pathlib.Path(__file__).resolve().parents[2]
  spec = importlib.util.spec_from_file_location("superglue_sparc",
                                                root / "experiments" / "superglue_sparc.py")
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  words = ("<pad> <s> </s> [UNK] yes no maybe 1 2 Question Answer or ? : , . the passage "
           "premise hypothesis is long").split()
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok.save(str(tmp_path / "tokenizer.json"))
  config = json.loads((root / "tests/models/fixtures/llama_tiny/config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(config))  # pad 0, bos 1, eos 2

  def fake_catalog(name, data_dir=None, *, splits, x_key, y_key):
    assert y_key == "label" and splits == ["train", "validation"]
    n = 6
    text = np.array(["the passage is long " * (20 if i == 0 else 1) for i in range(n)], object)
    other = {"boolq": {"question": np.array(["is the passage long"] * n, object)},
             "cb": {"hypothesis": np.array(["the premise is long ."] * n, object)}}
    other = other[name.split("/")[1]]
    labels = np.arange(n) % (2 if "boolq" in name else 3)
    make = lambda y: catalog.ArraySplit({"x": text, "y": y, **other})  # noqa: E731
    return {"train": make(labels), "validation": make(np.where(labels == 0, -1, labels))}

  monkeypatch.setattr(catalog, "load_catalog", fake_catalog)
  stream = exp.super_glue_stream(model_path=str(tmp_path), tasks="boolq,cb", max_length=24)
  boolq, cb = stream.tasks
  assert stream.num_classes == 5 and boolq.classes == (0, 1) and cb.classes == (0, 1, 2)
  np.testing.assert_array_equal(boolq.train.y, [exp.NO, exp.YES] * 3)  # TFDS False/True
  np.testing.assert_array_equal(cb.train.y, [exp.YES, exp.NO, exp.MAYBE] * 2)
  assert len(boolq.test) == 3  # unlabelled (-1) validation rows are dropped
  x = boolq.train.x
  assert x.shape == (6, 24) and np.all(x[:, 0] == 1)  # BOS first
  vocab = {w: i for i, w in enumerate(words)}
  _, cue_text = exp.format_example("boolq", {"passage": "p", "question": "is the passage long"})
  cue = tok.encode(cue_text, add_special_tokens=False).ids
  first = x[0][x[0] != 0]
  assert len(first) == 24 and list(first[-len(cue):]) == cue  # passage cut, the cue survives
  ids = sparc_lib._resolve_label_words(list(exp.LABEL_WORDS), str(tmp_path))
  np.testing.assert_array_equal(ids, [vocab[w] for w in ("yes", "no", "maybe", "1", "2")])
  with pytest.raises(ValueError, match="scenario"):
    exp.super_glue_stream(model_path=str(tmp_path), scenario="class")


def test_checkpoint_holds_z_basis_mean_lora_and_decisions_per_task(tmp_path):
  from clx import checkpoint as ckpt
  method = sparc_lib.sparc(tiny_bert(), num_prompt_tokens=2, num_components=4, lora_rank=2,
                           train_basis=True, orthogonal_penalty=1.0)
  states, spec = drive(method, make_stream("AC"), train=False)
  initial = method.init(jax.random.fold_in(jax.random.PRNGKey(0), 0), spec)
  with ckpt.TaskCheckpointer(tmp_path) as saver:
    prev = jax.device_get(initial)
    for t, state in enumerate(states):
      delta, removed = ckpt.state_delta(prev, state)
      assert set(delta["tasks"]) == {str(t)}  # only the new task's entry is written
      assert {"z", "basis", "pca", "lora", "overlap"} <= set(delta["tasks"][str(t)])
      saver.save(t, delta, removed, {"task": t})
      prev = state
    restored, _ = saver.restore_state(1, jax.device_get(initial))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[-1])):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(restored) == jax.tree.structure(states[-1])


def test_sequential_lora_baseline_with_label_words():
  backbone = llama.llama((L,), pad_id=0, vocab_size=128, hidden_size=32, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
  method = sparc_lib.prompt_lora(backbone, lora_rank=2, label_words=[10, 11, 12, 13])
  states, spec = drive(method, make_stream("AB"), train=False)
  assert set(states[-1]) == {"lora"} and method.name == "prompt_lora"
  diag = method.diagnostics(states[-1])
  assert diag["prompt_params"] == 0 and diag["lora_params"] == diag["trainable_params_per_task"] > 0
  with pytest.raises(ValueError, match="only the head"):
    sparc_lib.prompt_tuning(backbone, num_prompt_tokens=0, label_words=[10, 11, 12, 13])


# ---------------------------------------------------------------------------------------------
# Geometry: the PCA describes the space the prompt is inserted into


CLS, SEP = 1, 2


def _random_ln_bert():
  """A tiny BERT with random word/position embeddings and a non-trivial embedding LayerNorm."""
  backbone = bert.bert((L,), config=bert.BertConfig(
      vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=32), seed=3)
  rng = np.random.default_rng(7)
  params = jax.tree.map(lambda v: v, backbone.params)
  emb = params["embeddings"]
  emb["word_embeddings"]["embedding"] = jnp.asarray(rng.normal(0, 0.05, (64, 16)), jnp.float32)
  emb["position_embeddings"]["embedding"] = jnp.asarray(rng.normal(0, 0.05, (32, 16)), jnp.float32)
  emb["layer_norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32)
  emb["layer_norm"]["bias"] = jnp.asarray(rng.normal(0, 0.3, 16), jnp.float32)
  return dataclasses.replace(backbone, params=params)


def _bert_rows(n, rng):
  """[CLS] w_1 .. w_m [SEP] then padding, m random in [2, L - 2]."""
  x = np.zeros((n, L), np.int32)
  for i, m in enumerate(rng.integers(2, L - 1, n)):
    x[i, 0], x[i, 1:m + 1], x[i, m + 1] = CLS, rng.integers(3, 64, m), SEP
  return x


def _embedding_layer_f64(params, x):
  """float64 reference of BERT's embedding layer: LN(word + position + type 0)."""
  emb = jax.tree.map(lambda v: np.asarray(v, np.float64), params["embeddings"])
  h = (emb["word_embeddings"]["embedding"][x] + emb["position_embeddings"]["embedding"][:L][None]
       + emb["token_type_embeddings"]["embedding"][0])
  mu = h.mean(-1, keepdims=True)
  var = ((h - mu) ** 2).mean(-1, keepdims=True)
  return (h - mu) / np.sqrt(var + 1e-12) * emb["layer_norm"]["scale"] + emb["layer_norm"]["bias"]


def _top_k(rows, k):
  mean = rows.mean(0)
  cov = (rows - mean).T @ (rows - mean) / len(rows)
  vals, vecs = np.linalg.eigh(cov)
  return mean, vecs[:, ::-1][:, :k], vals[::-1][:k]


def test_pca_runs_on_the_post_layernorm_real_tokens_the_prompt_sits_among():
  backbone = _random_ln_bert()
  rng = np.random.default_rng(0)
  x = _bert_rows(40, rng)
  y = rng.integers(0, 2, 40).astype(np.int32)
  stream = Stream("bert_rows", (Task("t0", ArraySplit({"x": x, "y": y}),
                                     ArraySplit({"x": x[:8], "y": y[:8]}), (0, 1)),), "task", 2)
  k = 4
  method = sparc_lib.sparc(backbone, num_prompt_tokens=3, num_components=k)
  states, _ = drive(method, stream, train=False)
  pc = states[-1]["tasks"]["0"]["pca"]
  # float64 reference: embedding-layer outputs of the real tokens (no [CLS], [SEP], padding)
  h = _embedding_layer_f64(backbone.params, x)
  real = (x != 0) & (x != CLS) & (x != SEP)
  mean, u_ref, vals_ref = _top_k(h[real], k)
  u = np.asarray(pc["components"], np.float64)
  np.testing.assert_allclose(np.asarray(pc["mean"]), mean, atol=1e-5)
  np.testing.assert_allclose(np.asarray(pc["eigenvalues"]), vals_ref, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(u @ u.T, u_ref @ u_ref.T, atol=1e-4)
  # the fixture can tell: with [CLS]/[SEP] in, or on word-table rows, the subspace differs
  _, u_special, _ = _top_k(h[x != 0], k)
  assert np.abs(u_special @ u_special.T - u_ref @ u_ref.T).max() > 1e-2
  table = np.asarray(backbone.params["embeddings"]["word_embeddings"]["embedding"], np.float64)
  _, u_table, _ = _top_k(table[x[real]], k)
  assert np.abs(u_table @ u_table.T - u_ref @ u_ref.T).max() > 1e-2
  # those reference rows are exactly the vectors the prompt is inserted among (layer-0 inputs)
  p = prompt(states[-1], 0)
  _, taps = backbone.apply(backbone.params, jnp.asarray(x), taps="inputs",
                           prefix=jnp.asarray(p, jnp.float32))
  layer0 = np.asarray(taps["encoder/layers/0/attention/query/kernel"], np.float64)
  np.testing.assert_allclose(layer0[:, 1:4], np.broadcast_to(p, (40, 3, 16)), atol=1e-5)
  np.testing.assert_allclose(np.delete(layer0, [1, 2, 3], axis=1), h, atol=1e-4)
  # and the initial prompt has the scale of those rows (table rows are ~50x smaller here)
  token_norm = np.linalg.norm(h[real] - mean, axis=1).mean()
  assert 0.2 < np.linalg.norm(p, axis=1).mean() / token_norm < 1.5


def test_special_tokens_option():
  backbone = _random_ln_bert()
  x = _bert_rows(6, np.random.default_rng(1))
  by_ids = sparc_lib._Embedder(backbone, "input", None, special=[CLS, SEP]).mask(x)
  edges = sparc_lib._Embedder(backbone, "input", None, special="auto").mask(x)
  none = sparc_lib._Embedder(backbone, "input", None, special="none").mask(x)
  np.testing.assert_array_equal(by_ids, (x != 0) & (x != CLS) & (x != SEP))
  np.testing.assert_array_equal(edges, by_ids)
  np.testing.assert_array_equal(none, x != 0)
  with pytest.raises(ValueError, match="special_tokens"):
    sparc_lib.sparc(backbone, num_components=4, special_tokens="cls")


# ---------------------------------------------------------------------------------------------
# Components switched off change the outcome


def test_subspace_off_lets_the_prompt_leave_the_pca_span():
  stream = make_stream("AB")
  cfg = dataclasses.replace(CFG, epochs=2, learning_rate=3e-2)
  kw = dict(num_prompt_tokens=3, num_components=4, overlap_threshold=float("inf"))
  on, _ = drive(table_sparc(**kw), stream, cfg=cfg)
  off, _ = drive(table_sparc(in_subspace=False, **kw), stream, cfg=cfg)
  untrained, _ = drive(table_sparc(in_subspace=False, **kw), stream, train=False)
  for t in range(2):
    u = on[-1]["tasks"][str(t)]["pca"]["components"]
    assert in_span_residual(prompt(on[-1], t), u) < 1e-5  # constrained: stays in span(U_t)
    # same start (the free prompt is initialised as SPARC's, inside the span) ...
    start = np.asarray(untrained[-1]["tasks"][str(t)]["z"], np.float64)
    assert in_span_residual(start, u) < 1e-5
    free = np.asarray(off[-1]["tasks"][str(t)]["z"], np.float64)
    assert free.shape == (3, 32)
    # ... but once trained the free prompt leaves the span
    assert in_span_residual(free, u) > 1e-2


def test_reuse_off_starts_a_repeated_task_from_scratch():
  """Domain-IL, task 1 = task 0's data: with re-use it starts where task 0 ended."""
  stream = make_stream("AA", scenario="domain", same_data=(1,))
  cfg = dataclasses.replace(CFG, epochs=6, learning_rate=5e-2)
  # prompt positions pooled too, so the prompt the shared head was trained with matters
  backbone = dataclasses.replace(tiny_bert(), graphdef=pooled_prefix_bert().graphdef)
  spec = StreamSpec.from_stream(stream)
  train = stream.tasks[1].train
  batch = {"x": jnp.asarray(train.x), "y": jnp.asarray(train.y),
           "mask": jnp.ones(len(train.y))}
  losses = {}
  for tau in (0.0, float("inf")):
    method = table_sparc(backbone, num_prompt_tokens=4, num_components=6, overlap_threshold=tau)
    states, _ = drive(method, stream, train=(0,), cfg=cfg)  # task 1 not trained: its start
    state = states[-1]
    loss_fn = jax.jit(functools.partial(method.loss, info=TaskInfo(1, spec)))
    start, _ = loss_fn(method.trainable(state, TaskInfo(1, spec)), state, method.backbone.params, batch, None)
    # what task 0's own trained prompt scores on the same texts with the same shared head
    state0 = {**state, "tasks": {**state["tasks"], "1": {**state["tasks"]["1"],
                                                         "z": state["tasks"]["0"]["z"]}}}
    end0, _ = loss_fn(method.trainable(state0, TaskInfo(1, spec)), state0, method.backbone.params, batch, None)
    losses[tau] = (float(start), float(end0))
    assert bool(state["tasks"]["1"]["overlap"]["reused"]) == (tau == 0.0)
  (reuse_start, end0), (fresh_start, _) = losses[0.0], losses[float("inf")]
  assert reuse_start == pytest.approx(end0, abs=1e-5)  # re-use: starts at the trained prompt
  assert fresh_start > reuse_start + 0.05  # re-use off: a new prompt, a higher starting loss


def test_lora_lr_scale_moves_lora_c_times_as_far_as_the_prompt_under_adam():
  import optax
  stream = make_stream("A")
  c, lr = 0.1, 1e-2
  method = table_sparc(num_prompt_tokens=2, num_components=4, lora_rank=2, lora_lr_scale=c)
  states, spec = drive(method, stream, train=False)
  state = states[-1]
  info0 = TaskInfo(0, spec)
  params = method.trainable(state, info0)
  # round trip: the stored state keeps natural units
  back = method.combine(state, params, info0)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  train = stream.tasks[0].train
  batch = {"x": jnp.asarray(train.x[:16]), "y": jnp.asarray(train.y[:16]), "mask": jnp.ones(16)}
  grads = jax.grad(lambda p: method.loss(p, state, method.backbone.params, batch, None,
                                         info0)[0])(params)
  opt = optax.adam(lr)
  updates, _ = opt.update(grads, opt.init(params), params)
  new = method.combine(state, optax.apply_updates(params, updates), info0)
  dz = np.abs(np.asarray(new["tasks"]["0"]["z"]) - np.asarray(state["tasks"]["0"]["z"]))
  db = [np.abs(np.asarray(new["tasks"]["0"]["lora"][s]["b"]) -
               np.asarray(state["tasks"]["0"]["lora"][s]["b"])) for s in state["tasks"]["0"]["lora"]]
  # Adam's first step moves every coordinate with a non-zero gradient by lr (its sign)
  assert dz.max() == pytest.approx(lr, rel=1e-3)
  assert max(d.max() for d in db) == pytest.approx(c * lr, rel=1e-3)


def test_linear_probe_trains_only_the_head():
  stream = make_stream("AB")
  method = sparc_lib.linear_probe(tiny_bert())
  states, _ = drive(method, stream, train=(0,))
  assert set(states[-1]) == {"heads"}
  diag = method.diagnostics(states[-1])
  assert diag["trainable_params_per_task"] == 0 and diag["trainable_pct"] == 0
  assert diag["trainable_pct_with_head"] == pytest.approx(
      100 * (32 * 2 + 2) / tiny_bert().num_params(), abs=1e-5)


def test_token_pca_equals_the_pca_begin_task_stores():
  stream = make_stream("A")
  method = sparc_lib.sparc(tiny_bert(), num_prompt_tokens=2, num_components=4)
  states, _ = drive(method, stream, train=False)
  got = sparc_lib.token_pca(tiny_bert(), stream.tasks[0].train.x, 4, batch_size=20)
  want = states[-1]["tasks"]["0"]["pca"]
  np.testing.assert_allclose(got["mean"], want["mean"], atol=1e-5)
  np.testing.assert_allclose(got["eigenvalues"], want["eigenvalues"], rtol=1e-4)
  assert sparc_lib.overlap_score(got["components"], want["components"]) == pytest.approx(1, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# The public pieces: config, re-use decision, routing


def test_config_validates_without_a_backbone_and_maps_old_names():
  with pytest.raises(ValueError, match="pooling"):
    sparc_lib.SPARCConfig(pooling="max")
  with pytest.raises(ValueError, match="lora_rank"):
    sparc_lib.SPARCConfig(lora_rank=-1)
  with pytest.raises(ValueError, match="train_basis"):
    sparc_lib.SPARCConfig(train_basis=True, in_subspace=False)
  with pytest.raises(ValueError, match="aux_batch_size"):
    sparc_lib.SPARCConfig(aux_batch_size=0)
  cfg = sparc_lib.SPARCConfig(**sparc_lib._renamed({"lora_sites": ["k"], "pca_batch_size": 7}))
  assert cfg.sites == ("k",) and cfg.aux_batch_size == 7
  with pytest.raises(TypeError, match="got both"):
    sparc_lib.sparc(tiny_bert(), num_components=4, lora_sites=("q",), sites=("q",))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.lora_rank = 3  # type: ignore[misc]
  # the factory's signature names every option (the experiment validator binds to it)
  signature = inspect.signature(sparc_lib.sparc)
  signature.bind(None, num_components=4, lora_sites=("q",), pca_batch_size=8)
  with pytest.raises(TypeError, match="num_componets"):
    signature.bind(None, num_componets=4)


def test_reuse_decision_matches_a_float64_reference():
  rng = np.random.default_rng(3)
  d, k = 12, 3
  basis = lambda: np.linalg.qr(rng.normal(size=(d, k)))[0]  # noqa: E731
  new, olds = basis(), {0: basis(), 1: basis(), 2: basis()}
  want = np.array([np.sum((new.T @ olds[s]) ** 2) / k for s in range(3)])
  best = int(np.argmax(want))
  for tau, reused in ((want[best] - 1e-3, True), (want[best] + 1e-3, False)):
    got = sparc_lib.reuse_decision(new, olds, 5, threshold=tau)
    np.testing.assert_allclose(got.scores[:3], want, atol=1e-5)
    np.testing.assert_array_equal(got.scores[3:], [-1.0, -1.0])
    assert (got.matched, got.reused) == (best, reused)
    assert got.score == pytest.approx(want[best], abs=1e-5)
  first = sparc_lib.reuse_decision(new, {}, 4)
  assert (first.matched, first.score, first.reused) == (-1, -1.0, False)
  np.testing.assert_array_equal(first.scores, -np.ones(4))


@pytest.mark.parametrize("pooling", ["token", "mean"])
def test_route_picks_the_task_with_the_smallest_float64_reconstruction_error(pooling):
  backbone = tiny_bert()
  setup = sparc_lib.resolve(backbone, sparc_lib.SPARCConfig(
      num_components=4, embedding_source="table", special_tokens="none", pooling=pooling))
  rng = np.random.default_rng(4)
  tasks = {str(s): {"pca": {"mean": jnp.asarray(rng.normal(size=32) * 0.3, jnp.float32),
                            "components": jnp.asarray(np.linalg.qr(rng.normal(size=(32, 4)))[0],
                                                      jnp.float32)}} for s in range(3)}
  x = np.zeros((10, L), np.int32)
  for i, length in enumerate(rng.integers(2, L + 1, 10)):
    x[i, :length] = rng.integers(1, 121, length)
  table = np.asarray(backbone.params["embeddings"]["word_embeddings"]["embedding"], np.float64)
  rows, valid = table[x], (x != backbone.pad_id).astype(np.float64)
  if pooling == "mean":
    rows = (np.einsum("nld,nl->nd", rows, valid) / valid.sum(1, keepdims=True))[:, None]
    valid = np.ones((10, 1))
  want = np.zeros((10, 3))
  for s in range(3):
    mu = np.asarray(tasks[str(s)]["pca"]["mean"], np.float64)
    u = np.asarray(tasks[str(s)]["pca"]["components"], np.float64)
    c = rows - mu
    resid = np.sum((c - c @ u @ u.T) ** 2, -1)
    want[:, s] = np.sum(resid * valid, 1) / valid.sum(1)
  state = {"tasks": tasks}
  got = sparc_lib.reconstruction_errors(setup, state, backbone.params, jnp.asarray(x), 2)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(
      sparc_lib.route(setup, state, backbone.params, jnp.asarray(x), 2), np.argmin(want, 1))
