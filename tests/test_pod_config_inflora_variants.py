"""Pod configs of the official InfLoRA variants: InfLoRA-b5 and InfLoRA+CA (vit_inflora)."""

import pytest

from clx import methods
from clx.data.catalog import DatasetNotPreparedError
from clx.experiment import build_stream, load_config, validate
from clx.methods import inflora as inflora_lib
from clx.models.vit import vit

# From liangyanshuo/InfLoRA configs/*_inflorab5.json, read by hand (not from the config module).
OFFICIAL_JSON = {"mimg5": (5, 5e-4, 50, 0.98), "mimg10": (10, 5e-4, 50, 0.99),
                 "mimg20": (20, 5e-4, 50, 0.99), "cifar100": (10, 1e-3, 20, 0.95)}


def test_config_is_the_official_imagenet_r_10_setup():
  config = load_config("vit_inflora_b5")
  validate(config)
  tasks, lr, epochs, lamb = OFFICIAL_JSON["mimg10"]
  args = config["method_args"]["inflora_b5"]
  train = config["train"]
  assert config["stream"]["num_tasks"] == tasks and config["stream"]["dataset"] == "imagenet_r"
  assert (args["lora_rank"], args["blocks"], args["lamb"], args["lame"]) == (10, 5, lamb, 1.0)
  assert (train["learning_rate"], train["epochs"], train["batch_size"]) == (lr, epochs, 128)
  # The official per-epoch CosineSchedule is InfLoRA's own, supplied by the method.
  assert train["optimizer"] == "adam" and train["schedule"] == "constant"
  assert args["lr_schedule"] == "epoch_cosine"
  assert config["stream"]["pixel_range"] == "0,1"


def test_every_official_variant_is_tabulated():
  import importlib.util
  from pathlib import Path
  path = Path(__file__).resolve().parents[1] / "experiments" / "vit_inflora_b5.py"
  spec = importlib.util.spec_from_file_location("vit_inflora_b5_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  table = {("cifar100" if k == "cifar100" else "imagenet_r", v[0]): v[1:]
           for k, v in OFFICIAL_JSON.items()}
  got = {k: (v["learning_rate"], v["epochs"], v["lamb"]) for k, v in module.OFFICIAL.items()}
  assert got == table


def test_method_adapts_kv_of_the_first_five_blocks_with_plain_gpm():
  backbone = vit((32, 32, 3), variant="test", depth=6, embed_dim=24, num_heads=2, mlp_dim=48,
                 patch_size=16, seed=0)
  config = load_config("vit_inflora_b5")
  args = {**config["method_args"]["inflora_b5"], "lora_rank": 4}
  method = methods.build("inflora_b5", backbone, **args)
  spec = methods.StreamSpec(2, 4, "class", ((0, 1), (2, 3)), (32, 32, 3))
  state = method.init(__import__("jax").random.PRNGKey(0), spec)
  k_sites, v_sites = backbone.site_paths("k"), backbone.site_paths("v")
  first5 = [p for pair in zip(k_sites[:5], v_sites[:5]) for p in pair]
  expected = set(inflora_lib.input_groups(backbone, first5))
  assert len(k_sites) == 6 and len(expected) == 5
  assert set(state["memory"]) == expected  # blocks 0-4; the sixth block has no branch
  assert method.name == "inflora_b5"


def test_fails_fast_offline(tmp_path):
  from clx.data.images import ImageDataMissingError
  config = load_config("vit_inflora_b5")
  assert config["stream"]["source"] == "folder"  # streamed from the ImageNet-R folder
  config["stream"]["root"] = str(tmp_path / "imagenet-r")
  with pytest.raises(ImageDataMissingError, match="imagenet-r"):
    build_stream(config)
  config["stream"]["source"] = "tfds"
  config["stream"]["data_dir"] = str(tmp_path)
  with pytest.raises(DatasetNotPreparedError, match="imagenet_r"):
    build_stream(config)


def test_vit_inflora_carries_the_official_imagenet_r_ca_row():
  # configs/mimg10_infloraca.json: rank 10, lamb 0.95, SGD (momentum 0.9) lr 1e-3, wd 0, 50 ep.
  config = load_config("vit_inflora")
  validate(config)
  args = config["method_args"]["inflora_ca"]
  assert (args["lora_rank"], args["lamb"], args["lame"], tuple(args["sites"])) == (
      10, 0.95, 1.0, ("k", "v"))
  train = {**config["train"], **config["train_overrides"]["inflora_ca"]}
  assert (train["optimizer"], train["momentum"], train["learning_rate"]) == ("momentum", 0.9, 1e-3)
  assert (train["epochs"], train["batch_size"], train.get("weight_decay", 0.0)) == (50, 128, 0.0)
  method = methods.build("inflora_ca", vit((32, 32, 3), variant="test", depth=2, embed_dim=24,
                                           num_heads=2, mlp_dim=48, patch_size=16, seed=0),
                         **args)
  assert method.name == "inflora_ca"
