"""One memory value for gradient-projection methods, and one rule per method family.

GPM, SGP and DualGPM (InfLoRA) all keep, per projected layer, a basis of the
old tasks' input space in a fixed (d, d) zero-padded layout. :class:`Memory`
is that value, a pytree of four arrays (jit-, vmap- and checkpoint-friendly):

* ``basis`` (d, d): columns ``< rank`` hold the memory directions, the rest
  are ignored (treated as zero);
* ``rank`` () int32: k, the number of valid columns (the memory rank: the only
  thing called "rank" for a memory);
* ``kind`` () int32: :data:`REMOVE` (the columns M span the protected space;
  new tasks may use its complement, Q = I − M Mᵀ) or :data:`RETAIN` (the
  columns M⊥ span the complement itself, Q = M⊥ M⊥ᵀ; DualGPM after its switch);
* ``scale`` (d,): the importance s_i ∈ [0, 1] of each direction in the
  gradient map g ← (I − M diag(s) Mᵀ) g (SGP). Hard projection (GPM,
  DualGPM) sets it to 1 on the valid columns and 0 elsewhere.

A :class:`MemoryRule` binds a family's update and projection to this value:

==========  ============================  ========================================
rule         ``update`` statistics         op it calls
==========  ============================  ========================================
``GPM``      representation R (d, n)      :func:`clx.ops.subspace.gpm_update_fixed`
``sgp()``    representation R (d, n)      :func:`clx.ops.sgp.sgp_update_fixed`
``dualgpm``  Gram matrix C (d, d)         :func:`clx.ops.dualgpm.dualgpm_update_fixed`
==========  ============================  ========================================

so method code never carries ``variant=`` strings or loose ``(basis, rank,
kind)`` triples: it holds ``{site_key: Memory}`` and a rule. Every function is
pure and jit-able (rule options are Python values bound when the rule is built).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from clx.ops import dualgpm, subspace
from clx.ops import sgp as sgp_ops

Array = jax.Array
REMOVE = dualgpm.REMOVE
RETAIN = dualgpm.RETAIN


class Memory(NamedTuple):
  """One layer's memory of the old tasks' input space (see the module docstring).

  Attributes:
    basis: (d, d) zero-padded directions; columns ``< rank`` are valid.
    rank: () int32, k ∈ [0, d].
    kind: () int32, :data:`REMOVE` (0) or :data:`RETAIN` (1).
    scale: (d,) importance of each direction (1 on valid columns for hard projection).
  """

  basis: Array
  rank: Array
  kind: Array
  scale: Array

  @property
  def dim(self) -> int:
    """d, the input dimension of the layer."""
    return int(np.shape(self.basis)[0])

  def columns(self) -> Array:
    """(d, d) basis with the columns ``≥ rank`` zeroed (M, or M⊥ for RETAIN).

    Returns:
      (d, d) array in the basis' dtype.
    """
    valid = jnp.arange(self.basis.shape[1]) < self.rank
    return jnp.where(valid[None, :], self.basis, 0.0).astype(self.basis.dtype)


def empty(d: int, dtype: Any = jnp.float32) -> Memory:
  """The memory before the first task: no directions, REMOVE (so Q = I).

  Args:
    d: input dimension (≥ 1).
    dtype: float dtype of ``basis`` and ``scale``.

  Returns:
    ``Memory(zeros (d, d), 0, REMOVE, zeros (d,))``.
  """
  if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
    raise ValueError(f"memory dimension must be a positive integer, got {d!r}")
  return Memory(jnp.zeros((d, d), dtype), jnp.zeros((), jnp.int32),
                jnp.asarray(REMOVE, jnp.int32), jnp.zeros((d,), dtype))


def _hard_scale(basis: Array, rank: Array) -> Array:
  return (jnp.arange(basis.shape[1]) < rank).astype(basis.dtype)


def _check_memory(memory: Any, where: str) -> None:
  """A :class:`Memory` whose fields have their ranks, shapes and dtypes (chex, trace-time)."""
  if not isinstance(memory, Memory):
    raise TypeError(f"{where}: expected a clx.ops.memory.Memory, got {type(memory).__name__}")
  chex.assert_rank([memory.basis, memory.rank, memory.kind, memory.scale], [2, 0, 0, 1],
                   custom_message=f"{where}: Memory(basis, rank, kind, scale)")
  chex.assert_shape(memory.scale, (memory.basis.shape[1],),
                    custom_message=f"{where}: Memory.scale has one entry per basis column")
  chex.assert_type([memory.rank, memory.kind], int,
                   custom_message=f"{where}: Memory.rank and Memory.kind are integers")


def _check_grad(grad: Any, memory: Memory, where: str) -> None:
  if np.ndim(grad) < 2:
    raise ValueError(f"{where}: grad must be a kernel of rank ≥ 2 (input axes first), "
                     f"got shape {np.shape(grad)}")
  d_in = int(np.prod(np.shape(grad)[:-1]))
  if d_in != memory.dim:
    raise ValueError(f"{where}: kernel input size {d_in} (shape {np.shape(grad)}) does not match "
                     f"the memory's dimension {memory.dim}")


def _apply_on_inputs(matrix: Array, grad: Array) -> Array:
  """``matrix @ grad`` on the flattened input axes of a kernel (d_in, d_out) / (kh, kw, cin, cout)."""
  flat = jnp.reshape(grad, (matrix.shape[0], -1))
  out = jnp.matmul(matrix.astype(flat.dtype), flat, precision=jax.lax.Precision.HIGHEST)
  return jnp.reshape(out, np.shape(grad))


class MemoryRule(NamedTuple):
  """How one method family grows and uses a :class:`Memory` (pure functions).

  Attributes:
    name: ``"gpm"``, ``"sgp"`` or ``"dualgpm"`` (logs).
    init: ``(d, dtype=float32) -> Memory`` before the first task.
    update: ``(memory, stats, threshold, *, first_task=None) -> Memory``; ``stats``
      is the representation R (d, n) for GPM/SGP and the Gram matrix C (d, d)
      for DualGPM; ``threshold`` ε ∈ (0, 1] (may be traced).
    allowed: ``memory -> (d, d)`` the map applied to a kernel gradient's input
      axis: Q = I − M Mᵀ (REMOVE), M⊥ M⊥ᵀ (RETAIN), I − M diag(s) Mᵀ (SGP).
    project_grad: ``(grad, memory) -> grad``: ``allowed(memory) @ grad`` on the
      kernel's input axes (all but the last), computed by the family's op.
    through_inputs: ``memory -> (basis, scale | None)``: the arguments of
      :func:`clx.ops.gradient_projection.projected_dense`, which applies the
      same map to a linear layer's inputs in the backward pass (the fast path).
  """

  name: str
  init: Callable[..., Memory]
  update: Callable[..., Memory]
  allowed: Callable[[Memory], Array]
  project_grad: Callable[[Array, Memory], Array]
  through_inputs: Callable[[Memory], tuple[Array, Array | None]]


# -- GPM (representation, hard projection) -----------------------------------------


def _gpm_update(memory: Memory, representation: Array, threshold: Any, *,
                first_task: Any = None) -> Memory:
  _check_memory(memory, "gpm update")
  basis, rank = subspace.gpm_update_fixed(memory.basis, memory.rank, representation, threshold,
                                          first_task=first_task)
  return Memory(basis, rank, jnp.asarray(REMOVE, jnp.int32), _hard_scale(basis, rank))


def _remove_projector(memory: Memory) -> Array:
  m = memory.columns()
  return jnp.eye(memory.dim, dtype=m.dtype) - jnp.matmul(m, m.T,
                                                         precision=jax.lax.Precision.HIGHEST)


def _gpm_project(grad: Array, memory: Memory) -> Array:
  _check_memory(memory, "gpm project_grad")
  _check_grad(grad, memory, "gpm project_grad")
  return subspace.project_kernel_gradient(grad, memory.columns())


def _gpm_through_inputs(memory: Memory) -> tuple[Array, None]:
  # The basis is zero past its rank (gpm_update_fixed pads with zeros), so it is passed as is.
  return memory.basis, None


GPM = MemoryRule("gpm", empty, _gpm_update, _remove_projector, _gpm_project, _gpm_through_inputs)
"""GPM (Saha et al. 2021): grow M from R with the energy criterion; g ← (I − M Mᵀ) g."""


# -- SGP (representation, importance-scaled projection) ----------------------------


def sgp(scale_coff: float = 10.0) -> MemoryRule:
  """The SGP rule (Saha & Roy 2023) with importance coefficient α = ``scale_coff``.

  ``update`` grows M as GPM and refreshes the importances s
  (:func:`clx.ops.sgp.sgp_update_fixed`); ``project_grad`` is
  g ← (I − M diag(s) Mᵀ) g (:func:`clx.ops.sgp.scaled_projection_out`).

  Args:
    scale_coff: α ≥ 0 in s = (α + 1) σ / (α σ + σ_max).

  Returns:
    A :class:`MemoryRule` named ``"sgp"``.
  """
  if isinstance(scale_coff, bool) or not np.isfinite(scale_coff) or scale_coff < 0:
    raise ValueError(f"scale_coff (SGP α) must be a finite number >= 0, got {scale_coff!r}")
  scale_coff = float(scale_coff)

  def update(memory: Memory, representation: Array, threshold: Any, *,
             first_task: Any = None) -> Memory:
    _check_memory(memory, "sgp update")
    basis, rank, scale = sgp_ops.sgp_update_fixed(memory.basis, memory.rank, memory.scale,
                                              representation, threshold, scale_coff=scale_coff,
                                              first_task=first_task)
    return Memory(basis, rank, jnp.asarray(REMOVE, jnp.int32), scale)

  def allowed(memory: Memory) -> Array:
    m = memory.columns()
    return jnp.eye(memory.dim, dtype=m.dtype) - jnp.matmul(
        m * memory.scale[None, :], m.T, precision=jax.lax.Precision.HIGHEST)

  def project_grad(grad: Array, memory: Memory) -> Array:
    _check_memory(memory, "sgp project_grad")
    _check_grad(grad, memory, "sgp project_grad")
    return sgp_ops.scaled_projection_out(grad, memory.basis, memory.rank, memory.scale)

  def through_inputs(memory: Memory) -> tuple[Array, Array]:
    return memory.basis, memory.scale

  return MemoryRule("sgp", empty, update, allowed, project_grad, through_inputs)


# -- DualGPM (Gram matrix, remove/retain) -------------------------------------------


def dualgpm_rule(*, energy: str = "official", dual: bool = True) -> MemoryRule:
  """The DualGPM rule of InfLoRA (``dual=False``: its plain ``update_GPM`` on Gram matrices).

  Args:
    energy: ``"official"`` (σ(Ĉ)² energies) or ``"paper"`` (σ²(Ĥ)), see
      :func:`clx.ops.dualgpm.dualgpm_update_fixed`.
    dual: switch REMOVE → RETAIN when the memory passes d/2.

  Returns:
    A :class:`MemoryRule` named ``"dualgpm"`` (``"gpm_gram"`` when not dual).
  """
  if energy not in dualgpm.ENERGIES:
    raise ValueError(f"energy must be one of {sorted(dualgpm.ENERGIES)}, got {energy!r}")
  dual = bool(dual)

  def update(memory: Memory, gram: Array, threshold: Any, *, first_task: Any = None) -> Memory:
    _check_memory(memory, "dualgpm update")
    basis, rank, kind = dualgpm.dualgpm_update_fixed(memory.basis, memory.rank, memory.kind,
                                                     gram, threshold, first_task=first_task,
                                                     energy=energy, dual=dual)
    return Memory(basis, rank, kind, _hard_scale(basis, rank))

  def allowed(memory: Memory) -> Array:
    protected = dualgpm.protected_projector(memory.basis, memory.rank, memory.kind)
    return jnp.eye(memory.dim, dtype=protected.dtype) - protected

  def project_grad(grad: Array, memory: Memory) -> Array:
    _check_memory(memory, "dualgpm project_grad")
    _check_grad(grad, memory, "dualgpm project_grad")
    return _apply_on_inputs(allowed(memory), grad)

  def through_inputs(memory: Memory):
    raise ValueError("DualGPM memories (remove/retain) are applied as a projector "
                     "(project_grad), not through a layer's inputs")

  return MemoryRule("dualgpm" if dual else "gpm_gram", empty, update, allowed, project_grad,
                    through_inputs)


DUALGPM = dualgpm_rule()
"""InfLoRA's official DualGPM rule (σ(Ĉ)² energies, remove → retain switch)."""


