"""20-split miniImageNet, ResNet-18: GPM, SGP and their BECAME variants at BECAME's settings (pods).

Command:   CLX_MINIIMAGENET=/data/miniimagenet clx run miniimagenet_gpm --workdir runs/mini_gpm
           (methods: gpm, sgp, became_gpm, became_sgp, finetune); rehearsal without the data:
           ``clx rehearse miniimagenet_gpm --devices 8``.
Needs:     miniImageNet as image folders ``$CLX_MINIIMAGENET/train/<class>/*.jpg|png`` and
           ``$CLX_MINIIMAGENET/test/<class>/*`` (100 class folders each; 84x84 images, larger
           ones are resized to 84x84). The official GPM/BECAME loaders read a pickled 84x84
           miniImageNet (``train.pkl``/``test.pkl``); unpickle it into that layout. Offline,
           or with a folder missing, the run stops at once with ImageDataMissingError naming
           what is missing. clx never downloads it.
Hardware:  one GPU (the net has 1.1M parameters; 84x84 inputs); host RAM for the float32
           images (60,000 x 84 x 84 x 3 x 4 B ≈ 5 GB).
Run time:  NOT MEASURED end to end (no miniImageNet on the development machine). The rehearsal
           (``clx rehearse``, experiments/BENCHMARKS.md "Rehearsal") gives the step time and
           memory at this shape on synthetic images.
Expected:  GPM paper (Saha et al. 2021), 20-split miniImageNet, ResNet-18: ACC 60.41 ± 0.61,
           BWT -0.7 ± 0.4 (5 seeds; cross-checked in ../shared/research/inflora_became.md §2.3).
           BECAME (Li et al. 2025) Table 1 reports GPM/SGP with and without BECAME on this
           split; its numbers were NOT retrieved offline (expect BECAME above its base method by
           about 1-2 points ACC, as on CIFAR-100). ``acc`` (mean over tasks) is the papers'
           metric; every task has the same test size, so ``acc_samples`` equals it.

Setup, from BECAME's ``GPM-based/scripts/run.sh`` (miniImageNet lines) as summarised in
../shared/research/inflora_became.md §2.2, and GPM's ResNet-18 code (sahagobinda/GPM
``main_five_dataset.py``, the same network, representation and update for 5-datasets):
- data: 100 classes in sorted folder order, 20 tasks of 5 classes, task-incremental (one
  bias-free head per task); 5 % of each task's training images held out for validation
  (sklearn shuffle with the run seed, as GPM's loaders); pixels ``ToTensor`` in [0, 1].
  NOT VERIFIED: the official miniImageNet loader's normalisation (GPM's
  ``main_mini_imagenet.py`` / its dataloader are not in the repositories stored offline);
  no per-channel normalisation is applied here;
- model: ResNet-18 with nf = 20, 3x3 stem at stride 2 for 84x84 (``clx.models.convnets``),
  batch norm with batch statistics (``track_running_stats=False``);
- training: plain SGD, lr 0.1, lr_min 1e-3, patience 5, factor 3, up to 200 epochs (BECAME;
  GPM's 5-datasets: 100), batch 64 (GPM's ``batch_size_train`` default), restore the best
  validation epoch;
- GPM: threshold 0.985 + 0.0003·t on every conv layer (shortcuts included), representations
  of 100 random training images with GPM's per-layer ``batch_list`` (10 for the stem and the
  first stages … 100 for stage 4; :func:`clx.models.convnets.resnet18_gpm_samples`); BN
  parameters frozen from the second task on; heads not projected;
- SGP: threshold 0.98 + 0.001·t, scale_coff 3 (BECAME's miniImageNet lines);
- BECAME: stage 2 with a fresh SGD at lr2 0.1 down to lr2_min 1e-3 (last model kept), true
  Fisher over the current head, one global λ, γ = 1 (as ``cifar100_gpm``).
5-datasets (GPM ``main_five_dataset.py``: 32x32 inputs, stem stride 1, threshold 0.965, lr 0.1,
lr_min 1e-3, patience 5, factor 3, 100 epochs, batch 64; paper ACC 91.22 ± 0.20 from memory,
unverified) needs CIFAR-10/MNIST/SVHN/Fashion-MNIST/notMNIST, not configured here.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = os.environ.get("CLX_MINIIMAGENET", "/data/miniimagenet")
IMAGE_SIZE = 84
NUM_CLASSES = 100
GPM_TRAIN = {"learning_rate": 0.1, "lr_min": 1e-3, "lr_patience": 5, "lr_factor": 3.0}
BECAME_STAGE2 = {"learning_rate": 0.1, "lr_min": 1e-3, "restore_best": False}


def _load_folder(folder: Path):
  import numpy as np
  from PIL import Image

  from clx.data import images
  split = images.image_folder(folder)  # ImageDataMissingError when absent
  x = np.empty((len(split), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for i in range(len(split)):
    image = split.load_image(i)
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
      image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    x[i] = np.asarray(image, np.uint8)
  return x, split.labels, split.classes


def miniimagenet_stream(*, root: str = DATA_DIR, num_tasks: int = 20, pc_valid: float = 0.05,
                        seed: int = 0, **unused):
  """20-split miniImageNet from image folders (see the module docstring)."""
  del unused
  import numpy as np

  from clx.data import images, streams
  from clx.data.types import ArraySplit, Stream, Task
  root = Path(root).expanduser()
  missing = [str(root / s) for s in ("train", "test") if not (root / s).is_dir()]
  if missing:
    raise images.ImageDataMissingError(
        f"miniimagenet_gpm: missing image folder(s) {missing}; expected "
        f"{root}/train/<class>/* and {root}/test/<class>/* (100 classes each); set "
        "CLX_MINIIMAGENET or --set stream.root=...")
  if NUM_CLASSES % num_tasks:
    raise ValueError(f"miniimagenet_gpm: num_tasks must divide {NUM_CLASSES}, got {num_tasks}")
  data = {s: _load_folder(root / s) for s in ("train", "test")}
  if data["train"][2] != data["test"][2] or len(data["train"][2]) != NUM_CLASSES:
    raise ValueError(f"miniimagenet_gpm: train and test need the same {NUM_CLASSES} class "
                     f"folders, got {len(data['train'][2])} and {len(data['test'][2])}")
  k = NUM_CLASSES // num_tasks
  tasks = []
  for t in range(num_tasks):
    classes = tuple(range(t * k, (t + 1) * k))
    parts = {}
    for name, (x, y, _) in data.items():
      idx = np.flatnonzero((y >= classes[0]) & (y <= classes[-1]))
      parts[name] = ArraySplit({"x": x[idx].astype(np.float32) / np.float32(255.0),
                                "y": y[idx].astype(np.int32)})
    order = streams.sklearn_shuffle(np.arange(len(parts["train"])), random_state=seed)
    n_valid = int(pc_valid * len(order))
    tasks.append(Task(f"miniimagenet-{t}", parts["train"].take(order[n_valid:]), parts["test"],
                      classes, val=parts["train"].take(order[:n_valid]) if n_valid else None))
  return Stream("gpm_miniimagenet", tuple(tasks), "task", NUM_CLASSES)


# Rehearsal shapes (clx.rehearse): miniImageNet has 600 images per class; the per-class
# 500 train / 100 test division of the GPM loader's pickles is from memory, not verified.
def synthetic_spec(args):
  """The :class:`clx.data.synthetic.SyntheticSpec` of ``gpm_miniimagenet`` for ``args``."""
  from clx.data import synthetic
  return synthetic.class_incremental_spec(
      "gpm_miniimagenet", num_classes=NUM_CLASSES, num_tasks=int(args.get("num_tasks", 20)),
      train_total=50000, test_total=10000, example_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
      scenario="task", val_fraction=float(args.get("pc_valid", 0.05)),
      source="miniImageNet: 500 train / 100 test images per class (assumed), pc_valid held out")


def _register():
  from clx.data import streams, synthetic
  streams.register_stream(
      "gpm_miniimagenet", lambda flatten=True, data_dir=None, asset_cache=None, **kw:
      miniimagenet_stream(**kw), overwrite=True)
  synthetic.register_spec("gpm_miniimagenet", synthetic_spec)


_register()


def site_samples() -> dict[str, int]:
  """GPM's ``batch_list`` per ResNet-18 conv site (built on a throwaway 84x84 net)."""
  from clx.models import convnets
  return convnets.resnet18_gpm_samples(convnets.resnet18((IMAGE_SIZE, IMAGE_SIZE, 3)))


def gpm_args(**extra):
  return {"threshold": 0.985, "threshold_increment": 0.0003, "num_samples": 100,
          "site_samples": site_samples(), "project_head": False, **extra}


def sgp_args(**extra):
  return gpm_args(**{"threshold": 0.98, "threshold_increment": 0.001, "scale_coff": 3.0, **extra})


def get_config():
  return {
      "name": "miniimagenet_gpm",
      "stream": {"name": "gpm_miniimagenet", "root": DATA_DIR, "num_tasks": 20, "pc_valid": 0.05,
                 "seed": None},
      "model": {"name": "resnet18", "nf": 20},
      "methods": ["gpm", "sgp", "became_gpm", "became_sgp", "finetune"],
      "method_args": {
          "gpm": gpm_args(),
          "sgp": sgp_args(),
          "became_gpm": gpm_args(stage2=dict(BECAME_STAGE2), fisher="true", gamma=1.0),
          "became_sgp": sgp_args(stage2=dict(BECAME_STAGE2), fisher="true", gamma=1.0),
      },
      "train": {"epochs": 200, "batch_size": 64, "optimizer": "sgd", "restore_best": True,
                "eval_batch_size": 64, **GPM_TRAIN},
      "seed": 0,
  }
