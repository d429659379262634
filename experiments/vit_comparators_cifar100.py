"""ViT-B/16 (pods): the seed papers' comparators on Split CIFAR-100 (10 tasks x 10 classes).

Command:   CLX_VIT_WEIGHTS=/models/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz \
             clx run vit_comparators_cifar100 --workdir runs/vit_comparators_c100 --set seed=0
           (one row: ``--set methods=l2p``; the ImageNet-R table is ``vit_comparators_imr``).
Needs:     TFDS ``cifar100`` prepared as array_record under $TFDS_DATA_DIR (clx never
           downloads: ``tfds build cifar100 --data_dir $TFDS_DATA_DIR --file_format=array_record``
           on a machine with internet) and the AugReg ViT-B/16 in21k ``.npz`` above (timm 0.6.7
           ``vit_base_patch16_224_in21k``, InfLoRA's and SD-LoRA's backbone). Offline the run stops
           at once with DatasetNotPreparedError / a missing-weights error.
Hardware:  one GPU with >= 40 GB (H100 80 GB); host RAM for the float32 224x224 images
           (CIFAR-100 60k: 36 GB).
Run time:  NOT MEASURED (no accelerator, data or ViT weights on the development machine).
           Rough estimate on one H100 (float32/TF32, ≈ 800 training images/s through a frozen
           ViT-B/16 with a prompt or LoRA; prefix prompts and the query pass of L2P /
           DualPrompt / CODA-Prompt cost a second forward): L2P and DualPrompt 5 epochs x 50k
           ≈ 10 min each; CODA-Prompt 20 epochs ≈ 40 min; SD-LoRA and InfLoRA 20 epochs ≈ 21 min
           each; SimpleCIL and RanPAC one feature pass per task (≈ 2 min in all).
Expected:  numbers of the papers, per row (ViT-B/16, 10 tasks, final accuracy over all test
           images = clx's ``acc_samples``; equal to ``acc`` here since every task has 1,000
           test images):
           - InfLoRA (InfLoRA paper, CVPR 2024, 5 seeds, ACC_T / mean ACC): 86.51 ± 0.73 /
             91.70 ± 0.32 (as ``vit_inflora``).
           - RanPAC (the repository's ``paper_tables/Table_data_main_cifar224.csv``, in21k
             ViT-B/16, seed 1993): Algorithm 1 (with first-session adaptation) 92.2; "No
             Phase 1" (RanPAC on the frozen backbone, what ``ranpac`` here is) **89.0**; "NCM
             only" (cosine class means on the frozen backbone, what ``simplecil`` is) **83.4**;
             joint linear probe 87.9.
           - L2P / DualPrompt / CODA-Prompt: the CODA-Prompt paper (CVPR 2023, in1k ViT-B/16,
             A_N) reports L2P 82.50 ± 1.10, DualPrompt 83.05 ± 1.16, CODA-P 86.25 ± 0.74 —
             FROM MEMORY, NOT VERIFIED offline (only abstracts of the papers could be read);
             InfLoRA's and SD-LoRA's tables rerun them on in21k and were not recovered.
           - SD-LoRA (ICLR 2025, Table A.3 on CIFAR-100): not recovered offline.
           - ``lora`` (sequential, no task id at test time) forgets most of the old tasks.

Rows (each method's settings from its official code; ``train_overrides`` per row):
- ``l2p`` (``google-research/l2p`` ``configs/cifar100_l2p.py``): pool 10, top-k / length as
  clx's L2P defaults (read from that config), batch-wise selection; Adam lr 0.03 constant,
  gradient clip 1.0, 5 epochs; per-device batch 16 (global 128 on the 8 accelerators the code
  is launched on: ASSUMED, the device count is not in the config).
- ``dualprompt`` (``configs/cifar100_dualprompt.py``): G-prompt length 5 at layers 0-1,
  E-prompt pool 10, length 5, top-1 at layers 2-4, batch-wise test selection, prefix-tuning;
  Adam lr 0.03 constant, clip 1.0, 5 epochs; per-device batch 24 (global 128 here).
- ``coda_prompt`` (``GT-RIPL/CODA-Prompt`` ``configs/cifar-100_prompt.yaml``,
  ``experiments/cifar-100.sh`` ``--prompt_param 100 8 0.0``): 100 components, length 8,
  layers 0-4, ortho 0; Adam lr 1e-3, cosine, batch 128, 20 epochs.
- ``ranpac`` (``RanPAC/RanPAC``, ``args/cifar224_publish.csv`` row 4 without Phase 1): 10,000
  random features, λ per task from 10⁻⁸…10⁸ on an 80/20 split; nothing trained.
- ``simplecil`` (``zhoudw-zdw/RevisitingCIL`` ``exps/simplecil.json``): class-mean cosine
  classifier on the frozen backbone; nothing trained.
- ``sd_lora`` (``WuYichen-97/SD-Lora-CL`` ``exps/sdlora_c100.json``): rank 10 on q and v,
  magnitudes 0.8; SGD momentum 0.9, lr 8e-3, batch 128, 20 epochs.
- ``inflora`` and ``lora``: as ``vit_inflora`` with its CIFAR-100 settings (lamb 0.95, Adam
  5e-4, ``inflora_cosine``, 20 epochs, batch 128).

Common departures: one backbone for every row (the in21k ViT-B/16 of InfLoRA's and SD-LoRA's
tables, which rerun the prompt methods on it; CODA-Prompt's own code uses an in1k checkpoint);
pixels in [0, 1] (``norm_01`` of the L2P code, ``ToTensor`` of the PyTorch codes); images
resized to 224 without the codes' training augmentation (the stream builder applies none:
expect ≈ 1 point lower); classes in ascending order (the codes shuffle with a fixed seed).
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


def get_config():
  adam_l2p = {"optimizer": "adam", "learning_rate": 0.03, "grad_clip": 1.0, "epochs": 5,
              "schedule": "constant"}
  return {
      "name": "vit_comparators_cifar100",
      "stream": {"name": "vit_proteus_split", "dataset": "cifar100", "num_tasks": 10,
                 "image_size": 224, "seed": 0, "pixel_range": "0,1"},
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
          "inflora": {"lora_rank": 10, "sites": ["k", "v"], "lamb": 0.95, "lame": 1.0},
          "lora": {"lora_rank": 10, "sites": ["k", "v"]},
      },
      "train": {"epochs": 20, "batch_size": 128, "optimizer": "adam", "learning_rate": 5e-4,
                "schedule": "inflora_cosine", "eval_batch_size": 256},
      "train_overrides": {
          "l2p": dict(adam_l2p), "dualprompt": dict(adam_l2p),
          "coda_prompt": {"optimizer": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
          "sd_lora": {"optimizer": "momentum", "momentum": 0.9, "learning_rate": 8e-3,
                      "schedule": "constant"},
          "simplecil": {"epochs": 1, "schedule": "constant"},
          "ranpac": {"epochs": 1, "schedule": "constant"},
      },
      "seed": 0,
  }
