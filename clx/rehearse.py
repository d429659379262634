"""Rehearse a pod config at its real shapes on synthetic data, and measure it.

``clx rehearse EXPERIMENT [--steps N] [--tasks T] [--devices 8] [--tiny]`` (or
:func:`rehearse`) runs every method of an experiment config through the real
loop (:func:`clx.train.loop.run_method`: the config's batch size, optimiser,
sharding, all host passes — Gram / DualGPM / GPM memories, Fisher, signatures,
merges —, evaluation and one checkpoint per task) with

  * the config's stream replaced by :func:`clx.data.synthetic.synthetic_stream`
    of the same class count, task split, example shape and pixel pipeline
    (``N · batch_size`` training rows per task, so each task trains ``N``
    steps in one epoch; ``test_rows`` test and validation rows per task);
  * the backbone built with **random weights** of the configured architecture
    (no pretrained weights are needed; ``--tiny`` shrinks ViT / Llama depth and
    width, and method dimensions tied to no backbone width such as RanPAC's
    random projection (``TINY_METHOD_ARGS``), for CI while keeping the
    per-example shapes).

Per task it records the time of the host passes before training
(``begin_task``), of the loop's training phase (compile included), of the
post-task passes (``end_task``) and of the evaluation; the loop's training step
(:func:`clx.train.fit.make_train_step`, with the loop's optimiser and schedule,
on the loop's mesh and placements), compiled alone, gives XLA's compiled memory
(``memory_analysis``, per device) and the steady step time (steps/s,
examples/s); the host's peak RSS (``getrusage``) and the bytes of the task's
checkpoint. Everything is printed and written to ``WORKDIR/rehearsal.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clx.experiment import ConfigError

REPORT_FILE = "rehearsal.json"
# Tiny backbones for CI (--tiny): the per-example shapes stay, depth and width shrink (depth 5:
# inflora_b5 adapts the first 5 blocks).
TINY_VIT = {"depth": 5, "embed_dim": 64, "num_heads": 2, "mlp_dim": 128}
# (Llama width 128: SPARC's 100 PCA components must fit in the hidden size.)
TINY_LLAMA = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
              "vocab_size": 512, "bos_token_id": None, "eos_token_id": None}
# Method dimensions that scale with no backbone width, shrunk with it (--tiny): RanPAC's and
# PROTEUS's random projection M = 10,000 makes M x M ridge statistics (400 MB each, replicated
# on every device) and an M x M solve per λ of the grid, which dominate a tiny rehearsal.
TINY_METHOD_ARGS = {"rp_dim": 256}


# Architectures of pretrained folders the pod configs name, for random-weight rehearsals when the
# folder is absent (its config.json is read when present). Llama-3.2-1B: the fields of its
# published config.json (meta-llama/Llama-3.2-1B), from memory, not checked against the file here.
KNOWN_ARCHITECTURES = {
    "Llama-3.2-1B": {
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": True, "bos_token_id": 128000,
        "eos_token_id": 128001,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}


class RehearsalError(ConfigError):
  """A config that cannot be rehearsed (unknown stream shape, bad option)."""


def _check_positive(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise RehearsalError(f"{what} must be a positive integer, got {value!r}")
  return int(value)


def rehearsal_model(config: dict[str, Any], *, tiny: bool = False) -> tuple[dict[str, Any], str]:
  """The config's ``model`` entry with random weights of its architecture.

  Returns:
    ``(model_config, note)``; ``note`` says what was changed.

  Raises:
    RehearsalError: a pretrained model with no random-weight twin.
  """
  model = dict(config["model"])
  name = model["name"]
  if name == "vit":
    model["weights"] = None
    note = f"ViT {model.get('variant', 'B/16')} with random weights (no pretrained checkpoint)"
    if tiny:
      model.update(TINY_VIT)
      note += f", tiny: {TINY_VIT}"
    return model, note
  if name == "llama_pretrained":
    folder = Path(str(model.get("path", ""))).expanduser()
    if (folder / "config.json").is_file():
      fields, where = json.loads((folder / "config.json").read_text()), f"{folder}/config.json"
    elif folder.name in KNOWN_ARCHITECTURES:
      fields, where = dict(KNOWN_ARCHITECTURES[folder.name]), f"clx.rehearse's {folder.name} table"
    else:
      raise RehearsalError(f"model llama_pretrained: {folder}/config.json is absent and "
                           f"{folder.name!r} is not among the known architectures "
                           f"{sorted(KNOWN_ARCHITECTURES)}; cannot rehearse with random weights")
    from clx.models.llama import LlamaConfig  # pylint: disable=import-outside-toplevel
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    fields = {k: v for k, v in fields.items() if k in known}
    fields.update(TINY_LLAMA if tiny else {})
    note = (f"Llama ({where}) with random weights"
            + (f", tiny: {TINY_LLAMA}" if tiny else ""))
    return {"name": "llama", "config": fields}, note
  if name in ("mlp", "alexnet", "resnet18", "bert", "llama"):
    return model, f"{name} with its random initialisation"
  raise RehearsalError(f"model {name!r}: no random-weight rehearsal defined")


def rehearsal_method_args(config: dict[str, Any], vocab_size: int) -> dict[str, Any]:
  """``method_args`` with tokenizer-dependent label words replaced by fixed token ids.

  Label words given as strings need the model's tokenizer, which a random-weight
  rehearsal does not have: they become the ids ``vocab_size − k … vocab_size − 1``
  (one token per class, as a single-token label word).
  """
  out = copy.deepcopy(config.get("method_args", {}))
  for args in out.values():
    words = args.get("label_words")
    if words is not None and any(isinstance(w, str) for w in words):
      args["label_words"] = [vocab_size - len(words) + i for i in range(len(words))]
      args["tokenizer"] = None
  return out


def rehearsal_config(config: dict[str, Any], *, steps: int, tiny: bool = False
                     ) -> tuple[dict[str, Any], list[str]]:
  """The config as rehearsed: random-weight model, one epoch of ``steps`` steps per task.

  Returns:
    ``(config, notes)``.
  """
  out = copy.deepcopy(config)
  model, note = rehearsal_model(config, tiny=tiny)
  out["model"] = model
  vocab = int(model.get("config", {}).get("vocab_size", 0)) if model["name"] == "llama" else 0
  out["method_args"] = rehearsal_method_args(config, vocab)
  notes_tiny = []
  if tiny:
    for method, args in sorted(out["method_args"].items()):
      for key, small in TINY_METHOD_ARGS.items():
        if key in args and args[key] and args[key] > small:
          notes_tiny.append(f"{method}.{key} {args[key]} -> {small}")
          args[key] = small
  out["train"] = {**config["train"], "epochs": 1}
  out["train_overrides"] = {m: {k: v for k, v in t.items() if k != "epochs"}
                            for m, t in config.get("train_overrides", {}).items()}
  notes = [note, f"one epoch of {steps} step(s) per task on synthetic data"]
  if notes_tiny:
    notes.append("tiny method dimensions: " + ", ".join(notes_tiny))
  return out, notes


def _rss_bytes() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _dir_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _memory(compiled) -> dict[str, int] | None:
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  out = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "temp", "alias", "generated_code")}
  # What the device holds while the step runs (XLA's buffer assignment, per device).
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def measure_step(method, ctx, state, *, time_steps: int = 1,
                 cpu_limit_bytes: float | None = None) -> dict[str, Any]:
  """Compile the task's training step as the loop does and measure it.

  The step is the loop's own (:func:`clx.train.fit.make_train_step`:
  ``value_and_grad(loss) → transform_grads → optimiser → transform_updates →
  apply``, with the optimiser and learning-rate schedule the loop builds for
  the phase), compiled alone, on the loop's mesh with the batch sharded on the
  ``data`` axis and the placed backbone/state of ``ctx`` / ``state``.

  ``cpu_limit_bytes``: on CPU devices (which all share the host's RAM), refuse
  to run a step whose compiled peak summed over the devices exceeds it.

  Returns:
    ``{"compile_s", "step_s", "examples_per_s", "memory": {...}, "batch"}``.

  Raises:
    RehearsalError: the step would exceed ``cpu_limit_bytes``.
  """
  import jax
  import jax.numpy as jnp

  from clx.train import fit, loop, sharding

  t, cfg, mesh = ctx.task_index, ctx.config, ctx.fitter.mesh
  rep = sharding.replicated(mesh)
  # A copy: the compiled step donates its params, which may alias the state's arrays.
  params = jax.tree.map(jnp.copy, jax.device_put(method.trainable(state, ctx.info), rep))
  optimizer = loop.make_optimizer(cfg, max(1, math.ceil(len(ctx.train_split) / cfg.batch_size)),
                                  ctx.fitter.schedule_factory(cfg))
  opt_state = jax.device_put(optimizer.init(params), rep)
  count = jax.device_put(jnp.zeros((), jnp.int32), rep)
  loss = functools.partial(method.loss, info=ctx.info)
  padded = sharding.pad_to_multiple(cfg.batch_size, sharding.num_data_shards(mesh))
  plan = ctx.fitter.plan(len(ctx.train_split), cfg.batch_size, True, (0,))[0]
  rows = sharding.process_rows(padded, mesh)
  t0 = time.perf_counter()
  local = loop._gather(ctx.train_split, plan[rows])  # pylint: disable=protected-access
  gather_s = time.perf_counter() - t0
  batch = sharding.shard_arrays(local, mesh, 0, padded)
  step = fit.make_train_step(loss, optimizer, transform_grads=method.transform_grads,
                             transform_updates=method.transform_updates, masked=False)

  rng = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  # Outputs pinned like the inputs, as in the loop (clx.train.fit): the timed calls feed
  # each step's parameters to the next, and an AOT-compiled step refuses other shardings.
  compiled = jax.jit(step, donate_argnums=(0, 1), out_shardings=(rep, rep, rep, rep)).lower(
      params, opt_state, count, batch, state, ctx.base, rng).compile()
  compile_s = time.perf_counter() - t0
  memory = _memory(compiled)
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  total = memory["peak"] * mesh.devices.size if memory is not None else 0
  if cpu_limit_bytes is not None and on_cpu and total > cpu_limit_bytes:
    raise RehearsalError(
        f"{method.name} task {t}: the compiled step needs {memory['peak'] / 2**30:.2f} GiB per "
        f"device x {mesh.devices.size} CPU devices = {total / 2**30:.1f} GiB of host RAM, "
        f"above the limit of {cpu_limit_bytes / 2**30:.1f} GiB")
  params, opt_state, count, value = compiled(params, opt_state, count, batch, state, ctx.base, rng)
  jax.block_until_ready(value)  # first call: allocation, not timed
  t0 = time.perf_counter()
  for _ in range(time_steps):
    params, opt_state, count, value = compiled(params, opt_state, count, batch, state, ctx.base,
                                               rng)
  jax.block_until_ready((params, value))
  step_s = (time.perf_counter() - t0) / time_steps
  real = int((plan >= 0).sum())
  if not bool(jnp.isfinite(value)):
    raise FloatingPointError(f"rehearsal step of {method.name} task {t}: non-finite loss {value}")
  return {"compile_s": compile_s, "step_s": step_s, "steps_per_s": 1.0 / step_s,
          "examples_per_s": real / step_s, "batch": real, "padded_batch": padded,
          "input_examples_per_s": real / gather_s if gather_s > 0 else None,
          "memory": memory}


def placed_bytes(tree) -> dict[str, int]:
  """Bytes of a placed pytree: in all, and on the device that holds the most.

  Args:
    tree: a pytree whose array leaves are ``jax.Array`` (others are ignored).

  Returns:
    ``{"total": Σ leaf bytes, "max_device": max over devices of Σ bytes of the
    shards it holds, "devices": number of devices holding any}``; with replicated
    leaves ``max_device == total``, fully sharded over n devices ``≈ total / n``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  total, per_device = 0, {}
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, jax.Array):
      continue
    total += leaf.nbytes
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return {"total": int(total), "max_device": int(max(per_device.values(), default=0)),
          "devices": len(per_device)}


