"""SD-LoRA's decoupled magnitude/direction update of a weight (Wu et al., ICLR 2025).

After ``WuYichen-97/SD-Lora-CL`` ``backbone/lora.py`` (``_LoRA_qkv_timm_train.forward``,
l.153–195): on task ``t`` a projection ``W`` (q and v of every block) is used as

    W + Σ_{i<t} α_i · A_i B_i / (‖A_i‖_F ‖B_i‖_F)  +  α_t · A_t B_t

where ``(A_i, B_i)`` are the earlier tasks' LoRA factors, frozen (their *directions*),
``α_i`` their learned scalar *magnitudes* (one per task, shared by every adapted layer:
``wrapped_param_prev``), and ``(A_t, B_t)`` the current task's factors, not normalised while
they train, with magnitude ``α_t`` (``wrapped_param``). The norms are the Frobenius norms of
the two factors separately (``torch.norm(w_b.weight) · torch.norm(w_a.weight)``), not of
their product. Shapes follow clx's kernel convention ``(d_in, d_out)``: ``A`` is ``(d_in, r)``
(the code's ``linear_a.weight`` transposed) and ``B`` ``(r, d_out)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def direction_scale(a: Array, b: Array) -> Array:
  """``1 / (‖A‖_F ‖B‖_F)`` of a frozen direction (a scalar).

  Args:
    a: A (d_in, r).
    b: B (r, d_out).

  Returns:
    () 1 / (‖A‖_F ‖B‖_F) (Inf when a factor is zero).
  """
  return 1.0 / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def decoupled_adapters(past: Sequence[dict], past_magnitudes: Array, current: dict | None,
                       current_magnitude: float | Array) -> list[dict]:
  """The update as a list of rank-``r`` adapters ``{"a", "b"}`` whose products sum to it.

  Each past adapter's ``a`` is scaled by ``α_i / (‖A_i‖ ‖B_i‖)`` and the current one's by
  ``α_t``, so :func:`clx.ops.lora.apply_adapters` (one concatenated matmul) applies it.

  Args:
    past: ``t`` adapters ``{"a" (d_in, r), "b" (r, d_out)}`` of the earlier tasks.
    past_magnitudes: ``(t,)`` ``α_0 … α_{t−1}``.
    current: the current task's adapter, or ``None`` (evaluation of a finished stream).
    current_magnitude: ``α_t`` (ignored when ``current`` is ``None``).

  Returns:
    list of adapters (``t`` or ``t + 1``).
  """
  shapes = "decoupled_adapters(past_magnitudes (t,))"
  chex.assert_rank(past_magnitudes, 1, custom_message=shapes)
  if len(past) != past_magnitudes.shape[0]:
    raise ValueError(f"{len(past)} past adapters but {past_magnitudes.shape[0]} magnitudes")
  out = [{"a": ad["a"] * (m * direction_scale(ad["a"], ad["b"])), "b": ad["b"]}
         for ad, m in zip(past, past_magnitudes)]
  if current is not None:
    out.append({"a": current["a"] * current_magnitude, "b": current["b"]})
  return out


def decoupled_delta(past: Sequence[dict], past_magnitudes: Array, current: dict | None,
                    current_magnitude: float | Array) -> Array:
  """``ΔW (d_in, d_out) = Σ_i α_i A_i B_i / (‖A_i‖‖B_i‖) + α_t A_t B_t`` (dense, for checks).

  Args:
    past: t adapters ``{"a" (d_in, r), "b" (r, d_out)}`` of the earlier tasks.
    past_magnitudes: (t,) α_0 … α_{t−1}.
    current: the current task's adapter, or None.
    current_magnitude: α_t (ignored when ``current`` is None).

  Returns:
    (d_in, d_out) ΔW.

  Raises:
    ValueError: no adapter at all, or ``past`` and ``past_magnitudes`` differ in length.
  """
  adapters = decoupled_adapters(past, past_magnitudes, current, current_magnitude)
  if not adapters:
    raise ValueError("decoupled_delta: no adapters")
  return sum(jnp.matmul(ad["a"], ad["b"], precision=_HIGHEST) for ad in adapters)


__all__ = ["decoupled_adapters", "decoupled_delta", "direction_scale"]
