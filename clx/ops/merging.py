"""Fisher-weighted model merging (BECAME, Li et al. ICML 2025) over pytrees.

BECAME trains each task twice from the previous model: a stability-preserving
run (gradient projection) gives θ_GP, an unconstrained run gives θ̂. It then
merges θ = (1 − λ) θ_GP + λ θ̂ with the closed-form λ that minimises the sum
of the two tasks' diagonal-Fisher quadratic losses along that segment (see
`became_objective`). Formulas follow the official code (`GPM-based/fisher.py`
at commit 859a267), which is authoritative where the paper differs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clx.ops import _checks

Array = jax.Array
LogitsFn = Callable[[Any, Array], Array]


# ----------------------------------------------------------------------------
# Diagonal Fisher
# ----------------------------------------------------------------------------


def _cross_entropy(logits_fn: LogitsFn, params: Any, x: Array, y: Array | None,
                   **model_kwargs):
  """Per-example CE (b,). y=None means the model's own argmax ("true")."""
  logits = logits_fn(params, x, **model_kwargs)
  if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
    raise ValueError(
        f"logits_fn must return (batch, classes) = ({x.shape[0]}, C), got "
        f"shape {logits.shape}."
    )
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  if y is None:  # argmax has zero gradient; stop_gradient makes that explicit
    y = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
  return -jnp.take_along_axis(log_probs, y[:, None], axis=-1)[:, 0]


def _fisher_impl(
    logits_fn: LogitsFn,
    params: Any,
    inputs: Array,
    labels: Array,
    weights: Array,
    rng: Array | None,
    kind: str,
    batch_size: int,
    per_sample: bool,
    pass_mask: bool,
) -> Any:
  """Σ over padded batches (lax.scan) of |b|·ḡ_b² (or Σ_n g_n²), / Σ weights.

  inputs (N, ...), labels (N,), weights (N,) in {0, 1}; returns params-like.
  """
  n = inputs.shape[0]
  n_batches = math.ceil(n / batch_size)
  flat_index = jnp.arange(n_batches * batch_size)
  # Pad the last batch by repeating the last example (not zeros, which could
  # make logits_fn produce NaN) and give the padding weight 0; with pass_mask
  # the model also leaves it out of its batch statistics, so the real rows see
  # what they would see if the last batch ran alone (the official loop).
  batch_index = jnp.minimum(flat_index, n - 1).reshape(n_batches, batch_size)
  batch_weight = jnp.where(
      flat_index < n, jnp.take(weights, jnp.minimum(flat_index, n - 1)), 0.0
  ).reshape(n_batches, batch_size)

  def squared_grads(index, weight, b):
    x = jnp.take(inputs, index, axis=0)
    y = None if kind == "true" else jnp.take(labels, index, axis=0)
    count = jnp.sum(weight)
    model_kwargs = {}
    if pass_mask:
      model_kwargs["mask"] = (flat_index.reshape(n_batches, batch_size)[b] < n).astype(
          jnp.float32)
    if rng is not None:
      model_kwargs["rng"] = jax.random.fold_in(rng, b)
    if per_sample:
      def one_loss(p, x_n, y_n):
        y_n = None if y_n is None else y_n[None]
        return _cross_entropy(logits_fn, p, x_n[None], y_n)[0]

      grads = jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0))(params, x, y)
      return jax.tree.map(
          lambda g: jnp.tensordot(weight.astype(g.dtype), g**2, axes=1), grads
      )

    def mean_loss(p):
      ce = _cross_entropy(logits_fn, p, x, y, **model_kwargs)
      return jnp.sum(weight * ce) / jnp.maximum(count, 1.0)

    grads = jax.grad(mean_loss)(params)
    return jax.tree.map(lambda g: count.astype(g.dtype) * g**2, grads)

  def step(total, batch):
    contribution = squared_grads(*batch)
    add = lambda t, c: t + c.astype(t.dtype)
    return jax.tree.map(add, total, contribution), None

  # Accumulate in at least float32 so bf16 params do not lose small squares.
  zeros = jax.tree.map(
      lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
      params,
  )
  total, _ = jax.lax.scan(
      step, zeros, (batch_index, batch_weight, jnp.arange(n_batches)))
  n_valid = jnp.sum(weights)
  return jax.tree.map(
      lambda f, p: (f / jnp.maximum(n_valid, 1.0)).astype(p.dtype),
      total,
      params,
  )


