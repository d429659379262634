"""The training loop: sharded, jitted, resumable (:mod:`clx.train.loop`), batched seeds
(:mod:`clx.train.seeds`), the device mesh (:mod:`clx.train.sharding`)."""

from clx.train.loop import Fitter, RunResult, TrainConfig, make_optimizer, run_method
from clx.train.seeds import run_seeds
from clx.train.sharding import make_mesh, maybe_initialize_distributed

__all__ = ["Fitter", "RunResult", "TrainConfig", "make_mesh", "make_optimizer",
           "maybe_initialize_distributed", "run_method", "run_seeds"]
