"""Classification heads shared by all methods (pure functions on the state).

Two layouts, chosen by ``mode``:

- ``"per_task"``: one linear head per task over that task's classes, stored at
  ``state["heads"][str(t)]``. Training uses the *local* cross-entropy (logits
  of the current head, labels re-indexed inside the task's class list), as
  InfLoRA's official code. Prediction scatters every seen head's logits into
  the global label space: in the class-incremental scenario that is the
  concatenation of all heads (no task id); in the task-incremental scenario the
  loop additionally masks to the given task's classes.
- ``"shared"``: one head over the global label space at
  ``state["heads"]["shared"]``; classes not seen yet are masked to ``-inf``
  (domain-incremental streams see every class from the first task).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clx.methods.base import StreamSpec

NEG_INF = -1e30  # finite so that argmax/softmax stay NaN-free under masking


def default_mode(spec: StreamSpec) -> str:
  return "shared" if spec.scenario == "domain" else "per_task"


def init_linear(key: jax.Array, d_in: int, d_out: int) -> dict[str, jax.Array]:
  """PyTorch ``nn.Linear`` default init, U(±1/√d_in), kernel (d_in, d_out)."""
  bound = 1.0 / math.sqrt(d_in)
  kk, kb = jax.random.split(key)
  return {"kernel": jax.random.uniform(kk, (d_in, d_out), jnp.float32, -bound, bound),
          "bias": jax.random.uniform(kb, (d_out,), jnp.float32, -bound, bound)}


def linear(head: dict[str, jax.Array], feats: jax.Array) -> jax.Array:
  out = feats @ head["kernel"].astype(feats.dtype)
  if "bias" in head:
    out = out + head["bias"].astype(feats.dtype)
  return out


def init_heads(key: jax.Array, spec: StreamSpec, feature_dim: int, mode: str) -> dict:
  """Initial ``{"heads": ...}`` entries (empty for per-task heads)."""
  if mode == "shared":
    return {"shared": init_linear(key, feature_dim, spec.num_classes)}
  if mode == "per_task":
    return {}
  raise ValueError(f"unknown head mode {mode!r}; expected 'per_task' or 'shared'")


def add_task_head(heads: dict, key: jax.Array, spec: StreamSpec, feature_dim: int,
                  task_index: int, mode: str) -> dict:
  """Heads after adding task ``task_index``'s head (no-op for shared heads)."""
  if mode != "per_task" or str(task_index) in heads:
    return heads
  n = len(spec.task_classes[task_index])
  return {**heads, str(task_index): init_linear(jax.random.fold_in(key, task_index), feature_dim, n)}


def _seen_class_mask(spec: StreamSpec, upto: int) -> np.ndarray:
  mask = np.zeros(spec.num_classes, bool)
  for classes in spec.task_classes[:upto + 1]:
    mask[list(classes)] = True
  return mask


def train_logits_and_labels(heads: dict, feats: jax.Array, y: jax.Array, spec: StreamSpec,
                            task_index: int, mode: str, *, cumulative: bool = False):
  """Logits and integer labels for the training loss of task ``task_index``.

  Per-task mode returns the current head's logits and local labels; shared mode
  returns global logits (classes not seen up to this task masked) and ``y``.
  ``cumulative`` (joint training over all tasks so far) requires shared heads.
  """
  if mode == "per_task":
    if cumulative:
      raise ValueError("cumulative (joint) training needs head mode 'shared'")
    return linear(heads[str(task_index)], feats), train_labels(y, spec, task_index, mode)
  seen = jnp.asarray(_seen_class_mask(spec, task_index))
  return jnp.where(seen, linear(heads["shared"], feats), NEG_INF), y


def train_labels(y: jax.Array, spec: StreamSpec, task_index: int, mode: str) -> jax.Array:
  """The training targets of :func:`train_logits_and_labels` for labels ``y``."""
  if mode == "per_task":
    return jnp.searchsorted(jnp.asarray(spec.task_classes[task_index]), y)
  return y


def global_logits(heads: dict, feats: jax.Array, spec: StreamSpec, mode: str,
                  seen_upto: int) -> jax.Array:
  """``(n, num_classes)`` logits over the global label space for prediction."""
  n = feats.shape[0]
  if mode == "shared":
    seen = jnp.asarray(_seen_class_mask(spec, seen_upto))
    return jnp.where(seen, linear(heads["shared"], feats), NEG_INF)
  out = jnp.full((n, spec.num_classes), NEG_INF, feats.dtype)
  for t in range(seen_upto + 1):
    out = out.at[:, jnp.asarray(spec.task_classes[t])].set(linear(heads[str(t)], feats))
  return out


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean cross-entropy over examples with ``mask == 1`` (padding has mask 0)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  mask = mask.astype(jnp.float32)
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  hits = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.sum(hits * mask) / jnp.maximum(jnp.sum(mask), 1.0)
