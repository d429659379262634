"""ViT-B/16 (pods): the seed papers' comparators on Split CIFAR-100 (10 tasks x 10 classes).

Command:   CLX_VIT_WEIGHTS=/models/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz \
             clx run vit_comparators_cifar100 --workdir runs/vit_comparators_c100 --set seed=0
           (one row: ``--set methods=l2p``; the ImageNet-R table is ``vit_comparators_imr``).
Needs:     TFDS ``cifar100`` prepared as array_record under $TFDS_DATA_DIR (clx never
           downloads: ``tfds build cifar100 --data_dir $TFDS_DATA_DIR --file_format=array_record``
           on a machine with internet) and the AugReg ViT-B/16 in21k ``.npz`` above (timm 0.6.7
           ``vit_base_patch16_224_in21k``, InfLoRA's backbone). Offline the run stops
           at once with DatasetNotPreparedError / a missing-weights error.
Hardware:  one GPU with >= 40 GB (H100 80 GB). The images are streamed (``stream.source=tfds``:
           decoded, augmented and batched per step, as ``vit_inflora``); host memory holds the
           index, not pixels.
Run time:  NOT MEASURED (no accelerator, data or ViT weights on the development machine).
           Rough estimate on one H100 (float32/TF32, ≈ 800 training images/s through a frozen
           ViT-B/16 with a prompt or LoRA; prefix prompts and the query pass of L2P /
           DualPrompt / CODA-Prompt cost a second forward): L2P and DualPrompt 5 epochs x 50k
           ≈ 10 min each; CODA-Prompt 20 epochs ≈ 40 min; SD-LoRA and InfLoRA 20 epochs ≈ 21 min
           each; SimpleCIL and RanPAC one feature pass per task (≈ 2 min in all).
Expected:  numbers read in the authors' repositories (fetched; commit given), per row (ViT-B/16,
           10 tasks, final accuracy over all test images = clx's ``acc_samples``, equal to
           ``acc`` here since every task has 1,000 test images). Rows with no number had none
           in the sources read (the CODA-Prompt and L2P repositories carry no result tables):
           - InfLoRA: the official logs (``liangyanshuo/InfLoRA`` e08b00e,
             ``logs/cifar100/10_10_sip/InfLoRA/adam/10/0.95_1.0-0.0005/{0,1993}.log``, last
             entry of "CNN top1 curve"): seed 0 **86.67**, seed 1993 86.95 (the logs of seeds
             1-4 are empty files at that commit).
           - RanPAC (``RanPAC/RanPAC`` 012927f, ``paper_tables/Table_data_main_cifar224.csv``,
             in21k ViT-B/16, seed 1993): Algorithm 1 (with first-session adaptation) 92.2;
             "No Phase 1" (RanPAC on the frozen backbone, what ``ranpac`` here is) **89.0**;
             "NCM only" (cosine class means on the frozen backbone, what ``simplecil`` is)
             **83.4**; joint linear probe 87.9.
           - SimpleCIL (``zhoudw-zdw/RevisitingCIL`` a2e6b71,
             ``logs/simplecil/cifar224/exp_1993_pretrained_vit_b16_224_in21k.log``, in21k, 20
             tasks of 5 classes): final 81.28 (class means do not depend on how the classes
             are split into tasks, so the 10-task final is the same classifier).
           - SD-LoRA (``WuYichen-97/SD-Lora-CL`` 8bacded, ``logs/C100.log``, one run, seed
             1994): final 87.26, average 92.05. That log's own config line names
             ``exps/finetune1.json`` (lr 8e-3, as ``exps/sdlora_c100.json``), not the json
             the README's ``run.sh`` launches. The README's tables cover ImageNet-R / -A and
             DomainNet only (``vit_comparators_imr``).
           - ``lora`` (sequential, no task id at test time) forgets most of the old tasks.

Rows (each method's settings from its official code; ``train_overrides`` per row):
- ``l2p`` (``google-research/l2p`` dd8836e ``configs/cifar100_l2p.py``): pool 10, top-k /
  length as clx's L2P defaults (read from that config), batch-wise selection; Adam, constant
  rate, gradient clip 1.0, 5 epochs. Learning rate **0.015**: the config's 0.03 is a rate for
  batch 256, scaled by the global batch (``train_continual.py`` l.638-639:
  ``base_learning_rate = config.learning_rate * global_batch_size / 256.0``), i.e.
  0.03·128/256 at this config's batch 128 (the code's 16 per device x 8 devices is 128 if it
  runs on 8: ASSUMED, the device count is not in the config).
- ``dualprompt`` (``configs/cifar100_dualprompt.py``): G-prompt length 5 at layers 0-1,
  E-prompt pool 10, length 5, top-1 at layers 2-4, batch-wise test selection, prefix-tuning;
  Adam constant, clip 1.0, 5 epochs; lr 0.03 scaled as L2P's to batch 128: **0.015** (the
  code's per-device 24 would give a global 192 and 0.0225 on 8 devices; clx keeps one batch,
  128, for every row and applies the code's scaling rule to it).
- ``coda_prompt`` (``GT-RIPL/CODA-Prompt`` 6417d4f ``configs/cifar-100_prompt.yaml``,
  ``experiments/cifar-100.sh`` ``--prompt_param 100 8 0.0``): 100 components, length 8,
  layers 0-4, ortho 0; Adam lr 1e-3, batch 128, 20 epochs, and the code's ``CosineSchedule``
  stepped once per EPOCH (``lr·cos(99π·e/(200(E−1)))``; ``utils/schedulers.py``,
  ``learners/default.py`` l.95), supplied through ``lr_schedules`` by
  ``clx.methods.coda_prompt.official_lr_schedule`` (clx's ``cosine`` would decay per step).
- ``ranpac`` (``RanPAC/RanPAC`` ``args/cifar224_publish.csv`` row 4 without Phase 1): 10,000
  random features, λ per task from 10⁻⁸…10⁸ on an 80/20 split; nothing trained.
- ``simplecil`` (``zhoudw-zdw/RevisitingCIL`` ``exps/simplecil/cifar224_5_5_vit-b_simplecil.json``):
  class-mean cosine classifier on the frozen backbone; nothing trained.
- ``sd_lora`` (``WuYichen-97/SD-Lora-CL`` 8bacded ``exps/sdlora_c100.json``, ``models/sdlora.py``
  l.92-122): rank 10 on q and v, magnitudes 0.8; SGD momentum 0.9 (hard-coded in ``_train``;
  the json's ``optimizer`` / ``scheduler`` keys are not read there), lr 8e-3, no weight decay
  (commented out), batch 128, 20 epochs; its MultiStepLR milestones (60/120/170 on task 1,
  40/70 after) lie beyond epoch 20, so the rate is constant.
- ``inflora`` and ``lora``: as ``vit_inflora`` with its CIFAR-100 settings (lamb 0.95, Adam
  5e-4, batch 128, 20 epochs, InfLoRA's per-epoch cosine: ``method_args.inflora.lr_schedule=
  epoch_cosine``; the LoRA row through ``lr_schedules``).

Common departures: one backbone for every row, the AugReg in21k ViT-B/16 of InfLoRA's code;
the other codes load timm ``vit_base_patch16_224`` (in21k pre-trained, in1k fine-tuned:
CODA-Prompt ``models/zoo.py`` l.369, SD-LoRA ``models/sdlora.py`` l.70; RanPAC's CIFAR row
uses the in21k one, as here). One stream for every row: InfLoRA's transforms
(``clx.data.transforms.OFFICIAL_TRANSFORMS``: RandomResizedCrop(224) + flip for training,
Resize(224) for test; ImageNet-R Resize(256) + CenterCrop(224)), pixels in [0, 1] (``norm_01`` of the L2P code, ``ToTensor`` of the
PyTorch codes), classes in ascending order (the other codes shuffle with a fixed seed); the
other codes' own augmentations are not reproduced per row.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

WEIGHTS = os.environ.get("CLX_VIT_WEIGHTS",
                         "/models/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vit_proteus  # noqa: E402,F401  (registers the split stream and its synthetic spec)

METHODS = ["l2p", "dualprompt", "coda_prompt", "ranpac", "simplecil", "sd_lora", "inflora",
           "lora"]


# google-research/l2p train_continual.py l.638-639: the configs' rate is for batch 256 and is
# scaled by the global batch; 0.03 (configs/cifar100_{l2p,dualprompt}.py) at batch 128.
L2P_BATCH = 128
L2P_LEARNING_RATE = 0.03 * L2P_BATCH / 256.0  # 0.015

# Both the method's and the experiment's per-epoch cosine resolve to the same formula.
EPOCH_COSINE = {"lora": "clx.methods.inflora:official_lr_schedule",
                "coda_prompt": "clx.methods.coda_prompt:official_lr_schedule"}


def get_config():
  adam_l2p = {"optimizer": "adam", "learning_rate": L2P_LEARNING_RATE, "grad_clip": 1.0,
              "epochs": 5, "schedule": "constant", "batch_size": L2P_BATCH}
  return {
      "name": "vit_comparators_cifar100",
      # CIFAR-100 is read from prepared TFDS (source tfds); root / split / list_dir apply to
      # the ImageNet-R folder (vit_comparators_imr), kept here so that --set finds them.
      "stream": {"name": "vit_proteus_split", "dataset": "cifar100", "num_tasks": 10,
                 "image_size": 224, "seed": 0, "pixel_range": "0,1",
                 "source": "tfds", "root": None, "split": None, "list_dir": None},
      "model": {"name": "vit", "variant": "B/16", "weights": WEIGHTS, "pool": "token"},
      "methods": list(METHODS),
      "method_args": {
          "l2p": {"pool_size": 10},
          "dualprompt": {"g_layers": [0, 1], "g_length": 5, "e_layers": [2, 3, 4],
                         "e_length": 5, "pool_size": 10, "top_k": 1, "batchwise": True},
          "coda_prompt": {"pool_size": 100, "length": 8, "layers": [0, 1, 2, 3, 4],
                          "ortho_mu": 0.0},
          "ranpac": {"rp_dim": 10000},
          "sd_lora": {"lora_rank": 10, "sites": ["q", "v"]},
          "inflora": {"lora_rank": 10, "sites": ["k", "v"], "lamb": 0.95, "lame": 1.0,
                      "lr_schedule": "epoch_cosine"},
          "lora": {"lora_rank": 10, "sites": ["k", "v"]},
      },
      "train": {"epochs": 20, "batch_size": 128, "optimizer": "adam", "learning_rate": 5e-4,
                "schedule": "constant", "eval_batch_size": 256},
      "lr_schedules": dict(EPOCH_COSINE),
      "train_overrides": {
          "l2p": dict(adam_l2p), "dualprompt": dict(adam_l2p),
          "coda_prompt": {"optimizer": "adam", "learning_rate": 1e-3, "schedule": "constant"},
          "sd_lora": {"optimizer": "momentum", "momentum": 0.9, "learning_rate": 8e-3,
                      "schedule": "constant"},
          "simplecil": {"epochs": 1, "schedule": "constant"},
          "ranpac": {"epochs": 1, "schedule": "constant"},
      },
      "seed": 0,
  }
