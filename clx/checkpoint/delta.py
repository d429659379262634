"""State trees as ``/``-joined paths, and the delta between two states.

:func:`state_delta` computes what a task added, changed or removed;
:func:`apply_delta` replays it. Keys are joined with ``/``; a ``/`` or ``%``
inside a key is written ``%2F`` / ``%25``; in the Orbax tree a ``.`` or ``%``
inside a key is written ``%2E`` / ``%25`` (see :mod:`clx.checkpoint`).

This is the encoding of arbitrary ``str`` keys, not a spelling of sites: a site key made by
:func:`clx.ops.tree.to_key` (``"lin1.kernel"``) is one key, stored as one path component
unchanged. Joining state paths with ``.`` instead would make ``{"lin1.kernel": x}`` and
``{"lin1": {"kernel": x}}`` the same path, and would change the paths recorded in every
format 1 and 2 ``meta`` (``tests/train/test_checkpoint_fixture.py`` restores such steps).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from clx.checkpoint.hashing import _is_array, array_sha256

_SEP = "/"
_UNESCAPE = re.compile(r"%(25|2F|2E)")
_UNESCAPED = {"25": "%", "2F": "/", "2E": "."}


class _EmptyDict:
  """Marker for an empty sub-dict in a flattened state."""

  def __repr__(self) -> str:
    return "{}"


_EMPTY = _EmptyDict()
_MISSING = object()


def _esc(key: str) -> str:
  """Escapes a key for use as one component of a ``/``-joined path."""
  return key.replace("%", "%25").replace(_SEP, "%2F")


def _orbax_key(key: str) -> str:
  """Escapes a key for Orbax, which names parameters by joining keys with ``.``."""
  return key.replace("%", "%25").replace(".", "%2E")


def _unesc(component: str) -> str:
  """Inverse of :func:`_esc` and of :func:`_orbax_key`."""
  return _UNESCAPE.sub(lambda m: _UNESCAPED[m.group(1)], component)


def _split(path: str) -> list[str]:
  return [_unesc(c) for c in path.split(_SEP)]


def _check_key(key: Any, prefix: str, what: str) -> None:
  if not isinstance(key, str):
    raise TypeError(f"{what}: key {key!r} under {prefix.rstrip(_SEP) or '<root>'!r} is a "
                    f"{type(key).__name__}; keys must be str")
  if not key:
    raise ValueError(f"{what}: empty key under {prefix.rstrip(_SEP) or '<root>'!r}; keys must "
                     "be non-empty")


def _flatten(tree: Any, what: str) -> dict[str, Any]:
  """Flattens a nested dict to ``{path: leaf}``; empty sub-dicts map to ``_EMPTY``."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"{what} must be a nested dict (Mapping) with str keys, got "
                    f"{type(tree).__name__}")
  out: dict[str, Any] = {}

  def rec(node: Mapping, prefix: str) -> None:
    for k, v in node.items():
      _check_key(k, prefix, what)
      path = prefix + _esc(k)
      if isinstance(v, Mapping):
        if v:
          rec(v, path + _SEP)
        else:
          out[path] = _EMPTY
      elif _is_array(v):
        out[path] = v
      else:
        raise TypeError(f"{what}: leaf {path!r} has type {type(v).__name__}; leaves must be "
                        "jax.Array or numpy arrays (wrap Python scalars with np.asarray)")

  rec(tree, "")
  return out


