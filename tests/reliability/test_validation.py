"""Config values are range-checked at config time, before any data loads (issue 16, item 6)."""

import dataclasses

import numpy as np
import pytest

from clx import experiment
from clx.data import streams
from clx.train.loop import TrainConfig


BAD_TRAIN = [("grad_clip", -1.0), ("weight_decay", -1.0), ("learning_rate", float("inf")),
             ("learning_rate", float("nan")), ("learning_rate", -0.1), ("momentum", 1.5),
             ("b2", -0.1), ("max_chunk_mb", 0.0), ("device_data_mb", -1.0),
             ("steps_per_call", -2), ("epochs", 1.5), ("batch_size", True), ("lr_min", float("nan"))]


@pytest.mark.parametrize("field,value", BAD_TRAIN, ids=[f"{f}={v}" for f, v in BAD_TRAIN])
def test_train_config_rejects_out_of_range_values(field, value):
  with pytest.raises(ValueError, match=field):
    TrainConfig(**{field: value})


def test_train_config_defaults_and_official_settings_pass():
  TrainConfig()
  TrainConfig(optimizer="sgd", learning_rate=0.01, lr_patience=6, lr_factor=2, lr_min=1e-5,
              restore_best=True, grad_clip=100.0, weight_decay=5e-4)
  assert dataclasses.replace(TrainConfig(), epochs=0).epochs == 0


@pytest.fixture
def no_data(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("data loaded before the arguments were checked")
  monkeypatch.setattr(streams, "_builtin", refuse)


BAD_STREAM = [("permuted_mnist", {"train_per_task": -59700}), ("permuted_mnist", {"train_per_task": 0}),
              ("permuted_mnist", {"num_tasks": 0}), ("split_digits", {"num_tasks": -1}),
              ("split_digits", {"classes_per_task": 0}), ("permuted_digits", {"seed": -1}),
              ("split_mnist", {"seed": 2**32}), ("pmnist", {"flatten": "yes"}),
              ("gpm_cifar100", {"pc_valid": 1.0}), ("permuted_mnist", {"val_fraction": -0.1}),
              ("split_digits", {"scenario": "domainn"})]


@pytest.mark.parametrize("name,kwargs", BAD_STREAM, ids=[f"{n}-{k}" for n, k in BAD_STREAM])
def test_stream_arguments_rejected_before_loading(no_data, name, kwargs):
  key = next(iter(kwargs))
  with pytest.raises(ValueError, match=key):
    streams.get_stream(name, **kwargs)


def test_unknown_stream_argument_rejected_before_loading(no_data):
  with pytest.raises(TypeError, match="num_taks"):
    streams.get_stream("split_digits", num_taks=3)


def _config(**changes):
  config = {"name": "v", "stream": {"name": "split_digits", "num_tasks": 2},
            "model": {"name": "mlp", "hidden": [8]}, "methods": ["finetune"],
            "method_args": {}, "train": {"epochs": 1}, "seed": 0}
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


@pytest.mark.parametrize("changes,words", [
    ({"seed": -1}, "seed"),
    ({"stream.train_per_task": 0, "stream.name": "permuted_mnist"}, "train_per_task"),
    ({"model.hidden": [8, 0]}, "mlp"),
    ({"model.widht": 3}, "widht"),
    ({"methods": ["lora"], "method_args": {"lora": {"rank": 9}}}, "rank 9"),
    ({"methods": ["gpm"], "method_args": {"gpm": {"threshold": -0.5}}}, "threshold"),
    ({"methods": ["gpm"], "method_args": {"gpm": {"threshhold": 0.9}}}, "threshhold"),
    ({"train_overrides": {"finetune": {"grad_clip": -1.0}}}, "train_overrides.finetune"),
])
def test_validate_rejects_before_loading(no_data, changes, words):
  with pytest.raises(experiment.ConfigError, match=words):
    experiment.validate(_config(**changes))


def test_validate_accepts_the_shipped_quick_configs(no_data):
  for name in ("quickstart", "quickstart_pmnist", "pmnist_gpm", "pmnist_became"):
    experiment.validate(experiment.load_config(name))


@pytest.mark.parametrize("name", ["split_digits", "permuted_digits"])
@pytest.mark.parametrize("flatten", [True, False])
def test_provisional_input_shapes_match_the_streams(name, flatten):
  config = _config(**{"stream.name": name, "stream.flatten": flatten})
  stream = streams.get_stream(name, flatten=flatten, num_tasks=2)
  assert experiment.provisional_input_shape(config) == tuple(stream.input_shape)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [("split_mnist", {}), ("pmnist", {}),
                                         ("permuted_mnist", {"num_tasks": 2}),
                                         ("mnist_animal_domains", {})])
@pytest.mark.parametrize("flatten", [True, False])
def test_provisional_input_shapes_match_the_mnist_streams(name, kwargs, flatten):
  config = _config(**{"stream.name": name, "stream.flatten": flatten})
  stream = streams.get_stream(name, flatten=flatten, **kwargs)
  assert experiment.provisional_input_shape(config) == tuple(stream.input_shape)


def test_train_per_task_above_the_data_is_an_error():
  # Before: a Python slice silently kept all 60,000 images.
  def fake(name, data_dir, asset_cache):
    from clx.data.types import ArraySplit
    x = np.zeros((50, 28, 28), np.uint8)
    y = np.arange(50, dtype=np.int32) % 10
    return {"train": ArraySplit({"x": x, "y": y}), "test": ArraySplit({"x": x[:10], "y": y[:10]})}

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(streams, "_builtin", fake)
    with pytest.raises(ValueError, match="exceeds"):
      streams.get_stream("permuted_mnist", num_tasks=2, train_per_task=51)


BAD_METHOD_ARGS = [("lora", {"rank": 0}), ("lora", {"rank": 9}), ("lora", {"alpha": float("nan")}),
                   ("finetune", {"head_mode": "bogus"}), ("gpm", {"threshold": 1.5}),
                   ("gpm", {"threshold": [0.9, 0.0]}), ("gpm", {"num_samples": 0}),
                   ("gpm", {"threshold_increment": -0.1}), ("sgp", {"scale_coff": -1.0}),
                   ("became_gpm", {"fisher_batch_size": 0}),
                   ("became_gpm", {"stage2": {"learning_rate": -1.0}}),
                   ("became_gpm", {"stage2": {"learning_rat": 0.1}})]


@pytest.mark.parametrize("name,kwargs", BAD_METHOD_ARGS, ids=[f"{n}-{k}" for n, k in BAD_METHOD_ARGS])
def test_method_factories_reject_bad_arguments_at_build_time(name, kwargs):
  from clx import methods
  from clx.models.mlp import mlp
  backbone = mlp((20,), (8,))  # widths 20 -> 8: rank 9 exceeds min(d_in, d_out) = 8
  with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
    methods.build(name, backbone, **kwargs)


def test_validate_does_not_build_before_a_pending_distributed_join(monkeypatch):
  # Building initialises JAX's backends; jax.distributed.initialize() must come first.
  import jax

  def refuse(*args, **kwargs):
    raise AssertionError("built a backbone before jax.distributed.initialize()")

  monkeypatch.setattr(experiment, "build_model_and_methods", refuse)
  monkeypatch.setenv("CLX_COORDINATOR", "127.0.0.1:1")
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  experiment.validate(_config())
  monkeypatch.delenv("CLX_COORDINATOR")
  with pytest.raises(AssertionError, match="built a backbone"):
    experiment.validate(_config())
