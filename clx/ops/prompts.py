"""Prompt-pool ops of L2P, DualPrompt and CODA-Prompt (pure, jit-able).

Sources (read, not copied; line numbers at the mirrored commit):

- L2P / DualPrompt, ``google-research/l2p`` ``models/prompt.py``: ``l2_normalize`` (l.31),
  the cosine key–query similarity and top-N selection (l.218–223), the batch-wise
  majority vote (``batchwise_prompt``, l.224–229), the forced task slots of
  ``prompt_mask`` (l.231–232, built in ``train_continual.py`` l.237–247), the prompt
  gather (l.239–255) and the surrogate (pull) loss ``reduce_sim`` (l.262–265), subtracted
  from the loss with coefficient 1 (``train_continual.py`` l.294–295).
- Prefix-tuning, ``models/prefix_attention.py`` l.131–136: a key prefix and a value prefix
  concatenated in front of the projected keys and values of a layer (they get no position
  embedding and do not change the number of queries).
- CODA-Prompt, ``GT-RIPL/CODA-Prompt`` ``models/zoo.py``: the attention-weighted component
  sum (``CodaPrompt.forward`` l.140–172), the split of the prompt into key/value halves
  (l.175–177), the orthogonality penalty (``ortho_penalty`` l.199) and the Gram–Schmidt
  initialisation of a new task's components (``gram_schmidt`` l.72–130).

Shapes: ``n`` batch rows, ``d`` feature/embedding width, ``P`` pool size (prompts or
components), ``k`` prompts selected per row, ``Lp`` prompt length.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: Array, axis: int = -1, epsilon: float = 1e-12) -> Array:
  """``x / sqrt(max(Σ x², ε))`` along ``axis`` (L2P's ``l2_normalize``, ``prompt.py`` l.31).

  Args:
    x: any shape.
    axis: the axis normalised.
    epsilon: floor of the squared norm (the code's 1e-12).

  Returns:
    same shape as ``x``.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, epsilon))


def key_similarity(query: Array, keys: Array) -> Array:
  """Cosine similarity of every query to every key: ``sim[i, j] = q̂_i · k̂_j``.

  Args:
    query: ``(n, d)`` query features (the frozen backbone's features of the input).
    keys: ``(P, d)`` prompt keys.

  Returns:
    ``(n, P)``.
  """
  shapes = "key_similarity(query (n, d), keys (P, d))"
  chex.assert_rank([query, keys], 2, custom_message=shapes)
  chex.assert_axis_dimension(keys, 1, query.shape[1], custom_message=shapes)
  return jnp.matmul(l2_normalize(query), l2_normalize(keys).T, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("top_k", "batchwise"))
def select_prompts(sim: Array, *, top_k: int, batchwise: bool = False,
                   mask: Array | None = None) -> Array:
  """Indices of the prompts each row uses: top-``k`` by similarity, optionally batch-wise.

  Batch-wise (``batchwise_prompt=True``, L2P's default): every row's top-``k`` ids are
  counted over the batch and the ``k`` most frequent ids (ties to the lowest id) are used
  by every row, as the code's ``jnp.unique(..., size=pool_size)`` + ``top_k`` of the counts.
  Rows with ``mask == 0`` (padding) do not vote. One departure: when fewer than ``k``
  distinct ids were voted, the code's padded ``unique`` repeats the smallest voted id, here
  the remaining slots take the lowest unvoted ids (never reached when ``k`` ≤ distinct votes).

  Args:
    sim: ``(n, P)`` similarities (:func:`key_similarity`).
    top_k: ``k``.
    batchwise: majority vote over the batch.
    mask: optional ``(n,)`` 0/1 real rows.

  Returns:
    ``(n, k)`` int32 prompt ids.
  """
  shapes = "select_prompts(sim (n, P), mask (n,) or None)"
  chex.assert_rank(sim, 2, custom_message=shapes)
  if mask is not None:
    chex.assert_shape(mask, (sim.shape[0],), custom_message=shapes)
  n, pool = sim.shape
  if not 1 <= top_k <= pool:
    raise ValueError(f"top_k must be in [1, pool size {pool}], got {top_k}")
  _, idx = jax.lax.top_k(sim, top_k)
  if not batchwise:
    return idx.astype(jnp.int32)
  weights = jnp.ones((n, top_k), jnp.float32) if mask is None else jnp.broadcast_to(
      mask.astype(jnp.float32)[:, None], (n, top_k))
  counts = jnp.zeros((pool,), jnp.float32).at[idx.reshape(-1)].add(weights.reshape(-1))
  _, major = jax.lax.top_k(counts, top_k)
  return jnp.broadcast_to(major.astype(jnp.int32)[None], (n, top_k))


