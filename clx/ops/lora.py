"""LoRA adapters as plain pytrees, addressed by "path/to/kernel" strings.

Convention (same as `flax.nnx.LoRA`): a Flax kernel W is (d_in, d_out) and
acts as y = x W, and an adapter is a dict
    {"a": (d_in, r), "b": (r, d_out)},   ΔW = scale · a @ b
which is LoRA's h = W₀x + BAx (Hu et al. 2021) in Flax's transposed layout.
so y = x (W + ΔW). A leading stack axis, a (s, d_in, r) / b (s, r, d_out),
holds s adapters for one kernel (e.g. one per task, InfLoRA-style) and means
their sum. `params` and adapter collections are nested dicts of arrays; paths
join dict keys with "/". Everything that maps arrays to arrays is jit-able
(paths, patterns, ranks and init names are static Python values).
"""

from __future__ import annotations

import fnmatch
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Adapter = Mapping[str, Array]
AdapterSpec = Union[Adapter, Sequence[Adapter]]
Initializer = Callable[[Array, tuple[int, ...], Any], Array]
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------


def path_str(path: Sequence[Any]) -> str:
  """Turns a jax key path of dict keys into "a/b/c".

  Args:
    path: tuple of `jax.tree_util.DictKey` (as from `tree_flatten_with_path`).

  Returns:
    The keys joined by "/".

  Raises:
    ValueError: for a non-dict key (list/tuple index, attribute) or a key
      containing "/" (the path would not round-trip).
  """
  parts = []
  for entry in path:
    if not isinstance(entry, jax.tree_util.DictKey):
      raise ValueError(
          f"only dict keys are supported in parameter paths, got "
          f"{type(entry).__name__} {entry!r} in {jax.tree_util.keystr(path)}."
      )
    key = str(entry.key)
    if "/" in key:
      raise ValueError(f"dict key {key!r} contains '/', cannot form a path.")
    parts.append(key)
  return "/".join(parts)


def flatten_paths(tree: Any) -> dict[str, Any]:
  """Nested dict of leaves → {"a/b/c": leaf}, in jax's (sorted-key) order.

  Args:
    tree: nested dicts whose leaves are arrays (or any non-dict leaves).

  Returns:
    Flat dict from path string to leaf. Non-string keys become str(key).
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(path): leaf for path, leaf in leaves}


def unflatten_paths(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": leaf} → nested dict; the inverse of `flatten_paths`.

  Args:
    flat: flat dict from path string to leaf.

  Returns:
    Nested dict.

  Raises:
    ValueError: when one path is a prefix of another ("a/b" and "a/b/c").
  """
  nested: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = nested
    keys = path.split("/")
    for depth, key in enumerate(keys[:-1]):
      child = node.setdefault(key, {})
      if not isinstance(child, dict):
        raise ValueError(
            f"path {path!r} conflicts with leaf at "
            f"{'/'.join(keys[: depth + 1])!r}."
        )
      node = child
    if keys[-1] in node:
      raise ValueError(f"path {path!r} conflicts with another path.")
    node[keys[-1]] = leaf
  return nested


def match_paths(params: Any, patterns: str | Sequence[Any]) -> list[str]:
  """Leaf paths of `params` matching any of `patterns`, in flatten order.

  A string pattern is a glob matched against the whole path with
  `fnmatch.fnmatchcase`; "*" also crosses "/" (so "*/query/kernel" matches
  "encoder/layer_0/attn/query/kernel"). A compiled `re.Pattern`, or a string
  starting with "re:", is a regular expression that must match the whole
  path (`re.fullmatch`).

  Args:
    params: nested dict of arrays (values are not read).
    patterns: one pattern or a sequence of them.

  Returns:
    Matching paths, each at most once.
  """
  if isinstance(patterns, (str, re.Pattern)):
    patterns = [patterns]
  matchers = []
  for pattern in patterns:
    if isinstance(pattern, re.Pattern):
      matchers.append(pattern.fullmatch)
    elif isinstance(pattern, str) and pattern.startswith("re:"):
      matchers.append(re.compile(pattern[3:]).fullmatch)
    elif isinstance(pattern, str):
      matchers.append(lambda p, g=pattern: fnmatch.fnmatchcase(p, g))
    else:
      raise ValueError(f"pattern must be a str or re.Pattern, got {pattern!r}.")
  return [p for p in flatten_paths(params) if any(m(p) for m in matchers)]


# ----------------------------------------------------------------------------
# Deltas and application
# ----------------------------------------------------------------------------