_fisher_jit = jax.jit(
    _fisher_impl,
    static_argnames=("logits_fn", "kind", "batch_size", "per_sample", "pass_mask"),
)


def diagonal_fisher(
    logits_fn: LogitsFn,
    params: Any,
    inputs: Array,
    *,
    labels: Array | None = None,
    kind: str = "true",
    batch_size: int = 64,
    per_sample: bool = False,
    mask: Array | None = None,
    pass_mask: bool = False,
    rng: Array | None = None,
) -> Any:
  """Diagonal Fisher information of a softmax classifier, as a params pytree.

  Default (per_sample=False) reproduces BECAME's official
  `compute_fisher_matrix_diag`: with consecutive batches b of `batch_size`
  examples and CE_n = −log softmax(logits_fn(θ, x_n))[y_n],
    F_i = (1/N) Σ_b |b| · (∂/∂θ_i  mean_{n∈b} CE_n)²      (batched squares)
  per_sample=True gives the exact empirical diagonal
    F_i = (1/N) Σ_n (∂ CE_n/∂θ_i)²
  (the two agree for batch_size=1). Labels y_n: kind="true" uses the model's
  own argmax prediction (official `fisher_comp="true"`), kind="empirical"
  the given `labels`.

  Batches are taken in input order (shuffle beforehand to match a shuffled
  loader) and run in one jitted `lax.scan`; the last batch is padded with
  copies of the last example, weighted 0, so shapes stay static. On a model
  with batch statistics (batch norm) the padding would still change the real
  rows' outputs: `pass_mask=True` hands the batch's real-row mask to the model
  (`logits_fn(params, x, mask=m)`, m (b,) float 0/1), and the result equals
  the official loop, which runs the last `N mod batch_size` examples alone.
  `rng` turns on the model's stochastic layers (the official pass runs in
  `model.train()`, dropout on): batch b is called with
  `logits_fn(params, x, rng=jax.random.fold_in(rng, b))`. `mask` drops
  examples from their batch's loss and from N (not from the batch
  statistics). `logits_fn` is a static jit argument: pass the same function
  object across calls to reuse the compilation.

  Args:
    logits_fn: (params, x (b, ...), [mask=, rng=]) -> logits (b, C). Must be pure.
    params: pytree of float arrays.
    inputs: (N, ...) examples.
    labels: (N,) int class ids; required for kind="empirical".
    kind: "true" or "empirical".
    batch_size: examples per batch (≥ 1).
    per_sample: exact per-example squares via vmap instead of batched.
    mask: optional (N,) bool, False excludes an example.
    pass_mask: call logits_fn with `mask=` (the real rows of each batch).
    rng: PRNG key for dropout (logits_fn gets `rng=`, folded with the batch
      index); None = deterministic model.

  Returns:
    Pytree like params (same dtypes) with F ≥ 0.
  """
  if kind not in ("true", "empirical"):
    raise ValueError(f"kind must be 'true' or 'empirical', got {kind!r}.")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if per_sample and (pass_mask or rng is not None):
    raise ValueError("per_sample runs one example at a time: it takes neither "
                     "pass_mask (no batch statistics over one row) nor rng.")
  if np.ndim(inputs) < 1 or np.shape(inputs)[0] < 1:
    raise ValueError(
        f"inputs must be (N, ...) with N ≥ 1, got shape {np.shape(inputs)}."
    )
  _checks.check_finite("inputs", inputs)
  n = np.shape(inputs)[0]
  if kind == "empirical" and labels is None:
    raise ValueError("kind='empirical' needs labels of shape (N,).")
  if labels is None:
    labels = jnp.zeros((n,), jnp.int32)  # unused placeholder for "true"
  if np.shape(labels) != (n,):
    raise ValueError(
        f"labels must have shape (N,) = ({n},), got {np.shape(labels)}."
    )
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(
        f"labels must be integer class ids, got {jnp.result_type(labels)}."
    )
  if mask is None:
    weights = jnp.ones((n,), jnp.float32)
  else:
    if np.shape(mask) != (n,):
      raise ValueError(
          f"mask must have shape (N,) = ({n},), got {np.shape(mask)}."
      )
    if _checks.is_concrete(mask) and not np.asarray(mask).any():
      raise ValueError("mask excludes every example; the Fisher is undefined.")
    weights = jnp.asarray(mask).astype(jnp.float32)
  try:
    hash(logits_fn)
    fisher_fn = _fisher_jit
  except TypeError:  # unhashable callable: cannot be a static jit argument
    fisher_fn = _fisher_impl
  return fisher_fn(
      logits_fn=logits_fn,
      params=params,
      inputs=jnp.asarray(inputs),
      labels=jnp.asarray(labels),
      weights=weights,
      rng=rng,
      kind=kind,
      batch_size=int(batch_size),
      per_sample=bool(per_sample),
      pass_mask=bool(pass_mask),
  )


