"""experiments/vit_inflora_domainnet.py: official settings, missing lists named, a tiny stream."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from clx.data.images import ImageDataMissingError
from clx.experiment import build_stream, load_config, validate


def test_config_is_the_official_setup_and_names_missing_split_lists(tmp_path):
  config = load_config("vit_inflora_domainnet")
  validate(config)
  args = config["method_args"]["inflora"]
  assert (args["lora_rank"], args["lamb"], args["lame"]) == (30, 0.95, 1.0)
  train = config["train"]
  assert (train["epochs"], train["batch_size"], train["optimizer"], train["learning_rate"]) == (
      5, 128, "momentum", 0.005)
  config["stream"].update(root=str(tmp_path / "domainnet"), list_dir=str(tmp_path / "splits"))
  with pytest.raises(ImageDataMissingError,
                     match=r"domainnet_train.yaml[\s\S]*domainnet_test.yaml[\s\S]*domainnet"):
    build_stream(config)


def test_stream_from_tiny_fake_lists(tmp_path):
  root, lists = tmp_path / "domainnet", tmp_path / "splits"
  lists.mkdir()
  rng = np.random.default_rng(0)
  entries = {"train": ([], []), "test": ([], [])}
  for label in range(345):
    for split, count in (("train", 1), ("test", 1)):
      for i in range(count):
        rel = f"real/class_{label:03d}/{split}_{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).save(root / rel)
        entries[split][0].append(f"data/domainnet/{rel}")
        entries[split][1].append(label)
  for split, (data, targets) in entries.items():
    (lists / f"domainnet_{split}.yaml").write_text(yaml.safe_dump({"data": data, "targets": targets}))
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
  import vit_inflora_domainnet as exp
  image_stream = exp.domainnet_image_stream(root=str(root), list_dir=str(lists), max_per_class=1)
  assert len(image_stream) == 5 and image_stream.tasks[4].classes == tuple(range(276, 345))
  assert len(image_stream.tasks[0].train) == 69 and image_stream.gram_transform == "rrc224_flip"
  # the stream the current loop gets: the test transform's [0, 1] pixels (first task only here)
  import dataclasses
  from clx.data import pipeline
  first = pipeline.materialize(dataclasses.replace(image_stream, tasks=image_stream.tasks[:1]))
  assert first.tasks[0].train.x.shape == (69, 224, 224, 3) and first.tasks[0].train.x.dtype == np.float32
  assert 0 <= first.tasks[0].train.x.min() and first.tasks[0].train.x.max() <= 1
  np.testing.assert_array_equal(first.tasks[0].test.y, np.arange(69))
