"""The ViT-B/16 comparator pod configs carry the official settings and fail fast offline."""

import math
import warnings

import pytest

from clx.data.catalog import DatasetNotPreparedError
from clx.experiment import build_stream, load_config, resolve_lr_schedule, validate
from clx.train.config import TrainConfig

CONFIGS = ("vit_comparators_cifar100", "vit_comparators_imr")


def _settings(config, method):
  return {**config["train"], **config.get("train_overrides", {}).get(method, {})}


def test_comparator_configs_validate_and_fail_fast_offline(tmp_path):
  c100, imr = load_config(CONFIGS[0]), load_config(CONFIGS[1])
  for config, dataset in ((c100, "cifar100"), (imr, "imagenet_r")):
    validate(config)
    assert config["stream"]["dataset"] == dataset and config["stream"]["num_tasks"] == 10
    assert set(config["methods"]) == {"l2p", "dualprompt", "coda_prompt", "ranpac", "simplecil",
                                      "sd_lora", "inflora", "lora"}
    # The stream keys of the other pod configs (vit_inflora), so that --set finds them.
    assert {"source", "root", "split", "list_dir"} <= set(config["stream"])
  assert c100["stream"]["source"] == "tfds"
  c100["stream"]["data_dir"] = str(tmp_path)
  with pytest.raises(DatasetNotPreparedError, match="cifar100"):
    build_stream(c100)
  # ImageNet-R is streamed from its folder with InfLoRA's split, as vit_inflora.
  from clx.data.images import ImageDataMissingError
  assert imr["stream"]["source"] == "folder" and imr["stream"]["root"]
  imr["stream"]["root"] = str(tmp_path / "imagenet-r")
  with pytest.raises(ImageDataMissingError, match="imagenet-r"):
    build_stream(imr)
  imr["stream"].update(source="tfds", data_dir=str(tmp_path))
  with pytest.raises(DatasetNotPreparedError, match="imagenet_r"):
    build_stream(imr)


def test_comparator_rows_run_their_codes_settings():
  c100, imr = load_config(CONFIGS[0]), load_config(CONFIGS[1])
  # google-research/l2p configs/cifar100_{l2p,dualprompt}.py (0.03) and imr_dualprompt.py
  # (0.005) are rates for batch 256: train_continual.py scales them by global_batch / 256.
  for m in ("l2p", "dualprompt"):
    s = _settings(c100, m)
    assert (s["optimizer"], s["learning_rate"], s["grad_clip"], s["epochs"], s["schedule"],
            s["batch_size"]) == ("adam", pytest.approx(0.015), 1.0, 5, "constant", 128)
  s = _settings(imr, "dualprompt")
  assert (s["learning_rate"], s["epochs"], s["batch_size"]) == (pytest.approx(0.0025), 50, 128)
  assert _settings(imr, "l2p")["learning_rate"] == pytest.approx(0.015)
  assert imr["method_args"]["dualprompt"]["e_length"] == 20
  assert c100["method_args"]["dualprompt"]["e_length"] == 5
  # CODA-Prompt configs/{cifar-100,imnet-r}_prompt.yaml: Adam 1e-3, batch 128, its per-epoch
  # CosineSchedule (through lr_schedules, not clx's per-step "cosine").
  from clx.methods import coda_prompt
  for config, epochs in ((c100, 20), (imr, 50)):
    s = _settings(config, "coda_prompt")
    assert (s["optimizer"], s["learning_rate"], s["epochs"], s["batch_size"]) == (
        "adam", 1e-3, epochs, 128)
    assert resolve_lr_schedule(config, "coda_prompt") is coda_prompt.official_lr_schedule
  # SD-LoRA exps/sdlora_c100.json (8e-3) and exps/sdlora_inr.json (1e-2); SGD momentum 0.9
  # hard-coded in models/sdlora.py; 20 epochs, batch 128, constant (milestones never reached).
  for config, lr in ((c100, 8e-3), (imr, 1e-2)):
    s = _settings(config, "sd_lora")
    assert (s["optimizer"], s["momentum"], s["learning_rate"], s["epochs"], s["batch_size"],
            s["schedule"]) == ("momentum", 0.9, lr, 20, 128, "constant")
  # RanPAC M = 10,000; InfLoRA lamb per dataset and its own per-epoch cosine.
  assert c100["method_args"]["ranpac"]["rp_dim"] == 10000
  assert (c100["method_args"]["inflora"]["lamb"], imr["method_args"]["inflora"]["lamb"]) == (
      0.95, 0.98)
  from clx.methods.inflora import official_lr_schedule as inflora_schedule
  for config in (c100, imr):
    assert config["method_args"]["inflora"]["lr_schedule"] == "epoch_cosine"
    assert resolve_lr_schedule(config, "lora") is inflora_schedule


def test_no_row_uses_a_deprecated_schedule():
  for name in CONFIGS:
    config = load_config(name)
    for method in config["methods"]:
      with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        TrainConfig(**_settings(config, method))


def test_coda_prompt_schedule_is_the_codes_per_epoch_cosine():
  from clx.methods import coda_prompt
  lr, epochs, steps_per_epoch = 1e-3, 20, 7
  schedule = coda_prompt.official_lr_schedule(
      TrainConfig(epochs=epochs, learning_rate=lr, optimizer="adam"))(steps_per_epoch)
  rates = [float(schedule(s)) for s in range(epochs * steps_per_epoch)]
  # utils/schedulers.py CosineSchedule(K=epochs), stepped once per epoch (epoch e > 0).
  expected = [lr * math.cos(99 * math.pi * (s // steps_per_epoch) / (200 * (epochs - 1)))
              for s in range(epochs * steps_per_epoch)]
  assert rates == pytest.approx(expected, rel=1e-5)
  assert rates[0] == rates[steps_per_epoch - 1] > rates[steps_per_epoch]  # flat within an epoch
  assert rates[-1] == pytest.approx(lr * math.cos(99 * math.pi / 200), rel=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_docstrings_carry_sourced_numbers_only(name):
  from clx.experiment import _load_module  # pylint: disable=protected-access
  from pathlib import Path
  doc = _load_module(Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py").__doc__
  for unsourced in ("NOT VERIFIED", "FROM MEMORY", "wizwand", "third-party"):
    assert unsourced not in doc, unsourced
  # Each number's source: repository file and commit.
  for commit in ("e08b00e", "012927f", "8bacded", "a2e6b71"):
    assert commit in doc, commit
  if name == "vit_comparators_imr":  # SD-LoRA Table 2, ImageNet-R 10 tasks
    for number in ("71.26", "68.22", "74.05", "74.75", "77.34"):
      assert number in doc, number