def task_prompt_ids(task_index: int, top_k: int, n: int) -> Array:
  """DualPrompt's training-time ``prompt_mask``: task ``t`` uses slots ``t·k … (t+1)·k − 1``.

  Args:
    task_index: ``t``.
    top_k: ``k``.
    n: rows.

  Returns:
    ``(n, k)`` int32.
  """
  ids = jnp.arange(task_index * top_k, (task_index + 1) * top_k, dtype=jnp.int32)
  return jnp.broadcast_to(ids[None], (n, top_k))


def pull_constraint(query: Array, keys: Array, idx: Array, mask: Array | None = None) -> Array:
  """L2P's surrogate loss term ``reduce_sim = (1/n) Σ_i Σ_{j ∈ idx_i} q̂_i · k̂_j``.

  The training loss is ``CE − coeff · reduce_sim`` (``train_continual.py`` l.294–295), which
  pulls the selected keys towards the queries that chose them.

  Args:
    query: ``(n, d)``.
    keys: ``(P, d)``.
    idx: ``(n, k)`` selected ids.
    mask: optional ``(n,)`` 0/1 real rows; the mean is over real rows.

  Returns:
    scalar.
  """
  shapes = "pull_constraint(query (n, d), keys (P, d), idx (n, k) int, mask (n,) or None)"
  chex.assert_rank([query, keys, idx], 2, custom_message=shapes)
  chex.assert_axis_dimension(keys, 1, query.shape[1], custom_message=shapes)
  chex.assert_axis_dimension(idx, 0, query.shape[0], custom_message=shapes)
  chex.assert_type(idx, int, custom_message=shapes)
  if mask is not None:
    chex.assert_shape(mask, (query.shape[0],), custom_message=shapes)
  q = l2_normalize(query)
  selected = jnp.take(l2_normalize(keys), idx, axis=0)            # (n, k, d)
  per_row = jnp.einsum("nd,nkd->n", q, selected, precision=_HIGHEST)
  if mask is None:
    return jnp.sum(per_row) / query.shape[0]
  m = mask.astype(per_row.dtype)
  return jnp.sum(per_row * m) / jnp.maximum(jnp.sum(m), 1.0)


def gather_prompts(pool: Array, idx: Array) -> Array:
  """The selected prompts of every row, concatenated along the token axis.

  Args:
    pool: ``(P, Lp, d)`` prompts (or ``(P, Lp, …)``).
    idx: ``(n, k)`` ids.

  Returns:
    ``(n, k·Lp, d)``: row ``i`` is ``[pool[idx[i, 0]]; …; pool[idx[i, k−1]]]``.
  """
  shapes = "gather_prompts(pool (P, Lp, ...), idx (n, k) int)"
  chex.assert_rank(pool, {3, 4, 5}, custom_message=shapes)
  chex.assert_rank(idx, 2, custom_message=shapes)
  chex.assert_type(idx, int, custom_message=shapes)
  chosen = jnp.take(pool, idx, axis=0)                             # (n, k, Lp, ...)
  n, k, length = chosen.shape[:3]
  return chosen.reshape(n, k * length, *chosen.shape[3:])


def split_key_value(prompt: Array) -> tuple[Array, Array]:
  """Prefix-tuning halves of a prompt of length ``Lp``: keys ``[:Lp//2]``, values ``[Lp//2:]``.

  CODA-Prompt's split (``zoo.py`` l.175–177) of one prompt tensor into the key and value
  prefixes of a layer.

  Args:
    prompt: ``(..., Lp, d)``.

  Returns:
    ``(key prefix (..., Lp//2, d), value prefix (..., Lp − Lp//2, d))``.
  """
  shapes = "split_key_value(prompt (..., Lp, d))"
  chex.assert_rank(prompt, {2, 3, 4, 5}, custom_message=shapes)
  half = prompt.shape[-2] // 2
  return prompt[..., :half, :], prompt[..., half:, :]


