"""Option-name migration shared by the method factories (one name per concept, DESIGN.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def renamed(kwargs: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
  """``kwargs`` with old option names mapped to the current ones.

  Existing experiment configs keep running while the code uses one name per concept.

  Args:
    kwargs: factory keyword arguments.
    names: ``{old name: current name}``.

  Returns:
    A new dict; raises ``ValueError`` when an option is given under both names.
  """
  out = dict(kwargs)
  for old, new in names.items():
    if old in out:
      if new in out:
        raise ValueError(f"pass {new}= only ({old}= is its old name), not both")
      out[new] = out.pop(old)
  return out
