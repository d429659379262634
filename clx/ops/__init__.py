"""Pure array/pytree ops for continual learning (imports only jax, numpy, chex).

Modules (each imported on first use: ``import clx.ops`` imports none of them, and
``clx.ops.lora`` or ``from clx.ops import lora`` imports that one module):
  subspace: GPM bases and updates, projections, principal angles.
  memory:   one ``Memory`` value and a ``MemoryRule`` per family (GPM, SGP, DualGPM).
  lora:     LoRA adapters as pytrees, apply/fold/init.
  tree:     the one tree-path module: sites, their string form, get/set/filter.
  merging:  diagonal Fisher, BECAME merge coefficient, interpolation.
  metrics:  accuracy-matrix summaries (ACC, AIA, BWT, forgetting, FWT).
  sgp:      SGP importance-scaled memory updates and projections.
  gradient_projection: GPM/SGP projection applied through a layer's inputs.
  null_space: Adam-NSCL's update projected into the null space of old inputs.
  pca:      streaming second moments and PCA from moments.
  dualgpm:  InfLoRA's designed down-projection and DualGPM memory updates.
  alignment: classifier alignment with class-wise Gaussian feature statistics.
  mixture:  DP-GMM (variational) and k-means task signatures, log-likelihoods.
  retrieval: task scoring and retrieval, the bound's quantities, screening.
  ridge:    RanPAC head (random projection, Gram statistics, ridge λ selection).
  prototypes: class-prototype classifier (SimpleCIL / APER, RanPAC's M = 0).
  prompts:  prompt-pool ops of L2P, DualPrompt and CODA-Prompt.
  sd_lora:  SD-LoRA's decoupled magnitude/direction update.
  schedules: the official per-epoch cosine of InfLoRA and CODA-Prompt.
"""

from __future__ import annotations

from clx._lazy import lazy_attributes

__all__ = ["alignment", "dualgpm", "gradient_projection", "lora", "memory", "merging", "metrics",
           "mixture", "null_space", "pca", "prompts", "prototypes", "retrieval", "ridge",
           "schedules", "sd_lora", "sgp", "subspace", "tree"]
__getattr__, __dir__ = lazy_attributes(__name__, {name: name for name in __all__}, globals())