# ----------------------------------------------------------------------------
# BECAME coefficient and objective
# ----------------------------------------------------------------------------


def _check_trees(**trees: Any) -> None:
  """Same tree structure and leaf shapes for all trees; finite leaves."""
  names = list(trees)
  ref_name = names[0]
  ref_def = jax.tree.structure(trees[ref_name])
  ref_shapes = [np.shape(x) for x in jax.tree.leaves(trees[ref_name])]
  for name in names[1:]:
    tree_def = jax.tree.structure(trees[name])
    if tree_def != ref_def:
      raise ValueError(
          f"{name} has tree structure {tree_def}, expected that of "
          f"{ref_name}: {ref_def}."
      )
    shapes = [np.shape(x) for x in jax.tree.leaves(trees[name])]
    for index, (got, want) in enumerate(zip(shapes, ref_shapes)):
      if got != want:
        raise ValueError(
            f"{name} leaf {index} has shape {got}, {ref_name} has {want}."
        )
  for name, tree in trees.items():
    for leaf in jax.tree.leaves(tree):
      _checks.check_finite(name, leaf)
      if name.startswith("fisher"):
        _checks.check_nonnegative(name, leaf)


def _safe_ratio(num: Array, den: Array) -> Array:
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def became_coefficient(
    theta_gp: Any,
    theta_hat: Any,
    fisher_cur: Any,
    fisher_old: Any,
    *,
    per_leaf: bool = False,
) -> Any:
  """BECAME's closed-form merge coefficient (official `compute_fisher_merging`).

    λ = Σ_i F_cur,i (θ̂_i − θ_GP,i)² / Σ_i (F_cur,i + F_old,i)(θ̂_i − θ_GP,i)²

  summed over all leaves (one global scalar, as in the official code); it is
  the minimiser of `became_objective`, and lies in [0, 1] because F ≥ 0
  (clipped against rounding). If the denominator is 0 (θ̂ = θ_GP wherever
  F_cur + F_old > 0) the objective is constant in λ, any λ minimises it, and
  λ = 0 (keep θ_GP) is returned. The official GPM-based code sums over
  every parameter, heads included (`fisher.py` `compute_fisher_merging`
  over `named_parameters`); its NSCL-based code excludes the `last*` heads.
  To exclude leaves, zero both of their Fishers or drop them from all four
  trees.

  Numerics: each leaf's steps and Fishers are rescaled by powers of two near
  their maxima and the leaves combined on a common exponent, so λ stays in [0, 1] where the naive float32
  sums would overflow to Inf/Inf = NaN (F·Δθ² beyond 3.4e38); on ordinary
  magnitudes the value equals the direct formula up to float rounding.

  Args:
    theta_gp: θ_GP pytree (gradient-projection solution).
    theta_hat: θ̂ pytree (unconstrained solution), same structure.
    fisher_cur: diag F of the current task at θ̂, same structure, ≥ 0.
    fisher_old: accumulated diag F of old tasks, same structure, ≥ 0.
    per_leaf: return a pytree of per-leaf scalars (the per-layer option,
      each leaf's own minimiser) instead of one global scalar.

  Returns:
    Scalar λ in [0, 1], or a pytree of such scalars when per_leaf.
  """
  _check_trees(
      theta_gp=theta_gp,
      theta_hat=theta_hat,
      fisher_cur=fisher_cur,
      fisher_old=fisher_old,
  )
  return _became_coefficient(
      theta_gp, theta_hat, fisher_cur, fisher_old, per_leaf
  )


