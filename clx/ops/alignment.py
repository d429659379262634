"""Classifier alignment (CA) with class-wise Gaussian feature statistics.

The official InfLoRA+CA code (``liangyanshuo/InfLoRA`` ``methods/inflora_ca.py`` and
``inflora_ca1.py``, ``_compute_class_mean`` and ``_stage2_compact_classifier``;
the scheme of SLCA) retrains the concatenated per-task heads after every task
t ≥ 1 on synthetic features, so that heads trained in isolation (local
cross-entropy) compete fairly at class-incremental inference:

1. Statistics, once per class, right after its task is learnt, from the final
   features f (n_c, d) of the class's training images:

       μ_c = mean(f),   Σ_c = (f − μ_c)ᵀ (f − μ_c) / (n_c − 1) + ridge·I   (ridge 1e-4)

   (``torch.cov``, unbiased; old classes keep the statistics of their own task).
2. Every alignment epoch e = 0..E−1 draws ``per_class`` (256) features per seen
   class c from N(s_c μ_c, Σ_c) with the mean shrunk by task age,

       s_c = 0.9 + 0.1·(task(c) + 1)/(t + 1)          (1 for the current task),

   shuffles all C·per_class of them and takes C batches of ``per_class``.
3. Each batch: logits z = f W + b of all seen heads (concatenated), optionally
   normalised per task (``logit_norm`` τ = 0.1)::

       n_k = ‖z[:, task k's classes]‖₂ + 1e-7,   n̄ = mean_k n_k,   z ← z / n̄ / τ

   and one SGD step on the cross-entropy over the heads' kernels and biases:
   PyTorch SGD with momentum 0.9, weight decay 5e-4 (added to the gradient)
   and a per-epoch cosine learning rate lr_e = lr·(1 + cos(π e / E))/2,
   lr = 0.01, E = 5.

Pure, jit-able functions (``per_class``, ``epochs``, ``task_sizes`` static).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from clx.ops import _checks

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST
OFFICIAL_RIDGE = 1e-4
LOGIT_NORM_EPS = 1e-7


def class_statistics(features: Array, labels: Array, num_classes: int, *,
                     ridge: float = OFFICIAL_RIDGE) -> tuple[Array, Array]:
  """Per-class mean and unbiased covariance (+ ridge·I) of features.

  μ_c = (1/n_c) Σ_{y_i=c} f_i,  Σ_c = Σ_{y_i=c} (f_i − μ_c)(f_i − μ_c)ᵀ / (n_c − 1) + ridge·I.

  Args:
    features: f (n, d), float.
    labels: (n,) int, class index in [0, num_classes).
    num_classes: C (static).
    ridge: added to every covariance's diagonal (official 1e-4 for new classes).

  Returns:
    ``(means (C, d), covs (C, d, d))`` in the features' float dtype (≥ float32).
    A class with fewer than 2 examples has no covariance (NaN); the concrete
    path raises instead.
  """
  _checks.check_ndim("features", features, 2)
  _checks.check_ndim("labels", labels, 1)
  if np.shape(labels)[0] != np.shape(features)[0]:
    raise ValueError(f"labels has {np.shape(labels)[0]} entries for {np.shape(features)[0]} "
                     "feature rows")
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  if _checks.is_concrete(labels):
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    if len(counts) > num_classes or np.any(np.asarray(labels) < 0):
      raise ValueError(f"labels must lie in [0, {num_classes}), got {np.unique(labels)}")
    if np.any(counts < 2):
      raise ValueError(f"class_statistics needs >= 2 examples per class; classes "
                       f"{np.flatnonzero(counts < 2).tolist()} have {counts[counts < 2].tolist()}")
  return _class_statistics(features, labels, int(num_classes), float(ridge))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _class_statistics(features: Array, labels: Array, num_classes: int,
                      ridge: float) -> tuple[Array, Array]:
  """Jitted core of :func:`class_statistics`."""
  dtype = jnp.promote_types(features.dtype, jnp.float32)
  f = features.astype(dtype)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=dtype)            # (n, C)
  counts = jnp.sum(onehot, axis=0)                                     # (C,)
  means = jnp.matmul(onehot.T, f, precision=_HIGHEST) / counts[:, None]
  centered = f - means[labels]                                         # (n, d)
  scatter = jnp.einsum("nc,nd,ne->cde", onehot, centered, centered, precision=_HIGHEST)
  eye = jnp.eye(f.shape[1], dtype=dtype)
  covs = scatter / (counts - 1.0)[:, None, None] + ridge * eye
  d = f.shape[1]
  chex.assert_shape([means, covs], [(num_classes, d), (num_classes, d, d)])
  return means, covs


def mean_scales(class_task: Sequence[int], current_task: int) -> np.ndarray:
  """The official shrink factor of each class's mean, 0.9 + 0.1·(task + 1)/(t + 1).

  Args:
    class_task: (C,) the task index of each seen class, in logit order.
    current_task: t, the task just learnt.

  Returns:
    (C,) float32 factors (1 for the current task's classes).
  """
  class_task = np.asarray(class_task)
  if np.any(class_task < 0) or np.any(class_task > current_task):
    raise ValueError(f"class tasks must lie in [0, {current_task}], got {np.unique(class_task)}")
  return (0.9 + 0.1 * (class_task + 1) / (current_task + 1)).astype(np.float32)


def sample_features(key: Array, means: Array, covs: Array, per_class: int) -> tuple[Array, Array]:
  """``per_class`` draws from N(μ_c, Σ_c) for every class, class-major.

  x = μ_c + L_c z with L_c = cholesky(Σ_c) and z ~ N(0, I) from
  ``jax.random.normal(key, (C, per_class, d))`` (PyTorch's MultivariateNormal
  draws the same way: loc + scale_tril @ eps).

  Args:
    key: PRNG key.
    means: (C, d).
    covs: (C, d, d), symmetric positive definite.
    per_class: draws per class (static).

  Returns:
    ``(features (C·per_class, d), labels (C·per_class,) int32)``, class c's
    draws at rows [c·per_class, (c+1)·per_class). A covariance that is not
    positive definite gives NaN rows (check with ``jnp.isfinite``).
  """
  _checks.check_ndim("means", means, 2)
  _checks.check_ndim("covs", covs, 3)
  c, d = np.shape(means)
  if np.shape(covs) != (c, d, d):
    raise ValueError(f"covs must have shape {(c, d, d)}, got {np.shape(covs)}")
  if not isinstance(per_class, (int, np.integer)) or per_class < 1:
    raise ValueError(f"per_class must be a positive int, got {per_class!r}")
  return _sample(key, means, covs, int(per_class))


@functools.partial(jax.jit, static_argnums=3)
def _sample(key: Array, means: Array, covs: Array, per_class: int) -> tuple[Array, Array]:
  """Jitted core of :func:`sample_features`."""
  c, d = means.shape
  chol = jnp.linalg.cholesky(covs)
  z = jax.random.normal(key, (c, per_class, d), means.dtype)
  x = means[:, None, :] + jnp.einsum("cij,cnj->cni", chol, z, precision=_HIGHEST)
  labels = jnp.repeat(jnp.arange(c, dtype=jnp.int32), per_class)
  return x.reshape(c * per_class, d), labels


def task_normalized_logits(logits: Array, task_sizes: Sequence[int], temperature: float) -> Array:
  """z / n̄ / τ with n̄ the mean over tasks of each task's logit-slice L2 norm (+1e-7).

  Args:
    logits: (B, C) over the concatenated heads.
    task_sizes: classes per task, in logit order; Σ = C (static).
    temperature: τ (official 0.1).

  Returns:
    (B, C) normalised logits.
  """
  chex.assert_rank(logits, 2)
  bounds = np.cumsum((0, *task_sizes))
  if bounds[-1] != logits.shape[-1]:
    raise ValueError(f"task_sizes sum to {bounds[-1]}, logits have {logits.shape[-1]} classes")
  norms = [jnp.linalg.norm(logits[:, a:b], axis=-1, keepdims=True) + LOGIT_NORM_EPS
           for a, b in zip(bounds[:-1], bounds[1:])]
  mean_norm = jnp.mean(jnp.concatenate(norms, axis=-1), axis=-1, keepdims=True)
  return logits / mean_norm / temperature


def cosine_epoch_lr(learning_rate: float, epoch: Any, epochs: int) -> Array:
  """PyTorch ``CosineAnnealingLR(T_max=epochs)`` stepped per epoch: lr·(1 + cos(π e/E))/2.

  Args:
    learning_rate: lr, the rate at epoch 0.
    epoch: e, an int or () int/float array (may be traced).
    epochs: E = ``T_max`` (> 0).

  Returns:
    lr_e = lr · (1 + cos(π e / E)) / 2, a () float array (or float).
  """
  return learning_rate * (1.0 + jnp.cos(jnp.pi * epoch / epochs)) / 2.0


def epoch_draws(key: Array, epoch: Any, num_classes: int, per_class: int, dim: int,
                dtype: Any = jnp.float32) -> tuple[Array, Array]:
  """The random draws of one alignment epoch: z (C, per_class, d) and the shuffle.

  Args:
    key: the alignment's PRNG key; epoch e draws from ``fold_in(key, e)``.
    epoch: e (int, may be traced).
    num_classes: C.
    per_class: draws per class.
    dim: feature dim d.
    dtype: dtype of z.

  Returns:
    ``(z, perm)``: z feeds :func:`sample_features`' formula, perm (C·per_class,)
    orders the epoch's samples before batching.
  """
  k_sample, k_perm = jax.random.split(jax.random.fold_in(key, epoch))
  z = jax.random.normal(k_sample, (num_classes, per_class, dim), dtype)
  return z, jax.random.permutation(k_perm, num_classes * per_class)


def align_classifier(heads: Sequence[dict], key: Array, means: Array, covs: Array,
                     mean_scale: Array, *, per_class: int = 256, epochs: int = 5,
                     learning_rate: float = 0.01, momentum: float = 0.9,
                     weight_decay: float = 5e-4, logit_norm: float | None = 0.1
                     ) -> tuple[dict[str, Array], ...]:
  """Retrain the concatenated per-task heads on Gaussian-sampled features.

  Args:
    heads: one ``{"kernel": (d, n_k), "bias": (n_k,)}`` per seen task, in logit
      order (task 0 first); ``Σ n_k = C``.
    key: PRNG key (draws per epoch from :func:`epoch_draws`).
    means: (C, d) class means in logit order.
    covs: (C, d, d) class covariances (positive definite).
    mean_scale: (C,) factor on each mean (:func:`mean_scales`).
    per_class: samples per class per epoch, also the batch size (official 256).
    epochs: E (official 5).
    learning_rate: SGD lr at epoch 0 (official 0.01), cosine-annealed per epoch.
    momentum: SGD momentum (official 0.9; PyTorch form buf ← m·buf + g).
    weight_decay: L2 added to the gradient (official 5e-4), kernels and biases.
    logit_norm: τ of :func:`task_normalized_logits`, or None for plain logits
      (the official InfLoRA_CA on CIFAR-100; InfLoRA_CA1 and ImageNet-R use 0.1).

  Returns:
    The aligned heads, same structure. Each epoch runs C steps of ``per_class``
    samples. jit-able.
  """
  heads = tuple({"kernel": jnp.asarray(h["kernel"]), "bias": jnp.asarray(h["bias"])}
                for h in heads)
  if not heads:
    raise ValueError("align_classifier needs at least one head")
  sizes = tuple(int(h["kernel"].shape[1]) for h in heads)
  c, d = np.shape(means)
  if sum(sizes) != c:
    raise ValueError(f"the heads cover {sum(sizes)} classes, means has {c}")
  if any(h["kernel"].shape[0] != d for h in heads):
    raise ValueError(f"head kernels must have {d} input rows, got "
                     f"{[tuple(h['kernel'].shape) for h in heads]}")
  if np.shape(covs) != (c, d, d) or np.shape(mean_scale) != (c,):
    raise ValueError(f"covs must be {(c, d, d)} and mean_scale {(c,)}, got "
                     f"{np.shape(covs)} and {np.shape(mean_scale)}")
  if not isinstance(epochs, (int, np.integer)) or epochs < 0:
    raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
  if not isinstance(per_class, (int, np.integer)) or per_class < 1:
    raise ValueError(f"per_class must be a positive int, got {per_class!r}")
  if logit_norm is not None and not logit_norm > 0:
    raise ValueError(f"logit_norm must be > 0 or None, got {logit_norm}")
  if epochs == 0:
    return heads
  return _align(heads, key, jnp.asarray(means), jnp.asarray(covs), jnp.asarray(mean_scale),
                sizes, int(per_class), int(epochs), float(learning_rate), float(momentum),
                float(weight_decay), None if logit_norm is None else float(logit_norm))


@functools.partial(jax.jit, static_argnums=tuple(range(5, 12)))
def _align(heads: tuple[dict[str, Array], ...], key: Array, means: Array, covs: Array,
           mean_scale: Array, sizes: tuple[int, ...], per_class: int, epochs: int, lr: float,
           momentum: float, weight_decay: float, logit_norm: float | None
           ) -> tuple[dict[str, Array], ...]:
  """Jitted core of :func:`align_classifier` (sizes and hyper-parameters static)."""
  c, d = means.shape
  chex.assert_shape([covs, mean_scale], [(c, d, d), (c,)])
  chol = jnp.linalg.cholesky(covs.astype(jnp.float32))
  loc = (means * mean_scale[:, None]).astype(jnp.float32)
  labels_all = jnp.repeat(jnp.arange(c, dtype=jnp.int32), per_class)

  def loss_fn(params, x, y):
    logits = jnp.concatenate([jnp.matmul(x, h["kernel"], precision=_HIGHEST) + h["bias"]
                              for h in params], axis=-1)
    if logit_norm is not None:
      logits = task_normalized_logits(logits, sizes, logit_norm)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return jnp.mean(logz - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0])

  def epoch_body(carry, epoch):
    params, buf = carry
    z, perm = epoch_draws(key, epoch, c, per_class, d)
    x = loc[:, None, :] + jnp.einsum("cij,cnj->cni", chol, z, precision=_HIGHEST)
    x = x.reshape(c * per_class, d)[perm].reshape(c, per_class, d)
    y = labels_all[perm].reshape(c, per_class)
    step_lr = cosine_epoch_lr(lr, epoch, epochs)

    def step(carry, batch):
      params, buf = carry
      grads = jax.grad(loss_fn)(params, *batch)
      grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
      buf = jax.tree.map(lambda b, g: momentum * b + g, buf, grads)
      params = jax.tree.map(lambda p, b: p - step_lr * b, params, buf)
      return (params, buf), None

    return jax.lax.scan(step, (params, buf), (x, y))[0], None

  # PyTorch's first momentum step sets buf = g; starting from buf = 0 gives the same.
  buf = jax.tree.map(jnp.zeros_like, heads)
  (heads, _), _ = jax.lax.scan(epoch_body, (heads, buf), jnp.arange(epochs))
  return heads


__all__ = ["OFFICIAL_RIDGE", "align_classifier", "class_statistics", "cosine_epoch_lr",
           "epoch_draws", "mean_scales", "sample_features", "task_normalized_logits"]
