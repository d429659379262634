"""Continual-learning methods, one file each, against one protocol (:mod:`clx.methods.base`)."""

from __future__ import annotations

from clx.methods.base import ContinualMethod, StreamSpec, TaskContext
from clx.methods import (became, became_nscl, gpm, inflora, inflora_ca, proteus, sequential,
                         sparc)
from clx.methods import coda_prompt, dualprompt, l2p, ranpac, sd_lora, simplecil  # comparators

REGISTRY = {**sequential.REGISTRY, **gpm.REGISTRY, **became.REGISTRY, **inflora.REGISTRY,
            **inflora_ca.REGISTRY, **became_nscl.REGISTRY, **proteus.REGISTRY, **sparc.REGISTRY,
            **l2p.REGISTRY, **dualprompt.REGISTRY, **coda_prompt.REGISTRY, **ranpac.REGISTRY,
            **simplecil.REGISTRY, **sd_lora.REGISTRY}


def build(name: str, backbone, **kwargs) -> ContinualMethod:
  """Construct a registered method by name (``clx.methods.REGISTRY``)."""
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; known methods: {sorted(REGISTRY)}")
  try:
    return REGISTRY[name](backbone, **kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for method {name!r}: {e}") from None


__all__ = ["ContinualMethod", "REGISTRY", "StreamSpec", "TaskContext", "build"]
