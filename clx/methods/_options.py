"""Option-name migration shared by the method factories (one name per concept, DESIGN.md)."""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any


def renamed(kwargs: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
  """``kwargs`` with old option names mapped to the current ones.

  Existing experiment configs keep running while the code uses one name per concept.

  Args:
    kwargs: factory keyword arguments.
    names: ``{old name: current name}``.

  Returns:
    A new dict; raises ``ValueError`` when an option is given under both names, and issues a
    :class:`DeprecationWarning` for every old name used (as :func:`clx.methods.base.renamed`
    does), so configs still using one are found (``tests/test_experiment_configs.py``).
  """
  out = dict(kwargs)
  for old, new in names.items():
    if old in out:
      if new in out:
        raise ValueError(f"pass {new}= only ({old}= is its old name), not both")
      warnings.warn(f"{old!r} is renamed {new!r}; the old name goes away in the next release",
                    DeprecationWarning, stacklevel=3)
      out[new] = out.pop(old)
  return out


def config_signature(factory: Callable, config_cls: type,
                     names: Mapping[str, str] = MappingProxyType({})) -> Callable:
  """Give ``factory(backbone, **kwargs)`` the explicit signature of its config's fields.

  ``inspect.signature`` (which the experiment validator binds ``method_args`` to) then
  names every option, so a misspelt one fails at validation, not when the method is built.

  Args:
    factory: ``(backbone, *, own keyword-only options, **kwargs)``.
    config_cls: the frozen dataclass ``kwargs`` builds.
    names: old option names still accepted (``{old: current}``).

  Returns:
    ``factory``, with ``__signature__`` set.
  """
  own = inspect.signature(factory)
  params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
  taken = {p.name for p in params}
  for field in dataclasses.fields(config_cls):
    if field.name not in taken:
      default = (field.default if field.default is not dataclasses.MISSING
                 else inspect.Parameter.empty)
      params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY,
                                      default=default, annotation=field.type))
      taken.add(field.name)
  for old in names:
    if old not in taken:
      params.append(inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, default=None))
  factory.__signature__ = own.replace(parameters=params)
  return factory
