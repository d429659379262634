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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clx.methods.base import Params, State, StreamSpec, TaskInfo
from clx.models.base import Backbone

NEG_INF = -1e30  # finite so that argmax/softmax stay NaN-free under masking


def default_mode(spec: StreamSpec) -> str:
  """``"shared"`` for the domain-incremental scenario, ``"per_task"`` otherwise.

  Args:
    spec: the stream (its ``scenario``).

  Returns:
    ``"shared"`` or ``"per_task"``.
  """
  return "shared" if spec.scenario == "domain" else "per_task"


def init_linear(key: jax.Array, d_in: int, d_out: int) -> dict[str, jax.Array]:
  """PyTorch ``nn.Linear`` default init, U(±1/√d_in), kernel (d_in, d_out).

  Args:
    key: the initialisation key.
    d_in: input size.
    d_out: output size.

  Returns:
    ``{"kernel" (d_in, d_out), "bias" (d_out,)}`` float32.
  """
  bound = 1.0 / math.sqrt(d_in)
  kk, kb = jax.random.split(key)
  return {"kernel": jax.random.uniform(kk, (d_in, d_out), jnp.float32, -bound, bound),
          "bias": jax.random.uniform(kb, (d_out,), jnp.float32, -bound, bound)}


def linear(head: dict[str, jax.Array], feats: jax.Array) -> jax.Array:
  """``feats @ kernel (+ bias)``: (n, d_in) → (n, d_out), in the features' dtype.

  Args:
    head: ``{"kernel" (d_in, d_out)(, "bias" (d_out,))}``.
    feats: ``(n, d_in)`` features.

  Returns:
    ``(n, d_out)`` logits.
  """
  out = feats @ head["kernel"].astype(feats.dtype)
  if "bias" in head:
    out = out + head["bias"].astype(feats.dtype)
  return out


def init_heads(key: jax.Array, spec: StreamSpec, feature_dim: int, mode: str) -> dict:
  """Initial ``{"heads": ...}`` entries (empty for per-task heads).

  Args:
    key: the initialisation key.
    spec: the stream (``num_classes`` C for a shared head).
    feature_dim: d_in of the heads.
    mode: ``"shared"`` or ``"per_task"``.

  Returns:
    ``{"shared": head (d_in, C)}`` or ``{}``.

  Raises:
    ValueError: an unknown ``mode``.
  """
  if mode == "shared":
    return {"shared": init_linear(key, feature_dim, spec.num_classes)}
  if mode == "per_task":
    return {}
  raise ValueError(f"unknown head mode {mode!r}; expected 'per_task' or 'shared'")


def add_task_head(heads: dict, key: jax.Array, spec: StreamSpec, feature_dim: int,
                  task_index: int, mode: str) -> dict:
  """Heads after adding task ``task_index``'s head (no-op for shared heads).

  Args:
    heads: the current heads.
    key: a key; the head uses ``fold_in(key, task_index)``.
    spec: the stream (the task's class count).
    feature_dim: d_in of the head.
    task_index: the task whose head is added.
    mode: the head mode (nothing is added unless ``"per_task"``).

  Returns:
    ``heads`` plus ``str(task_index)``: head (d_in, classes of the task); ``heads`` itself when
    shared or already present.
  """
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
                            task_index: int, mode: str, *,
                            cumulative: bool = False) -> tuple[jax.Array, jax.Array]:
  """Logits and integer labels for the training loss of task ``task_index``.

  Per-task mode returns the current head's logits and local labels; shared mode
  returns global logits (classes not seen up to this task masked) and ``y``.
  ``cumulative`` (joint training over all tasks so far) requires shared heads.

  Args:
    heads: the heads (with the current one).
    feats: ``(n, d)`` features.
    y: ``(n,)`` int global labels.
    spec: the stream.
    task_index: the task being trained.
    mode: ``"per_task"`` or ``"shared"``.
    cumulative: joint training over every task so far.

  Returns:
    ``(logits, labels)``: per task ``(n, classes of the task)`` and local labels; shared
    ``(n, C)`` (unseen classes at ``NEG_INF``) and ``y``.

  Raises:
    ValueError: ``cumulative`` with per-task heads.
  """
  if mode == "per_task":
    if cumulative:
      raise ValueError("cumulative (joint) training needs head mode 'shared'")
    return linear(heads[str(task_index)], feats), train_labels(y, spec, task_index, mode)
  seen = jnp.asarray(_seen_class_mask(spec, task_index))
  return jnp.where(seen, linear(heads["shared"], feats), NEG_INF), y