def _check_adapter(adapter: Any, where: str) -> None:
  if not isinstance(adapter, Mapping) or set(adapter) != {"a", "b"}:
    keys = sorted(adapter) if isinstance(adapter, Mapping) else type(adapter)
    raise ValueError(
        f"adapter for {where} must be a dict with keys 'a' and 'b', got {keys}."
    )
  a_shape, b_shape = np.shape(adapter["a"]), np.shape(adapter["b"])
  if (
      len(a_shape) not in (2, 3)
      or len(a_shape) != len(b_shape)
      or a_shape[:-2] != b_shape[:-2]
      or a_shape[-1] != b_shape[-2]
  ):
    raise ValueError(
        f"adapter for {where} needs a (d_in, r) and b (r, d_out), optionally "
        f"with the same leading stack axis; got a {a_shape}, b {b_shape}."
    )


def lora_delta(adapter: Adapter, scale: Any = 1.0) -> Array:
  """ΔW = scale · a @ b.

  Args:
    adapter: {"a": (..., d_in, r), "b": (..., r, d_out)}; leading axes
      broadcast (a stack of s adapters gives s deltas).
    scale: scalar (e.g. α / r), may be traced.

  Returns:
    (..., d_in, d_out) delta in the adapters' result dtype.
  """
  _check_adapter(adapter, "lora_delta")
  return scale * jnp.matmul(adapter["a"], adapter["b"], precision=_HIGHEST)


def _factors(spec: AdapterSpec, path: str) -> tuple[Array, Array]:
  """The adapters of one kernel as one factor pair: down (d_in, R), up (R, d_out).

  A list/tuple of adapters and leading stack axes are concatenated along the
  rank, [a_1 … a_m] and [b_1; …; b_m] (R = Σ r_j), so that
  down @ up = Σ_j a_j @ b_j.
  """
  adapters = [spec] if isinstance(spec, Mapping) else list(spec)
  if not adapters:
    raise ValueError(f"empty adapter list for {path!r}.")
  downs, ups = [], []
  for adapter in adapters:
    _check_adapter(adapter, repr(path))
    a, b = jnp.asarray(adapter["a"]), jnp.asarray(adapter["b"])
    if a.ndim == 3:  # (s, d_in, r) stack -> (d_in, s·r); b (s, r, d_out)
      a = jnp.moveaxis(a, 0, 1).reshape(a.shape[1], -1)
      b = b.reshape(-1, b.shape[-1])
    delta_shape = (a.shape[0], b.shape[1])
    first_shape = (downs[0].shape[0], ups[0].shape[1]) if downs else None
    if first_shape is not None and delta_shape != first_shape:
      raise ValueError(
          f"adapters for {path!r} disagree on the delta shape: "
          f"{first_shape} vs {delta_shape}."
      )
    downs.append(a)
    ups.append(b)
  if len(downs) == 1:
    return downs[0], ups[0]
  return jnp.concatenate(downs, axis=1), jnp.concatenate(ups, axis=0)


def _summed_delta(spec: AdapterSpec, path: str, scale: Any) -> Array:
  """scale · Σ_j a_j @ b_j over a list/tuple and over leading stack axes.

  Computed as one matmul [a_1 … a_m] @ [b_1; …; b_m] (ranks concatenated),
  which never materialises m separate (d_in, d_out) deltas.
  """
  down, up = _factors(spec, path)
  return scale * jnp.matmul(down, up, precision=_HIGHEST)


def lora_branch(x: Array, spec: AdapterSpec, scale: Any = 1.0, *,
                path: str = "lora_branch") -> Array:
  """The factored LoRA branch y_Δ = scale · Σ_j (x a_j) b_j, without forming a_j @ b_j.

  Equal to x @ (scale · Σ_j a_j b_j) (the merged delta of :func:`apply_adapters`)
  up to float rounding. Per row it costs 2·R·(d_in + d_out) flops (R the summed
  rank) instead of the merged form's 2·d_in·d_out per row for the kernel gradient
  in the backward pass; the rank-R intermediate x A is what the backward keeps.
  The factors are cast to x's dtype (the compute dtype, as ``nnx.Linear`` casts its
  kernel) and the matmuls use the default precision, like the layer's own x W.

  Args:
    x: (..., d_in) inputs of the adapted layer.
    spec: {"a": (d_in, r), "b": (r, d_out)}, a stacked adapter (s, d_in, r) /
      (s, r, d_out), or a list/tuple of them (summed).
    scale: scalar multiplier (e.g. α / r), may be traced.
    path: the kernel path, named in errors.

  Returns:
    (..., d_out) in x's dtype.

  Raises:
    ValueError: malformed adapters, or d_in ≠ x.shape[-1].
  """
  down, up = _factors(spec, path)
  if down.shape[0] != x.shape[-1]:
    raise ValueError(f"adapter for {path!r} expects inputs with {down.shape[0]} features, "
                     f"got x {tuple(x.shape)}.")
  hidden = jnp.matmul(x, down.astype(x.dtype))  # (..., R)
  return jnp.matmul(hidden * jnp.asarray(scale, x.dtype), up.astype(x.dtype))


