"""The one protocol every continual method implements.

In the spirit of ``optax.GradientTransformation``, a method is a NamedTuple of
pure functions over an explicit state pytree. The state is a nested dict with
string keys whose leaves are arrays (heads, adapters, memory bases, Fisher,
signatures, …). It is the only thing a task checkpoint stores (as its delta
against the previous task); the frozen backbone is passed to the functions as
an argument (``base``) and never copied into the state.

The training loop drives a method like this, with no special case per method::

    state = method.init(rng, spec)
    for t, task in enumerate(stream):
      info = TaskInfo(t, spec)                            # static: the task and the stream
      state = method.begin_task(state, ctx)               # host: Gram passes, design, …
      params = method.trainable(state, info)              # what the optimiser updates
      params = ctx.fit(params, partial(method.loss, info=info), method.transform_grads)
      state = method.combine(state, params, info)         # pure write-back of the trained params
      state = method.end_task(state, ctx)                 # host: memory updates, merges
      logits = method.predict(state, base, x, TaskInfo(t, spec, task_id), mask=m)  # (n, C)

``loss``, ``transform_grads``, ``params_for`` and ``predict`` are traced under
``jax.jit`` (``info`` is static: a frozen, hashable :class:`TaskInfo`).
``begin_task``/``end_task`` run on the host and may call jitted passes over data
or even further training (``ctx.fit``), e.g. BECAME's unconstrained second stage;
``end_task`` reads the trained params back with ``trainable(state, ctx.info)``.
Methods that only change the backbone's parameters write ``params_for`` and get
``loss``/``predict`` from :func:`clx.methods.heads.classification_loss` /
:func:`clx.methods.heads.classification_predict`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
import optax

from clx.models.base import Backbone
from clx.ops import tree as tree_ops

State = dict[str, Any]
Params = Any
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """What a method may know about the stream up front (no data).

  Attributes:
    num_tasks: number of tasks T.
    num_classes: size of the global label space.
    scenario: ``"task"``, ``"class"`` or ``"domain"``.
    task_classes: per task, the sorted global class ids it contains.
    input_shape: shape of one input example.
  """

  num_tasks: int
  num_classes: int
  scenario: str
  task_classes: tuple[tuple[int, ...], ...]
  input_shape: tuple[int, ...]

  @classmethod
  def from_stream(cls, stream: Any) -> "StreamSpec":
    """The spec of a :class:`clx.data.types.Stream` (its tasks' classes, scenario, shapes).

    Args:
      stream: a :class:`clx.data.types.Stream` (``tasks`` with ``classes``, ``num_classes``,
        ``scenario``, ``input_shape``).

    Returns:
      The :class:`StreamSpec`; class ids as Python ints, no data read.
    """
    return cls(len(stream.tasks), stream.num_classes, stream.scenario,
               tuple(tuple(int(c) for c in t.classes) for t in stream.tasks),
               tuple(stream.input_shape))


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """The static facts a traced method function needs about "now" (hashable, jit-static).

  Attributes:
    task: the current task index: the task being trained (``trainable``, ``loss``,
      ``combine``) or the last trained task (``predict``).
    spec: the stream's :class:`StreamSpec`.
    task_id: in ``predict``, the test examples' task in the task-incremental
      scenario; ``None`` otherwise (and always ``None`` during training).
  """

  task: int
  spec: StreamSpec
  task_id: int | None = None

  def __post_init__(self):
    if isinstance(self.task, bool) or not isinstance(self.task, (int, np.integer)) or self.task < 0:
      raise ValueError(f"TaskInfo.task must be an integer >= 0, got {self.task!r}")
    if self.task_id is not None and (isinstance(self.task_id, bool)
                                     or not isinstance(self.task_id, (int, np.integer))
                                     or not 0 <= self.task_id <= self.task):
      raise ValueError(f"TaskInfo.task_id must be None or an integer in [0, task={self.task}], "
                       f"got {self.task_id!r}")
    object.__setattr__(self, "task", int(self.task))
    if self.task_id is not None:
      object.__setattr__(self, "task_id", int(self.task_id))


class TaskContext(Protocol):
  """What the loop gives ``begin_task``/``end_task`` (host side)."""

  task_index: int
  spec: StreamSpec
  info: TaskInfo  # TaskInfo(task_index, spec)
  rng: jax.Array
  base: Any  # the frozen backbone params, placed on the mesh

  def batches(self, split: str = "train", *, batch_size: int | None = None,
              shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
    """Sharded device batches ``{"x", "y", "mask"}`` of the current task, in order; the
    last one is padded: pass ``mask`` to ``backbone.apply`` and weight sums by it
    (:mod:`clx.methods.passes`).

    Args:
      split: ``"train"`` or an evaluation split of the current task.
      batch_size: examples per batch (default: the run's training batch size).
      shuffle: shuffle the examples (with ``seed``) instead of keeping their order.
      seed: shuffling seed.

    Yields:
      ``{"x" (b, …), "y" (b,) global labels, "mask" (b,) 1 for real examples}`` device arrays.
    """

  def sample(self, n: int, *, split: str = "train", seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random training examples of the current task (host arrays).

    Args:
      n: number of examples (at most the split's size).
      split: the split to sample from.
      seed: sampling seed.

    Returns:
      ``{"x" (n, …), "y" (n,)}`` NumPy arrays.
    """

  def arrays(self, split: str = "train") -> dict[str, np.ndarray]:
    """All examples of a split of the current task (host arrays ``x``, ``y``).

    Args:
      split: ``"train"`` or an evaluation split.

    Returns:
      ``{"x" (N, …), "y" (N,)}`` NumPy arrays.
    """

  config: Any  # the run's clx.train.TrainConfig for this task's main phase

  def fit(self, params: Params, loss: Callable, *, transform_grads: Callable | None = None,
          transform_updates: Callable | None = None, state: State | None = None, optimizer: optax.GradientTransformation | None = None,
          epochs: int | None = None, config: Any = None, title: str | None = None,
          phase: int = 1) -> Params:
    """Train ``params`` on the current task with the loop's sharded, jitted step.

    ``loss(params, state, base, batch, rng) -> (loss, aux)``; ``config`` (a
    TrainConfig) replaces the run's settings; ``phase`` seeds the shuffling
    so that extra phases (e.g. BECAME's stage 2) draw their own batch order.

    Args:
      params: the trainable parameters to start from.
      loss: ``(params, state, base, batch, rng) -> (loss, aux)``.
      transform_grads: ``(grads, state) -> grads`` applied before the optimiser, or None.
      transform_updates: ``(updates, state) -> updates`` applied after it, or None.
      state: the method state passed to ``loss`` and the transforms.
      optimizer: an optax transformation replacing the run's optimiser, or None.
      epochs: epochs to train (default: the run's).
      config: a :class:`clx.train.TrainConfig` replacing the run's settings, or None.
      title: progress-bar title.
      phase: seeds the shuffling of this training phase.

    Returns:
      The trained parameters (same tree as ``params``).
    """


def site_key(site: Any) -> str:
  """Deprecated alias of :func:`clx.ops.tree.to_key` (the one string form of a site).

  Args:
    site: a site path (``/`` string or tuple of keys).

  Returns:
    Its key string (``/`` escaped as ``.``).
  """
  return tree_ops.to_key(site)


def get_path(tree: Any, path: Any) -> Any:
  """Deprecated alias of :func:`clx.ops.tree.get`.

  Args:
    tree: a nested dict.
    path: a ``/`` path or tuple of keys.

  Returns:
    The leaf or subtree at ``path``.

  Raises:
    KeyError: the path is not in ``tree``.
  """
  return tree_ops.get(tree, path)


def check_positive_int(value: Any, name: str) -> int:
  """``value`` as an int when it is a positive integer (not a bool).

  Args:
    value: the value to check.
    name: the option's name, for the message.

  Returns:
    ``int(value)``.

  Raises:
    ValueError: ``value`` is a bool, not an integer, or < 1.
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def renamed(kwargs: dict[str, Any], names: dict[str, str], who: str) -> dict[str, Any]:
  """``kwargs`` with deprecated keyword names replaced by their new names (one release).

  Args:
    kwargs: the keyword arguments a factory received.
    names: ``{old name: new name}``.
    who: the method, for the messages.

  Returns:
    A new dict; a :class:`DeprecationWarning` is issued for every old name used.

  Raises:
    TypeError: both the old and the new name were given.
  """
  out = dict(kwargs)
  for old, new in names.items():
    if old in out:
      if new in out:
        raise TypeError(f"{who}: got both {old!r} and its new name {new!r}; pass only {new!r}")
      warnings.warn(f"{who}: {old!r} is renamed {new!r}; the old name goes away in the next "
                    "release", DeprecationWarning, stacklevel=3)
      out[new] = out.pop(old)
  return out


def identity_grads(grads: Params, state: State) -> Params:
  """``transform_grads`` of methods that do not touch gradients.

  Args:
    grads: the gradients of the trainable parameters.
    state: the method state (unused).

  Returns:
    ``grads`` unchanged.
  """
  del state
  return grads


def no_host_hook(state: State, ctx: TaskContext) -> State:
  """``begin_task``/``end_task`` of methods with nothing to do on the host.

  Args:
    state: the method state.
    ctx: the loop's task context (unused).

  Returns:
    ``state`` unchanged.
  """
  del ctx
  return state


class ContinualMethod(NamedTuple):
  """A continual-learning method as pure functions over an explicit state.

  Attributes:
    name: registry name, also the run's subfolder.
    backbone: the frozen backbone (graphdef + base params) it adapts.
    init: ``(rng, spec) -> state``.
    begin_task: ``(state, ctx) -> state`` (host).
    trainable: ``(state, info) -> params`` to optimise on task ``info.task``.
    loss: ``(params, state, base, batch, rng, info) -> (loss, aux)``; ``batch`` has
      ``x``, global labels ``y`` and a 0/1 ``mask`` (padding); ``info`` is static.
    combine: ``(state, params, info) -> state``: the pure write-back of trained
      params into the state (run by the loop after training, before ``end_task``).
    end_task: ``(state, ctx) -> state`` (host): post-task work (memory updates,
      merges, signatures) on the combined state; the trained params are
      ``trainable(state, ctx.info)``.
    predict: ``(state, base, x, info, mask=None) -> logits (n, C)`` over the
      global label space of ``C`` classes; classes not available are at a large
      negative value. ``info.task`` is the last trained task; ``info.task_id``
      is the test examples' task in the task-incremental scenario and ``None``
      otherwise. ``mask`` (n,) marks the real rows of a padded evaluation batch
      and must reach ``backbone.apply(..., mask=mask)`` so batch-statistic
      layers ignore the padding (:mod:`clx.methods.passes`); the loop refuses a
      ``predict`` without it on such a backbone.
    params_for: ``(state, base, info) -> backbone params``: the effective
      backbone parameters for task ``info.task`` (jittable, public), or ``None``
      for methods whose forward is not one backbone parameter set (per-example
      task routing, soft prompts).
    transform_grads: ``(grads, state) -> grads`` (e.g. gradient projection).
    data_view: ``"current"`` (train on the current task) or ``"cumulative"``
      (all tasks so far: the joint upper bound).
    diagnostics: optional ``state -> dict`` of JSON-able numbers worth
      reporting (memory ranks, merge coefficients, …); stored in metrics.json.
    transform_updates: optional ``(updates, state) -> updates`` applied to the
      optimiser's updates before they are added to the params (e.g. Adam-NSCL's
      null-space projection of the Adam step, per-group learning rates).
    lr_schedule: optional ``train_config -> schedule factory | None``: the
      learning-rate schedule the method trains with, given a phase's
      ``clx.train.TrainConfig``; the factory maps ``steps_per_epoch`` to a
      float or an optax schedule ``step -> lr`` (e.g. InfLoRA's per-epoch
      cosine, :func:`clx.ops.schedules.epoch_cosine`). The loop uses it
      instead of ``TrainConfig.schedule`` for every phase it builds the
      optimiser of; ``None`` (or a ``None`` result) keeps ``TrainConfig.schedule``.
  """

  name: str
  backbone: Backbone
  init: Callable[[jax.Array, StreamSpec], State]
  begin_task: Callable[[State, TaskContext], State]
  trainable: Callable[[State, TaskInfo], Params]
  loss: Callable[..., tuple[jax.Array, dict]]
  combine: Callable[[State, Params, TaskInfo], State]
  end_task: Callable[[State, TaskContext], State]
  predict: Callable[..., jax.Array]
  params_for: Callable[[State, Any, TaskInfo], Params] | None = None
  transform_grads: Callable[[Params, State], Params] = identity_grads
  data_view: str = "current"
  diagnostics: Callable[[State], dict] | None = None
  transform_updates: Callable[[Params, State], Params] | None = None
  lr_schedule: Callable[[Any], Callable[[int], Any] | None] | None = None


def to_host(x: Any) -> np.ndarray:
  """A (possibly multi-host sharded) array as one NumPy array on every process.

  ``jax.device_get`` needs every shard on this process; on multi-host runs a
  data-sharded batch from ``ctx.batches`` is gathered with
  ``multihost_utils.process_allgather``.

  Args:
    x: a jax array (sharded or not) or array-like.

  Returns:
    The full array as NumPy.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