def _pow2_exponent(x: Array) -> Array:
  """e with x = m · 2^e, m in [0.5, 1) (0 for x = 0)."""
  return jnp.frexp(x)[1].astype(jnp.int32)


def _times_pow2(x: Array, e: Array) -> Array:
  """x · 2^e as two multiplications by normal powers of two: exact, and no
  denormal factor that XLA would flush to zero (1/3e38 is one)."""
  half = e // 2
  return x * jnp.exp2(half.astype(x.dtype)) * jnp.exp2((e - half).astype(x.dtype))


def _scaled_leaf_sums(gp, hat, f_cur, f_old):
  """One leaf's sums with steps and Fishers rescaled by powers of two to ≤ 1.

  Returns (num, den, e) with the true sums equal to 2^e · (num, den) (e is an
  int32; -2^30 for a leaf that contributes nothing). The naive float32 sums
  overflow (to Inf, then NaN = Inf/Inf) once F·Δθ² passes 3.4e38, e.g.
  Δθ ~ 1e20; scaled, every term is ≤ 1 and λ stays in [0, 1]. Δθ is taken as
  θ̂/2 − θ_GP/2 (the factor cancels in λ), so even opposite float32 extremes
  do not overflow.
  """
  step = jnp.asarray(hat) / 2 - jnp.asarray(gp) / 2
  f_cur, f_old = jnp.asarray(f_cur), jnp.asarray(f_old)
  step_max = jnp.max(jnp.abs(step), initial=0.0)
  fisher_max = jnp.maximum(jnp.max(f_cur, initial=0.0), jnp.max(f_old, initial=0.0))
  live = (step_max > 0) & (fisher_max > 0)
  e_step, e_fisher = _pow2_exponent(step_max), _pow2_exponent(fisher_max)
  step = _times_pow2(step, -e_step)
  step_sq = step * step
  f_cur, f_old = _times_pow2(f_cur, -e_fisher), _times_pow2(f_old, -e_fisher)
  num = jnp.sum(f_cur * step_sq)
  den = jnp.sum((f_cur + f_old) * step_sq)
  e = jnp.where(live, e_fisher + 2 * e_step, -(2**30))
  return (jnp.where(live, num, 0.0), jnp.where(live, den, 0.0), e)


# Checks run on host above; the arithmetic is one jitted call, so eager use
# compiles once per tree signature instead of once per leaf op.
@functools.partial(jax.jit, static_argnums=4)
def _became_coefficient(theta_gp, theta_hat, fisher_cur, fisher_old, per_leaf):
  sums = jax.tree.map(_scaled_leaf_sums, theta_gp, theta_hat, fisher_cur, fisher_old)
  is_triple = lambda x: isinstance(x, tuple)
  if per_leaf:  # each leaf's own scale cancels in its own ratio
    return jax.tree.map(
        lambda s: jnp.clip(_safe_ratio(s[0], s[1]), 0.0, 1.0), sums, is_leaf=is_triple
    )
  triples = jax.tree.leaves(sums, is_leaf=is_triple)
  if not triples:
    return jnp.zeros((), jnp.float32)
  # Bring the leaves to the scale of the largest one (weights 2^(e − top) ≤ 1,
  # so the sums cannot overflow either; far smaller leaves underflow to 0).
  top = jnp.max(jnp.stack([t[2] for t in triples]))
  num, den = 0.0, 0.0
  for leaf_num, leaf_den, e in triples:
    shift = jnp.maximum(e - top, -300)  # keeps the exponent arithmetic in range
    num = num + _times_pow2(leaf_num, shift)
    den = den + _times_pow2(leaf_den, shift)
  return jnp.clip(_safe_ratio(jnp.asarray(num), jnp.asarray(den)), 0.0, 1.0)