def check_adapters(params: Any, adapters: Mapping[str, AdapterSpec]) -> None:
  """Checks that every adapter path is a 2-D kernel of ``params`` with a matching delta shape.

  Args:
    params: nested dict of arrays (shapes only are read).
    adapters: {"path/to/kernel": adapter | [adapter, ...]}.

  Raises:
    ValueError: naming the path when it is missing from params, is not a 2-D
      kernel, or the adapters' delta shape differs from the kernel's.
  """
  flat = flatten_paths(params)
  for path, spec in adapters.items():
    _kernel_for(flat, path, spec)


def _kernel_for(flat: Mapping[str, Any], path: str, spec: AdapterSpec) -> Any:
  """The kernel at ``path`` after checking it against ``spec`` (see :func:`check_adapters`)."""
  if path not in flat:
    near = [p for p in flat if p.endswith(path.rsplit("/", 1)[-1])][:5]
    raise ValueError(
        f"adapter path {path!r} not found in params (paths ending the same "
        f"way: {near})."
    )
  kernel = flat[path]
  if np.ndim(kernel) != 2:
    raise ValueError(
        f"adapter path {path!r} points at shape {np.shape(kernel)}, "
        f"expected a 2-D (d_in, d_out) kernel."
    )
  down, up = jax.eval_shape(lambda s: _factors(s, path), spec)
  if (down.shape[0], up.shape[1]) != tuple(np.shape(kernel)):
    raise ValueError(
        f"adapter for {path!r} gives delta {(down.shape[0], up.shape[1])} but the kernel is "
        f"{tuple(np.shape(kernel))}."
    )
  return kernel


def apply_adapters(
    params: Any, adapters: Mapping[str, AdapterSpec], scale: Any = 1.0
) -> dict[str, Any]:
  """Returns params with W ← W + Σ_j scale · a_j @ b_j at every adapter path.

  Used per forward pass (the base stays frozen; gradients flow into the
  adapters). The delta is cast to the kernel's dtype so a bf16/f32 base keeps
  its dtype. `params` is not modified.

  Args:
    params: nested dict of arrays.
    adapters: {"path/to/kernel": adapter | [adapter, ...]}; a list/tuple, or
      a leading stack axis inside one adapter, is summed (one adapter per
      task).
    scale: scalar multiplier applied to every delta.

  Returns:
    New nested dict with the same structure as `params`.

  Raises:
    ValueError: naming the path when it is missing from params, is not a
      2-D kernel, or the delta shape differs from the kernel shape.
  """
  flat = flatten_paths(params)
  for path, spec in adapters.items():
    kernel = _kernel_for(flat, path, spec)
    delta = _summed_delta(spec, path, scale)
    flat[path] = kernel + delta.astype(jnp.result_type(kernel))
  return _restore_structure(params, flat)


