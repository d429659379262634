"""The one tree-path module: sites, their string form, and get/set/filter on nested dicts.

A **site** (a weight matrix a method adapts or projects, or any leaf of a
parameter tree) is a tuple path in code, as Flax NNX spells paths::

    ("encoder", "layers", "3", "attention", "key", "kernel")

It has one string form, :func:`to_key`, used wherever a site must be a single
string (state dict keys, logs, checkpoints)::

    to_key(site) == "encoder.layers.3.attention.key.kernel"

The separator is ``.`` because state trees are themselves flattened on ``/``
by the checkpointer, so a ``.``-joined key stays one path component (this is
the form method states used before this module existed, so stored states keep
their keys). Parameter names never contain ``.`` (backbones build their trees
from attribute names and list indices), which makes :func:`from_key` exact.

Users and backbones also write a site as its ``/``-joined parameter path
(``"lin1/kernel"``, ``Backbone.sites``); :func:`as_site` accepts that spelling,
the key spelling and tuples alike. Everything here is plain Python on nested
dicts (no tracing): usable inside and outside ``jax.jit``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

Site = tuple[str, ...]
"""A path into a nested dict of parameters, one string per level."""

SiteLike = Union[Site, Sequence[str], str]
"""A site, its ``/``-joined parameter path or its ``.``-joined key."""

KEY_SEP = "."
PATH_SEP = "/"


def as_site(site: SiteLike) -> Site:
  """The tuple form of ``site``.

  Args:
    site: a tuple/list of path parts, a ``/``-joined parameter path
      (``"blocks/0/attn/key/kernel"``) or a ``.``-joined key
      (``"blocks.0.attn.key.kernel"``). Integer parts are turned into strings.

  Returns:
    The site as a tuple of non-empty strings.

  Raises:
    ValueError: empty site or an empty path part.
  """
  if isinstance(site, str):
    parts = tuple(site.split(PATH_SEP)) if PATH_SEP in site else tuple(site.split(KEY_SEP))
  else:
    parts = tuple(str(p) for p in site)
  if not parts or any(not p for p in parts):
    raise ValueError(f"not a site path: {site!r} (needs non-empty parts)")
  bad = [p for p in parts if KEY_SEP in p or PATH_SEP in p]
  if bad:
    raise ValueError(f"site {site!r} has parts containing {KEY_SEP!r} or {PATH_SEP!r}: {bad}")
  return parts


def to_key(site: SiteLike) -> str:
  """The one string form of a site: parts joined by ``.`` (state keys, logs, checkpoints).

  Args:
    site: a tuple of parts, a ``/`` path or a ``.`` key.

  Returns:
    ``"a.b.c"``.

  Raises:
    ValueError: an empty site, an empty part, or a part containing ``.`` or ``/``.
  """
  return KEY_SEP.join(as_site(site))


def from_key(key: str) -> Site:
  """Inverse of :func:`to_key`: ``"a.b.c"`` → ``("a", "b", "c")``.

  Args:
    key: a ``.``-joined key.

  Returns:
    The site tuple.

  Raises:
    TypeError: ``key`` is not a string.
    ValueError: an empty part, or a part containing ``/``.
  """
  if not isinstance(key, str):
    raise TypeError(f"from_key expects a string key, got {type(key).__name__}")
  return as_site(tuple(key.split(KEY_SEP)))


def to_path(site: SiteLike) -> str:
  """A site as its ``/``-joined parameter path (how ``Backbone.sites`` and LoRA adapters spell it).

  Args:
    site: a ``.`` key, a ``/`` path or a tuple of parts.

  Returns:
    ``"a/b/c"``.

  Raises:
    ValueError: as :func:`to_key`.
  """
  return PATH_SEP.join(as_site(site))


def get(tree: Mapping, site: SiteLike) -> Any:
  """The entry of a nested mapping at ``site``.

  Args:
    tree: a nested mapping.
    site: a tuple of parts, a ``/`` path or a ``.`` key.

  Returns:
    The entry (a leaf or a sub-mapping).

  Raises:
    KeyError: naming the missing part and the keys present at that level.
  """
  node = tree
  parts = as_site(site)
  for i, part in enumerate(parts):
    if not isinstance(node, Mapping) or part not in node:
      have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise KeyError(f"no {part!r} at {PATH_SEP.join(parts[:i]) or '<root>'} while resolving "
                     f"{PATH_SEP.join(parts)!r}; present: {have}")
    node = node[part]
  return node


def set(tree: Mapping, site: SiteLike, value: Any) -> dict:  # pylint: disable=redefined-builtin
  """A copy of ``tree`` with ``value`` at ``site`` (only the dicts along the path are copied).

  Missing intermediate levels are created. The input is never mutated, so the
  function is safe on traced pytrees inside ``jax.jit``.

  Args:
    tree: a nested mapping.
    site: a tuple of parts, a ``/`` path or a ``.`` key.
    value: the new entry.

  Returns:
    A new dict (``tree`` untouched).
  """
  parts = as_site(site)
  head, rest = parts[0], parts[1:]
  if not rest:
    return {**tree, head: value}
  return {**tree, head: set(tree.get(head, {}), rest, value)}


def add(tree: Mapping, site: SiteLike, delta: Any) -> dict:
  """A copy of ``tree`` with ``tree[site] + delta`` at ``site``.

  Args:
    tree: a nested mapping.
    site: the entry's site.
    delta: added to the entry (broadcasting as ``+`` does).

  Returns:
    A new dict (``tree`` untouched).

  Raises:
    KeyError: ``site`` is not in ``tree``.
  """
  return set(tree, site, get(tree, site) + delta)


def leaves_with_sites(tree: Mapping, prefix: Site = ()) -> Iterator[tuple[Site, Any]]:
  """``(site, leaf)`` for every non-mapping leaf of a nested mapping, in key order.

  Args:
    tree: a nested mapping (keys sortable).
    prefix: parts prepended to every site.

  Yields:
    ``(site tuple, leaf)`` pairs, depth first, keys sorted.
  """
  for k in sorted(tree):
    v = tree[k]
    if isinstance(v, Mapping):
      yield from leaves_with_sites(v, (*prefix, str(k)))
    else:
      yield (*prefix, str(k)), v


def matches(pattern: SiteLike, site: SiteLike) -> bool:
  """Whether ``site`` matches a glob ``pattern`` (``fnmatch`` on the ``/``-joined path).

  ``"*kernel"`` matches every kernel; ``"blocks/*/attn/key/kernel"`` one role.

  Args:
    pattern: a glob over the ``/`` path (or a site, turned into its path).
    site: a tuple of parts, a ``/`` path or a ``.`` key.

  Returns:
    True on a case-sensitive ``fnmatch`` match.
  """
  pattern = pattern if isinstance(pattern, str) else to_path(pattern)
  return fnmatch.fnmatchcase(to_path(site), pattern)


def filter_sites(tree: Mapping, patterns: str | Iterable[str]) -> tuple[Site, ...]:
  """Sites of the leaves of ``tree`` matching any of the glob ``patterns``, in key order.

  Args:
    tree: a nested mapping.
    patterns: one glob or several.

  Returns:
    The site tuples of the matching leaves.
  """
  patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
  return tuple(s for s, _ in leaves_with_sites(tree) if any(matches(p, s) for p in patterns))


__all__ = ["KEY_SEP", "PATH_SEP", "Site", "SiteLike", "add", "as_site", "filter_sites", "from_key",
           "get", "leaves_with_sites", "matches", "set", "to_key", "to_path"]
