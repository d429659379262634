"""clx: parameter-efficient continual fine-tuning in JAX/Flax NNX.

Rooms: :mod:`clx.ops` (pure functions), :mod:`clx.models` (backbones),
:mod:`clx.methods` (continual methods as pure functions over explicit state),
:mod:`clx.data` (offline datasets and task streams), :mod:`clx.train` (the
sharded loop), :mod:`clx.checkpoint` (per-task Orbax deltas with sha256).
Subpackages are imported on demand so ``import clx`` stays cheap.
"""

__version__ = "0.1.0"