def _unflatten(flat: Mapping[str, Any], key_fn=lambda k: k) -> dict[str, Any]:
  """Inverse of :func:`_flatten` (``_EMPTY`` becomes ``{}``); ``key_fn`` maps each key."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    *parents, last = (key_fn(k) for k in _split(path))
    node = out
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = {} if v is _EMPTY else v
  return out


def _copy_tree(tree: Mapping, what: str) -> dict[str, Any]:
  """Copies the dict structure of a nested Mapping (leaves are shared)."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"{what} must be a nested dict (Mapping) with str keys, got "
                    f"{type(tree).__name__}")
  return {k: _copy_tree(v, what) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _same_array(a: Any, b: Any) -> bool:
  if a is b:
    return True
  if tuple(np.shape(a)) != tuple(np.shape(b)) or np.dtype(a.dtype) != np.dtype(b.dtype):
    return False
  return array_sha256(a) == array_sha256(b)


def state_delta(prev_state: Mapping, new_state: Mapping) -> tuple[dict[str, Any], list[str]]:
  """Computes what changed between two states.

  Leaves are compared by dtype, shape and bytes (:func:`array_sha256`), so a
  value that is recomputed but bitwise identical does not enter the delta.

  Args:
    prev_state: the state after the previous task (nested dict, str keys,
      array leaves; empty sub-dicts allowed).
    new_state: the state after this task.

  Returns:
    ``(delta, removed_paths)``. ``delta`` is a sparse nested dict holding the
    leaves of ``new_state`` that are new or whose dtype, shape or bytes
    changed (the leaf objects themselves, not copies), plus every empty
    sub-dict of ``new_state`` that was not an empty sub-dict before.
    ``removed_paths`` is the sorted list of ``"a/b/c"`` paths (see the
    module docstring for keys containing ``/``) of
    ``prev_state`` leaves (or empty sub-dicts) that are absent from
    ``new_state`` or changed kind (array ↔ empty dict).
    ``apply_delta(prev_state, delta, removed_paths)`` equals ``new_state``.

  Raises:
    TypeError / ValueError: for non-str or empty keys or leaves that are not
      arrays.
  """
  pf = _flatten(prev_state, "prev_state")
  nf = _flatten(new_state, "new_state")
  removed = [p for p, old in pf.items() if p not in nf or (old is _EMPTY) != (nf[p] is _EMPTY)]
  delta: dict[str, Any] = {}
  for p, v in nf.items():
    old = pf.get(p, _MISSING)
    if v is _EMPTY:
      if old is not _EMPTY:
        delta[p] = _EMPTY
    elif old is _MISSING or old is _EMPTY or not _same_array(old, v):
      delta[p] = v
  return _unflatten(delta), sorted(removed)


def _remove_path(tree: dict[str, Any], path: str) -> None:
  keys = _split(path)
  nodes = [tree]
  for k in keys[:-1]:
    node = nodes[-1].get(k, _MISSING)
    if not isinstance(node, dict):
      raise ValueError(f"cannot remove {path!r}: it is not in the state")
    nodes.append(node)
  if keys[-1] not in nodes[-1]:
    raise ValueError(f"cannot remove {path!r}: it is not in the state")
  del nodes[-1][keys[-1]]
  # Drop the sub-dicts that this removal emptied (not the root).
  for depth in range(len(nodes) - 1, 0, -1):
    if nodes[depth]:
      break
    del nodes[depth - 1][keys[depth - 1]]


def _merge(dst: dict[str, Any], src: Mapping, prefix: str) -> None:
  for k, v in src.items():
    _check_key(k, prefix, "delta")
    path = prefix + _esc(k)
    cur = dst.get(k, _MISSING)
    if isinstance(v, Mapping):
      if not v:
        if cur is _MISSING:
          dst[k] = {}
        elif not (isinstance(cur, dict) and not cur):
          raise ValueError(f"delta sets {path!r} to an empty dict but the state holds "
                           f"{'a non-empty dict' if isinstance(cur, dict) else 'an array'} "
                           "there that removed_paths does not remove")
        continue
      if cur is _MISSING:
        cur = dst[k] = {}
      elif not isinstance(cur, dict):
        raise ValueError(f"delta has a sub-dict at {path!r} but the state holds an array there "
                         "that removed_paths does not remove")
      _merge(cur, v, path + _SEP)
    elif _is_array(v):
      if isinstance(cur, dict):
        raise ValueError(f"delta has an array at {path!r} but the state holds a dict there "
                         "whose leaves removed_paths does not remove")
      dst[k] = v
    else:
      raise TypeError(f"delta: leaf {path!r} has type {type(v).__name__}; leaves must be arrays")


def apply_delta(state: Mapping, delta: Mapping, removed_paths: Iterable[str]) -> dict[str, Any]:
  """Applies a delta from :func:`state_delta` (pure: inputs are not modified).

  First every path in ``removed_paths`` is deleted (sub-dicts left empty by a
  deletion are dropped), then ``delta`` is merged in: its arrays replace or
  add leaves, its empty sub-dicts add empty sub-dicts.

  Args:
    state: the state the delta was computed against.
    delta: the sparse nested dict of new/changed leaves.
    removed_paths: ``"a/b/c"`` paths to delete.

  Returns:
    A new nested dict (plain ``dict`` nodes; array leaves shared, not copied).

  Raises:
    ValueError: if a removed path is not in ``state`` or the delta conflicts
      with the state's structure (e.g. an array where the state keeps a dict),
      i.e. the delta was not computed against ``state``.
  """
  out = _copy_tree(state, "state")
  if isinstance(removed_paths, str):
    raise TypeError("removed_paths must be a list of paths, not a str")
  for path in removed_paths:
    if not isinstance(path, str) or not path:
      raise TypeError(f"removed_paths entries must be non-empty str, got {path!r}")
    _remove_path(out, path)
  if not isinstance(delta, Mapping):
    raise TypeError(f"delta must be a nested dict, got {type(delta).__name__}")
  _merge(out, delta, "")
  return out

