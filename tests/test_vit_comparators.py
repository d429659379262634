"""The ViT-B/16 comparator pod configs carry the official settings and fail fast offline."""

import pytest

from clx.data.catalog import DatasetNotPreparedError
from clx.experiment import build_stream, load_config, validate


def _settings(config, method):
  return {**config["train"], **config.get("train_overrides", {}).get(method, {})}


@pytest.mark.parametrize("name,dataset", [("vit_comparators_cifar100", "cifar100"),
                                          ("vit_comparators_imr", "imagenet_r")])
def test_comparator_configs_validate_and_fail_fast_offline(name, dataset, tmp_path):
  config = load_config(name)
  validate(config)
  assert config["stream"]["dataset"] == dataset and config["stream"]["num_tasks"] == 10
  assert {"l2p", "dualprompt", "coda_prompt", "ranpac", "simplecil", "sd_lora",
          "inflora"} <= set(config["methods"])
  config["stream"]["data_dir"] = str(tmp_path)
  with pytest.raises(DatasetNotPreparedError, match=dataset):
    build_stream(config)


def test_comparator_rows_run_their_codes_settings():
  c100, imr = load_config("vit_comparators_cifar100"), load_config("vit_comparators_imr")
  # google-research/l2p configs/cifar100_{l2p,dualprompt}.py and imr_dualprompt.py
  for m in ("l2p", "dualprompt"):
    s = _settings(c100, m)
    assert (s["optimizer"], s["learning_rate"], s["grad_clip"], s["epochs"], s["schedule"]) == (
        "adam", 0.03, 1.0, 5, "constant")
  s = _settings(imr, "dualprompt")
  assert (s["learning_rate"], s["epochs"]) == (0.005, 50)
  assert imr["method_args"]["dualprompt"]["e_length"] == 20
  assert c100["method_args"]["dualprompt"]["e_length"] == 5
  # CODA-Prompt configs/{cifar-100,imnet-r}_prompt.yaml
  for config, epochs in ((c100, 20), (imr, 50)):
    s = _settings(config, "coda_prompt")
    assert (s["learning_rate"], s["schedule"], s["epochs"], s["batch_size"]) == (
        1e-3, "cosine", epochs, 128)
  # SD-LoRA exps/sdlora_c100.json; RanPAC M = 10,000; InfLoRA lamb per dataset
  s = _settings(c100, "sd_lora")
  assert (s["optimizer"], s["momentum"], s["learning_rate"], s["epochs"]) == (
      "momentum", 0.9, 8e-3, 20)
  assert c100["method_args"]["ranpac"]["rp_dim"] == 10000
  assert (c100["method_args"]["inflora"]["lamb"], imr["method_args"]["inflora"]["lamb"]) == (
      0.95, 0.98)