def as_dict(memory: Memory) -> dict[str, Array]:
  """``{"basis", "rank", "kind", "scale"}``: the nested-dict form a state / checkpoint stores.

  Args:
    memory: a :class:`Memory`.

  Returns:
    ``{"basis" (d, d), "rank" (), "kind" (), "scale" (d,)}``: the same arrays.

  Raises:
    TypeError: ``memory`` is not a :class:`Memory`.
    AssertionError: a field of the wrong rank, shape or dtype (chex).
  """
  _check_memory(memory, "as_dict")
  return memory._asdict()


def from_dict(entry: dict[str, Any], *, kind: int = REMOVE) -> Memory:
  """A :class:`Memory` from a stored entry; older entries lack ``kind``/``scale``.

  Args:
    entry: ``{"basis" (d, d), "rank" ()}`` plus optional ``"kind"`` (GPM/SGP states
      written before this module have none: REMOVE) and ``"scale"`` (GPM states
      have none: 1 on the valid columns).
    kind: the kind to assume when ``entry`` has none.

  Returns:
    The memory.
  """
  missing = [k for k in ("basis", "rank") if k not in entry]
  if missing:
    raise KeyError(f"memory entry lacks {missing}; has {sorted(entry)}")
  basis, rank = jnp.asarray(entry["basis"]), jnp.asarray(entry["rank"], jnp.int32)
  scale = entry.get("scale")
  return Memory(basis, rank, jnp.asarray(entry.get("kind", kind), jnp.int32),
                _hard_scale(basis, rank) if scale is None else jnp.asarray(scale))


__all__ = ["DUALGPM", "GPM", "Memory", "MemoryRule", "REMOVE", "RETAIN", "as_dict",
           "dualgpm_rule", "empty", "from_dict", "sgp"]