def coda_weights(query: Array, keys: Array, attention: Array) -> Array:
  """CODA-Prompt's component weights ``α[i, m] = cos(q_i ⊙ A_m, K_m)``.

  ``a_querry = q ⊙ A`` (b, M, d), both it and ``K`` normalised by ``F.normalize`` (divide
  by ``max(‖·‖, 1e-12)``), and their dot product per component (``zoo.py`` l.164–168).

  Args:
    query: ``(n, d)`` frozen-backbone query.
    keys: ``(M, d)`` component keys ``K``.
    attention: ``(M, d)`` component attention vectors ``A``.

  Returns:
    ``(n, M)``.
  """
  shapes = "coda_weights(query (n, d), keys (M, d), attention (M, d))"
  chex.assert_rank([query, keys, attention], 2, custom_message=shapes)
  chex.assert_equal_shape([keys, attention], custom_message=shapes)
  chex.assert_axis_dimension(keys, 1, query.shape[1], custom_message=shapes)
  attended = query[:, None, :] * attention[None]                   # (n, M, d)
  attended = attended / jnp.maximum(jnp.linalg.norm(attended, axis=-1, keepdims=True), 1e-12)
  k_hat = keys / jnp.maximum(jnp.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
  return jnp.einsum("nmd,md->nm", attended, k_hat, precision=_HIGHEST)


def coda_prompt(query: Array, keys: Array, attention: Array, components: Array) -> Array:
  """CODA-Prompt's prompt ``P(q) = Σ_m α_m(q) P_m`` (``zoo.py`` l.170).

  Args:
    query: ``(n, d)``.
    keys, attention: ``(M, d)``.
    components: ``(M, Lp, d)`` prompt components.

  Returns:
    ``(n, Lp, d)``.
  """
  shapes = "coda_prompt(query (n, d), keys (M, d), attention (M, d), components (M, Lp, d))"
  chex.assert_rank(components, 3, custom_message=shapes)
  chex.assert_axis_dimension(components, 0, keys.shape[0], custom_message=shapes)
  alpha = coda_weights(query, keys, attention)
  return jnp.einsum("nm,mld->nld", alpha, components, precision=_HIGHEST)


def ortho_penalty(t: Array) -> Array:
  """``mean((T Tᵀ − I)²)`` over the rows of ``t`` (M, D) (``zoo.py`` l.199).

  Args:
    t: (M, D), M rows (e.g. prompt keys or components).

  Returns:
    () mean over the (M, M) entries of (T Tᵀ − I)².
  """
  gram = jnp.matmul(t, t.T, precision=_HIGHEST)
  return jnp.mean(jnp.square(gram - jnp.eye(t.shape[0], dtype=t.dtype)))


@functools.partial(jax.jit, static_argnames=("start", "stop"))
def gram_schmidt_init(key: Array, components: Array, *, start: int, stop: int) -> Array:
  """CODA-Prompt's re-initialisation of the new task's components (``gram_schmidt``).

  Rows ``[0, start)`` (earlier tasks' learned components) are kept; each new row
  ``k ∈ [start, stop)`` is a fresh N(0, 1) vector minus its projections on ALL earlier rows
  ``j < k`` (old rows as they are, new rows before normalisation):
  ``u_k = v_k − Σ_{j<k} (⟨v_k, u_j⟩ / ⟨u_j, u_j⟩) u_j``, then every new row is divided by its
  norm; rows ``[stop, M)`` are set to zero (the code's ``uu`` starts as zeros). This is
  classic Gram–Schmidt against rows that are themselves not orthogonal once learned, so the
  new rows are exactly orthogonal to the old ones only when those are (e.g. the first task,
  ``start = 0``): that is the code's behaviour, kept. Rows of
  dimension > 2 are flattened (the prompt tensor ``(M, Lp, d)`` as ``(M, Lp·d)``).

  Departure: where an earlier row has squared norm < 1e-8 the code draws a new ``v_k`` and
  restarts (it never terminates if that row stays zero); here such a row is skipped.

  Args:
    key: PRNG key of the new draws.
    components: ``(M, …)``.
    start, stop: the new task's rows, ``0 ≤ start < stop ≤ M``.

  Returns:
    same shape as ``components``.
  """
  shape = components.shape
  m = shape[0]
  if not 0 <= start < stop <= m:
    raise ValueError(f"need 0 <= start < stop <= {m}, got start={start}, stop={stop}")
  flat = components.reshape(m, -1)
  draws = jax.random.normal(key, (stop - start, flat.shape[1]), flat.dtype)
  rows = jnp.zeros_like(flat).at[:start].set(flat[:start])

  def body(i, rows):
    k = start + i
    v = draws[i]
    sq = jnp.sum(rows * rows, axis=1)                              # (M,)
    coef = jnp.where((jnp.arange(m) < k) & (sq >= 1e-8),
                     jnp.matmul(rows, v, precision=_HIGHEST) / jnp.where(sq >= 1e-8, sq, 1.0),
                     0.0)
    return rows.at[k].set(v - jnp.matmul(coef, rows, precision=_HIGHEST))

  rows = jax.lax.fori_loop(0, stop - start, body, rows)
  new = rows[start:stop]
  rows = rows.at[start:stop].set(new / jnp.linalg.norm(new, axis=1, keepdims=True))
  return rows.reshape(shape)


__all__ = ["coda_prompt", "coda_weights", "gather_prompts", "gram_schmidt_init",
           "key_similarity", "l2_normalize", "ortho_penalty", "pull_constraint",
           "select_prompts", "split_key_value", "task_prompt_ids"]