def _restore_structure(params: Any, flat: dict[str, Any]) -> Any:
  """Puts `flat` leaves back into `params`' exact tree structure."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  new_leaves = [flat[path_str(path)] for path, _ in leaves_with_path]
  return jax.tree_util.tree_unflatten(treedef, new_leaves)


def fold_adapters(
    params: Any, adapters: Mapping[str, AdapterSpec], scale: Any = 1.0
) -> dict[str, Any]:
  """Permanently merges adapters into the base: W ← W + Σ scale · a @ b.

  Same arithmetic and errors as `apply_adapters`. Call it once when a task
  ends and store the result as the new base (then drop or reset those
  adapters); calling `apply_adapters` on top of the folded params with the
  same adapters would add them twice.

  Args:
    params: nested dict of arrays.
    adapters: {"path/to/kernel": adapter | [adapter, ...]}.
    scale: scalar multiplier applied to every delta.

  Returns:
    New nested dict with the adapters folded in.
  """
  return apply_adapters(params, adapters, scale)


# ----------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------


def _uniform(bound_fn: Callable[[int, int], float]) -> Initializer:
  def init(key, shape, dtype):
    fan_in, fan_out = shape[-2], shape[-1]
    bound = bound_fn(fan_in, fan_out)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _normal(key, shape, dtype):
  # PEFT's "gaussian" A init: N(0, (1/r)²). r ≤ min(d_in, d_out) is enforced,
  # so r is the smaller of the two trailing dims for both a and b.
  rank = min(shape[-2], shape[-1])
  return jax.random.normal(key, shape, dtype) / rank


_INITIALIZERS: dict[str, Initializer] = {
    # torch/PEFT/InfLoRA default kaiming_uniform_(a=√5): U(±1/√fan_in).
    "kaiming_uniform": _uniform(lambda fan_in, _: 1.0 / math.sqrt(fan_in)),
    # flax.nnx.LoRA default (he_uniform): U(±√(6/fan_in)).
    "he_uniform": _uniform(lambda fan_in, _: math.sqrt(6.0 / fan_in)),
    "normal": _normal,
    "zeros": lambda key, shape, dtype: jnp.zeros(shape, dtype),
}


def _initializer(spec: str | Initializer, name: str) -> Initializer:
  if callable(spec):
    return spec
  if spec not in _INITIALIZERS:
    raise ValueError(
        f"{name} must be one of {sorted(_INITIALIZERS)} or a callable "
        f"(key, shape, dtype) -> array, got {spec!r}."
    )
  return _INITIALIZERS[spec]


def init_lora(
    key: Array,
    params: Any,
    patterns: str | Sequence[Any],
    rank: int,
    *,
    a_init: str | Initializer = "kaiming_uniform",
    b_init: str | Initializer = "zeros",
    dtype: Any = None,
) -> dict[str, dict[str, Array]]:
  """Creates {"a": (d_in, r), "b": (r, d_out)} for every matched 2-D kernel.

  With b = 0 (default) ΔW = a @ b = 0, so the adapted model starts equal to
  the base (as in Hu et al. 2021). Each path's key is
  fold_in(key, crc32(path)), so an adapter's init does not depend on which
  other paths were selected. Leaves matched by the patterns that are not 2-D
  (biases, norms) are skipped.

  Initialisers: "kaiming_uniform" U(±1/√d_in) (torch/PEFT kaiming_uniform_
  with a=√5); "he_uniform" U(±√(6/d_in)) (flax.nnx.LoRA default); "normal"
  N(0, 1/r²) (PEFT "gaussian"); "zeros"; or a callable (key, shape, dtype).

  Args:
    key: PRNG key.
    params: nested dict of arrays or `jax.ShapeDtypeStruct`s (only shapes
      and dtypes are read).
    patterns: globs/regexes, see `match_paths`.
    rank: r ≥ 1, at most min(d_in, d_out) for every matched kernel.
    a_init: initialiser for a (d_in, r).
    b_init: initialiser for b (r, d_out).
    dtype: adapter dtype; default each kernel's dtype.

  Returns:
    {"path/to/kernel": {"a": ..., "b": ...}}.

  Raises:
    ValueError: rank < 1, rank > min(d_in, d_out) (naming the path and its
      dims), or no 2-D kernel matched.
  """
  a_fn, b_fn = _initializer(a_init, "a_init"), _initializer(b_init, "b_init")
  if not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}.")
  flat = flatten_paths(params)
  adapters = {}
  for path in match_paths(params, patterns):
    kernel = flat[path]
    if np.ndim(kernel) != 2:
      continue
    d_in, d_out = np.shape(kernel)
    if rank > min(d_in, d_out):
      raise ValueError(
          f"rank {rank} is larger than min(d_in, d_out) = {min(d_in, d_out)} "
          f"for {path!r} with kernel (d_in, d_out) = ({d_in}, {d_out})."
      )
    leaf_dtype = jnp.result_type(kernel) if dtype is None else dtype
    path_key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    key_a, key_b = jax.random.split(path_key)
    adapters[path] = {
        "a": a_fn(key_a, (d_in, rank), leaf_dtype),
        "b": b_fn(key_b, (rank, d_out), leaf_dtype),
    }
  if not adapters:
    raise ValueError(
        f"patterns {patterns!r} matched no 2-D kernel (matched paths: "
        f"{match_paths(params, patterns)[:5]})."
    )
  return adapters
