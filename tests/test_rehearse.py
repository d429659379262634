"""Rehearsals: synthetic streams with real shapes, and every pod config on 8 simulated devices.

The pod configs run in one subprocess (8 simulated CPU devices need XLA_FLAGS before JAX
starts; this suite's process has 4) with 1 step per task on 2 tasks, at the configs' real
per-example shapes, batch sizes and host passes; ViT-B/16 and Llama-3.2-1B are shrunk in
depth and width (``tiny``) so that CI stays affordable on 2 cores. The full-shape runs are
the ``slow`` test (and the BENCHMARKS.md "Rehearsal" table).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clx.data import synthetic

ROOT = Path(__file__).resolve().parents[1]

COMPARATOR_ROWS = ["l2p", "dualprompt", "coda_prompt", "ranpac", "simplecil", "sd_lora",
                   "inflora", "lora"]
# (experiment, --set overrides, methods rehearsed in CI): every pod config, with the method
# whose host passes are the heaviest of its config (Gram + DualGPM, CA's feature statistics,
# PROTEUS signatures, GPM memories + Fisher + merge, SPARC PCA + LoRA); the slow test runs all.
POD_CONFIGS = [
    ("vit_inflora", ["stream.num_tasks=5"], ["inflora"]),
    ("vit_inflora", [], ["inflora_ca"]),
    ("vit_inflora", ["stream.num_tasks=20"], ["inflora"]),
    ("vit_inflora_b5", [], ["inflora_b5"]),
    ("vit_proteus", [], ["proteus"]),
    ("cifar100_gpm", [], ["became_gpm"]),
    ("cifar100_gpm", ["stream.num_tasks=20"], ["sgp"]),
    ("miniimagenet_gpm", [], ["became_sgp"]),
    ("superglue_sparc", [], ["sparc_lora"]),
    # The comparator configs: every row (they differ in prompts, projections and optimisers).
    ("vit_comparators_cifar100", [], COMPARATOR_ROWS),
    ("vit_comparators_imr", [], COMPARATOR_ROWS),
]
# The default suite's jobs: the first config, and one comparator (CODA-Prompt: prefix-tuning
# through the ViT plus its Gram–Schmidt host step at 768-d).
DEFAULT_JOBS = [POD_CONFIGS[0], ("vit_comparators_imr", [], ["coda_prompt"])]


def _spec(**kw):
  args = dict(name="t", scenario="class", num_classes=6, task_classes=((0, 1, 2), (3, 4, 5)),
              example_shape=(8, 8, 3), train_per_task=(50, 50), test_per_task=(10, 10))
  return synthetic.SyntheticSpec(**{**args, **kw})


def test_rows_are_deterministic_lazy_and_have_the_real_shape():
  spec = _spec(mean=(0.5,), std=(0.25,))
  stream = synthetic.synthetic_stream(spec, train_rows=12, test_rows=4, seed=3)
  x = stream.tasks[1].train.x
  assert isinstance(x, synthetic.SyntheticArray)
  assert x.shape == (12, 8, 8, 3) and x.dtype == np.float32 and len(stream.tasks[1].test) == 4
  assert x.nbytes == 50 * 8 * 8 * 3 * 4  # the real split's size decides device residency
  idx = np.array([[5, 0], [11, 5]])
  batch = x[idx]
  assert batch.shape == (2, 2, 8, 8, 3)
  np.testing.assert_array_equal(batch[0, 0], batch[1, 1])  # same row, same pixels
  again = synthetic.synthetic_stream(spec, train_rows=12, test_rows=4, seed=3).tasks[1].train.x
  np.testing.assert_array_equal(again[idx], batch)
  other = synthetic.synthetic_stream(spec, train_rows=12, test_rows=4, seed=4).tasks[1].train.x
  assert not np.array_equal(other[idx], batch)
  # pixels are (u/255 - mean)/std of uint8 u: recover integers in [0, 255]
  u = (batch * 0.25 + 0.5) * 255.0
  np.testing.assert_allclose(u, np.round(u), atol=1e-3)
  assert u.min() >= -1e-3 and u.max() <= 255 + 1e-3 and u.std() > 50
  # labels cycle over the task's classes; the stream validates them
  np.testing.assert_array_equal(stream.tasks[1].train.y[:6], [3, 4, 5, 3, 4, 5])
  assert stream.tasks[1].classes == (3, 4, 5) and stream.num_classes == 6


def test_rows_are_capped_tasks_cut_and_resident_splits_materialised():
  spec = _spec(val_per_task=(5, 5))
  stream = synthetic.synthetic_stream(spec, train_rows=500, test_rows=3, num_tasks=1,
                                      resident_bytes=1e9)
  assert len(stream.tasks) == 1 and len(stream.tasks[0].train) == 50
  assert isinstance(stream.tasks[0].train.x, np.ndarray)  # small real split: held whole
  val = stream.tasks[0].val
  assert isinstance(val.x, synthetic.SyntheticArray) and len(val) == 3
  with pytest.raises(ValueError, match="num_tasks"):
    synthetic.synthetic_stream(spec, train_rows=1, test_rows=1, num_tasks=3)
  with pytest.raises(ValueError, match="train_rows"):
    synthetic.synthetic_stream(spec, train_rows=0, test_rows=1)


def test_tokens_and_transformed_images():
  tokens = _spec(kind="tokens", example_shape=(16,), vocab_size=7)
  ids = synthetic.synthetic_stream(tokens, train_rows=4, test_rows=2).tasks[0].train.x[np.arange(4)]
  assert ids.dtype == np.int32 and ids.shape == (4, 16) and ids.min() >= 0 and ids.max() < 7
  images = _spec(example_shape=(224, 224, 3), source_shape=(32, 32, 3),
                 train_transform="rrc224_flip", test_transform="resize224")
  stream = synthetic.synthetic_stream(images, train_rows=2, test_rows=2)
  train, test = stream.tasks[0].train.x[0], stream.tasks[0].test.x[0]
  assert train.shape == test.shape == (224, 224, 3)
  # resize224 of a 32x32 source is smooth (bilinear upsampling): neighbours nearly equal
  assert np.abs(np.diff(test, axis=0)).mean() < 0.1 < np.abs(np.diff(
      synthetic.synthetic_stream(_spec(example_shape=(224, 224, 3)), train_rows=1,
                                 test_rows=1).tasks[0].test.x[0], axis=0)).mean()


def test_bad_specs_name_the_problem():
  with pytest.raises(ValueError, match="kind"):
    _spec(kind="audio")
  with pytest.raises(ValueError, match="train_per_task"):
    _spec(train_per_task=(50,))
  with pytest.raises(ValueError, match=r"task 1 classes"):
    _spec(task_classes=((0,), (9,)))
  with pytest.raises(ValueError, match="makes"):
    _spec(source_shape=(32, 32, 3), train_transform="rrc224_flip", test_transform="resize224")
  with pytest.raises(KeyError, match="no synthetic spec"):
    synthetic.spec_for_config({"stream": {"name": "no_such_stream"}})


def test_the_measured_step_is_the_loops_step_with_its_schedule(monkeypatch):
  # The rehearsal compiles the loop's own step (fit.make_train_step) with the optimiser and
  # schedule the loop builds (the method's own schedule included), not a copy of it.
  from clx import rehearse
  from clx.methods import build
  from clx.models.mlp import mlp
  from clx.train import fit, run_method
  from clx.train.config import TrainConfig
  from clx.train.sharding import make_mesh
  from tests.helpers import make_gaussian_stream

  built, asked = [], []
  real = fit.make_train_step
  monkeypatch.setattr(fit, "make_train_step", lambda *a, **k: built.append(k) or real(*a, **k))
  stream = make_gaussian_stream(num_tasks=2, n_train=40)
  method = build("inflora", mlp(stream.input_shape, (16,), seed=0), lora_rank=2, sites=("mlp",),
                 lr_schedule="epoch_cosine")
  method = method._replace(lr_schedule=lambda c: asked.append(c) or (lambda n: 0.01))
  record = {}
  cfg = TrainConfig(epochs=1, batch_size=10, optimizer="adam", learning_rate=0.01)
  run_method(rehearse._instrument(method, record, 2), stream, cfg,  # pylint: disable=protected-access
             mesh=make_mesh(1), quiet=True)
  # Per task: one step built by the rehearsal and one by the loop (the old rehearsal built 0).
  assert len(built) == 4
  assert len(asked) == 4  # the schedule was asked by the loop and by the rehearsal, per task
  for t in (0, 1):
    step = record[t]["step"]
    assert step["batch"] == 10 and step["step_s"] > 0 and step["memory"]["peak"] > 0


def test_the_measured_step_gets_the_state_placed_as_the_loop_places_it(monkeypatch):
  # begin_task may return leaves off the mesh (new leaves computed on one device, as the host
  # passes' linear algebra is: passes.on_one_device). The loop places the state right after
  # begin_task; the rehearsal's step, compiled before that, must see the same placement. On
  # the old code the whole-state-on-device-0 case below failed to compile (incompatible
  # devices) on this suite's 4 devices; InfLoRA had a special case for its own new leaves.
  import jax

  from clx import rehearse
  from clx.methods import build
  from clx.models.mlp import mlp
  from clx.train import run_method
  from clx.train.config import TrainConfig
  from clx.train.sharding import make_mesh
  from tests.helpers import make_gaussian_stream

  assert jax.device_count() >= 4
  stream = make_gaussian_stream(num_tasks=2, n_train=40)
  method = build("inflora", mlp(stream.input_shape, (16,), seed=0), lora_rank=2, sites=("mlp",))
  begin = method.begin_task

  def begin_on_one_device(state, ctx):
    first = jax.devices()[0]
    return jax.tree.map(lambda v: jax.device_put(v, first) if isinstance(v, jax.Array) else v,
                        begin(state, ctx))

  seen = []
  measure = rehearse.measure_step

  def spy(method, ctx, state, **kw):
    seen.append(sorted({d.id for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array)
                        for d in leaf.devices()}))
    return measure(method, ctx, state, **kw)

  monkeypatch.setattr(rehearse, "measure_step", spy)
  record = {}
  cfg = TrainConfig(epochs=1, batch_size=10, optimizer="adam", learning_rate=0.01)
  result = run_method(rehearse._instrument(  # pylint: disable=protected-access
      method._replace(begin_task=begin_on_one_device), record, 1), stream, cfg,
      mesh=make_mesh(4), quiet=True)
  assert seen == [[0, 1, 2, 3]] * 2
  assert np.isfinite(record[1]["step"]["step_s"]) and np.all(np.isfinite(np.diag(result.acc_matrix)))


_RUNNER = r"""
import json, sys
from clx import experiment, rehearse
jobs, workdir, steps, tasks, tiny = json.loads(sys.argv[1])
out = []
for i, (name, sets, methods) in enumerate(jobs):
  config = experiment.apply_overrides(experiment.load_config(name), sets)
  report = rehearse.rehearse(config, f"{workdir}/{i}", steps=steps, tasks=tasks, tiny=tiny,
                             test_rows=8, methods=methods)
  print(rehearse.format_report(report), flush=True)
  out.append(report)
