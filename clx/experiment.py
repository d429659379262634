"""Experiments: Python files with ``get_config()``, run method by method into a workdir.

An experiment config is a nested dict::

    {"name": "quickstart",
     "stream": {"name": "split_mnist", ...stream kwargs},
     "model": {"name": "mlp", ...model kwargs},
     "methods": ["finetune", "lora", "joint"],
     "method_args": {"lora": {"rank": 8}},
     "train": {...clx.train.TrainConfig fields},
     "train_overrides": {"joint": {...}},   # optional per-method TrainConfig fields
     "lr_schedules": {"lora": "clx.methods.inflora:official_lr_schedule"},  # optional
     "seed": 0}

``lr_schedules`` (optional) supplies a learning-rate schedule per method from the
experiment: ``"module:function"`` of a function ``TrainConfig -> schedule factory``
(the signature of a method's ``lr_schedule`` field), passed to
:func:`clx.train.loop.run_method` as ``lr_schedule``; it replaces the method's own
schedule and ``train.schedule``.

``--set key.sub=value`` overrides any existing key (unknown keys are an error);
values are parsed to the type of the value they replace (lists from
``a,b,c``). The workdir holds ``metrics.json``, ``config.json``, per-method
checkpoints (``<method>/checkpoints/<task>``) and heatmaps
(``<method>/acc_matrix.png``); re-running the same command resumes. A workdir
records one configuration and is locked while a run uses it (see
:mod:`clx.workdir` for what it guarantees).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXPERIMENTS_ENV = "CLX_EXPERIMENTS_DIR"
REQUIRED_KEYS = ("name", "stream", "model", "methods", "train")


class ConfigError(ValueError):
  """A bad experiment name, config key or value."""


def experiments_dir() -> Path:
  """``$CLX_EXPERIMENTS_DIR`` or the repository's ``experiments/`` folder."""
  env = os.environ.get(EXPERIMENTS_ENV)
  if env:
    return Path(env)
  return Path(__file__).resolve().parents[1] / "experiments"


def list_experiments() -> dict[str, str]:
  """``{name: first docstring line}`` of every experiment file."""
  out = {}
  folder = experiments_dir()
  for path in sorted(folder.glob("*.py")) if folder.is_dir() else []:
    if path.name.startswith("_"):
      continue
    text = path.read_text()
    if "def get_config" not in text:
      continue
    module = _load_module(path)
    out[path.stem] = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
  return out


