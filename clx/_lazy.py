"""Import-on-first-use helpers for package attributes and name registries (no JAX import).

``import clx.train`` must not import every backbone and method (``tests/test_imports.py``):
packages that re-export many submodules (:mod:`clx.models`) or register factories by name
(:mod:`clx.models`, :mod:`clx.methods`) name *where* each thing lives and import that module
only when the thing is first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any


def lazy_attributes(package: str, table: Mapping[str, str], namespace: dict[str, Any]
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
  """Module-level ``__getattr__`` / ``__dir__`` (PEP 562) that import submodules on first use.

  Args:
    package: the package's ``__name__``, e.g. ``"clx.models"``.
    table: attribute name -> submodule name (relative to ``package``). An attribute
      named like its submodule is the submodule itself; any other is that
      submodule's attribute of the same name.
    namespace: the package's ``globals()``; a resolved value is stored there, so
      ``__getattr__`` runs once per name.

  Returns:
    ``(__getattr__, __dir__)`` to assign at the package's module level.
  """

  def __getattr__(name: str) -> Any:  # pylint: disable=invalid-name
    if name not in table:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = importlib.import_module(f"{package}.{table[name]}")
    value = module if name == table[name] else getattr(module, name)
    namespace[name] = value
    return value

  def __dir__() -> list[str]:  # pylint: disable=invalid-name
    return sorted(set(namespace) | set(table))

  return __getattr__, __dir__


class LazyRegistry(MutableMapping):
  """A name -> factory dict whose entries are imported from their module on first lookup.

  Membership, iteration and ``len`` use the table only (nothing is imported);
  ``registry[name]`` imports the one module that defines ``name``. Entries set
  by callers (``registry[name] = fn``, ``setdefault``, ``update``) take
  precedence and are kept as given.

  Args:
    what: what the entries are, for error messages (``"method"``, ``"model"``).
    table: name -> ``"module:attribute"`` (the factory is that attribute of the
      module) or ``"module"`` (the factory is ``module.REGISTRY[name]``).
  """

  def __init__(self, what: str, table: Mapping[str, str]):
    self._what = what
    self._table = dict(table)
    self._loaded: dict[str, Any] = {}

  def _resolve(self, name: str) -> Any:
    module_name, _, attribute = self._table[name].partition(":")
    module = importlib.import_module(module_name)
    if attribute:
      return getattr(module, attribute)
    registry = getattr(module, "REGISTRY", {})
    if name not in registry:
      raise LookupError(f"{module_name}.REGISTRY has no {self._what} {name!r}, but the lazy "
                        f"registry lists it there; fix the table")
    return registry[name]

  def __getitem__(self, name: str) -> Any:
    if name not in self._loaded:
      if name not in self._table:
        raise KeyError(name)
      self._loaded[name] = self._resolve(name)
    return self._loaded[name]

  def __setitem__(self, name: str, factory: Any) -> None:
    self._loaded[name] = factory

  def __delitem__(self, name: str) -> None:
    if name not in self:
      raise KeyError(name)
    self._loaded.pop(name, None)
    self._table.pop(name, None)

  def __contains__(self, name: object) -> bool:
    return name in self._loaded or name in self._table

  def __iter__(self) -> Iterator[str]:
    yield from self._table
    yield from (name for name in self._loaded if name not in self._table)

  def __len__(self) -> int:
    return len(set(self._table) | set(self._loaded))

  def __repr__(self) -> str:
    return f"LazyRegistry({self._what}s: {sorted(self)})"

  def module_of(self, name: str) -> str | None:
    """The module that defines ``name`` (None for an entry set by a caller)."""
    spec = self._table.get(name)
    return spec.partition(":")[0] if spec is not None else None
