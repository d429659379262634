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

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
import functools
from collections.abc import Callable

from clx.methods.base import ContinualMethod, StreamSpec, no_host_hook
from clx.models.base import Backbone

Array = jax.Array


def select_keys(keys: tuple[str, ...], state, info) -> dict:
  """``trainable``: the state entries ``keys`` (the same on every task)."""
  del info
  return {k: state[k] for k in keys}


def write_back(state, params, info) -> dict:
  """``combine``: the trained entries replace the state's."""
  del info
  return {**state, **params}


def num_layers(backbone: Backbone) -> int:
  """Transformer depth: the number of query kernels the backbone declares."""
  return len(backbone.site_paths("q"))


def check_layers(name: str, layers, depth: int) -> tuple[int, ...]:
  """``layers`` as a tuple of distinct ints in ``[0, depth)``, or a clear error."""
  layers = tuple(int(i) for i in layers)
  if len(set(layers)) != len(layers) or any(not 0 <= i < depth for i in layers):
    raise ValueError(f"{name}: layers must be distinct ints in [0, {depth}) for this backbone, "
                     f"got {layers}")
  return layers


def query(backbone: Backbone, base, x: Array, mask: Array | None = None) -> Array:
  """The frozen, prompt-free pooled features ``(n, d)`` used as the key-matching query."""
  return jax.lax.stop_gradient(backbone.apply(base, x, mask=mask)).astype(jnp.float32)


def after_query(base, q: Array):
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


def prompted_features(backbone: Backbone, base, x: Array, *, prefix=None,
                      kv_prefix=None) -> Array:
  """Pooled features ``(n, d)`` with prompt tokens (``prefix``) and/or prefix-tuning prompts
  (``kv_prefix`` ``{layer: (key prompt, value prompt)}``) on the frozen backbone."""
  kwargs = {}
  if prefix is not None:
    kwargs["prefix"] = prefix
  if kv_prefix:
    kwargs["kv_prefix"] = kv_prefix
  return backbone.merge(base)(x, **kwargs).astype(jnp.float32)


HEAD_INITS = ("zeros", "torch", "simple_linear")


def init_head(key: Array, d: int, num_classes: int, kind: str) -> dict[str, Array]:
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
  if kind == "zeros":
    return {"kernel": jnp.zeros((d, num_classes)), "bias": jnp.zeros((num_classes,))}
  if kind == "torch":
    return heads_lib.init_linear(key, d, num_classes)
  if kind == "simple_linear":
    bound = float(np.sqrt(3.0 / d))  # kaiming-uniform bound with gain 1 ('linear')
    return {"kernel": jax.random.uniform(key, (d, num_classes), jnp.float32, -bound, bound),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  raise ValueError(f"head_init must be one of {HEAD_INITS}, got {kind!r}")


def class_mask(spec: StreamSpec, tasks) -> np.ndarray:
  """``(C,)`` bool: the classes of ``tasks``."""
  mask = np.zeros(spec.num_classes, bool)
  for t in tasks:
    mask[list(spec.task_classes[t])] = True
  return mask


def current_task_loss(head: dict, feats: Array, y: Array, mask: Array, spec: StreamSpec,
                      task_index: int) -> tuple[Array, Array]:
  """Cross-entropy and accuracy of the global head with logits outside task ``t`` at −∞."""
  allowed = jnp.asarray(class_mask(spec, [task_index]))
  logits = jnp.where(allowed, heads_lib.linear(head, feats), heads_lib.NEG_INF)
  return (heads_lib.masked_cross_entropy(logits, y, mask),
          heads_lib.masked_accuracy(logits, y, mask))


def seen_logits(head: dict, feats: Array, spec: StreamSpec, current_task: int) -> Array:
  """``(n, C)`` logits with classes not seen up to ``current_task`` at −∞."""
  seen = jnp.asarray(class_mask(spec, range(current_task + 1)))
  return jnp.where(seen, heads_lib.linear(head, feats), heads_lib.NEG_INF)


def uniform(key: Array, shape, scale: float) -> Array:
  """U[0, scale): flax ``initializers.uniform()`` (scale 1e-2, L2P/DualPrompt) or torch
  ``nn.init.uniform_`` (scale 1, CODA-Prompt)."""
  return jax.random.uniform(key, shape, jnp.float32, 0.0, scale)


def retrieval_accuracy(retrieved: Array, task_index: int) -> float:
  """Share of rows whose retrieved task is ``task_index``."""
  return float(np.mean(np.asarray(retrieved) == task_index))


def prompt_method(name: str, cfg, backbone: Backbone, *, init: Callable, loss: Callable,
                  predict: Callable, trained: tuple[str, ...], begin_task: Callable | None = None,
                  end_task: Callable | None = None,
                  diagnostics: Callable | None = None) -> ContinualMethod:
  """The protocol of a prompt method over a frozen backbone (L2P, DualPrompt, CODA-Prompt).

  Args:
    name: registry name.
    cfg: the method's frozen config, bound as the first argument of ``init``/``loss``/``predict``.
    backbone: the frozen backbone, bound as their second argument.
    init, loss, predict: module-level ``fn(cfg, backbone, ...)`` of the method.
    trained: the state keys trained on every task (``trainable`` selects them, ``combine``
      writes them back).
    begin_task, end_task: host hooks ``(state, ctx) -> state``; ``None`` leaves the state as is.
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
