"""The training loop: sharded, jitted, resumable (:mod:`clx.train.loop`; ``run`` yields a
:class:`TaskResult` per task), the one training step (:mod:`clx.train.fit`), batched seeds
(:mod:`clx.train.seeds`), the device mesh (:mod:`clx.train.sharding`), run logs
(:mod:`clx.train.logging`)."""

from clx.train.loop import (Fitter, RunResult, TaskResult, TrainConfig, make_optimizer, run,
                            run_method)
from clx.train.seeds import run_seeds
from clx.train.sharding import make_mesh, maybe_initialize_distributed

__all__ = ["Fitter", "RunResult", "TaskResult", "TrainConfig", "make_mesh", "make_optimizer",
           "maybe_initialize_distributed", "run", "run_method", "run_seeds"]