def _instrument(method, record: dict[str, Any], time_steps: int,
                cpu_limit_bytes: float | None = None):
  """``method`` with begin_task/end_task wrapped to time them and measure the step."""

  def find_ctx(args, kwargs):
    for value in (*args, *kwargs.values()):
      if hasattr(value, "fitter") and hasattr(value, "task_index"):
        return value
    raise RehearsalError("could not find the task context among the method's arguments")

  def begin_task(*args, **kwargs):
    ctx = find_ctx(args, kwargs)
    entry = record.setdefault(ctx.task_index, {"task": ctx.task_index})
    entry["train_rows"] = len(ctx.train_split)
    t0 = time.perf_counter()
    state = method.begin_task(*args, **kwargs)
    entry["begin_task_s"] = time.perf_counter() - t0
    # The loop places the state right after begin_task (run: sharding.place_state); the step
    # measured here runs before that, so it places the state the same way first: leaves that
    # begin_task created (computed on one device, or host arrays) would otherwise reach the
    # compiled step off the mesh.
    from clx.train import sharding  # pylint: disable=import-outside-toplevel
    state = sharding.place_state(state, ctx.fitter.mesh, ctx.config.param_sharding)
    entry["placed_bytes"] = {"base": placed_bytes(ctx.base), "state": placed_bytes(state)}
    entry["step"] = measure_step(method, ctx, state, time_steps=time_steps,
                                 cpu_limit_bytes=cpu_limit_bytes)
    entry["_fit_start"] = time.perf_counter()
    return state

  def end_task(*args, **kwargs):
    ctx = find_ctx(args, kwargs)
    entry = record[ctx.task_index]
    t0 = time.perf_counter()
    entry["fit_s"] = t0 - entry.pop("_fit_start")
    state = method.end_task(*args, **kwargs)
    entry["_end"] = time.perf_counter()
    entry["end_task_s"] = entry["_end"] - t0
    return state

  return method._replace(begin_task=begin_task, end_task=end_task)