print("REPORTS " + json.dumps(out, default=str))
"""


def _run_configs(jobs, tmp_path, *, steps, tasks, tiny, timeout):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", _RUNNER,
                         json.dumps([jobs, str(tmp_path), steps, tasks, tiny])],
                        capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("REPORTS ")][-1]
  return json.loads(line[len("REPORTS "):])


def _check_report(report, job, *, tasks, steps, tiny):
  name, _, methods = job
  config_methods = methods
  assert report["devices"] == 8 and report["random_weights"] and report["tiny"] == tiny
  assert report["stream"]["tasks_rehearsed"] == tasks
  for method, run in report["methods"].items():
    assert config_methods is None or method in config_methods
    assert run["acc_matrix_finite"], (name, method)
    assert [e["task"] for e in run["tasks"]] == list(range(tasks))
    for e in run["tasks"]:
      batch = run["train"]["batch_size"]
      real = report["stream"]["train_per_task_real"][e["task"]]
      assert e["train_rows"] == min(steps * batch, real)
      st = e["step"]
      assert st["batch"] == batch and st["step_s"] > 0 and st["examples_per_s"] > 0
      assert st["memory"] is not None and st["memory"]["peak"] > 0
      assert e["checkpoint_bytes"] > 0 and e["host_peak_rss_bytes"] > 0
      base = e["placed_bytes"]["base"]
      assert base["devices"] == 8 and 0 < base["max_device"] <= base["total"]
      if run["train"]["param_sharding"] == "replicated":
        assert base["max_device"] == base["total"]
      for key in ("begin_task_s", "fit_s", "end_task_s", "eval_s"):
        assert e[key] >= 0


def test_the_slow_rehearsal_covers_every_comparator_row():
  from clx.experiment import load_config
  for name in ("vit_comparators_cifar100", "vit_comparators_imr"):
    listed = [methods for job, _, methods in POD_CONFIGS if job == name]
    assert listed and set(load_config(name)["methods"]) <= set(listed[0]), name


def test_tiny_rehearsal_shrinks_the_random_projection():
  # RanPAC's M = 10,000 (M x M ridge statistics on every device) made the tiny 8-device
  # rehearsal of vit_comparators_cifar100's ranpac row take 15 GB; tiny mode shrinks it.
  from clx import rehearse
  from clx.experiment import load_config
  config = load_config("vit_comparators_cifar100")
  tiny, notes = rehearse.rehearsal_config(config, steps=1, tiny=True)
  full, _ = rehearse.rehearsal_config(config, steps=1, tiny=False)
  assert tiny["method_args"]["ranpac"]["rp_dim"] == rehearse.TINY_METHOD_ARGS["rp_dim"] < 10000
  assert full["method_args"]["ranpac"]["rp_dim"] == 10000
  assert config["method_args"]["ranpac"]["rp_dim"] == 10000  # the config itself is untouched
  assert any("ranpac.rp_dim 10000 -> " in n for n in notes)


def test_a_vit_pod_config_rehearses_on_8_devices(tmp_path):
  """Default-suite size: one ViT pod config, 2 tasks, 1 step each, tiny ViT, 8 devices."""
  jobs = [list(j) for j in DEFAULT_JOBS]
  reports = _run_configs(jobs, tmp_path, steps=1, tasks=2, tiny=True, timeout=2400)
  for report, job in zip(reports, jobs):
    assert report["stream"]["example_shape"] == [224, 224, 3]
    _check_report(report, job, tasks=2, steps=1, tiny=True)
  assert [r["stream"]["tasks_real"] for r in reports] == [5, 10]


@pytest.mark.slow  # every pod config and every comparator row on 8 devices; alone, one tiny
# comparator row took 1.5-16 min wall (1.4-3.3 GB RSS) on the shared 2-core machine (load up to 30)
def test_every_pod_config_rehearses_on_8_devices(tmp_path):
  """CI size: 2 tasks, 1 step each, tiny ViT/Llama; real per-example shapes and batches."""
  jobs = [list(j) for j in POD_CONFIGS]
  reports = _run_configs(jobs, tmp_path, steps=1, tasks=2, tiny=True, timeout=1800)
  assert len(reports) == len(jobs)
  shapes = {r["experiment"]: r["stream"]["example_shape"] for r in reports}
  assert shapes["vit_inflora"] == shapes["vit_proteus"] == [224, 224, 3]
  assert shapes["cifar100_gpm"] == [32, 32, 3] and shapes["miniimagenet_gpm"] == [84, 84, 3]
  assert shapes["superglue_sparc"] == [256]
  real_tasks = [r["stream"]["tasks_real"] for r in reports]
  assert real_tasks == [5, 10, 20, 10, 10, 10, 20, 20, 5, 10, 10]
  for report, job in zip(reports, jobs):
    _check_report(report, job, tasks=2, steps=1, tiny=True)
    assert sorted(report["methods"]) == sorted(job[2])


# What lets a full-shape 8-device rehearsal fit one 23 GiB host (8 simulated CPU devices share
# its RAM): the backbone FSDP-sharded, and the global batch cut so each device holds 4 images
# (ViT-B/16 at the configs' 128, 16 per device, needs 8 x 3.8 GiB). Per-example shapes,
# backbones and host passes are the configs' own. Llama-3.2-1B (superglue_sparc) does not fit
# 23 GiB even at 1 sequence per device: its step needs 2.37 GiB per device under tensor
# parallelism (3.21 under fsdp) next to 13.7 GB of host RSS (BENCHMARKS.md): a larger host.
FULL_SHAPE_FITS = ["train.param_sharding=fsdp"]
_VIT_FITS = ["train.batch_size=32"]
FULL_SHAPE_SETS = {
    "vit_inflora": _VIT_FITS, "vit_inflora_b5": _VIT_FITS,
    "vit_comparators_cifar100": [*_VIT_FITS, "train_overrides.l2p.batch_size=32",
                                 "train_overrides.dualprompt.batch_size=32"],
    "superglue_sparc": ["train.param_sharding=tensor", "train.model_parallel=8",
                        "train.batch_size=8", "train.eval_batch_size=16"],
}
FULL_SHAPE_SETS["vit_comparators_imr"] = FULL_SHAPE_SETS["vit_comparators_cifar100"]


@pytest.mark.slow
def test_pod_configs_rehearse_at_full_shape(tmp_path):
  """Full ViT-B/16 and Llama-3.2-1B widths on 8 devices: 2 tasks, 2 steps (hours on 2 cores)."""
  jobs = [[name, [*sets, *FULL_SHAPE_FITS, *FULL_SHAPE_SETS.get(name, [])], None]
          for name, sets, _ in POD_CONFIGS]
  reports = _run_configs(jobs, tmp_path, steps=2, tasks=2, tiny=False, timeout=8 * 3600)
  for report, job in zip(reports, jobs):
    _check_report(report, job, tasks=2, steps=2, tiny=False)
    if not job[0].startswith(("vit_", "superglue_")):
      continue  # the small CNNs keep leaves no dimension of which 8 divides (ResNet-18 nf 20)
    for run in report["methods"].values():  # ViT-B/16, Llama-3.2-1B: ≤ 1/8 of the total + 10 %
      for e in run["tasks"]:
        base = e["placed_bytes"]["base"]
        assert base["max_device"] <= base["total"] * (1 / 8 + 0.1 / 8), (job, base)


def test_miniimagenet_config_says_what_is_missing(tmp_path):
  from clx.data.images import ImageDataMissingError
  from clx.experiment import _load_module  # pylint: disable=protected-access
  module = _load_module(ROOT / "experiments" / "miniimagenet_gpm.py")
  (tmp_path / "train").mkdir()
  with pytest.raises(ImageDataMissingError, match=r"missing image folder.*test"):
    module.miniimagenet_stream(root=str(tmp_path))
  spec = module.synthetic_spec({"num_tasks": 20, "pc_valid": 0.05})
  assert spec.example_shape == (84, 84, 3) and spec.scenario == "task"
  assert spec.train_per_task[0] == 2375 and spec.val_per_task[0] == 125


def test_placed_bytes_counts_the_fullest_device():
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from clx import rehearse
  from clx.train import sharding
  mesh = sharding.make_mesh(4)
  rng = np.random.default_rng(5)
  big = jax.device_put(jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
                       NamedSharding(mesh, P("data", None)))
  small = jax.device_put(jnp.asarray(rng.normal(size=(3,)), jnp.float32), sharding.replicated(mesh))
  got = rehearse.placed_bytes({"w": big, "b": small, "name": "not an array"})
  assert got == {"total": 8 * 6 * 4 + 3 * 4, "max_device": 2 * 6 * 4 + 3 * 4, "devices": 4}
  assert rehearse.placed_bytes({}) == {"total": 0, "max_device": 0, "devices": 0}
