"""ViT-B/16 (pods): the seed papers' comparators on ImageNet-R (10 tasks x 20 classes).

Command:   CLX_VIT_WEIGHTS=/models/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz \
             clx run vit_comparators_imr --workdir runs/vit_comparators_imr --set seed=0
           (5 / 20 tasks: ``--set stream.num_tasks=5`` / ``=20``; one row: ``--set methods=l2p``).
Needs:     TFDS ``imagenet_r`` prepared as array_record under $TFDS_DATA_DIR (``tfds build
           imagenet_r --data_dir $TFDS_DATA_DIR --file_format=array_record`` on a machine with
           internet) and the AugReg ViT-B/16 in21k ``.npz`` above. Offline the run stops at once.
Hardware:  one GPU with >= 40 GB (H100 80 GB); host RAM 18 GB for the float32 images.
Run time:  NOT MEASURED (no accelerator, data or weights here). Rough estimate on one H100
           (≈ 800 training images/s, prompt methods ≈ half that for their query pass), 24k
           training images: L2P, DualPrompt, CODA-Prompt 50 epochs ≈ 50 min each; SD-LoRA 20
           epochs ≈ 10 min; InfLoRA 50 epochs ≈ 25 min; SimpleCIL / RanPAC ≈ 1 min.
Expected:  per row (ViT-B/16, 10 tasks; ``acc_samples`` is the papers' "final accuracy over all
           test images"; ``acc`` differs slightly, ImageNet-R's classes are unequal):
           - InfLoRA (InfLoRA paper, 5 seeds, ACC_T / mean ACC): 75.65 ± 0.14 / 80.82 ± 0.24;
             5 tasks 77.52 ± 0.37, 20 tasks 71.01 ± 0.45 (as ``vit_inflora``).
           - RanPAC (``paper_tables/Table_data_main_imagenetr.csv`` of the RanPAC repository,
             seed 1993, timm ``vit_base_patch16_224``): Algorithm 1 77.9; "No Phase 1" (frozen
             backbone, what ``ranpac`` here is) **71.8**; "NCM only" (what ``simplecil`` is)
             **61.2**; joint linear probe 72.0.
           - CODA-Prompt paper (in1k ViT-B/16, A_N, 10 tasks): L2P 69.29 ± 0.73, DualPrompt
             71.32 ± 0.62, CODA-P 75.45 ± 0.56 — FROM MEMORY, NOT VERIFIED offline.
           - SD-LoRA (ICLR 2025): 20 tasks 75.26 (the figure a third-party benchmark page,
             wizwand, lists for the paper); the 5- and 10-task numbers were not recovered offline.

Rows: as ``vit_comparators_cifar100`` (whose docstring lists each method's source), with the
ImageNet-R settings of the codes that have them:
- ``dualprompt``: ``configs/imr_dualprompt.py``: E-prompt length 20 (G 5), per-row test
  selection (``batchwise_prompt=False``), Adam lr 0.005 constant, clip 1.0, 50 epochs,
  per-device batch 24 (global 128 here).
- ``l2p``: the L2P repository has no ImageNet-R config; its CIFAR-100 optimiser (Adam 0.03,
  constant, clip 1.0) is kept with DualPrompt's 50 ImageNet-R epochs (a choice, not the code's).
- ``coda_prompt``: ``configs/imnet-r_prompt.yaml``: Adam lr 1e-3, cosine, batch 128, 50 epochs.
- ``sd_lora``: the ImageNet-R json of SD-Lora-CL was not readable offline; the CIFAR-100
  settings (SGD 0.9, lr 8e-3, 20 epochs) are kept — check ``exps/`` before a measured run.
- ``inflora`` / ``lora``: ``vit_inflora`` (lamb 0.98, Adam 5e-4, ``inflora_cosine``, 50 epochs).
- ``ranpac`` / ``simplecil``: unchanged (nothing trained).
ImageNet-R has one TFDS split: 80 % of each class (seeded) trains, 20 % tests (24,000 / 6,000).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vit_comparators_cifar100 as cifar100  # noqa: E402  (registers the stream too)


def get_config():
  config = cifar100.get_config()
  config["name"] = "vit_comparators_imr"
  config["stream"]["dataset"] = "imagenet_r"
  config["train"]["epochs"] = 50
  config["method_args"]["inflora"]["lamb"] = 0.98
  config["method_args"]["dualprompt"].update(e_length=20, batchwise=False)
  over = config["train_overrides"]
  over["dualprompt"].update(learning_rate=0.005, epochs=50)
  over["l2p"]["epochs"] = 50
  over["sd_lora"]["epochs"] = 20
  return config
