"""Pure array/pytree ops for continual learning (imports only jax, numpy).

Modules:
  subspace: GPM bases and updates, projections, principal angles.
  lora:     LoRA adapters as pytrees, path utilities, apply/fold/init.
  merging:  diagonal Fisher, BECAME merge coefficient, interpolation.
  metrics:  accuracy-matrix summaries (ACC, AIA, BWT, forgetting, FWT).
  sgp:      SGP importance-scaled memory updates and projections.
  gradient_projection: GPM/SGP projection applied through a layer's inputs.
  pca:      streaming second moments and PCA from moments.
  dualgpm:  InfLoRA's designed down-projection and DualGPM memory updates.
  mixture:  DP-GMM (variational) and k-means task signatures, log-likelihoods.
  retrieval: task scoring and retrieval, the bound's quantities, screening.
  ridge:    RanPAC head (random projection, Gram statistics, ridge λ selection).
"""

from clx.ops import (dualgpm, gradient_projection, lora, merging, metrics, mixture, pca,
                     retrieval, ridge, sgp, subspace)

__all__ = ["dualgpm", "gradient_projection", "lora", "merging", "metrics", "mixture", "pca",
           "retrieval", "ridge", "sgp", "subspace"]
