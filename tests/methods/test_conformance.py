"""Every registered method through the protocol on a tiny stream.

init → (begin_task → trainable → loss → combine → end_task) per task → predict → the
checkpoint round trip (the state restored from the per-task deltas equals the final
state, and a rerun on the same directory resumes instead of training again).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx import checkpoint as ckpt
from clx.data.types import ArraySplit, Stream, Task
from clx.methods import REGISTRY, build
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo
from clx.models import bert
from clx.models.mlp import mlp
from clx.train.loop import TrainConfig, run_method
from clx.train.sharding import make_mesh

CFG = TrainConfig(epochs=1, batch_size=8, optimizer="adam", learning_rate=1e-3, eval_batch_size=16)
L = 8  # tokens per text example

# Methods on token ids (soft prompts, the word-embedding table, attention roles).
TEXT = {"sparc", "sparc_lora", "free_prompt", "prompt_tuning", "prompt_lora", "linear_probe",
        "inflora_b5"}
# Small settings for a fast run; every other argument is the method's default.
KWARGS = {
    "gpm": {"threshold": 0.97, "num_samples": 16},
    "sgp": {"threshold": 0.97, "num_samples": 16},
    "became": {"threshold": 0.97, "num_samples": 16, "verbose": False},
    "became_gpm": {"threshold": 0.97, "num_samples": 16, "verbose": False},
    "became_sgp": {"threshold": 0.97, "num_samples": 16, "verbose": False},
    "became_nscl": {"verbose": False},
    "lora": {"rank": 2},
    "inflora": {"rank": 2, "sites": ("mlp",)},
    "inflora_ca": {"rank": 2, "sites": ("mlp",), "ca_epochs": 1, "ca_samples": 4},
    "inflora_b5": {"rank": 2, "blocks": 1},
    "proteus": {"sites": ("lin1/kernel",), "n_components": 2, "rp_dim": 16, "max_iter": 20,
                "verbose": False},
    "proteus_kmeans": {"sites": ("lin1/kernel",), "n_components": 2, "rp_dim": 16,
                       "max_iter": 20, "verbose": False},
    "proteus_independent": {"sites": ("lin1/kernel",), "n_components": 2, "rp_dim": 16,
                            "max_iter": 20, "verbose": False},
    "sparc": {"num_prompt_tokens": 2, "num_components": 4},
    "sparc_lora": {"num_prompt_tokens": 2, "num_components": 4, "lora_rank": 2},
    "free_prompt": {"num_prompt_tokens": 2},
    "prompt_tuning": {"num_prompt_tokens": 2},
    "prompt_lora": {"num_prompt_tokens": 2, "lora_rank": 2},
    "linear_probe": {},
}
# One method per protocol shape runs in the default suite (full fine-tuning, adapters,
# projection memory, InfLoRA's Gram passes, SPARC's prompts and PCA); the others are
# `-m slow` (each one is a fresh compilation of a whole run plus Orbax writes).
FAST = {"finetune", "lora", "gpm", "inflora", "sparc"}


def _vector_stream() -> Stream:
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 6)) * 2.0
  tasks = []
  for t in range(2):
    classes = (2 * t, 2 * t + 1)

    def split(n):
      y = rng.choice(np.asarray(classes), n).astype(np.int32)
      return ArraySplit({"x": (centres[y] + rng.normal(size=(n, 6))).astype(np.float32), "y": y})

    tasks.append(Task(f"t{t}", split(24), split(12), classes))
  return Stream("conformance_vectors", tuple(tasks), "class", 4)


def _text_stream() -> Stream:
  rng = np.random.default_rng(1)
  tasks = []
  for t in range(2):
    classes = (2 * t, 2 * t + 1)

    def split(n):
      y = rng.choice(np.asarray(classes), n).astype(np.int32)
      x = rng.integers(3, 60, (n, L)).astype(np.int32)
      x[:, 0] = 3 + y  # a label-bearing first token
      x[:, L - 2:] = 0  # padding
      return ArraySplit({"x": x, "y": y})

    tasks.append(Task(f"t{t}", split(24), split(12), classes))
  return Stream("conformance_text", tuple(tasks), "class", 4)


def _backbone(name: str):
  if name in TEXT:
    return bert.bert((L,), config=bert.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16))
  return mlp((6,), (8, 8), seed=0)


def test_every_registered_method_is_covered():
  assert set(KWARGS) | {"finetune", "joint", "adam_nscl"} >= set(REGISTRY), (
      f"add small settings for {sorted(set(REGISTRY) - set(KWARGS))}")


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(REGISTRY)])
def test_method_runs_through_the_protocol_and_round_trips(name, tmp_path):
  stream = _text_stream() if name in TEXT else _vector_stream()
  method = build(name, _backbone(name), **KWARGS.get(name, {}))
  assert isinstance(method, ContinualMethod) and method.name
  assert method.data_view in ("current", "cumulative")
  result = run_method(method, stream, CFG, mesh=make_mesh(1), quiet=True,
                      checkpoint_dir=str(tmp_path / "ckpt"))
  acc = result.acc_matrix
  chex.assert_shape(acc, (2, 2))
  assert np.all(np.isfinite(acc[np.tril_indices(2)])) and np.all(np.isnan(acc[0, 1:]))
  assert np.all((acc[np.tril_indices(2)] >= 0) & (acc[np.tril_indices(2)] <= 100))
  state = jax.device_get(result.state)
  chex.assert_tree_all_finite(jax.tree.map(lambda v: np.asarray(v, np.float64),
                                           [v for v in jax.tree.leaves(state)
                                            if np.issubdtype(np.asarray(v).dtype, np.number)]))

  # predict: global logits (n, C) for the last task, under jit with a static TaskInfo.
  spec = StreamSpec.from_stream(stream)
  x = jnp.asarray(stream.tasks[0].test.x[:5])
  logits = jax.jit(lambda s, b, xx: method.predict(s, b, xx, TaskInfo(1, spec)))(
      result.state, method.backbone.params, x)
  chex.assert_shape(logits, (5, spec.num_classes))
  assert logits.dtype == jnp.float32

  # params_for, where the method has one, gives a parameter tree the backbone accepts.
  if method.params_for is not None:
    params = method.params_for(result.state, method.backbone.params, TaskInfo(1, spec))
    chex.assert_trees_all_equal_shapes(params, method.backbone.params)

  # checkpoint round trip: replaying the deltas gives the final state back.
  init = method.init(jax.random.fold_in(jax.random.PRNGKey(0), 0), spec)
  checkpointer = ckpt.TaskCheckpointer(str(tmp_path / "ckpt"))
  try:
    restored, meta = checkpointer.restore_state(1, init)
  finally:
    checkpointer.close()
  assert meta["task"] == 1 and meta["method"] == method.name
  chex.assert_trees_all_close(jax.device_get(restored), state, rtol=0, atol=0)

  # and a rerun on the same directory resumes from the last task instead of training again.
  again = run_method(method, stream, CFG, mesh=make_mesh(1), quiet=True,
                     checkpoint_dir=str(tmp_path / "ckpt"))
  assert again.resumed_from == 1
  np.testing.assert_array_equal(again.acc_matrix, acc)


def test_combine_then_trainable_is_the_identity_for_full_fine_tuning_methods():
  """``combine`` writes exactly what ``trainable`` reads (the loop's write-back contract)."""
  stream = _vector_stream()
  spec = StreamSpec.from_stream(stream)
  for name in ("finetune", "lora", "gpm", "became_gpm", "adam_nscl"):
    method = build(name, _backbone(name), **KWARGS.get(name, {}))
    state = method.init(jax.random.PRNGKey(0), spec)
    state = {**state, "heads": {"0": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}}
    info = TaskInfo(0, spec)
    params = method.trainable(state, info)
    bumped = jax.tree.map(lambda v: v + 1.0, params)
    chex.assert_trees_all_equal(method.trainable(method.combine(state, bumped, info), info),
                                bumped)


def test_task_info_is_static_and_checked():
  spec = StreamSpec(2, 4, "class", ((0, 1), (2, 3)), (6,))
  assert hash(TaskInfo(1, spec, 0)) == hash(TaskInfo(1, spec, 0))
  with pytest.raises(ValueError, match="task_id"):
    TaskInfo(0, spec, 1)
  with pytest.raises(ValueError, match="TaskInfo.task"):
    TaskInfo(-1, spec)
  assert dataclasses.replace(TaskInfo(1, spec), task_id=1).task_id == 1