def _prepare_workdir(workdir: Path) -> None:
  if workdir.exists() and any(workdir.iterdir()) and not (workdir / REPORT_FILE).is_file():
    raise RehearsalError(f"workdir {str(workdir)!r} is not empty and holds no {REPORT_FILE}; "
                         "rehearse into a new folder (a rehearsal overwrites its workdir)")
  if workdir.exists():
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True)


def rehearse(config: dict[str, Any], workdir: str | os.PathLike, *, steps: int = 2,
             tasks: int | None = None, test_rows: int | None = None, tiny: bool = False,
             time_steps: int = 1, methods: Sequence[str] | None = None,
             cpu_limit_gb: float | None = None, quiet: bool = True) -> dict[str, Any]:
  """Run ``config`` at its real shapes on synthetic data and measure it.

  Args:
    config: an experiment config (:func:`clx.experiment.load_config`).
    workdir: output folder (new, or an earlier rehearsal's: it is overwritten).
    steps: training steps per task (``steps · batch_size`` synthetic rows).
    tasks: rehearse the first ``tasks`` tasks (default: all).
    test_rows: test (and validation) rows per task (default: one eval batch).
    tiny: shrink ViT/Llama depth and width and ``TINY_METHOD_ARGS`` (per-example
      shapes unchanged).
    time_steps: executions of the compiled step timed per task.
    methods: a subset of the config's methods (default: all).
    cpu_limit_gb: on CPU devices, stop before running a training step whose
      compiled memory over all devices exceeds this (a shared machine's guard).
    quiet: no progress bars.

  Returns:
    The report written to ``WORKDIR/rehearsal.json``.

  Raises:
    RehearsalError / clx.experiment.ConfigError: bad options or config.
  """
  import jax

  from clx import experiment
  from clx.data import synthetic
  from clx.train.loop import TrainConfig, run_method

  steps = _check_positive(steps, "steps")
  time_steps = _check_positive(time_steps, "time_steps")
  cfg, notes = rehearsal_config(config, steps=steps, tiny=tiny)
  if methods is not None:
    unknown = sorted(set(methods) - set(cfg["methods"]))
    if unknown:
      raise RehearsalError(f"methods {unknown} are not in the config's {cfg['methods']}")
    cfg["methods"] = list(methods)
  try:
    spec = synthetic.spec_for_config(cfg)
  except KeyError as e:
    raise RehearsalError(str(e.args[0])) from None
  if tasks is not None:
    tasks = _check_positive(tasks, "tasks")
  batch = int(cfg["train"]["batch_size"])
  eval_batch = int(cfg["train"].get("eval_batch_size", 1024))
  test_rows = _check_positive(test_rows, "test_rows") if test_rows is not None else eval_batch
  vocab = int(cfg["model"].get("config", {}).get("vocab_size", spec.vocab_size) or spec.vocab_size)
  if spec.kind == "tokens":
    spec = dataclasses.replace(spec, vocab_size=vocab)
  stream = synthetic.synthetic_stream(spec, train_rows=steps * batch, test_rows=test_rows,
                                      num_tasks=tasks, seed=int(cfg.get("seed", 0)),
                                      resident_bytes=float(cfg["train"].get(
                                          "device_data_mb", TrainConfig.device_data_mb)) * 2**20)
  backbone, built = experiment.build_model_and_methods(cfg, stream.input_shape)
  del backbone
  workdir = Path(workdir)
  _prepare_workdir(workdir)

  devices = jax.devices()
  report = {
      "experiment": config["name"], "random_weights": True, "notes": notes,
      "platform": devices[0].platform, "device_kind": devices[0].device_kind,
      "devices": len(devices), "tiny": bool(tiny), "steps_per_task": steps,
      "stream": {"name": spec.name, "scenario": spec.scenario, "num_classes": spec.num_classes,
                 "tasks_rehearsed": len(stream.tasks), "tasks_real": spec.num_tasks,
                 "example_shape": list(spec.example_shape), "kind": spec.kind,
                 "source_shape": list(spec.source_shape) if spec.source_shape else None,
                 "train_transform": spec.train_transform, "test_transform": spec.test_transform,
                 "train_per_task_real": list(spec.train_per_task),
                 "test_per_task_real": list(spec.test_per_task), "source": spec.source},
      "model": {k: v for k, v in cfg["model"].items() if k != "weights"},
      "methods": {},
  }
  try:
    for name, method in built.items():
      overrides = cfg.get("train_overrides", {}).get(name, {})
      train = TrainConfig(**{**cfg["train"], **overrides})
      record: dict[int, dict[str, Any]] = {}

      def on_task_end(t, acc, record=record):
        del acc
        record[t]["eval_s"] = time.perf_counter() - record[t].pop("_end")
        record[t]["host_peak_rss_bytes"] = _rss_bytes()

      ckpt_dir = workdir / name / "checkpoints"
      t0 = time.perf_counter()
      limit = None if cpu_limit_gb is None else cpu_limit_gb * 2**30
      schedule_fn = experiment.resolve_lr_schedule(cfg, name)  # the experiment's, if any
      result = run_method(_instrument(method, record, time_steps, limit), stream, train,
                          seed=int(cfg.get("seed", 0)), checkpoint_dir=str(ckpt_dir.resolve()),
                          quiet=quiet, progress=False if quiet else None, on_task_end=on_task_end,
                          lr_schedule=schedule_fn(train) if schedule_fn is not None else None)
      wall = time.perf_counter() - t0
      rows = []
      for t in sorted(record):
        entry = record[t]
        entry["checkpoint_bytes"] = _dir_bytes(ckpt_dir / str(t))
        steps_per_epoch = math.ceil(spec.train_per_task[t] / train.batch_size)
        entry["projected_epoch_s"] = steps_per_epoch * entry["step"]["step_s"]
        rows.append(entry)
      report["methods"][name] = {
          "train": dataclasses.asdict(train), "wall_s": wall, "tasks": rows,
          "epochs_real": int(config["train"].get("epochs", 1)) if not overrides.get("epochs")
          else int(config["train_overrides"][name]["epochs"]),
          "acc_matrix_finite": bool(np.all(np.isfinite(result.acc_matrix[np.tril_indices(
              len(stream.tasks))]))),
      }
  except BaseException:
    shutil.rmtree(workdir, ignore_errors=True)  # nothing half-written stays behind
    raise
  report["host_peak_rss_bytes"] = _rss_bytes()
  (workdir / REPORT_FILE).write_text(json.dumps(report, indent=1, default=str))
  return report