def became_objective(
    lam: Any, theta_gp: Any, theta_hat: Any, fisher_cur: Any, fisher_old: Any
) -> Array:
  """Fisher-weighted two-task loss on the merge segment (BECAME).

    L(λ) = Σ_i F_cur,i (θ_i − θ̂_i)² + F_old,i (θ_i − θ_GP,i)²,
    θ = (1 − λ) θ_GP + λ θ̂.

  Derivation: with δ = θ̂ − θ_GP, θ − θ̂ = −(1 − λ) δ and θ − θ_GP = λ δ, so
  L = (1 − λ)² A + λ² B with A = Σ F_cur δ², B = Σ F_old δ²; dL/dλ = 0 gives
  λ* = A / (A + B), i.e. `became_coefficient`. With a pytree of per-leaf λ
  the sum separates by leaf and each leaf's minimiser is its per-leaf λ.

  Args:
    lam: scalar or pytree of scalars matching the params' leaves.
    theta_gp, theta_hat, fisher_cur, fisher_old: as in `became_coefficient`.

  Returns:
    Scalar L(λ).
  """
  _check_trees(
      theta_gp=theta_gp,
      theta_hat=theta_hat,
      fisher_cur=fisher_cur,
      fisher_old=fisher_old,
  )
  lams = _per_leaf_lams(theta_gp, lam)
  return _became_objective(lams, theta_gp, theta_hat, fisher_cur, fisher_old)


@jax.jit
def _became_objective(lams, theta_gp, theta_hat, fisher_cur, fisher_old):
  theta = _interpolate(theta_gp, theta_hat, lams)
  terms = jax.tree.map(
      lambda t, gp, hat, f_cur, f_old: jnp.sum(
          f_cur * (t - hat) ** 2 + f_old * (t - gp) ** 2
      ),
      theta, theta_gp, theta_hat, fisher_cur, fisher_old,
  )
  return jnp.asarray(sum(jax.tree.leaves(terms)))


def interpolate(a: Any, b: Any, lam: Any) -> Any:
  """(1 − λ) a + λ b over pytrees; exact at λ = 0 and λ = 1.

  Args:
    a: pytree of arrays (λ = 0 end).
    b: pytree of arrays, same structure and shapes (λ = 1 end).
    lam: scalar, or a pytree of scalars with a's structure (per leaf).

  Returns:
    Pytree like a, in a's leaf dtypes.
  """
  _check_trees(a=a, b=b)
  return _interpolate(a, b, _per_leaf_lams(a, lam))


def _per_leaf_lams(a: Any, lam: Any) -> Any:
  """Broadcasts a scalar λ to a's structure, or validates a per-leaf tree."""
  lam_def = jax.tree.structure(lam)
  a_def = jax.tree.structure(a)
  if jax.tree_util.treedef_is_leaf(lam_def) and np.ndim(lam) == 0:
    return jax.tree.map(lambda _: lam, a)
  if lam_def != a_def:
    raise ValueError(
        f"lam must be a scalar or a pytree of scalars with the structure of "
        f"a ({a_def}), got {lam_def}"
        + (f" of shape {np.shape(lam)}." if lam_def.num_leaves == 1 else ".")
    )
  for leaf in jax.tree.leaves(lam):
    if np.ndim(leaf) != 0:
      raise ValueError(
          f"per-leaf lam must hold scalars, got a leaf of shape "
          f"{np.shape(leaf)}."
      )
  return lam


@jax.jit
def _interpolate(a: Any, b: Any, lams: Any) -> Any:
  return jax.tree.map(
      lambda x, y, t: ((1 - t) * x + t * y).astype(jnp.result_type(x)),
      a, b, lams,
  )
