"""Pod configs (CIFAR-100 AlexNet, ViT InfLoRA) validate and run on tiny synthetic stand-ins."""

import dataclasses

import numpy as np

from clx import methods
from clx.data import streams
from clx.data.types import ArraySplit
from clx.experiment import load_config, validate
from clx.models import convnets
from clx.train.loop import TrainConfig, run_method


def test_config_validates_and_every_method_runs_two_tasks():
  config = load_config("cifar100_gpm")
  validate(config)
  rng = np.random.default_rng(0)

  def fake(n):
    y = np.repeat(np.arange(100), n)
    return ArraySplit({"x": rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8), "y": y})

  stream = streams.official_gpm_cifar100({"train": fake(8), "test": fake(2)}, 10, seed=0,
                                         pc_valid=0.25)
  stream = dataclasses.replace(stream, tasks=stream.tasks[:2])
  backbone = convnets.alexnet((32, 32, 3), channels=(8, 8, 8), hidden=32, seed=0)
  train = TrainConfig(**{**config["train"], "epochs": 3, "batch_size": 16})
  for name in config["methods"]:
    args = dict(config.get("method_args", {}).get(name, {}))
    if "num_samples" in args:  # the stand-in has 60 training images per task
      args["num_samples"] = 40
      args["site_samples"] = {k: min(v, 40) for k, v in args["site_samples"].items()}
    if name.startswith("became"):
      args.setdefault("verbose", False)
    result = run_method(methods.build(name, backbone, **args), stream, train, quiet=True)
    assert np.all(np.isfinite(result.acc_matrix[np.tril_indices(2)])), name


def test_vit_inflora_config_is_the_official_setup_and_fails_fast_offline(tmp_path):
  import pytest

  from clx.data.catalog import DatasetNotPreparedError
  from clx.experiment import build_stream
  config = load_config("vit_inflora")
  validate(config)
  args = config["method_args"]["inflora"]
  assert (args["lora_rank"], args["lamb"], tuple(args["sites"])) == (10, 0.98, ("k", "v"))
  assert config["train"]["batch_size"] == 128
  # The per-epoch cosine is InfLoRA's own (method_args) and the experiment's for the LoRA row.
  assert config["train"]["schedule"] == "constant" and args["lr_schedule"] == "epoch_cosine"
  from clx.experiment import resolve_lr_schedule
  from clx.methods.inflora import official_lr_schedule
  assert resolve_lr_schedule(config, "lora") is official_lr_schedule
  assert resolve_lr_schedule(config, "inflora") is None and "inflora_ca" not in config[
      "lr_schedules"]
  from clx.data.images import ImageDataMissingError
  assert config["stream"]["source"] == "folder"  # streamed from the ImageNet-R folder
  config["stream"]["root"] = str(tmp_path / "imagenet-r")
  with pytest.raises(ImageDataMissingError, match="imagenet-r"):
    build_stream(config)
  config["stream"]["source"] = "tfds"
  config["stream"]["data_dir"] = str(tmp_path)
  with pytest.raises(DatasetNotPreparedError, match="imagenet_r"):
    build_stream(config)
  config["stream"]["pixel_range"] = "0,255"
  with pytest.raises(ValueError, match="pixel_range"):
    build_stream(config)


def test_cifar100_rows_run_the_settings_of_the_tables_they_quote():
  def settings(config, method):
    train = {**config["train"], **config.get("train_overrides", {}).get(method, {})}
    return (train["learning_rate"], train["lr_min"],
            config["method_args"].get(method, {}).get("scale_coff"))

  papers, became = load_config("cifar100_gpm"), load_config("cifar100_became_table")
  validate(papers), validate(became)
  assert settings(papers, "gpm")[:2] == (0.01, 1e-5)          # GPM repo defaults
  assert settings(papers, "sgp") == (0.05, 5e-5, 10.0)         # SGP repo defaults
  assert settings(papers, "became_sgp") == (0.05, 5e-5, 5.0)   # BECAME scripts/run.sh
  assert settings(papers, "became_gpm")[:2] == (0.05, 5e-5)
  for method in became["methods"]:                             # BECAME's table: one setting
    lr, lr_min, scale = settings(became, method)
    assert (lr, lr_min) == (0.05, 5e-5) and scale in (None, 5.0), method
  for config in (papers, became):
    stage2 = config["method_args"]["became_gpm"]["stage2"]
    assert (stage2["learning_rate"], stage2["lr_min"]) == (0.05, 5e-5)


def test_an_experiment_schedule_that_does_not_resolve_is_a_config_error():
  import pytest

  from clx.experiment import ConfigError
  config = load_config("vit_inflora")
  for bad in ("clx.methods.inflora:no_such_schedule", "no_such_module:f", "clx.methods.inflora"):
    config["lr_schedules"] = {"lora": bad}
    with pytest.raises(ConfigError, match="lr_schedules.lora"):
      validate(config)
  config["lr_schedules"] = {"no_such_method": "clx.methods.inflora:official_lr_schedule"}
  with pytest.raises(ConfigError, match="unknown method"):
    validate(config)