def _fraction(entry: dict[str, Any], key: str) -> str:
  """The largest device's share of a placed tree, e.g. ``0.125`` (``-`` when unknown)."""
  got = entry.get("placed_bytes", {}).get(key)
  return f"{got['max_device'] / got['total']:.3f}" if got and got["total"] else "-"


def format_report(report: dict[str, Any]) -> str:
  """A plain-text table of a rehearsal report."""
  s = report["stream"]
  lines = [f"rehearsal of {report['experiment']}: {report['devices']} {report['platform']} "
           f"device(s), {s['tasks_rehearsed']}/{s['tasks_real']} tasks, "
           f"{report['steps_per_task']} step(s) per task, input {s['example_shape']} ({s['kind']})",
           *[f"  note: {n}" for n in report["notes"]],
           f"{'method':<16}{'task':>5}{'step s':>9}{'ex/s':>9}{'in ex/s':>9}{'peak dev MB':>12}"
           f"{'begin s':>9}{'fit s':>8}{'end s':>8}{'eval s':>8}{'RSS MB':>8}{'ckpt MB':>9}"
           f"{'base/dev':>9}{'state/dev':>10}"]
  mb = 2.0**20
  for name, run in report["methods"].items():
    for e in run["tasks"]:
      st = e["step"]
      peak = st["memory"]["peak"] / mb if st["memory"] else float("nan")
      inp = st["input_examples_per_s"] or float("nan")
      lines.append(f"{name:<16}{e['task']:>5}{st['step_s']:>9.3f}{st['examples_per_s']:>9.1f}"
                   f"{inp:>9.1f}{peak:>12.1f}{e['begin_task_s']:>9.2f}{e['fit_s']:>8.2f}"
                   f"{e['end_task_s']:>8.2f}{e['eval_s']:>8.2f}"
                   f"{e['host_peak_rss_bytes'] / mb:>8.0f}{e['checkpoint_bytes'] / mb:>9.2f}"
                   f"{_fraction(e, 'base'):>9}{_fraction(e, 'state'):>10}")
  return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The ``clx rehearse`` options."""
  parser.add_argument("experiment", help="experiment name (see `clx list`) or a .py config")
  parser.add_argument("--workdir", help="output folder (default: runs/rehearse_<experiment>)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key first, as in `clx run`")
  parser.add_argument("--steps", type=int, default=2, help="training steps per task (default 2)")
  parser.add_argument("--tasks", type=int, default=None, help="rehearse the first T tasks")
  parser.add_argument("--test-rows", type=int, default=None,
                      help="test/validation rows per task (default: one evaluation batch)")
  parser.add_argument("--methods", default=None, help="comma-separated subset of the methods")
  parser.add_argument("--devices", type=int, default=None,
                      help="simulated CPU devices (sets XLA_FLAGS before JAX starts)")
  parser.add_argument("--tiny", action="store_true",
                      help="shrink ViT/Llama depth and width and the random-projection "
                           "width rp_dim (CI); per-example shapes stay")
  parser.add_argument("--time-steps", type=int, default=1,
                      help="executions of the compiled step timed per task")
  parser.add_argument("--cpu-limit-gb", type=float, default=None,
                      help="on CPU devices, stop before a step whose compiled memory over all "
                           "devices exceeds this many GiB")


def set_cpu_devices(count: int) -> None:
  """Ask for ``count`` simulated CPU devices; must run before JAX's backends start.

  Raises:
    RehearsalError: JAX already runs with another device count.
  """
  count = _check_positive(count, "--devices")
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  if jax.device_count() != count:
    raise RehearsalError(f"--devices {count}: JAX already started with {jax.device_count()} "
                         "device(s); set XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{count} before starting Python")


def run_command(args: argparse.Namespace) -> int:
  """``clx rehearse``: parse, rehearse, print the table and the report path."""
  from clx import experiment
  if args.devices is not None:
    set_cpu_devices(args.devices)
  config = experiment.apply_overrides(experiment.load_config(args.experiment), args.set)
  workdir = Path(args.workdir or os.path.join("runs", f"rehearse_{config['name']}"))
  methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
  report = rehearse(config, workdir, steps=args.steps, tasks=args.tasks, test_rows=args.test_rows,
                    tiny=args.tiny, time_steps=args.time_steps, methods=methods,
                    cpu_limit_gb=args.cpu_limit_gb)
  print(format_report(report))
  print(f"\nreport: {workdir / REPORT_FILE}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  import faulthandler
  import signal
  faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is it?
  parser = argparse.ArgumentParser(prog="python -m clx.rehearse",
                                   description=__doc__.splitlines()[0])
  add_arguments(parser)
  try:
    return run_command(parser.parse_args(argv))
  except (RehearsalError, ValueError, OSError) as e:
    print(f"clx rehearse: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
