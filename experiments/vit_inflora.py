"""ViT-B/16 (pods): InfLoRA, InfLoRA+CA vs sequential LoRA on Split CIFAR-100 / ImageNet-R.

Command:   CLX_VIT_WEIGHTS=/models/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz \
           CLX_IMAGENET_R=/data/imagenet-r \
             clx run vit_inflora --workdir runs/vit_inflora_inr10 --set seed=0
           ImageNet-R 5 / 20 tasks: ``--set stream.num_tasks=5`` / ``=20``; CIFAR-100 (10 tasks):
           ``--set stream.dataset=cifar100 --set train.epochs=20
           --set method_args.inflora.lamb=0.95``.
Needs:     the ImageNet-R folder at $CLX_IMAGENET_R (default ``data/imagenet-r``, the official
           path: 200 class folders, split by InfLoRA's ``random_split``; or ``train/`` + ``test/``
           folders, the layout the official code writes and PILOT/LibContinual distribute);
           ``--set stream.source=tfds`` reads a prepared TFDS ``imagenet_r`` instead; CIFAR-100
           is read from TFDS ``cifar100`` prepared as array_record under $TFDS_DATA_DIR (clx
           never downloads: ``tfds build cifar100 --data_dir $TFDS_DATA_DIR
           --file_format=array_record`` on a machine with internet); and the AugReg ViT-B/16
           in21k ``.npz`` above (timm 0.6.7 ``vit_base_patch16_224_in21k``, the official
           backbone). A missing folder stops the run at once with ImageDataMissingError naming
           what is missing (DatasetNotPreparedError for TFDS, a missing-weights error).
Hardware:  one GPU with >= 40 GB (H100 80 GB). The loop streams the images (decoded, augmented
           and batched per step in grain threads, uint8 to the device; each process reads its
           own rows): host memory holds the file list, not pixels (experiments/BENCHMARKS.md,
           input pipeline: peak RSS flat from 6k to 24k images).
Run time:  NOT MEASURED (no accelerator, data or ViT weights on the development machine).
           Estimate on one H100 (float32/TF32, ≈ 800 training images/s through a frozen
           ViT-B/16 with LoRA on k and v): ImageNet-R, 24k training images × 50 epochs ≈ 25 min
           per method, plus two Gram passes per task (≈ 1 min in all); CIFAR-100, 50k × 20 epochs
           ≈ 21 min. The design + DualGPM update for 12 layers of 768-d costs < 1 s per task
           (experiments/BENCHMARKS.md).
Expected:  the InfLoRA paper (CVPR 2024, 5 seeds, ACC_T / mean ACC): ImageNet-R 5 tasks
           77.52 ± 0.37 / 82.01 ± 0.12, 10 tasks 75.65 ± 0.14 / 80.82 ± 0.24, 20 tasks
           71.01 ± 0.45 / 77.28 ± 0.45; CIFAR-100 10 tasks 86.51 ± 0.73 / 91.70 ± 0.32. The
           official logs, seed 0: 74.93 (ImageNet-R 10) and 86.67 (CIFAR-100). Sequential LoRA
           forgets most of the old tasks (class-incremental, no task id at test time).
           Metric: the paper's ACC_T is over all seen test samples (official utils/toolkit.py),
           i.e. clx's ``acc_samples``; ``acc`` (mean over tasks) differs on ImageNet-R.

Setup, from the official code (liangyanshuo/InfLoRA ``configs/*.json``, details in
../shared/research/inflora_became.md §1): classes in ascending order (unshuffled), per-task heads
with class-incremental inference (all seen heads' logits concatenated), LoRA rank 10 on k and v
of all 12 blocks, B_t designed from the task's input Gram matrix projected off the DualGPM
memory (scale 1/√3, the σ⁴ energy criterion), threshold lamb + (1 − lamb)·t/T with lamb 0.98
(ImageNet-R) / 0.95 (CIFAR-100); Adam (0.9, 0.999), lr 5e-4, no weight decay, batch 128, the
per-epoch ``CosineSchedule`` (supplied by the method: ``method_args.inflora.lr_schedule=
epoch_cosine``; sequential LoRA trains on the same schedule, supplied by the experiment's
``lr_schedules``), 50 epochs (ImageNet-R) / 20 (CIFAR-100);
pixels in [0, 1] without normalisation (``ToTensor`` + ``Normalize(0, 1)``); the official
transforms (``utils/data.py``): training RandomResizedCrop(224) + horizontal flip, test
Resize(256) + CenterCrop(224) (ImageNet-R) / Resize(224) (CIFAR-100), drawn per example and
epoch from the run seed (same seed -> same augmented batches, also after a resume); the Gram
passes before and after training use the train transform, as the official ones iterate the
training loader (``methods/inflora.py`` l. 74-75, 117-119, 189-191 at e08b00e, a loader built
with ``mode='train'``, i.e. the train transform, ``utils/data_manager.py`` l. 39-40), each pass
with fresh draws. ImageNet-R split: InfLoRA's ``random_split(ImageFolder(root), [0.8n, n - 0.8n])``
after ``torch.manual_seed(stream.seed)`` (``utils/data.py`` ``iIMAGENET_R``), reproduced in
NumPy (``clx.data.images.torch_randperm``). The earlier in-memory builder (224² resize, no
augmentation, clx's 80/20 per-class split) is ``--set stream.source=tfds_resized``.
InfLoRA+CA (``inflora_ca``, the official ``configs/mimg10_infloraca.json`` / ``InfLoRA_CA``): plain
GPM memory, rank 10, lamb 0.95, SGD with momentum 0.9 at lr 1e-3 without weight decay, 50
epochs, batch 128, then classifier alignment after every task (256 Gaussian samples per class,
5 epochs, SGD 0.01, logit normalisation 0.1; clx.methods.inflora_ca). The official schedule is
``CosineAnnealingLR`` stepped per epoch; clx's ``cosine`` decays per step. Its paper number was
not recovered offline; it adds ≈ 25 min (ImageNet-R) to the run. Run it alone with
``--set methods=inflora_ca``. CIFAR-100 (``cifar100_infloraca.json``, ``InfLoRA_CA1``): also
``--set method_args.inflora_ca.lora_rank=5 --set train_overrides.inflora_ca.learning_rate=0.001``
with weight decay 1e-3; its head lr 0.01, MultiStepLR and fresh final LayerNorm are not
reproduced (clx/methods/inflora_ca.py lists the departures).
DomainNet (5 × 69 classes, SGD, r 30) needs the official split files
(``dataloaders/splits/domainnet_*.yaml``), which are not available offline; it is not
configured here.
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
import vit_proteus  # noqa: E402  (registers the TFDS split stream "vit_proteus_split")


def get_config():
  return {
      "name": "vit_inflora",
      "stream": {"name": "vit_proteus_split", "dataset": "imagenet_r", "num_tasks": 10,
                 "image_size": 224, "seed": 0, "pixel_range": "0,1",
                 "source": "folder", "root": IMAGENET_R},
      "model": {"name": "vit", "variant": "B/16", "weights": WEIGHTS, "pool": "token"},
      "methods": ["inflora", "lora", "inflora_ca"],
      "method_args": {
          "inflora": {"lora_rank": 10, "sites": ["k", "v"], "lamb": 0.98, "lame": 1.0,
                      "lr_schedule": "epoch_cosine"},
          "lora": {"lora_rank": 10, "sites": ["*attn/key/kernel", "*attn/value/kernel"]},
          "inflora_ca": {"lora_rank": 10, "sites": ["k", "v"], "lamb": 0.95, "lame": 1.0},
      },
      "train_overrides": {"inflora_ca": {"optimizer": "momentum", "momentum": 0.9,
                                         "learning_rate": 1e-3, "schedule": "cosine"}},
      "train": {"epochs": 50, "batch_size": 128, "optimizer": "adam", "learning_rate": 5e-4,
                "schedule": "constant", "eval_batch_size": 256},
      # The comparator trains on InfLoRA's per-epoch cosine too (the method supplies its own).
      "lr_schedules": {"lora": "clx.methods.inflora:official_lr_schedule"},
      "seed": 0,
  }
