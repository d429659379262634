"""Pieces shared by the prompt-pool comparators (L2P, DualPrompt, CODA-Prompt).

All three keep the backbone frozen, compute a query from the frozen backbone's pooled
feature (the official code's ``cls_features`` / ``pre_logits``: a second, prompt-free
forward pass), prompt the backbone, and classify with ONE head over the global label
space whose training logits are restricted to the current task's classes
(L2P/DualPrompt ``train_mask``, ``train_continual.py`` l.272–284; CODA-Prompt masks the
earlier classes to −inf and drops the later ones, ``learners/prompt.py`` l.27–30: the
same set). At test time the classes seen so far compete.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods.base import ContinualMethod, Params, State, StreamSpec, TaskInfo, no_host_hook
from clx.models.base import Backbone

Array = jax.Array
Head = dict[str, Array]  # {"kernel": (d, C), "bias": (C,)}


def select_keys(keys: tuple[str, ...], state: State, info: TaskInfo) -> Params:
  """``trainable`` of a prompt method: the state entries ``keys`` (the same on every task).

  Args:
    keys: the state keys trained on every task.
    state: the method's state.
    info: the task being trained (unused: every task trains the same entries).

  Returns:
    ``{key: state[key]}`` for every key of ``keys``.
  """
  del info
  return {k: state[k] for k in keys}


def write_back(state: State, params: Params, info: TaskInfo) -> State:
  """``combine`` of a prompt method: the trained entries replace the state's.

  Args:
    state: the method's state.
    params: the trained entries (:func:`select_keys`'s keys).
    info: the task just trained (unused).

  Returns:
    ``state`` with the entries of ``params`` replaced.
  """
  del info
  return {**state, **params}


def num_layers(backbone: Backbone) -> int:
  """Transformer depth: the number of query kernels the backbone declares.

  Args:
    backbone: a transformer backbone declaring the ``"q"`` role.

  Returns:
    The number of blocks.
  """
  return len(backbone.site_paths("q"))


def check_layers(name: str, layers: Iterable[int], depth: int) -> tuple[int, ...]:
  """``layers`` as a tuple of distinct ints in ``[0, depth)``, or a clear error.

  Args:
    name: the option, for the message (``"dualprompt e_layers"``).
    layers: the layer indices given.
    depth: the backbone's number of blocks (:func:`num_layers`).

  Returns:
    The layers as a tuple of ints.

  Raises:
    ValueError: a repeated index or one outside ``[0, depth)``.
  """
  layers = tuple(int(i) for i in layers)
  if len(set(layers)) != len(layers) or any(not 0 <= i < depth for i in layers):
    raise ValueError(f"{name}: layers must be distinct ints in [0, {depth}) for this backbone, "
                     f"got {layers}")
  return layers


def check_head_init(name: str, kind: str) -> None:
  """Validates a ``head_init`` option (:func:`init_head`'s ``kind``).

  Args:
    name: the method, for the message.
    kind: the value given.

  Raises:
    ValueError: ``kind`` is not one of :data:`HEAD_INITS`.
  """
  if kind not in HEAD_INITS:
    raise ValueError(f"{name}: head_init must be one of {HEAD_INITS}, got {kind!r}")


def query(backbone: Backbone, base: Params, x: Array, mask: Array | None = None) -> Array:
  """The frozen, prompt-free pooled features used as the key-matching query.

  ``q = stop_gradient(f(x))``: the official code's ``cls_features`` / ``pre_logits`` (a
  second forward pass without prompts).

  Args:
    backbone: the frozen backbone.
    base: its parameters.
    x: ``(n, ...)`` inputs.
    mask: ``(n,)`` real-row mask of a padded batch, or ``None``.

  Returns:
    ``(n, d)`` float32 features, with no gradient.
  """
  return jax.lax.stop_gradient(backbone.apply(base, x, mask=mask)).astype(jnp.float32)


def after_query(base: Params, q: Array) -> tuple[Params, Array]:
  """``(base, q)`` unchanged, behind an optimisation barrier: the prompted pass that reads
  this ``base`` starts after the query pass that made ``q`` has finished.

  Why: the query pass and a prefix-tuned prompted pass (DualPrompt, CODA-Prompt: prompts
  only in the keys and values, so both passes have ``T`` tokens) run the same frozen
  layers at the same shapes, so XLA's common-subexpression elimination merges their
  parameter-only ops (the biases broadcast to ``(n, T, d_mlp)``, …) into one value per
  layer that the scheduler then keeps alive from the query pass to the prompted pass: on
  CPU, ViT-B/16 at 32 rows, 1.84 GiB of temporaries instead of 0.2 GiB (issue 13). Behind
  the barrier the two passes' ops take different operands, nothing is shared and the
  query pass's temporaries are dead before the prompted pass begins. The values are
  unchanged; the barrier only orders the computation. Used in ``predict`` only, so the
  training step's graph is the one it was (its memory was not measured with the barrier).

  Args:
    base: the frozen backbone parameters (any pytree).
    q: ``(n, d)`` the query features.

  Returns:
    ``(base, q)``, the same values.
  """
  return jax.lax.optimization_barrier((base, q))


def prompted_features(backbone: Backbone, base: Params, x: Array, *,
                      prefix: Array | None = None,
                      kv_prefix: dict[int, tuple[Array, Array]] | None = None) -> Array:
  """Pooled features of the frozen backbone with prompts.

  Args:
    backbone: the frozen backbone.
    base: its parameters.
    x: ``(n, ...)`` inputs.
    prefix: ``(n, p, d)`` prompt tokens added to the input tokens (prompt-tuning), or ``None``.
    kv_prefix: ``{layer: (key prompt (n, p, d), value prompt (n, p, d))}`` put in front of
      that layer's keys and values (prefix-tuning), or ``None``.

  Returns:
    ``(n, d)`` float32 features.
  """
  kwargs = {}
  if prefix is not None:
    kwargs["prefix"] = prefix
  if kv_prefix:
    kwargs["kv_prefix"] = kv_prefix
  return backbone.merge(base)(x, **kwargs).astype(jnp.float32)


def _zeros_head(key: Array, d: int, num_classes: int) -> Head:
  del key
  return {"kernel": jnp.zeros((d, num_classes)), "bias": jnp.zeros((num_classes,))}


def _simple_linear_head(key: Array, d: int, num_classes: int) -> Head:
  bound = float(np.sqrt(3.0 / d))  # kaiming-uniform bound with gain 1 ('linear')
  return {"kernel": jax.random.uniform(key, (d, num_classes), jnp.float32, -bound, bound),
          "bias": jnp.zeros((num_classes,), jnp.float32)}


_HEAD_INITIALIZERS = {"zeros": _zeros_head, "torch": heads_lib.init_linear,
                      "simple_linear": _simple_linear_head}
HEAD_INITS = tuple(_HEAD_INITIALIZERS)  # the ``head_init`` options


def init_head(key: Array, d: int, num_classes: int, kind: str) -> Head:
  """A ``(d, C)`` linear head: ``{"kernel" (d, C), "bias" (C,)}``.

  Args:
    key: PRNG key (unused by ``"zeros"``).
    d: feature dimension (the fan-in).
    num_classes: ``C``.
    kind: ``"zeros"`` (L2P/DualPrompt's ``kernel_init=zeros``, zero bias); ``"torch"``
      (``nn.Linear`` default, kernel and bias U(±1/√d), CODA-Prompt); ``"simple_linear"``
      (PILOT's ``SimpleLinear``, the head of SD-LoRA's ``IncrementalNet``:
      ``kaiming_uniform_(nonlinearity='linear')``, i.e. kernel U(±√(3/d)), bias 0;
      ``WuYichen-97/SD-Lora-CL`` ``backbone/linears.py`` l.27-29).

  Returns:
    The head's params.
  """
  check_head_init("head", kind)
  return _HEAD_INITIALIZERS[kind](key, d, num_classes)


def class_mask(spec: StreamSpec, tasks: Iterable[int]) -> np.ndarray:
  """The classes of some tasks as a mask over the global label space.

  Args:
    spec: the stream's spec.
    tasks: task indices.

  Returns:
    ``(C,)`` bool, True for the classes of ``tasks``.
  """
  mask = np.zeros(spec.num_classes, bool)
  for t in tasks:
    mask[list(spec.task_classes[t])] = True
  return mask


def current_task_loss(head: Head, feats: Array, y: Array, mask: Array, spec: StreamSpec,
                      task_index: int) -> tuple[Array, Array]:
  """Cross-entropy and accuracy of the global head with the logits outside task ``t`` at −∞.

  ``logits = where(c ∈ classes(t), feats W + b, −∞)`` (L2P/DualPrompt ``train_mask``,
  CODA-Prompt's masking of the earlier classes: the same set).

  Args:
    head: ``{"kernel": (d, C), "bias": (C,)}``.
    feats: ``(n, d)`` features.
    y: ``(n,)`` global labels.
    mask: ``(n,)`` 0/1 real-row weights.
    spec: the stream's spec.
    task_index: the task being trained.

  Returns:
    ``(cross-entropy, accuracy)``, scalars averaged over the real rows.
  """
  allowed = jnp.asarray(class_mask(spec, [task_index]))
  logits = jnp.where(allowed, heads_lib.linear(head, feats), heads_lib.NEG_INF)
  return (heads_lib.masked_cross_entropy(logits, y, mask),
          heads_lib.masked_accuracy(logits, y, mask))


def mask_unseen(logits: Array, spec: StreamSpec, current_task: int) -> Array:
  """Logits with the classes not seen up to ``current_task`` at −∞ (the test-time competition).

  Args:
    logits: ``(n, C)`` logits over the global label space.
    spec: the stream's spec.
    current_task: the last trained task.

  Returns:
    ``(n, C)``: ``where(c ∈ classes(0 … t), logits, −∞)``.
  """
  seen = jnp.asarray(class_mask(spec, range(current_task + 1)))
  return jnp.where(seen, logits, heads_lib.NEG_INF)


def seen_logits(head: Head, feats: Array, spec: StreamSpec, current_task: int) -> Array:
  """The global linear head's logits over the classes seen so far.

  Args:
    head: ``{"kernel": (d, C), "bias": (C,)}``.
    feats: ``(n, d)`` features.
    spec: the stream's spec.
    current_task: the last trained task.

  Returns:
    ``(n, C)`` logits ``feats W + b`` with the unseen classes at −∞ (:func:`mask_unseen`).
  """
  return mask_unseen(heads_lib.linear(head, feats), spec, current_task)


def uniform(key: Array, shape: Sequence[int], scale: float) -> Array:
  """``U[0, scale)`` float32 samples.

  flax ``initializers.uniform()`` (scale 1e-2, L2P/DualPrompt) or torch ``nn.init.uniform_``
  (scale 1, CODA-Prompt).

  Args:
    key: PRNG key.
    shape: output shape.
    scale: upper bound.

  Returns:
    An array of ``shape``.
  """
  return jax.random.uniform(key, shape, jnp.float32, 0.0, scale)


def prompt_method(name: str, cfg: Any, backbone: Backbone, *, init: Callable, loss: Callable,
                  predict: Callable, trained: tuple[str, ...], begin_task: Callable | None = None,
                  end_task: Callable | None = None,
                  diagnostics: Callable | None = None) -> ContinualMethod:
  """The protocol of a prompt method over a frozen backbone (L2P, DualPrompt, CODA-Prompt).

  Args:
    name: registry name.
    cfg: the method's frozen config, bound as the first argument of ``init``/``loss``/``predict``.
    backbone: the frozen backbone, bound as their second argument.
    init: module-level ``fn(cfg, backbone, rng, spec) -> state`` of the method.
    loss: module-level ``fn(cfg, backbone, params, state, base, batch, rng, info)``.
    predict: module-level ``fn(cfg, backbone, state, base, x, info, mask=None)``.
    trained: the state keys trained on every task (``trainable`` selects them, ``combine``
      writes them back).
    begin_task: host hook ``(state, ctx) -> state``; ``None`` leaves the state as is.
    end_task: host hook ``(state, ctx) -> state``; ``None`` leaves the state as is.
    diagnostics: optional ``state -> dict``.

  Returns:
    The :class:`ContinualMethod`.
  """
  bound = lambda fn: functools.partial(fn, cfg, backbone)
  return ContinualMethod(
      name=name, backbone=backbone, init=bound(init),
      begin_task=begin_task or no_host_hook,
      trainable=functools.partial(select_keys, trained), loss=bound(loss), combine=write_back,
      end_task=end_task or no_host_hook, predict=bound(predict), diagnostics=diagnostics)
