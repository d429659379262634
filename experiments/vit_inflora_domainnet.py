"""ViT-B/16 (pods): InfLoRA vs sequential LoRA on DomainNet, 5 tasks x 69 classes, official split lists.

Command:   CLX_VIT_WEIGHTS=/models/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz \
           CLX_DOMAINNET_DIR=/data/domainnet CLX_DOMAINNET_SPLITS=/data/splits \
             clx run vit_inflora_domainnet --workdir runs/vit_inflora_domainnet --set seed=0
Needs:     the DomainNet images (``clipart/ infograph/ painting/ quickdraw/ real/ sketch/``, each
           with 345 class folders) and the official split lists ``domainnet_train.yaml`` and
           ``domainnet_test.yaml`` (CODA-Prompt's ``dataloaders/splits``, which InfLoRA reads from
           the same path; their paths ``data/domainnet/<domain>/<class>/<file>`` are mapped onto
           CLX_DOMAINNET_DIR). The lists are not in either repository's git history (too large
           for GitHub), so get them from the authors. Without them the run stops at once with
           ``ImageDataMissingError`` naming the missing files (nothing is decoded first).
Hardware:  one GPU with >= 40 GB. The loop streams the images (``clx.data.pipeline.
           streaming_stream``): decoded, augmented (train transform for the epochs and the Gram
           passes, test transform for evaluation) and batched per step in grain threads, each
           process reading its own rows; host memory holds file paths, not pixels
           (experiments/BENCHMARKS.md, input pipeline). ``stream.max_per_class`` subsamples.
Run time:  NOT MEASURED (no accelerator, data or weights on the development machine).
Expected:  NOT MEASURED. InfLoRA paper (CVPR 2024), DomainNet 5 tasks: ACC_T 74.53 ± 0.23 /
           mean ACC 79.57 ± 0.57 — recalled, UNVERIFIED (../shared/research/inflora_became.md).

Setup, from the official code (liangyanshuo/InfLoRA ``configs/domainnet_inflora.json``,
``utils/data.py`` ``iDomainNet``, ``methods/inflora_domain.py``): 345 classes in ascending order
(``shuffle: false``), ``init_cls`` = ``increment`` = 69 -> 5 tasks; rank 30 on k and v; lamb 0.95,
lame 1.0; SGD momentum 0.9, lr 0.005, weight decay 0, batch 128, 5 epochs; train transform
RandomResizedCrop(224) + horizontal flip, test Resize(256) + CenterCrop(224), ``ToTensor`` with
``Normalize(0, 1)`` (pixels in [0, 1]); the Gram passes iterate the training loader (train
transform). Differences from the official code, all in the loop (clx/train, not this config):
the official classifier heads use lr 0.01 (``fc_lrate``) and a MultiStepLR (x0.1 after epoch 4);
clx trains everything at 0.005 with a constant schedule. The official method class is
``InfLoRA_domain``, which updates its memory with plain ``update_GPM`` (no DualGPM switch,
../shared/research/inflora_became.md); clx runs its ``inflora`` method (DualGPM) — a
DomainNet variant is left to the official-variants work.
"""

from __future__ import annotations

import os

WEIGHTS = os.environ.get("CLX_VIT_WEIGHTS",
                         "/models/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz")
DOMAINNET_DIR = os.environ.get("CLX_DOMAINNET_DIR", "data/domainnet")
DOMAINNET_SPLITS = os.environ.get("CLX_DOMAINNET_SPLITS", "dataloaders/splits")


def domainnet_image_stream(*, root: str = DOMAINNET_DIR, list_dir: str = DOMAINNET_SPLITS,
                           num_tasks: int = 5, max_per_class: int = 0, check: bool = True,
                           **unused):
  """The official DomainNet task sequence as an ImageStream (files, not pixels).

  Args:
    root: the DomainNet image folder.
    list_dir: the folder with ``domainnet_train.yaml`` / ``domainnet_test.yaml``.
    num_tasks: 5 in the official config (69 classes each); 345 must divide by it.
    max_per_class: keep the first N listed images of each class per split (0: all).
    check: stat every listed image first.

  Raises:
    ImageDataMissingError: the lists / folder / listed images are missing (named).
  """
  del unused
  import numpy as np

  from clx.data import images, pipeline
  if 345 % num_tasks:
    raise ValueError(f"num_tasks must divide 345 classes, got {num_tasks}")
  splits = images.load_image_dataset("domainnet", root, list_dir=list_dir, check=check)
  if max_per_class:
    def head(split):
      keep = np.concatenate([np.flatnonzero(split.labels == c)[:max_per_class]
                             for c in np.unique(split.labels)])
      return split.take(np.sort(keep))
    splits = {k: head(v) for k, v in splits.items()}
  per = 345 // num_tasks
  return pipeline.class_incremental_images(
      splits, pipeline.inflora_increments(345, per, per), class_order=range(345),
      name="domainnet", train_transform="rrc224_flip", test_transform="resize256_center224",
      pixel_range="0,1")


def _register():
  from clx.data import pipeline, streams
  streams.register_stream(
      "inflora_domainnet", lambda flatten=True, data_dir=None, asset_cache=None, seed=0, **kw:
      pipeline.streaming_stream(domainnet_image_stream(**kw)), overwrite=True)


_register()


def get_config():
  return {
      "name": "vit_inflora_domainnet",
      "stream": {"name": "inflora_domainnet", "root": DOMAINNET_DIR, "list_dir": DOMAINNET_SPLITS,
                 "num_tasks": 5, "max_per_class": 0, "seed": 0},
      "model": {"name": "vit", "variant": "B/16", "weights": WEIGHTS, "pool": "token"},
      "methods": ["inflora", "lora"],
      "method_args": {
          "inflora": {"lora_rank": 30, "sites": ["k", "v"], "lamb": 0.95, "lame": 1.0},
          "lora": {"lora_rank": 30, "sites": ["*attn/key/kernel", "*attn/value/kernel"]},
      },
      "train": {"epochs": 5, "batch_size": 128, "optimizer": "momentum", "learning_rate": 0.005,
                "momentum": 0.9, "weight_decay": 0.0, "schedule": "constant",
                "eval_batch_size": 256},
      "seed": 0,
  }
