"""ViT-B/16 (pods): InfLoRA-b5 (LoRA in blocks 0-4 only, plain GPM) on ImageNet-R / CIFAR-100.

Command:   CLX_VIT_WEIGHTS=/models/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz \
             clx run vit_inflora_b5 --workdir runs/vit_inflora_b5_inr10 --set seed=0
           ImageNet-R 20 tasks: ``--set stream.num_tasks=20`` (lamb stays 0.99);
           ImageNet-R 5 tasks: ``--set stream.num_tasks=5 --set method_args.inflora_b5.lamb=0.98``;
           CIFAR-100 (10 tasks): ``--set stream.dataset=cifar100 --set train.epochs=20
           --set train.learning_rate=0.001 --set method_args.inflora_b5.lamb=0.95``.
Needs:     the ImageNet-R folder at $CLX_IMAGENET_R (CIFAR-100: TFDS ``cifar100`` prepared under
           $TFDS_DATA_DIR) and the AugReg ViT-B/16 in21k ``.npz`` above, as
           experiments/vit_inflora.py. A missing folder stops the run at once with
           ImageDataMissingError naming what is missing.
Hardware:  one GPU with >= 40 GB (H100 80 GB); images are streamed per batch (host memory
           holds file paths, not pixels), as experiments/vit_inflora.py.
Run time:  NOT MEASURED (no accelerator, data or ViT weights on the development machine).
           Estimate: at most vit_inflora's (≈ 25 min per method on ImageNet-R 10 tasks,
           ≈ 21 min on CIFAR-100 on one H100); the frozen forward dominates and is the same,
           the LoRA backward stops after block 5 (7 of 12 blocks need no weight gradients).
Expected:  the InfLoRA paper's InfLoRA-b5 rows were NOT RECOVERED offline (the research notes
           have only the abstract; see ../shared/research/inflora_became.md). Compare against
           the paper's table by hand; ``acc`` in metrics.json is the mean over tasks, the
           official toolkit reports accuracy over all seen test samples (equal on CIFAR-100,
           slightly different on ImageNet-R).

Setup, from the official code (liangyanshuo/InfLoRA ``configs/{mimg5,mimg10,mimg20,cifar100}
_inflorab5.json``, ``methods/inflorab5.py``, ``models/vit_inflorab5.py``): LoRA rank 10 on k
and v of blocks 0-4 only (``inflora_b5``), plain GPM memory (``update_GPM``, never the DualGPM
switch), B_t designed from the remove-projected Gram matrix (scale 1/√3, σ⁴ energies); Adam
(0.9, 0.999), no weight decay, batch 128, the per-epoch ``CosineSchedule``
(supplied by the method: ``lr_schedule="epoch_cosine"``); per config:

  ============  =====  ======  ======  =====
  config        tasks  lr      epochs  lamb
  ============  =====  ======  ======  =====
  mimg5         5      5e-4    50      0.98
  mimg10        10     5e-4    50      0.99
  mimg20        20     5e-4    50      0.99
  cifar100      10     1e-3    20      0.95
  ============  =====  ======  ======  =====

lame = 1.0 everywhere. Data, the official transforms (RandomResizedCrop + flip in training and
in the Gram passes; ImageNet-R test Resize(256) + CenterCrop(224)) and InfLoRA's ImageNet-R
``random_split`` are those of experiments/vit_inflora.py. DomainNet (``domainnet_inflorab5.json``: SGD, rank 30, 5 epochs) is
configured by experiments/vit_inflora_domainnet.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

WEIGHTS = os.environ.get("CLX_VIT_WEIGHTS",
                         "/models/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz")

# ImageNet-R's raw folder (200 class folders; InfLoRA's path is data/imagenet-r), split by
# InfLoRA's random_split (torch seed = stream.seed), or <root>/{train,test} folders.
IMAGENET_R = os.environ.get("CLX_IMAGENET_R", "data/imagenet-r")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vit_proteus  # noqa: E402,F401  (registers the TFDS split stream "vit_proteus_split")

# The official per-config settings (tasks → lr, epochs, lamb), for the docstring table and tests.
OFFICIAL = {
    ("imagenet_r", 5): {"learning_rate": 5e-4, "epochs": 50, "lamb": 0.98},
    ("imagenet_r", 10): {"learning_rate": 5e-4, "epochs": 50, "lamb": 0.99},
    ("imagenet_r", 20): {"learning_rate": 5e-4, "epochs": 50, "lamb": 0.99},
    ("cifar100", 10): {"learning_rate": 1e-3, "epochs": 20, "lamb": 0.95},
}


def get_config():
  official = OFFICIAL[("imagenet_r", 10)]
  return {
      "name": "vit_inflora_b5",
      "stream": {"name": "vit_proteus_split", "dataset": "imagenet_r", "num_tasks": 10,
                 "image_size": 224, "seed": 0, "pixel_range": "0,1",
                 "source": "folder", "root": IMAGENET_R},
      "model": {"name": "vit", "variant": "B/16", "weights": WEIGHTS, "pool": "token"},
      "methods": ["inflora_b5"],
      "method_args": {
          "inflora_b5": {"lora_rank": 10, "blocks": 5, "lamb": official["lamb"], "lame": 1.0,
                         "lr_schedule": "epoch_cosine"},
      },
      "train": {"epochs": official["epochs"], "batch_size": 128, "optimizer": "adam",
                "learning_rate": official["learning_rate"], "schedule": "constant",
                "eval_batch_size": 256},
      "seed": 0,
  }
