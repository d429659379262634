"""InfLoRA with its defining component switched off: the designed down-projection.

The same 2-task run is repeated with ``a_t`` replaced by (i) the un-projected top
eigenvectors of the task's Gram matrix (the memory ignored) and (ii) a random
matrix of the same column norms. Only the designed ``a_t`` keeps every input of
the old tasks' protected space blind to the new branch.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from clx.methods import inflora as inflora_lib
from clx.models.mlp import mlp
from clx.ops import dualgpm
from clx.ops import tree as tree_ops
from clx.train.loop import TrainConfig, run_method
from clx.train.sharding import make_mesh
from tests.helpers import make_gaussian_stream

RANK = 3
CFG = TrainConfig(epochs=3, batch_size=16, learning_rate=1e-2, eval_batch_size=64)


def _unprojected(gram, basis=None, kind="remove", rank=10, *, memory_rank=None, scale=1.0,
                 form="official"):
  """The design with the memory ignored: top-r eigenvectors of C itself."""
  del basis, kind, memory_rank
  return _DESIGN(gram, None, "remove", rank, scale=scale, form=form)


def _random(gram, basis=None, kind="remove", rank=10, *, memory_rank=None, scale=1.0,
            form="official"):
  """A random a with the designed one's column norms (``scale``)."""
  del basis, kind, memory_rank, form
  d = np.shape(gram)[0]
  q, _ = np.linalg.qr(np.random.default_rng(d + rank).standard_normal((d, rank)))
  return (scale * q).astype(np.float32)


_DESIGN = dualgpm.design_down_projection


@functools.cache
def _stream():
  return make_gaussian_stream(num_tasks=2, n_train=96, dim=16, seed=3)


def _run(design):
  stream = _stream()
  backbone = mlp(stream.input_shape, (24,), seed=0)
  method = inflora_lib.inflora(backbone, lora_rank=RANK, sites="mlp", lamb=0.9, memory="gpm")
  with pytest.MonkeyPatch.context() as mp:
    if design is not None:
      mp.setattr(dualgpm, "design_down_projection", design)
    result = run_method(method, stream, CFG, mesh=make_mesh(1), quiet=True)
  return backbone, result


def _kernel_and_delta(backbone, state, site="lin1/kernel"):
  """The layer's kernel after task 0 (W + a_0 b_0) and task 1's delta a_1 b_1, float64."""
  g = tree_ops.to_key(site)
  branch0, branch1 = state["branches"]["0"], state["branches"]["1"]
  w = np.asarray(backbone.params["lin1"]["kernel"], np.float64)
  w0 = w + np.asarray(branch0["a"][g], np.float64) @ np.asarray(branch0["b"][g], np.float64)
  delta = np.asarray(branch1["a"][g], np.float64) @ np.asarray(branch1["b"][g], np.float64)
  return w0, delta


@functools.cache
def _runs():
  return {name: _run(design) for name, design in
          (("designed", None), ("unprojected", _unprojected), ("random", _random))}


def _task0_memory_projector(backbone, stream):
  """Protected projector of lin1 after task 0 (independent of how a_1 was chosen)."""
  method = inflora_lib.inflora(backbone, lora_rank=RANK, sites="mlp", lamb=0.9, memory="gpm")
  one = type(stream)(stream.name, stream.tasks[:1], stream.scenario, stream.num_classes)
  state = run_method(method, one, CFG, mesh=make_mesh(1), quiet=True).state
  mem = state["memory"]["lin1.kernel"]
  return np.asarray(dualgpm.protected_projector(mem["basis"], mem["rank"], mem["kind"]),
                    np.float64), int(mem["rank"])


def test_switching_off_the_design_breaks_interference_freedom():
  runs = _runs()
  backbone = runs["designed"][0]
  protected, rank = _task0_memory_projector(backbone, _stream())
  assert 0 < rank < 16
  x = (protected @ np.random.default_rng(0).standard_normal((16, 200))).T  # rows in the span
  rel = {}
  for name, (_, result) in runs.items():
    w0, delta = _kernel_and_delta(backbone, result.state)
    rel[name] = np.linalg.norm(x @ delta) / np.linalg.norm(x @ w0)
    # Every variant did train its branch: the delta is visible on generic inputs.
    generic = np.random.default_rng(1).standard_normal((200, 16))
    assert np.linalg.norm(generic @ delta) > 1e-3 * np.linalg.norm(generic @ w0), name
  assert rel["designed"] < 1e-5, rel
  assert rel["unprojected"] > 1e-2 and rel["random"] > 1e-2, rel
  assert min(rel["unprojected"], rel["random"]) > 1e3 * max(rel["designed"], 1e-9), rel
