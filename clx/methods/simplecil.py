"""SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained models",
IJCV 2024), after ``zhoudw-zdw/RevisitingCIL`` ``models/simplecil.py``.

Nothing is trained: after each task the class means of the frozen backbone's features on
the task's training split (``replace_fc`` l.27–50, ``train_dataset_for_protonet`` with the
test-time transform) become the rows of a cosine classifier (``CosineLinear``; its σ is never
trained in SimpleCIL, so σ = 1 and only the cosine matters). Earlier classes' prototypes are
never touched. Prediction: ``cos(f, p_c)`` over the classes seen so far.

APER's first-session adaptation (adapter/SSF/VPT tuning on task 0, then the concatenation
of the frozen and the adapted features) is not implemented here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods import prompting
from clx.methods.base import ContinualMethod, StreamSpec, TaskInfo, no_host_hook
from clx.models.base import Backbone
from clx.ops import prototypes as proto_ops


@dataclasses.dataclass(frozen=True)
class SimpleCILConfig:
  """SimpleCIL's settings."""

  aux_batch_size: int = 128

  def __post_init__(self):
    if isinstance(self.aux_batch_size, bool) or self.aux_batch_size < 1:
      raise ValueError(f"simplecil: aux_batch_size must be a positive int, got {self.aux_batch_size!r}")


def init(cfg: SimpleCILConfig, backbone: Backbone, rng, spec: StreamSpec) -> dict:
  """``{"prototypes" (C, d)}`` (zero until a class is seen)."""
  del cfg, rng
  return {"prototypes": jnp.zeros((spec.num_classes, backbone.feature_dim), jnp.float32)}


def class_feature_sums(backbone: Backbone, ctx, num_classes: int, batch_size: int):
  """``(sums (C, d), counts (C,))`` of the frozen features over the task's training split."""
  step = jax.jit(lambda base, x, y, m: proto_ops.class_sums(
      prompting.query(backbone, base, x, m), y, num_classes, m))
  sums, counts = 0.0, 0.0
  for batch in ctx.batches("train", batch_size=batch_size):
    s, c = step(ctx.base, batch["x"], batch["y"], batch["mask"])
    sums, counts = sums + s, counts + c
  return sums, counts


def end_task(cfg: SimpleCILConfig, backbone: Backbone, state, ctx) -> dict:
  sums, counts = class_feature_sums(backbone, ctx, ctx.spec.num_classes, cfg.aux_batch_size)
  new = np.asarray(counts) > 0
  protos = jnp.where(jnp.asarray(new)[:, None], proto_ops.prototypes(sums, counts),
                     state["prototypes"])
  return {**state, "prototypes": protos}


def predict(cfg, backbone, state, base, x, info: TaskInfo, mask=None):
  del cfg
  logits = proto_ops.cosine_logits(prompting.query(backbone, base, x, mask), state["prototypes"])
  seen = prompting.class_mask(info.spec, range(info.task + 1))
  return jnp.where(jnp.asarray(seen), logits, heads_lib.NEG_INF)


def nothing_trained(state, info) -> dict:
  """``trainable`` of a method that trains nothing."""
  del state, info
  return {}


def no_loss(params, state, base, batch, rng, info):
  """Nothing to train: a zero loss on the empty parameter dict."""
  del params, state, base, rng, info
  return jnp.zeros(()), {"accuracy": jnp.zeros(()) * batch["mask"][0]}


def simplecil(backbone: Backbone, **kwargs) -> ContinualMethod:
  """SimpleCIL on a frozen ``backbone``; ``kwargs`` are :class:`SimpleCILConfig` fields."""
  cfg = SimpleCILConfig(**kwargs)
  bound = lambda fn: functools.partial(fn, cfg, backbone)
  return ContinualMethod(
      name="simplecil", backbone=backbone, init=bound(init), begin_task=no_host_hook,
      trainable=nothing_trained, loss=no_loss, combine=lambda state, params, info: state,
      end_task=bound(end_task), predict=bound(predict))


REGISTRY = {"simplecil": simplecil}
