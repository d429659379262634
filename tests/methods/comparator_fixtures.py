"""A tiny text stream and tiny backbones for the comparator methods' tests (fast on CPU)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from clx.data.types import ArraySplit, Stream, Task
from clx.models import bert
from clx.train import loop

L = 12
VOCAB = 96
CFG = loop.TrainConfig(epochs=3, batch_size=16, learning_rate=1e-2, optimizer="adam",
                       eval_batch_size=64)


@functools.lru_cache(maxsize=None)
def tiny_bert(layers: int = 2):
  """A 2-layer, 32-wide random BERT (its features still separate the token groups)."""
  return bert.bert((L,), config=bert.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=32), seed=0)


def token_stream(num_tasks: int = 3, classes_per_task: int = 2, n_train: int = 64,
                 n_test: int = 32, seed: int = 0) -> Stream:
  """Class c draws its tokens from its own block of 8 ids (1 + 8c … 8c + 8), rows padded
  with 0 (BERT's pad id) to random lengths; tasks are disjoint class sets."""
  rng = np.random.default_rng(seed)
  tasks = []
  for t in range(num_tasks):
    classes = tuple(range(t * classes_per_task, (t + 1) * classes_per_task))

    def split(n):
      y = rng.choice(np.asarray(classes), n).astype(np.int32)
      x = np.zeros((n, L), np.int32)
      for i, length in enumerate(rng.integers(4, L + 1, n)):
        x[i, :length] = rng.integers(1 + 8 * y[i], 9 + 8 * y[i], length)
      return ArraySplit({"x": x, "y": y})

    tasks.append(Task(f"t{t}", split(n_train), split(n_test), classes))
  return Stream("tokens", tuple(tasks), "class", num_tasks * classes_per_task)


def run(method, stream, cfg=CFG):
  """``(final state, (T, T) accuracy matrix in percent)`` of the loop's run on one device."""
  from clx.train.sharding import make_mesh  # pylint: disable=import-outside-toplevel
  result = loop.run_method(method, stream, cfg, mesh=make_mesh(1), quiet=True, progress=False)
  return jax.device_get(result.state), result.acc_matrix


def loss_grads(method, stream, task_index: int = 0, rows: int = 16):
  """Gradients of ``method.loss`` w.r.t. its trainable params at init (after ``begin_task``
  is skipped: the init state), on the first ``rows`` training rows of ``task_index``."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from clx.methods.base import StreamSpec, TaskInfo  # pylint: disable=import-outside-toplevel
  spec = StreamSpec.from_stream(stream)
  info = TaskInfo(task_index, spec)
  state = method.init(jax.random.PRNGKey(0), spec)
  split = stream.tasks[task_index].train
  batch = {"x": jnp.asarray(split.x[:rows]), "y": jnp.asarray(split.y[:rows]),
           "mask": jnp.ones(rows)}
  grad = jax.jit(jax.grad(lambda p, base: method.loss(p, state, base, batch,
                                                      jax.random.PRNGKey(1), info)[0]))
  return jax.device_get(grad(method.trainable(state, info), method.backbone.params))