def _load_module(path: Path):
  spec = importlib.util.spec_from_file_location(f"clx_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name_or_path: str) -> dict[str, Any]:
  """The config of an experiment given by name (``quickstart``) or file path."""
  path = Path(name_or_path)
  if not (path.suffix == ".py" and path.is_file()):
    path = experiments_dir() / f"{name_or_path}.py"
  if not path.is_file():
    known = ", ".join(sorted(list_experiments())) or "(none found)"
    raise ConfigError(f"unknown experiment {name_or_path!r}; known experiments: {known}")
  module = _load_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config()")
  config = module.get_config()
  missing = [k for k in REQUIRED_KEYS if k not in config]
  if missing:
    raise ConfigError(f"experiment {path.stem!r} config lacks keys {missing}")
  for key, default in RUN_OPTION_DEFAULTS.items():  # so that --set log.wandb=... has a key
    config.setdefault(key, copy.deepcopy(default))
  return config


# Run options: how a run is observed, never what it computes, so they are kept out of
# config.json and of the config hashes (changing them never refuses a resume).
RUN_OPTION_DEFAULTS: dict[str, Any] = {
    "log": {"tensorboard": True, "wandb": ""},  # METHOD/metrics.jsonl is always written
    "profile": False,  # a jax.profiler trace of a few steps into METHOD/profile
}


def split_run_options(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """``config`` without its run options, and the run options (defaults filled, checked).

  Returns:
    ``(config, {"log": {"tensorboard": bool, "wandb": str}, "profile": bool})``.

  Raises:
    ConfigError: an unknown ``log`` key, a value of the wrong type, or a
      requested log backend that is not installed.
  """
  from clx.train import logging as run_logging
  config = dict(config)
  log = {**RUN_OPTION_DEFAULTS["log"], **(config.pop("log", None) or {})}
  profile = config.pop("profile", RUN_OPTION_DEFAULTS["profile"])
  unknown = sorted(set(log) - set(RUN_OPTION_DEFAULTS["log"]))
  if unknown:
    raise ConfigError(f"log has unknown keys {unknown}; known: {sorted(RUN_OPTION_DEFAULTS['log'])}")
  if not isinstance(log["tensorboard"], bool):
    raise ConfigError(f"log.tensorboard must be true or false, got {log['tensorboard']!r}")
  if not isinstance(log["wandb"], str):
    raise ConfigError(f"log.wandb must be a W&B project name (or empty), got {log['wandb']!r}")
  if not isinstance(profile, bool):
    raise ConfigError(f"profile must be true or false, got {profile!r}")
  try:
    run_logging.require_backends(tensorboard=log["tensorboard"], wandb_project=log["wandb"])
  except run_logging.LoggerUnavailableError as e:
    raise ConfigError(str(e)) from None
  return config, {"log": log, "profile": profile}


def _parse_like(old: Any, text: str, key: str) -> Any:
  try:
    if isinstance(old, bool):
      if text.lower() in ("1", "true", "yes", "on"):
        return True
      if text.lower() in ("0", "false", "no", "off"):
        return False
      raise ValueError(text)
    if isinstance(old, int):
      return int(text)
    if isinstance(old, float):
      return float(text)
    if isinstance(old, (list, tuple)):
      items = [s.strip() for s in text.split(",") if s.strip()]
      if old and not isinstance(old[0], str):
        items = [_parse_like(old[0], s, key) for s in items]
      return type(old)(items)
    if old is None:
      if "," in text and text[:1] not in "[{":  # a,b -> [a, b], each item parsed alike
        return [_parse_like(None, item.strip(), key) for item in text.split(",") if item.strip()]
      if text[:1] in "[{0123456789-" or text in ("true", "false", "null"):
        return json.loads(text)
      return text
    return text
  except ValueError:
    raise ConfigError(f"--set {key}={text}: expected a value like {old!r}") from None


def _train_field_default(config: dict[str, Any], parts: list[str]) -> tuple[bool, Any]:
  """Whether ``parts`` names a ``TrainConfig`` field the config leaves at its default.

  ``train.FIELD`` and ``train_overrides.METHOD.FIELD`` (METHOD one of the config's methods)
  may be set although the config does not list them: every TrainConfig field is a key of
  ``train``. Returns ``(True, default)`` for such a key — the field's default, or for a
  per-method override the config's own ``train`` value when it sets one — else
  ``(False, None)``.
  """
  from clx.train.config import TrainConfig  # pylint: disable=import-outside-toplevel
  if parts[:1] == ["train"] and len(parts) == 2:
    field = parts[1]
  elif (parts[:1] == ["train_overrides"] and len(parts) == 3
        and parts[1] in (config.get("methods") or ())):
    field = parts[2]
  else:
    return False, None
  defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
              if f.default is not dataclasses.MISSING}
  if field not in defaults:
    return False, None
  return True, (config.get("train") or {}).get(field, defaults[field])


def _method_option_default(config: dict[str, Any], parts: list[str]) -> tuple[bool, Any]:
  """Whether ``parts`` is ``method_args.METHOD.OPTION`` for one of the config's methods.

  Such a key may be set although the config does not list it (the factory's default
  applies until then); an option the factory does not take is refused when the method
  is built. Returns ``(True, the factory's default or None)``, else ``(False, None)``.
  """
  if not (parts[:1] == ["method_args"] and len(parts) == 3
          and parts[1] in (config.get("methods") or ())):
    return False, None
  from clx import methods  # pylint: disable=import-outside-toplevel
  try:
    factory = methods.REGISTRY[parts[1]]
    parameter = inspect.signature(factory).parameters.get(parts[2])
  except (KeyError, TypeError, ValueError):
    parameter = None
  default = None if parameter is None or parameter.default is inspect.Parameter.empty \
      else parameter.default
  return True, default


def apply_overrides(config: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
  """A copy of ``config`` with ``key.sub=value`` overrides applied.

  A key must exist in the config, except a ``TrainConfig`` field under ``train`` or
  ``train_overrides.METHOD`` (e.g. ``train.param_sharding=fsdp``) and a factory option
  under ``method_args.METHOD`` (e.g. ``method_args.lora.lora_compute=factored``) of one
  of the config's methods: those are added, the value parsed like the field's or the
  factory's default (JSON-like when the default is unknown or None). An option the
  factory does not take is refused when the methods are built (``validate``).

  Raises:
    ConfigError: a malformed item, an unknown key, or a value unlike the old one.
  """
  config = copy.deepcopy(config)
  for item in sets:
    if "=" not in item:
      raise ConfigError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    is_field, default = _train_field_default(config, parts)
    if not is_field:
      is_field, default = _method_option_default(config, parts)
    if is_field:
      node = config
      for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
          raise ConfigError(f"--set {key}: {part!r} is not a section of the config")
      node[parts[-1]] = _parse_like(node.get(parts[-1], default), value, key)
      continue
    node = config
    for i, part in enumerate(parts):
      if not isinstance(node, dict) or part not in node:
        where = ".".join(parts[:i]) or "the config"
        options = sorted(node) if isinstance(node, dict) else []
        raise ConfigError(f"unknown config key {key!r}: {where} has no {part!r} (keys: {options})")
      if i == len(parts) - 1:
        node[part] = _parse_like(node[part], value, key)
      else:
        node = node[part]
  return config


# Input shapes of the builtin image streams (flatten=True, flatten=False), so
# that validate() can build cheap backbones and the methods on them before any
# data loads; tests/reliability/test_validation.py checks them against the data.
_BUILTIN_INPUT_SHAPES = {
    "split_mnist": ((784,), (28, 28, 1)),
    "pmnist": ((784,), (28, 28, 1)),
    "permuted_mnist": ((784,), (784,)),
    "mnist_animal_domains": ((784,), (28, 28, 1)),
    "split_digits": ((64,), (8, 8, 1)),
    "permuted_digits": ((64,), (8, 8, 1)),
    "gpm_cifar100": ((32, 32, 3), (32, 32, 3)),
}
# Backbones built from a random init (no weights to read), cheap to build twice.
_CHEAP_MODELS = ("mlp", "alexnet", "resnet18")


def resolve_lr_schedule(config: dict[str, Any], method: str):
  """The experiment-supplied schedule function of ``method`` (``lr_schedules``), or None.

  Raises:
    ConfigError: the entry is not ``"module:function"`` of an importable callable.
  """
  spec = (config.get("lr_schedules") or {}).get(method)
  if spec is None:
    return None
  module_name, _, attr = str(spec).partition(":")
  try:
    fn = getattr(importlib.import_module(module_name), attr) if attr else None
  except (ImportError, AttributeError):
    fn = None
  if not callable(fn):
    raise ConfigError(f"lr_schedules.{method}: {spec!r} is not 'module:function' of an "
                      "importable function (TrainConfig -> schedule factory)")
  return fn


def _stream_args(config: dict[str, Any]) -> dict[str, Any]:
  args = {k: v for k, v in config["stream"].items() if k != "name"}
  if "seed" in args and args["seed"] is None:
    args["seed"] = int(config.get("seed", 0))
  return args


def provisional_input_shape(config: dict[str, Any]) -> tuple[int, ...] | None:
  """The input shape of a builtin stream without loading it (None if not known)."""
  name = config["stream"].get("name")
  if name not in _BUILTIN_INPUT_SHAPES:
    return None
  from clx.data import streams
  if getattr(streams.STREAMS.get(name), "__module__", None) != streams.__name__:
    return None  # re-registered by the user: shape unknown
  flat, shaped = _BUILTIN_INPUT_SHAPES[name]
  return flat if config["stream"].get("flatten", True) else shaped


def validate(config: dict[str, Any], workdir: str | os.PathLike | None = None) -> None:
  """Check every name and value before any data loads or anything is written.

  In order: methods and ``train``/``train_overrides`` (``TrainConfig`` ranges),
  the run seed, the stream's arguments (``clx.data.streams.check_stream_args``),
  the model name and arguments, and the methods' arguments: for the builtin
  image streams and the cheap backbones (MLP, AlexNet, ResNet-18) the backbone
  and every method are built on the stream's known input shape (not before a
  pending ``jax.distributed.initialize()``, which must come first), so argument
  errors of models and methods (zero-width layers, LoRA rank 0 or above a
  layer's width, GPM thresholds) surface before any data loads (the build
  costs JAX's start-up and compiles the inits once; the run's own build then
  hits the caches, ~0.3 s for AlexNet). Other backbones (pretrained, large)
  are built once, after the data loads, and a bad argument then still ends in
  a :class:`ConfigError`. Finally ``workdir``
  (when given) must be a directory or creatable as one.

  Raises:
    ConfigError: naming the config key and the bad value.
  """
  from clx import methods, models
  from clx.data import streams
  from clx.train.loop import TrainConfig

  for key in REQUIRED_KEYS:
    if key not in config:
      raise ConfigError(f"config lacks the key {key!r}")
  if not isinstance(config["methods"], (list, tuple)):
    raise ConfigError(f"methods must be a list of method names, got {config['methods']!r}")
  unknown = [m for m in config["methods"] if m not in methods.REGISTRY]
  if unknown:
    raise ConfigError(f"unknown method(s) {unknown}; known: {sorted(methods.REGISTRY)}")
  if not config["methods"]:
    raise ConfigError("config lists no methods")
  for name in config.get("method_args", {}):
    if name not in methods.REGISTRY:
      raise ConfigError(f"method_args names unknown method {name!r}")
  for name in config.get("lr_schedules") or {}:
    if name not in methods.REGISTRY:
      raise ConfigError(f"lr_schedules names unknown method {name!r}")
    resolve_lr_schedule(config, name)
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  for where, train in [("train", config["train"]),
                       *[(f"train_overrides.{m}", t) for m, t in config.get("train_overrides", {}).items()]]:
    bad = sorted(set(train) - fields)
    if bad:
      raise ConfigError(f"{where} has unknown keys {bad}; TrainConfig fields: {sorted(fields)}")
    try:
      TrainConfig(**(train if where == "train" else {**config["train"], **train}))
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{where}: {e}") from None

  seed = config.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}")

  stream_name = config["stream"].get("name")
  try:
    streams.check_stream_args(stream_name, **_stream_args(config))
  except KeyError as e:
    raise ConfigError(str(e.args[0]) if e.args else str(e)) from None
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None

  model_name = config["model"].get("name")
  if model_name not in models._FACTORIES:  # pylint: disable=protected-access
    raise ConfigError(f"unknown model {model_name!r}; known: {sorted(models._FACTORIES)}")  # pylint: disable=protected-access
  try:
    inspect.signature(models._FACTORIES[model_name]).bind(  # pylint: disable=protected-access
        (1,), **_model_args(config))
  except TypeError as e:
    raise ConfigError(f"model {model_name!r}: {e}") from None
  for name in config["methods"]:
    try:
      inspect.signature(methods.REGISTRY[name]).bind(None, **config.get("method_args", {}).get(name, {}))
    except TypeError as e:
      raise ConfigError(f"method {name!r}: {e}") from None

  shape = provisional_input_shape(config)
  if shape is not None and model_name in _CHEAP_MODELS and not _distributed_pending():
    build_model_and_methods(config, shape)
  if workdir is not None:
    check_workdir(workdir)


def _distributed_pending() -> bool:
  """A multi-process launch whose ``jax.distributed.initialize()`` has not run yet.

  Building a backbone initialises JAX's backends, after which the processes
  can no longer join; the CLI validates once before joining (no build then)
  and again in :func:`run_experiment`, after joining (with the build).
  """
  if not (os.environ.get("CLX_COORDINATOR") or os.environ.get("CLX_DISTRIBUTED") == "1"):
    return False
  import jax
  is_initialized = getattr(jax.distributed, "is_initialized", None)
  return not (is_initialized() if is_initialized is not None else False)


def _model_args(config: dict[str, Any]) -> dict[str, Any]:
  from clx import models
  args = {k: v for k, v in config["model"].items() if k != "name"}
  if models.accepts_seed(config["model"]["name"]):  # random inits follow the run seed
    args.setdefault("seed", config.get("seed", 0))
  return args


def build_model_and_methods(config: dict[str, Any], input_shape: Sequence[int]):
  """The config's backbone (for ``input_shape``) and ``{name: method}``.

  Raises:
    ConfigError: a model or method argument is rejected, naming which.
  """
  from clx import methods, models
  model_name = config["model"]["name"]
  try:
    backbone = models.build(model_name, tuple(input_shape), **_model_args(config))
  except (TypeError, ValueError, ZeroDivisionError) as e:
    raise ConfigError(f"model {model_name!r}: {e}") from None
  built = {}
  for name in config["methods"]:
    try:
      built[name] = methods.build(name, backbone, **config.get("method_args", {}).get(name, {}))
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
      raise ConfigError(f"method {name!r} (method_args.{name}): {e}") from None
  return backbone, built


def check_workdir(workdir: str | os.PathLike) -> None:
  """Raises ConfigError unless ``workdir`` is a writable directory or can become one.

  Creates nothing: walks up to the nearest existing ancestor, which must be a
  writable directory (a file on the way is named).
  """
  path = Path(workdir).expanduser().absolute()
  if path.exists():
    if not path.is_dir():
      raise ConfigError(f"workdir {str(path)!r} is a file, not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
      raise ConfigError(f"workdir {str(path)!r} is not writable")
    return
  parent = path.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise ConfigError(f"cannot create workdir {str(path)!r}: {str(parent)!r} is a file, "
                      "not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"cannot create workdir {str(path)!r}: {str(parent)!r} is not writable")


def build_stream(config: dict[str, Any]):
  """The config's stream; a stream ``seed`` of ``None`` follows the run seed."""
  from clx import data
  args = _stream_args(config)
  try:
    return data.get_stream(config["stream"]["name"], **args)
  except KeyError as e:
    raise ConfigError(str(e.args[0]) if e.args else str(e)) from None
  except (TypeError, ValueError) as e:
    from clx.data.assets import AssetChecksumError
    if isinstance(e, (ConfigError, AssetChecksumError)):  # already clear, and not a config value
      raise
    raise ConfigError(f"stream {config['stream']['name']!r}: {e}") from None


def summarize(acc: np.ndarray) -> dict[str, float]:
  """ACC, AIA, BWT and forgetting of a run's (T, T) accuracy matrix; only ``acc`` when rows
  before the last were not measured (``train.evaluate_after="last_task"``)."""
  from clx.ops import metrics
  acc = np.asarray(acc, dtype=np.float64)
  if np.isnan(acc[np.tril_indices(acc.shape[0])]).any():
    return {"acc": float(np.mean(acc[-1]))}
  return metrics.summarize_to_floats(acc)


def _command_line() -> str:
  import shlex
  return shlex.join(sys.argv)[:500]


def run_experiment(config: dict[str, Any], workdir: str | os.PathLike, *,
                   progress: bool | None = None, quiet: bool = False, mesh=None) -> dict[str, Any]:
  """Run every method of ``config`` into ``workdir`` (resuming what is there).

  The workdir is locked for the whole run and must record the same
  configuration (see :mod:`clx.workdir`); nothing in it is written before the
  data and models are built. Methods that have results in the workdir but are
  not in ``config["methods"]`` keep their ``metrics.json`` entries when these
  verify, else the entries are rebuilt from the verified checkpoints.

  Returns:
    The ``metrics.json`` content.

  Raises:
    ConfigError: bad config values.
    clx.workdir.WorkdirError: the workdir is locked by another process,
      records another configuration, or cannot be created/written.
    clx.checkpoint.CheckpointCorruptedError / CheckpointMismatchError: a
      checkpoint is damaged or was written by another run.
  """
  import jax

  from clx import methods, report
  from clx import workdir as wd
  from clx.ops import metrics
  from clx.train import logging as run_logging
  from clx.train.loop import TrainConfig, run_method

  config, options = split_run_options(config)
  validate(config, workdir)
  with wd.Workdir(workdir, config, command=_command_line()) as w:
    stream = build_stream(config)
    backbone, built = build_model_and_methods(config, stream.input_shape)

    removed = w.accept()  # the run is accepted: first write to the workdir
    if removed:
      print(f"clx: note: removed {len(removed)} temp file(s) left by an interrupted run in "
            f"{w.path}", file=sys.stderr)
    merged = w.merged
    metrics_path = w.path / wd.METRICS_FILE
    # Methods with results that this run does not re-run: keep their entries if metrics.json
    # verifies and the entry was made under the recorded configuration, else rebuild them.
    carried, rebuild = {}, []
    previous = w.metrics["runs"] if (w.metrics is not None and w.metrics_problem is None) else {}
    for name in w.with_results:
      if name in built:
        continue
      entry = previous.get(name)
      if entry is not None and entry.get("config_sha256") == wd.method_config_sha256(
          w.recorded or {}, name):
        carried[name] = {**entry, "config_sha256": wd.method_config_sha256(merged, name)}
      elif len(wd.complete_tasks(w.path, name)) >= len(stream.tasks):
        rebuild.append(name)
    if rebuild and w.primary:
      why = (w.metrics_problem if w.metrics_problem is not None
             else "has no verified entry for them" if w.metrics is not None else "is missing")
      print(f"clx: note: {metrics_path} {why}; rebuilding the results of {', '.join(rebuild)} "
            "from their verified checkpoints", file=sys.stderr)
    elif w.metrics_problem is not None and w.primary:
      print(f"clx: note: {metrics_path} {w.metrics_problem}; it is rewritten from this run's "
            "results (resumed from the verified checkpoints)", file=sys.stderr)
    to_run = {name: methods.build(name, backbone, **merged.get("method_args", {}).get(name, {}))
              for name in rebuild}
    to_run.update(built)

    result = {"experiment": config["name"], "runs": dict(carried)}
    for name, method in to_run.items():
      overrides = merged.get("train_overrides", {}).get(name, {})
      train = TrainConfig(**{**merged["train"], **overrides})
      run_info = {"experiment": merged["name"], "stream": merged["stream"], "model": merged["model"],
                  "method_args": merged.get("method_args", {}).get(name, {})}
      schedule_fn = resolve_lr_schedule(merged, name)
      if schedule_fn is not None:  # fingerprinted only when set: older checkpoints keep resuming
        run_info["lr_schedule"] = merged["lr_schedules"][name]
      logger = run_logging.RunLogger(
          w.path / name, tensorboard=options["log"]["tensorboard"],
          wandb_project=options["log"]["wandb"], run_name=f"{merged['name']}/{name}",
          run_config={**run_info, "train": dataclasses.asdict(train), "seed": merged.get("seed", 0)})
      profiler = (run_logging.StepProfiler(w.path / name / run_logging.PROFILE_DIR)
                  if options["profile"] else None)
      res = run_method(method, stream, train, seed=int(merged.get("seed", 0)), mesh=mesh,
                       checkpoint_dir=str((w.path / name / "checkpoints").resolve()),
                       run_info=run_info, progress=progress, quiet=quiet, logger=logger,
                       profiler=profiler,
                       lr_schedule=schedule_fn(train) if schedule_fn is not None else None)
      if profiler is not None and profiler.state != "done" and w.primary:
        print(f"clx: note: no profile for {name}: no fit had a second chunk to trace after "
              "warm-up (set train.steps_per_call smaller)", file=sys.stderr)
      entry = {"acc_matrix": report.matrix_to_json(res.acc_matrix), **summarize(res.acc_matrix),
               "wall_time_s": round(res.wall_time_s, 3)}
      # acc weights tasks equally; acc_samples weights test examples (official InfLoRA).
      entry["acc_samples"] = float(metrics.accuracy_over_samples(
          res.acc_matrix, [len(task.test) for task in stream.tasks]))
      if res.resumed_from is not None:
        entry["resumed_from_task"] = res.resumed_from
      if method.diagnostics is not None:
        entry["diagnostics"] = method.diagnostics(jax.device_get(res.state))
      entry["config_sha256"] = wd.method_config_sha256(merged, name)
      result["runs"][name] = entry
      wd.write_metrics(metrics_path, result)
      if w.primary:
        report.save_heatmap(res.acc_matrix, w.path / name / "acc_matrix.png",
                            title=f"{config['name']}: {name}")
      if not quiet:
        print(report.format_matrix(res.acc_matrix, title=f"{name} accuracy matrix (%)"),
              file=sys.stdout, flush=True)
  return result
