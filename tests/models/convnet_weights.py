"""Seeded random weights for the conv-net parity tests (shared by the test and its generator).

The PyTorch reference outputs in ``fixtures/convnets_reference.npz`` were computed
from these exact weights (``fixtures/make_convnets_reference.py``); storing the
generator instead of 7.6M parameters keeps the fixture small. NumPy's PCG64
``default_rng`` streams are stable across platforms and versions.
"""

from __future__ import annotations

import numpy as np


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  """A float32 state dict: kernels ~ N(0, 1/fan_in), BN scales ~ 1 ± 0.2, biases ~ ±0.1."""
  rng = np.random.default_rng(seed)
  out = {}
  for name in sorted(shapes):
    shape = tuple(shapes[name])
    if len(shape) == 1 and name.endswith("weight"):
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif len(shape) == 1:
      value = 0.1 * rng.standard_normal(shape)
    else:
      fan_in = int(np.prod(shape[1:]))
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    out[name] = value.astype(np.float32)
  return out


def random_images(n: int, size: int, seed: int) -> np.ndarray:
  """(n, size, size, 3) NHWC float32 images in [0, 1)."""
  return np.random.default_rng(seed).random((n, size, size, 3)).astype(np.float32)
