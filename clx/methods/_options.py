"""Factory signatures from config dataclasses, old option names included (one name per concept,
DESIGN.md; the names themselves are mapped by :func:`clx.methods.base.renamed`)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any


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