def train_labels(y: jax.Array, spec: StreamSpec, task_index: int, mode: str) -> jax.Array:
  """The training targets of :func:`train_logits_and_labels` for labels ``y``.

  Args:
    y: ``(n,)`` int global labels of task ``task_index``.
    spec: the stream.
    task_index: the task being trained.
    mode: ``"per_task"`` (local index in the task's sorted classes) or ``"shared"`` (``y``).

  Returns:
    ``(n,)`` int labels.
  """
  if mode == "per_task":
    return jnp.searchsorted(jnp.asarray(spec.task_classes[task_index]), y)
  return y


def global_logits(heads: dict, feats: jax.Array, spec: StreamSpec, mode: str,
                  seen_upto: int) -> jax.Array:
  """``(n, num_classes)`` logits over the global label space for prediction.

  Args:
    heads: the heads.
    feats: ``(n, d)`` features.
    spec: the stream.
    mode: ``"per_task"`` or ``"shared"``.
    seen_upto: the last trained task; classes of later tasks stay at ``NEG_INF``.

  Returns:
    ``(n, C)`` logits (per-task heads write their task's classes).
  """
  n = feats.shape[0]
  if mode == "shared":
    seen = jnp.asarray(_seen_class_mask(spec, seen_upto))
    return jnp.where(seen, linear(heads["shared"], feats), NEG_INF)
  out = jnp.full((n, spec.num_classes), NEG_INF, feats.dtype)
  for t in range(seen_upto + 1):
    out = out.at[:, jnp.asarray(spec.task_classes[t])].set(linear(heads[str(t)], feats))
  return out


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean cross-entropy over examples with ``mask == 1`` (padding has mask 0).

  Args:
    logits: ``(n, C)``.
    labels: ``(n,)`` int targets.
    mask: ``(n,)`` 1 for real examples, 0 for padding.

  Returns:
    A float32 scalar (0 when the mask is all zero).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  mask = mask.astype(jnp.float32)
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Fraction of rows with ``mask == 1`` whose argmax logit is the label.

  Args:
    logits: ``(n, C)`` scores; a row's argmax is its prediction.
    labels: ``(n,)`` int true classes.
    mask: ``(n,)`` row weights: 1 for real examples, 0 for padding.

  Returns:
    A float32 scalar in [0, 1].
  """
  mask = mask.astype(jnp.float32)
  hits = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.sum(hits * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def check_mode(head_mode: str | None, who: str) -> None:
  """Build-time check of a ``head_mode`` argument (``None``, ``"shared"`` or ``"per_task"``).

  Args:
    head_mode: the value to check.
    who: the method, for the message.

  Raises:
    ValueError: any other value.
  """
  if head_mode not in (None, "shared", "per_task"):
    raise ValueError(f"{who}: head_mode must be None, 'shared' or 'per_task', got {head_mode!r}")


def mode_for(head_mode: str | None, spec: StreamSpec) -> str:
  """The head layout in use: ``head_mode``, or the scenario's default when it is ``None``.

  Args:
    head_mode: ``None``, ``"shared"`` or ``"per_task"``.
    spec: the stream.

  Returns:
    ``"shared"`` or ``"per_task"``.
  """
  return head_mode or default_mode(spec)


def head_key(heads: dict, task: int) -> str:
  """Key of the head trained on task ``task``: ``"shared"`` if heads are shared, else ``str(task)``.

  Args:
    heads: the heads.
    task: the task index.

  Returns:
    ``"shared"`` or ``str(task)``.
  """
  return "shared" if "shared" in heads else str(task)


def with_head(state: State, head: dict, task: int) -> State:
  """``state`` with the head of task ``task`` replaced by ``head`` (a pure write-back).

  Args:
    state: a method state with ``heads``.
    head: the new head.
    task: the task whose head is replaced.

  Returns:
    A new state.
  """
  return {**state, "heads": {**state["heads"], head_key(state["heads"], task): head}}


def classification_loss(backbone: Backbone,
                        params_for: Callable[[State, Any, TaskInfo], Params],
                        combine: Callable[[State, Params, TaskInfo], State], *,
                        head_mode: str | None = None, cumulative: bool = False,
                        forward_kwargs: Callable[[State, TaskInfo], dict] | None = None,
                        penalty: Callable[[Params], jax.Array] | None = None) -> Callable:
  """The default ``loss`` of a method: masked cross-entropy of the current head.

  ``loss(params, state, base, batch, rng, info)`` combines ``params`` into the
  state, runs ``backbone.apply(params_for(state, base, info), x, rng=rng,
  mask=mask, **forward_kwargs(state, info))`` and scores the head of task
  ``info.task`` (:func:`train_logits_and_labels`).

  Args:
    backbone: the backbone the method adapts.
    params_for: the method's effective backbone parameters.
    combine: the method's write-back of trained params (``params`` reach the
      forward only through it, so gradients flow to them).
    head_mode: ``"per_task"``/``"shared"``/``None`` (by scenario).
    cumulative: joint training over all tasks so far (needs shared heads).
    forward_kwargs: extra ``backbone.apply`` arguments from the state (e.g.
      GPM's ``grad_projection``).
    penalty: ``params -> scalar`` added to the loss (e.g. Adam-NSCL's L2 decay).

  Returns:
    ``loss(params, state, base, batch, rng, info) -> (scalar, {"accuracy"})``.
  """

  def loss(params, state, base, batch, rng, info: TaskInfo):
    state = combine(state, params, info)
    kwargs = forward_kwargs(state, info) if forward_kwargs is not None else {}
    # rng: dropout (models that have it); mask: padding rows out of batch statistics.
    feats = backbone.apply(params_for(state, base, info), batch["x"], rng=rng, mask=batch["mask"],
                           **kwargs)
    logits, labels = train_logits_and_labels(state["heads"], feats, batch["y"], info.spec,
                                             info.task, mode_for(head_mode, info.spec),
                                             cumulative=cumulative)
    value = masked_cross_entropy(logits, labels, batch["mask"])
    if penalty is not None:
      value = value + penalty(params)
    return value, {"accuracy": masked_accuracy(logits, labels, batch["mask"])}

  return loss


def classification_predict(backbone: Backbone,
                           params_for: Callable[[State, Any, TaskInfo], Params], *,
                           head_mode: str | None = None,
                           forward_kwargs: Callable[[State, TaskInfo], dict] | None = None
                           ) -> Callable:
  """The default ``predict``: every seen head over ``backbone(params_for(...))``.

  ``forward_kwargs`` (optional): extra ``backbone.apply`` arguments from the state,
  as in :func:`classification_loss` (e.g. factored LoRA ``adapters``).

  Args:
    backbone: the network.
    params_for: ``(state, base, info) -> params`` the backbone runs with.
    head_mode: ``None`` (scenario default), ``"shared"`` or ``"per_task"``.
    forward_kwargs: ``(state, info) -> dict`` extra ``backbone.apply`` arguments, or None.

  Returns:
    ``predict(state, base, x, info, mask=None) -> (n, num_classes)`` global logits
    (:func:`global_logits`; the loop masks task-IL logits to the task's classes,
    so ``info.task_id`` is not needed here).
  """

  def predict(state, base, x, info: TaskInfo, mask=None):
    # mask: padding rows of an evaluation batch stay out of the batch statistics.
    kwargs = forward_kwargs(state, info) if forward_kwargs is not None else {}
    feats = backbone.apply(params_for(state, base, info), x, mask=mask, **kwargs)
    return global_logits(state["heads"], feats, info.spec, mode_for(head_mode, info.spec),
                         info.task)

  return predict
