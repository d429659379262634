"""Continual-learning methods, one file each, against one protocol (:mod:`clx.methods.base`).

``REGISTRY`` maps each method name to its factory. It is lazy: ``name in REGISTRY``
and ``sorted(REGISTRY)`` import nothing, ``REGISTRY[name]`` / :func:`build` import
only the module that defines ``name`` (so ``import clx.train`` imports no method).
A new method module lists its names in ``_METHOD_MODULES``; ``tests/test_imports.py``
checks the table against every module's own ``REGISTRY``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clx._lazy import LazyRegistry, lazy_attributes
from clx.methods.base import ContinualMethod, StreamSpec, TaskContext, TaskInfo

if TYPE_CHECKING:
  from clx.models.base import Backbone

# module -> the names its REGISTRY defines.
_METHOD_MODULES = {
    "sequential": ("finetune", "lora", "joint"),
    "gpm": ("gpm", "sgp"),
    "became": ("became", "became_gpm", "became_sgp"),
    "inflora": ("inflora", "inflora_b5"),
    "inflora_ca": ("inflora_ca",),
    "became_nscl": ("adam_nscl", "became_nscl"),
    "proteus": ("proteus", "proteus_kmeans", "proteus_independent"),
    "sparc": ("sparc", "sparc_lora", "free_prompt", "prompt_tuning", "prompt_lora",
              "linear_probe"),
    # comparators (issue 15)
    "l2p": ("l2p",),
    "dualprompt": ("dualprompt",),
    "coda_prompt": ("coda_prompt",),
    "ranpac": ("ranpac",),
    "simplecil": ("simplecil",),
    "sd_lora": ("sd_lora",),
}
REGISTRY = LazyRegistry("method", {name: f"clx.methods.{module}"
                                   for module, names in _METHOD_MODULES.items()
                                   for name in names})
# ``clx.methods.<module>`` as an attribute, imported on first use as before the registry was lazy.
__getattr__, __dir__ = lazy_attributes(
    __name__, {m: m for m in (*_METHOD_MODULES, "heads", "passes")}, globals())


def build(name: str, backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """Construct a registered method by name (``clx.methods.REGISTRY``).

  Args:
    name: a key of ``REGISTRY`` (e.g. ``"proteus"``, ``"gpm"``).
    backbone: the backbone the method adapts.
    **kwargs: the factory's keyword options.

  Returns:
    The method.

  Raises:
    ValueError: an unknown name, or arguments the factory rejects (its TypeError, re-raised
      naming the method).
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; known methods: {sorted(REGISTRY)}")
  try:
    return REGISTRY[name](backbone, **kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for method {name!r}: {e}") from None


__all__ = ["ContinualMethod", "REGISTRY", "StreamSpec", "TaskContext", "TaskInfo", "build"]
