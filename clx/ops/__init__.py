"""Pure array/pytree ops for continual learning (imports only jax, numpy).

Modules:
  subspace: GPM bases and updates, projections, principal angles.
  lora:     LoRA adapters as pytrees, path utilities, apply/fold/init.
  merging:  diagonal Fisher, BECAME merge coefficient, interpolation.
  metrics:  accuracy-matrix summaries (ACC, AIA, BWT, forgetting, FWT).
"""

from clx.ops import lora, merging, metrics, subspace

__all__ = ["lora", "merging", "metrics", "subspace"]
