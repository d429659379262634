"""One process of the multi-process test (see ``tests/train/test_multiprocess.py``).

Run from the repository root as::

    python -m tests.train.multiprocess_worker OUT_DIR [--checkpoints DIR]

A multi-process launch sets ``CLX_COORDINATOR`` (``host:port``),
``CLX_NUM_PROCESSES`` and ``CLX_PROCESS_ID`` in each process's environment;
``jax.distributed`` is then initialised by clx's own
:func:`clx.train.sharding.maybe_initialize_distributed`, exactly as ``clx run``
does. Without these variables the same run happens in one process.

Every process runs the same small continual runs (sequential fine-tuning and
GPM on an MLP, 3 Gaussian class-incremental tasks, 2 epochs of SGD) on a mesh
over all global devices and writes ``OUT_DIR/process_<i>.json``::

    {"process_index", "process_count", "device_count", "local_device_count",
     "feeding": {MESH: {"index_chunks": bool, "device_batches": bool}},
     "runs": {METHOD: {"acc_matrix": [[...]],          # percent, null above the diagonal
                       "state": {PATH: LEAF},          # final state
                       "restored_state": {PATH: LEAF}, # --checkpoints: replayed from disk
                       "checkpoint_acc_matrix": [...], # --checkpoints: stored in meta
                       "resumed_from": int | null}}}

``MESH`` is ``default`` (:func:`make_mesh`: devices grouped by process) or
``interleaved`` (devices alternating between processes); ``LEAF`` is
``{"sha256", "dtype", "shape", "values"}`` (values as a flat list of float64,
exact for float32 leaves).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Cross-process collectives for CPU devices (Gloo over TCP). It is this jax
# version's default; set explicitly because without a CPU collectives
# implementation a jitted computation cannot span the devices of 2 processes.
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402

from clx import checkpoint as ckpt  # noqa: E402
from clx.methods import StreamSpec, build  # noqa: E402
from clx.models.mlp import mlp  # noqa: E402
from clx.data.types import ArraySplit  # noqa: E402
from clx.train.loop import Fitter, TrainConfig, run_method  # noqa: E402
from clx.train.sharding import make_mesh, maybe_initialize_distributed, replicated  # noqa: E402
from tests.helpers import make_gaussian_stream  # noqa: E402

# Global batch 10 on 4 devices is padded to 12 with masked rows, and the
# 96-example tasks end every epoch on a 6-example step: padding and masking are
# exercised, and each process feeds 6 of the 12 rows of every step.
CONFIG = TrainConfig(epochs=2, batch_size=10, eval_batch_size=16, optimizer="sgd",
                     learning_rate=0.05)
METHODS = {"finetune": {}, "gpm": {"threshold": 0.5}}  # GPM keeps a rank-5 memory of 16 dims
SEED = 0


def _leaves(tree) -> dict:
  """``{path: {"sha256", "dtype", "shape", "values"}}`` of a state pytree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    arr = np.asarray(leaf)
    out[jax.tree_util.keystr(path)] = {
        "sha256": ckpt.array_sha256(arr), "dtype": arr.dtype.name, "shape": list(arr.shape),
        "values": arr.astype(np.float64).ravel().tolist()}
  return out


def _feeding(mesh) -> dict:
  """Whether the global batches built from every process's rows are the plan's.

  Checks the index stacks of the device-resident path and the gathered
  ``x``/``y``/``mask`` batches of the host path, brought back replicated.
  """
  fitter = Fitter(mesh, quiet=True)
  plan = fitter.plan(50, 10, True, (3,))  # 5 steps of 10 real + 2 padding rows on 4 devices
  split = ArraySplit({"x": np.arange(50, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32),
                      "y": np.arange(50, dtype=np.int32)})
  gather = jax.jit(lambda a: a, out_shardings=replicated(mesh))
  idx = np.concatenate([np.asarray(gather(a["idx"]))[:steps]
                        for a, steps, _ in fitter.index_chunks(plan, 2)])
  host = [jax.tree.map(lambda v: np.asarray(gather(v)), a)
          for a, _, _ in fitter.device_batches(split, plan, "feeding")]
  return {"index_chunks": bool(np.array_equal(idx, plan)),
          "device_batches": all(
              np.array_equal(b["y"], np.where(row < 0, 0, row))
              and np.array_equal(b["x"][:, 0], np.where(row < 0, 0, row))
              and np.array_equal(b["mask"], (row >= 0).astype(np.float32))
              for b, row in zip(host, plan, strict=True))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir")
  parser.add_argument("--checkpoints", default=None,
                      help="checkpoint root shared by all processes (one subdir per method); "
                           "an existing one is resumed")
  args = parser.parse_args(argv)

  maybe_initialize_distributed()  # what is under test: clx's env-var launch
  stream = make_gaussian_stream(separation=1.0)
  spec = StreamSpec.from_stream(stream)
  record = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "runs": {}}
  mesh = make_mesh()
  devices = jax.devices()  # grouped by process; interleave them for a second mesh
  by_process = [[d for d in devices if d.process_index == p] for p in range(jax.process_count())]
  interleaved = make_mesh([d for group in zip(*by_process) for d in group])
  record["feeding"] = {"default": _feeding(mesh), "interleaved": _feeding(interleaved)}
  for name, kwargs in METHODS.items():
    method = build(name, mlp(stream.input_shape, (24,), seed=SEED), **kwargs)
    ckpt_dir = os.path.join(args.checkpoints, name) if args.checkpoints else None
    res = run_method(method, stream, CONFIG, seed=SEED, mesh=mesh, checkpoint_dir=ckpt_dir,
                     quiet=True, progress=False)
    run = {"acc_matrix": [[None if np.isnan(v) else float(v) for v in row]
                          for row in res.acc_matrix],
           "state": _leaves(res.state), "resumed_from": res.resumed_from}
    if ckpt_dir:
      # Every process replays the checkpoints that the processes wrote together.
      initial = method.init(jax.random.fold_in(jax.random.PRNGKey(SEED), 0), spec)
      with ckpt.TaskCheckpointer(ckpt_dir, read_only=True) as c:
        restored, meta = c.restore_state(len(stream) - 1, initial)
      run["restored_state"] = _leaves(restored)
      run["checkpoint_acc_matrix"] = meta["acc_matrix"]
    record["runs"][name] = run
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, f"process_{jax.process_index()}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(record, f)
  os.replace(path + ".tmp", path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
