"""DualGPM memories and InfLoRA's interference-free down-projection, on Gram matrices.

InfLoRA (Liang & Li, CVPR 2024) keeps, per adapted layer, a memory of the input
space of the old tasks. It has two uses. First, it designs each new task's
frozen LoRA down-projection so that it is orthogonal to that space. Second, it
grows the memory after each task with DualGPM, which is GPM (Saha et al. 2021)
plus "dual" switching to the orthogonal complement when the memory passes d/2.
Everything here works on a layer's **input Gram matrix** over a task's data,

    C = (1/n) Σ_tokens x xᵀ = H Hᵀ / n   (d, d), H (d, n) the representation,

which is what the official code collects (``Attention_LoRA.cur_matrix``) and
what ``backbone.apply(params, x, taps="gram")`` returns (sum and count).

Memory layout (fixed shapes, jit-able). ``basis`` is (d, d) zero-padded,
``rank`` = k is the number of valid columns, and ``kind`` is an int32 flag:

* ``REMOVE`` (0): the columns M (d, k) span the protected space. The space
  new tasks may use is its complement, with projector Q = I − M Mᵀ.
* ``RETAIN`` (1): the columns M⊥ (d, k) span the complement of the protected
  space. New tasks may use Q = M⊥ M⊥ᵀ.

A layer with no memory is (zeros, 0, REMOVE), so Q = I.

Down-projection (:func:`design_down_projection`, the paper's B_t; clx's
adapter ``a`` (d_in, r), because in clx's layout ΔW = a @ b):

* official code (``form="official"``):
  Ĉ = C − M Mᵀ C (remove) or M⊥ M⊥ᵀ C (retain), i.e. Ĉ = Q C;
  a = U[:, :r] / √3 with U the left singular vectors of Ĉ.
  This is the SVD of a one-sided projected Gram matrix.
* paper (Eqs. 6-8, ``form="paper"``): the SVD of the projected
  representation Ĥ = Q H. Its left singular vectors are the eigenvectors of
  Ĥ Ĥᵀ = n · Q C Q.
  The paper has no 1/√3 factor; pass ``scale=1.0`` for that too.
* Both forms give a spanning the same column space Q·range(C). The principal
  directions and their order differ (the official form weighs them by C², the
  paper form by C).

Memory update (:func:`dualgpm_update_fixed`, the official ``update_DualGPM``).
Let total = Σ_i e_i(C), and let e_i(Ĉ) be the energies of the projected matrix,
sorted in descending order. Then:

* first task:
  r = #{k : Σ_{i≤k} e_i / total < ε}.
  - If r < d/2, the memory is REMOVE with M = U[:, :max(r, 1)].
  - Otherwise it is RETAIN with M⊥ = U[:, r:] (see the deviations below).
* REMOVE:
  acc = (total − Σ e(Ĉ)) / total. Then, while acc < ε: acc += e_i(Ĉ)/total and r += 1.
  M ← [M, Û[:, :r]]. If dim M > d/2 afterwards and ``dual`` is set, the layer
  switches to RETAIN with M⊥ = a basis of span(M)^⊥.
* RETAIN:
  acc = Σ e(Ĉ) / total. Then, while acc ≥ 1 − ε: acc −= e_i(Ĉ)/total and r += 1.
  M⊥ ← a basis of span(M⊥) ∩ span(Û[:, :r])^⊥.
* Threshold: ε_t = lamb + (lame − lamb)·t/T (:func:`task_threshold`).

Energies (the ``energy`` option):

* ``"official"``: the code takes the SVD of the *Gram* matrix and still
  squares its singular values, e_i = σ_i(Ĉ)², so total = ‖C‖_F² = Σ λ_i(C)².
  In terms of the representation these are σ⁴(H) energies. Ranks differ from
  the paper's, so keep this for reproduction.
* ``"paper"``: GPM on the representation, with energies σ²(Ĥ) (the eigenvalues
  of Q C Q) and total = Σ σ²(H)/n = trace C. The new directions are the
  eigenvectors of Q C Q. This is exactly GPM's Eqs. 8-9 applied to H.

:func:`gpm_update_from_gram_fixed` is the official plain ``update_GPM`` used by
InfLoRA-b5 and DomainNet. It is the same REMOVE rule with no switch, so the
memory may grow to d columns.

Differences from the official code. They are numerical (same subspaces) or
concern corner cases where the official code crashes or mislabels its memory;
the only result-changing one is the zero design column noted below:

* One symmetric eigendecomposition replaces the official code's SVDs (of Ĉ,
  of M for the switch, of (I − U_r U_rᵀ) M⊥ for the retain update).
  - Û and e(Ĉ) = σ(Ĉ)² are the eigenpairs of Ĉ Ĉᵀ = Q C² Q. This is about 2×
    faster than an SVD on CPU.
  - The excluded directions are shifted to −s, s = trace(Q C² Q) (eigenproblem
    Q C² Q − s(I − Q), with Q applied twice to clean the rounding error of the
    first product). They are then separated from every allowed direction by a
    gap ≥ s, so the chosen vectors are orthogonal to the protected space to
    machine precision. A plain SVD leaks in directions of tiny σ.
  - Precision: squaring resolves σ(Ĉ) down to about √(eps·‖C‖·σ_max(Ĉ))
    instead of eps·‖C‖. Only the order of directions whose energy is at
    float32 noise level is affected.
  - The eigenvectors after the chosen r that are still inside the allowed
    space span the complement needed by the switch and by the retain update.
    These are the same subspaces as the official SVDs give (bases within a
    subspace are arbitrary in both).
* First task with r ≥ d/2: the official code stores U[:, :r] with type
  'retain', i.e. it mislabels the memory as its complement. It then fails its
  own assert (``≤ d/2``) when r > d/2, and silently protects the wrong space
  when r = d/2. clx stores the complement U[:, r:].
* RETAIN: r is capped at k, and REMOVE: r is capped at d − k, which is where
  the energy runs out. The official loop could only pass these caps through
  rounding error; it would then slice a negative width, or append null
  directions that the truncation to d columns removes.
* The designed a is projected once more onto the allowed space (a ← Q a). In
  exact arithmetic this changes nothing. Any column beyond the allowed
  dimension (only when fewer than r directions remain, RETAIN with k < r)
  becomes 0 instead of an arbitrary, interfering direction. Each column's sign
  is fixed so that its largest-magnitude entry is positive (deterministic).
* A zero Gram matrix (no energy) leaves the memory unchanged after the first
  task. The official code divides by zero there. In the first task the
  official code falls through to r = 0 → U[:, :1], and so does clx.

Every jitted function is pure. The eigensolver is the only O(d³) step, one call
per design and one per update. On GPU/TPU the matmuls use
``Precision.HIGHEST``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from clx.ops import _checks

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST

REMOVE = 0
RETAIN = 1
KINDS = {"remove": REMOVE, "retain": RETAIN}
KIND_NAMES = {REMOVE: "remove", RETAIN: "retain"}
ENERGIES = {"official": 2, "paper": 1}
FORMS = {"official": 2, "paper": 1}
DEFAULT_SCALE = 1.0 / math.sqrt(3.0)


def _mm(a: Array, b: Array) -> Array:
  """a @ b at full float32 precision (``Precision.HIGHEST``, no bf16 passes on GPU/TPU)."""
  return jnp.matmul(a, b, precision=_HIGHEST)


def task_threshold(task_index: int, num_tasks: int, lamb: float = 0.95, lame: float = 1.0) -> float:
  """InfLoRA's per-task energy threshold ε_t = lamb + (lame − lamb)·t/T.

  Args:
    task_index: t, 0-based (the task that just ended).
    num_tasks: T, the number of tasks of the stream (``total_sessions``).
    lamb: ε at the first task (0.95 CIFAR/DomainNet, 0.98 ImageNet-R).
    lame: the value ε would reach at t = T (1.0 in every official config).

  Returns:
    ε_t as a Python float (< lame for t < T).
  """
  if num_tasks < 1 or not 0 <= task_index < num_tasks:
    raise ValueError(f"need 0 <= task_index < num_tasks, got {task_index} and {num_tasks}")
  value = lamb + (lame - lamb) * task_index / num_tasks
  if not 0.0 < value <= 1.0:
    raise ValueError(f"threshold {value} (lamb={lamb}, lame={lame}, t={task_index}, "
                     f"T={num_tasks}) must lie in (0, 1]")
  return float(value)


def kind_code(kind: Any) -> Any:
  """``"remove"``/``"retain"`` → 0/1; ints and arrays are passed through.

  Args:
    kind: ``"remove"``/``"retain"``, or 0/1 as an int or () int array (may be traced).

  Returns:
    :data:`REMOVE` (0) / :data:`RETAIN` (1) for a string, else ``kind`` itself.

  Raises:
    ValueError: an unknown string, or a concrete int that is neither 0 nor 1.
  """
  if isinstance(kind, str):
    if kind not in KINDS:
      raise ValueError(f"kind must be 'remove' or 'retain', got {kind!r}")
    return KINDS[kind]
  if _checks.is_concrete(kind) and int(np.asarray(kind)) not in KIND_NAMES:
    raise ValueError(f"kind must be {REMOVE} (remove) or {RETAIN} (retain), got {kind!r}")
  return kind


def _power(option: str, table: dict[str, int], name: str) -> int:
  """The power (2 official, 1 paper) of an ``energy``/``form`` option; ValueError naming it."""
  if option not in table:
    raise ValueError(f"{name} must be one of {sorted(table)}, got {option!r}")
  return table[option]


# ----------------------------------------------------------------------------
# The shared eigenproblem
# ----------------------------------------------------------------------------


def _allowed_projector(basis: Array, rank: Any, kind: Any, dtype: Any) -> Array:
  """Q = I − M Mᵀ (remove) or M Mᵀ (retain), M = the first ``rank`` columns."""
  d, width = basis.shape
  m = jnp.where(jnp.arange(width)[None, :] < rank, basis, 0).astype(dtype)
  pm = _mm(m, m.T)
  return jnp.where(kind == RETAIN, pm, jnp.eye(d, dtype=dtype) - pm)


def _eigenproblem(gram: Array, q: Array, power: int) -> tuple[Array, Array, Array, Array]:
  """Eigenpairs of the projected matrix, allowed directions first.

  A = (Q C)(Q C)ᵀ = Q C² Q (power 2: left singular pairs of the official Ĉ =
  Q C, eigenvalues σ(Ĉ)²) or A = Q C Q (power 1: the paper's Ĥ Ĥᵀ / n). The
  excluded space is shifted to −s with s = trace(A) ≥ ‖A‖ (1 if A = 0), so it
  sorts last and is separated from the allowed directions by a gap ≥ s.

  Returns:
    (mu (d,) descending, u (d, d) matching columns, total = trace(C^power),
    shift s).
  """
  d = gram.shape[0]
  c = (gram + gram.T) / 2
  # Projecting twice removes the rounding error of the first product along the
  # excluded space (eps·‖C‖, large next to a small residual Q C).
  if power == 2:
    qc = _mm(q, _mm(q, c))
    a = _mm(qc, qc.T)
    total = jnp.sum(c * c)
  else:
    a = _mm(q, _mm(_mm(_mm(q, c), q), q))
    total = jnp.trace(c)
  # Shift by trace(A) ≥ ‖A‖ (not by ‖C‖): eigh's absolute error is eps·‖shifted A‖,
  # so a shift on the scale of the residual keeps small residual energies resolved.
  trace = jnp.trace(a)
  shift = jnp.where(trace > 0, trace, jnp.ones_like(trace))
  a = a - shift * (jnp.eye(d, dtype=c.dtype) - q)
  w, v = jnp.linalg.eigh((a + a.T) / 2)
  return w[::-1], v[:, ::-1], total, shift


def _window(u: Array, start: Array, count: Array) -> Array:
  """(d, d) whose column j < count is u[:, start + j]; later columns are 0."""
  d = u.shape[1]
  cols = jnp.arange(d)
  picked = u[:, jnp.clip(start + cols, 0, d - 1)]
  return jnp.where((cols < count)[None, :], picked, 0)


def _safe_div(num: Array, den: Array) -> Array:
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)


# ----------------------------------------------------------------------------
# Down-projection design
# ----------------------------------------------------------------------------


def _prepare_basis(gram: Any, basis: Any, memory_rank: Any):
  """(d, d) zero-padded basis and rank from None, (d, k) or (d, d) + rank."""
  d = np.shape(gram)[0]
  if basis is None:
    return jnp.zeros((d, d), _float_dtype(gram)), 0
  _checks.check_ndim("basis", basis, 2)
  rows, k = np.shape(basis)
  if rows != d or k > d:
    raise ValueError(f"basis must be (d, k) with k <= d = {d} to match the Gram matrix "
                     f"{np.shape(gram)}, got {np.shape(basis)}")
  _checks.check_finite("basis", basis)
  rank = k if memory_rank is None else memory_rank
  if np.ndim(rank) != 0:
    raise ValueError(f"memory_rank must be a scalar, got shape {np.shape(rank)}")
  if _checks.is_concrete(rank) and not 0 <= int(rank) <= k:
    raise ValueError(f"memory_rank must lie in [0, {k}], got {int(rank)}")
  padded = jnp.pad(jnp.asarray(basis), ((0, 0), (0, d - k)))
  return padded, rank


def _float_dtype(*arrays: Any) -> Any:
  """The arrays' common dtype, promoted to at least float32."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _check_gram(gram: Any) -> None:
  """ValueError unless ``gram`` is a finite square (d, d) matrix."""
  _checks.check_ndim("gram", gram, 2)
  if np.shape(gram)[0] != np.shape(gram)[1]:
    raise ValueError(f"gram must be square (d, d), got shape {np.shape(gram)}")
  _checks.check_finite("gram", gram)


def design_down_projection(gram: Array, basis: Array | None = None, kind: Any = "remove",
                           rank: int = 10, *, memory_rank: Any = None,
                           scale: float = DEFAULT_SCALE, form: str = "official") -> Array:
  """InfLoRA's designed down-projection a (d, r) for a new task (the paper's B_tᵀ).

  Official (``form="official"``): a = top-r left singular vectors of Ĉ = Q C, times
  ``scale``; Q = I − M Mᵀ (remove), M⊥ M⊥ᵀ (retain), I with no memory (first
  task: Ĉ = C). Paper (``form="paper"``): top-r eigenvectors of Q C Q (the left
  singular vectors of the projected representation Q H); use ``scale=1.0`` for
  the paper's unscaled B_t. See the module docstring for the differences.

  Every column lies in the allowed space (a = Q a), so for any x in the
  protected space, x a = 0 and the branch x a b vanishes whatever b is trained
  to. Columns beyond the allowed dimension are 0.

  Args:
    gram: C (d, d), the layer's input Gram matrix on the new task's data (with
      every old branch active).
    basis: the memory, None (no memory), (d, k), or (d, d) zero-padded with
      ``memory_rank``.
    kind: ``"remove"``/``"retain"`` or its int code (may be traced).
    rank: r, the LoRA rank (static), 1 ≤ r ≤ d.
    memory_rank: number of valid columns of ``basis`` (default: all of them).
    scale: the factor on a (official 1/√3).
    form: ``"official"`` or ``"paper"``.

  Returns:
    a, (d, r), in the Gram's float dtype (≥ float32). jit-able (``rank``,
    ``scale`` and ``form`` static).
  """
  _check_gram(gram)
  d = np.shape(gram)[0]
  if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= d:
    raise ValueError(f"rank must be an int in [1, d = {d}], got {rank!r}")
  power = _power(form, FORMS, "form")
  padded, mem_rank = _prepare_basis(gram, basis, memory_rank)
  return _design(gram, padded, mem_rank, kind_code(kind), int(rank), float(scale), power)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _design(gram: Array, basis: Array, mem_rank: Any, kind: Any, rank: int, scale: float,
            power: int) -> Array:
  """Jitted core of :func:`design_down_projection`: a (d, rank), ``basis`` (d, d) padded."""
  dtype = _float_dtype(gram, basis)
  gram = jnp.asarray(gram, dtype)
  q = _allowed_projector(jnp.asarray(basis), mem_rank, kind, dtype)
  mu, u, _, shift = _eigenproblem(gram, q, power)
  n_allowed = jnp.sum(mu > -shift / 2)
  top = _mm(q, u[:, :rank])  # safeguard: exactly inside the allowed space
  top = jnp.where((jnp.arange(rank) < n_allowed)[None, :], top, 0)
  peak = jnp.take_along_axis(top, jnp.argmax(jnp.abs(top), axis=0)[None, :], axis=0)
  signs = jnp.where(peak < 0, -1, 1).astype(dtype)
  out = top * signs * jnp.asarray(scale, dtype)
  chex.assert_shape(out, (gram.shape[0], rank))
  return out


def projected_gram(gram: Array, basis: Array | None = None, kind: Any = "remove", *,
                   memory_rank: Any = None) -> Array:
  """The official Ĉ = C − M Mᵀ C (remove) or M⊥ M⊥ᵀ C (retain); C with no memory.

  Args:
    gram: C (d, d), finite and square.
    basis: M (remove) or M⊥ (retain), (d, k) or (d, d) zero-padded; None: no memory.
    kind: ``"remove"``/``"retain"`` or 0/1.
    memory_rank: valid columns of ``basis`` (default: k, all of them); may be traced.

  Returns:
    Ĉ (d, d) = (I − M Mᵀ) C (remove) or M⊥ M⊥ᵀ C (retain); C itself with no memory.

  Raises:
    ValueError: a non-square or non-finite ``gram``, a ``basis`` whose shape does not match,
      a non-finite ``basis``, ``memory_rank`` outside [0, k], or an unknown ``kind``.
  """
  _check_gram(gram)
  padded, mem_rank = _prepare_basis(gram, basis, memory_rank)
  dtype = _float_dtype(gram, padded)
  q = _allowed_projector(padded, mem_rank, kind_code(kind), dtype)
  return _mm(q, jnp.asarray(gram, dtype))


# ----------------------------------------------------------------------------
# DualGPM / GPM memory updates
# ----------------------------------------------------------------------------


def _check_memory(gram: Any, basis_padded: Any, rank: Any) -> None:
  """ValueError unless the memory is (d, d) finite with a scalar rank in [0, d]."""
  d = np.shape(gram)[0]
  if np.shape(basis_padded) != (d, d):
    raise ValueError(f"basis_padded must be (d, d) = ({d}, {d}) to match gram "
                     f"{np.shape(gram)}, got {np.shape(basis_padded)}")
  if np.ndim(rank) != 0:
    raise ValueError(f"rank must be a scalar, got shape {np.shape(rank)}")
  if _checks.is_concrete(rank) and not 0 <= int(rank) <= d:
    raise ValueError(f"rank must lie in [0, d] = [0, {d}], got {int(rank)}")
  _checks.check_finite("basis_padded", basis_padded)


def dualgpm_update_fixed(basis_padded: Array, rank: Any, kind: Any, gram: Array,
                         threshold: Any, *, first_task: Any = None, energy: str = "official",
                         dual: bool = True) -> tuple[Array, Array, Array]:
  """One official ``update_DualGPM`` step for one layer, in the fixed (d, d) layout.

  See the module docstring for the rules. ``dual=False`` gives the plain
  ``update_GPM`` (remove only, never switches; the first task always stores
  U[:, :max(r, 1)]).

  Args:
    basis_padded: (d, d); columns < ``rank`` hold M (remove) or M⊥ (retain),
      later columns are ignored.
    rank: k, int scalar in [0, d] (may be traced).
    kind: ``"remove"``/``"retain"`` or 0/1 (may be traced).
    gram: C (d, d), the input Gram matrix on the task's data with every
      branch, the task's own included, active.
    threshold: ε in (0, 1] (may be traced), see :func:`task_threshold`.
    first_task: whether this is the first update (the official code branches
      on an empty feature list). Default: ``rank == 0 and kind == remove``,
      which is exact for DualGPM and GPM memories (a later remove memory has
      at least one column, because the first task keeps max(r, 1)).
    energy: ``"official"`` (σ(Ĉ)², the σ⁴ of the representation) or
      ``"paper"`` (σ²(Ĥ)).
    dual: switch remove → retain when the memory passes d/2 (DualGPM).

  Returns:
    (basis_padded (d, d), rank int32, kind int32): zero columns beyond the
    rank. Pure and jit-able (``energy``/``dual`` static); vmap-able.
  """
  _check_gram(gram)
  _check_memory(gram, basis_padded, rank)
  _checks.check_threshold("threshold", threshold)
  kind = kind_code(kind)
  power = _power(energy, ENERGIES, "energy")
  if first_task is None:
    first_task = (jnp.asarray(rank) == 0) & (jnp.asarray(kind) == REMOVE)
  return _update(basis_padded, rank, kind, gram, threshold, first_task, power, bool(dual))


@functools.partial(jax.jit, static_argnums=(6, 7))
def _update(basis_padded: Array, rank: Any, kind: Any, gram: Array, eps: Any, first_task: Any,
            power: int, dual: bool) -> tuple[Array, Array, Array]:
  """Jitted core of :func:`dualgpm_update_fixed` (``power``, ``dual`` static)."""
  chex.assert_rank(gram, 2)
  chex.assert_equal_shape([gram, basis_padded])
  dtype = _float_dtype(gram, basis_padded)
  gram = jnp.asarray(gram, dtype)
  d = gram.shape[0]
  cols = jnp.arange(d)
  rank = jnp.asarray(rank, jnp.int32)
  kind = jnp.asarray(kind, jnp.int32)
  first_task = jnp.asarray(first_task, bool)
  retain = (kind == RETAIN) & ~first_task
  memory = jnp.where(cols[None, :] < rank, jnp.asarray(basis_padded, dtype), 0)
  q = jnp.where(first_task, jnp.eye(d, dtype=dtype),
                _allowed_projector(memory, rank, kind, dtype))
  mu, u, total, _ = _eigenproblem(gram, q, power)
  n_allowed = jnp.where(first_task, d, jnp.where(retain, rank, d - rank))
  energy = jnp.where(cols < n_allowed, jnp.maximum(mu, 0), 0)
  ratio = _safe_div(energy, total)
  has_energy = total > 0

  # First task: r = #{k : cumulative ratio < ε} (official exclusive count).
  r_first = jnp.sum(jnp.cumsum(ratio) < eps).astype(jnp.int32)
  r_first = jnp.where(has_energy, r_first, 0)
  # Remove: acc = (total − Σ e)/total, then "while acc < ε: acc += e_i".
  acc0 = _safe_div(total - jnp.sum(energy), total)
  before = jnp.cumsum(jnp.concatenate([acc0[None], ratio[:-1]]))
  r_remove = jnp.minimum(jnp.sum(before < eps), n_allowed).astype(jnp.int32)
  r_remove = jnp.where(has_energy, r_remove, 0)
  # Retain: acc = Σ e/total, then "while acc ≥ 1 − ε: acc −= e_i".
  acc0_r = _safe_div(jnp.sum(energy), total)
  before_r = jnp.cumsum(jnp.concatenate([acc0_r[None], -ratio[:-1]]))
  r_retain = jnp.minimum(jnp.sum(before_r >= 1 - eps), rank).astype(jnp.int32)
  r_retain = jnp.where(has_energy, r_retain, 0)

  # Remove path (the first task is a remove step onto an empty memory).
  if dual:
    switch_first = 2 * r_first >= d
  else:
    switch_first = jnp.zeros((), bool)
  r_app = jnp.where(first_task, jnp.where(switch_first, r_first, jnp.maximum(r_first, 1)),
                    r_remove)
  k_old = jnp.where(first_task, 0, rank)
  k_new = jnp.minimum(k_old + r_app, d)
  grown = jnp.where((cols < k_old)[None, :], memory, _window(u, -k_old, k_new))
  if dual:
    switch = jnp.where(first_task, switch_first, 2 * k_new > d)
  else:
    switch = jnp.zeros((), bool)
  complement_rank = n_allowed - r_app
  complement = _window(u, r_app, complement_rank)
  rm_basis = jnp.where(switch, complement, grown)
  rm_rank = jnp.where(switch, complement_rank, k_new)
  rm_kind = jnp.where(switch, RETAIN, REMOVE)

  # Retain path: keep the allowed eigenvectors after the r removed ones.
  rt_basis = jnp.where(r_retain > 0, _window(u, r_retain, rank - r_retain), memory)
  rt_rank = rank - r_retain

  new_basis = jnp.where(retain, rt_basis, rm_basis)
  new_rank = jnp.where(retain, rt_rank, rm_rank).astype(jnp.int32)
  new_kind = jnp.where(retain, RETAIN, rm_kind).astype(jnp.int32)
  chex.assert_shape(new_basis, (d, d))
  chex.assert_rank([new_rank, new_kind], 0)
  return new_basis, new_rank, new_kind


def gpm_update_from_gram_fixed(basis_padded: Array, rank: Any, gram: Array, threshold: Any, *,
                               first_task: Any = None,
                               energy: str = "official") -> tuple[Array, Array]:
  """Official InfLoRA ``update_GPM`` (b5/DomainNet): remove-only, no switch.

  Same as :func:`dualgpm_update_fixed` with ``dual=False``. It differs from
  :func:`clx.ops.subspace.gpm_update_fixed`: that one works on a
  representation R, whereas this one works on the Gram matrix with σ(Ĉ)²
  energies, and the first task here keeps max(r, 1) columns.

  Args:
    basis_padded: (d, d); columns < ``rank`` hold M, later columns are ignored.
    rank: k, int scalar in [0, d] (may be traced).
    gram: C (d, d), the task's input Gram matrix.
    threshold: ε in (0, 1] (may be traced).
    first_task: whether this is the first update (default: ``rank == 0``).
    energy: ``"official"`` (σ(Ĉ)²) or ``"paper"`` (σ²(Ĥ)).

  Returns:
    (basis_padded (d, d), rank int32).

  Raises:
    ValueError: bad shapes, non-finite inputs, ε outside (0, 1] or an unknown ``energy``.
  """
  basis, new_rank, _ = dualgpm_update_fixed(basis_padded, rank, REMOVE, gram, threshold,
                                            first_task=first_task, energy=energy, dual=False)
  return basis, new_rank


def dualgpm_update(basis: Array | None, kind: str, gram: Array, threshold: Any, *,
                   energy: str = "official", dual: bool = True) -> tuple[Array, str]:
  """Host convenience form of :func:`dualgpm_update_fixed` with dynamic widths.

  Args:
    basis: M or M⊥ (d, k), or None before the first task.
    kind: ``"remove"``/``"retain"`` (ignored when ``basis`` is None).
    gram: C (d, d).
    threshold: ε in (0, 1].
    energy, dual: see :func:`dualgpm_update_fixed`.

  Returns:
    (new basis (d, k'), new kind). Not jit-able (data-dependent width).
  """
  _check_gram(gram)
  d = np.shape(gram)[0]
  if basis is None:
    padded, rank, code, first = jnp.zeros((d, d), _float_dtype(gram)), 0, REMOVE, True
  else:
    padded, rank = _prepare_basis(gram, basis, None)
    code, first = kind_code(kind), False
  new, new_rank, new_kind = dualgpm_update_fixed(padded, rank, code, gram, threshold,
                                                 first_task=first, energy=energy, dual=dual)
  return new[:, :int(new_rank)], KIND_NAMES[int(new_kind)]


def gpm_update_from_gram(basis: Array | None, gram: Array, threshold: Any, *,
                         energy: str = "official") -> Array:
  """Host form of :func:`gpm_update_from_gram_fixed`: (d, k) → (d, k').

  Args:
    basis: M (d, k), or None before the first task.
    gram: C (d, d).
    threshold: ε in (0, 1].
    energy: ``"official"`` or ``"paper"``, see :func:`dualgpm_update_fixed`.

  Returns:
    The new basis M' (d, k'), k' ≥ k (not jit-able: data-dependent width).

  Raises:
    ValueError: bad shapes, non-finite inputs, ε outside (0, 1] or an unknown ``energy``.
  """
  new, _ = dualgpm_update(basis, "remove", gram, threshold, energy=energy, dual=False)
  return new


def protected_projector(basis: Array, rank: Any, kind: Any) -> Array:
  """Projector (d, d) onto the protected (old tasks') space: M Mᵀ or I − M⊥ M⊥ᵀ.

  Args:
    basis: (d, d) zero-padded memory (M for remove, M⊥ for retain).
    rank: k, the valid columns (may be traced).
    kind: ``"remove"``/``"retain"`` or 0/1.

  Returns:
    P (d, d) = M Mᵀ (remove) or I − M⊥ M⊥ᵀ (retain), in the basis' float dtype.

  Raises:
    ValueError: an unknown ``kind``.
  """
  dtype = _float_dtype(basis)
  return jnp.eye(np.shape(basis)[0], dtype=dtype) - _allowed_projector(
      jnp.asarray(basis), rank, kind_code(kind), dtype)


__all__ = [
    "DEFAULT_SCALE", "KINDS", "KIND_NAMES", "REMOVE", "RETAIN", "design_down_projection",
    "dualgpm_update", "dualgpm_update_fixed", "gpm_update_from_gram",
    "gpm_update_from_gram_fixed", "kind_code", "projected_gram", "protected_projector",
    "task_threshold",
]
