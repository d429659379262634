"""Class-prototype classifier of SimpleCIL / APER (Zhou et al., 2023) and RanPAC's ``M = 0`` branch.

After ``zhoudw-zdw/RevisitingCIL`` (``models/simplecil.py`` ``replace_fc``: the class mean of
the frozen features of the training split, loaded with the test-time transform) and its
``CosineLinear`` (``F.linear(F.normalize(x), F.normalize(w))``, times a learnable σ that
SimpleCIL never trains, so σ = 1): a feature is classified by its cosine similarity to each
class prototype. Prototypes are built from streamed sums so one pass over a task's data
suffices.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def class_sums(features: Array, labels: Array, num_classes: int,
               mask: Array | None = None) -> tuple[Array, Array]:
  """``(Σ_{y_i=c} f_i (C, d), n_c (C,))`` over rows with ``mask == 1``.

  Args:
    features: ``(n, d)``.
    labels: ``(n,)`` int in ``[0, C)``.
    num_classes: ``C``.
    mask: optional ``(n,)`` 0/1 real rows.

  Returns:
    ``(sums (C, d) float32, counts (C,) float32)``.
  """
  shapes = "class_sums(features (n, d), labels (n,) int, mask (n,) or None)"
  chex.assert_rank(features, 2, custom_message=shapes)
  chex.assert_shape(labels, (features.shape[0],), custom_message=shapes)
  chex.assert_type(labels, int, custom_message=shapes)
  if mask is not None:
    chex.assert_shape(mask, (features.shape[0],), custom_message=shapes)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if mask is not None:
    onehot = onehot * mask.astype(jnp.float32)[:, None]
  sums = jnp.matmul(onehot.T, features.astype(jnp.float32), precision=_HIGHEST)
  return sums, jnp.sum(onehot, axis=0)


def prototypes(sums: Array, counts: Array) -> Array:
  """Class means ``sums / n_c`` (zero rows for classes without examples), ``(C, d)``.

  Args:
    sums: (C, d) per-class feature sums.
    counts: (C,) per-class example counts.

  Returns:
    (C, d) p_c = sums_c / max(n_c, 1).

  Raises:
    AssertionError: wrong ranks or shapes (chex).
  """
  shapes = "prototypes(sums (C, d), counts (C,))"
  chex.assert_rank(sums, 2, custom_message=shapes)
  chex.assert_shape(counts, (sums.shape[0],), custom_message=shapes)
  return sums / jnp.maximum(counts, 1.0)[:, None]


def cosine_logits(features: Array, protos: Array, eps: float = 1e-12) -> Array:
  """``cos(f_i, p_c)`` ``(n, C)``, both normalised by ``max(‖·‖, eps)`` (``F.normalize``).

  Args:
    features: (n, d).
    protos: (C, d) class prototypes.
    eps: lower bound of the norms (avoids 0/0).

  Returns:
    (n, C) cosine similarities f̂_i · p̂_c.

  Raises:
    AssertionError: wrong ranks or mismatched d (chex).
  """
  shapes = "cosine_logits(features (n, d), protos (C, d))"
  chex.assert_rank([features, protos], 2, custom_message=shapes)
  chex.assert_axis_dimension(protos, 1, features.shape[1], custom_message=shapes)
  f = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), eps)
  p = protos / jnp.maximum(jnp.linalg.norm(protos, axis=-1, keepdims=True), eps)
  return jnp.matmul(f, p.T, precision=_HIGHEST)


__all__ = ["class_sums", "cosine_logits", "prototypes"]
