"""ViT-B/16 (pods): the seed papers' comparators on ImageNet-R (10 tasks x 20 classes).

Command:   CLX_VIT_WEIGHTS=/models/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz \
           CLX_IMAGENET_R=/data/imagenet-r \
             clx run vit_comparators_imr --workdir runs/vit_comparators_imr --set seed=0
           (5 / 20 tasks: ``--set stream.num_tasks=5`` / ``=20``; one row: ``--set methods=l2p``).
Needs:     the ImageNet-R folder at $CLX_IMAGENET_R (default ``data/imagenet-r``; 200 class
           folders split by InfLoRA's ``random_split``, or ``train/`` + ``test/`` folders), as
           ``vit_inflora``; ``--set stream.split=coda --set stream.list_dir=DIR`` reads
           CODA-Prompt's split lists instead; ``--set stream.source=tfds`` a prepared TFDS
           ``imagenet_r``. And the AugReg ViT-B/16 in21k ``.npz`` above. Offline the run stops at
           once (ImageDataMissingError naming the folder, DatasetNotPreparedError for TFDS).
Hardware:  one GPU with >= 40 GB (H100 80 GB). Images streamed (host memory holds the file
           list, not pixels).
Run time:  NOT MEASURED (no accelerator, data or weights here). Rough estimate on one H100
           (≈ 800 training images/s, prompt methods ≈ half that for their query pass), 24k
           training images: L2P, DualPrompt, CODA-Prompt 50 epochs ≈ 50 min each; SD-LoRA 20
           epochs ≈ 10 min; InfLoRA 50 epochs ≈ 25 min; SimpleCIL / RanPAC ≈ 1 min.
Expected:  numbers read in the authors' repositories (fetched; commit given). ``acc_samples``
           is the papers' "final accuracy over all test images"; ``acc`` differs slightly,
           ImageNet-R's classes are unequal:
           - SD-LoRA (ICLR 2025) Table 2, read from the image ``imgs/results1.jpg`` of
             ``WuYichen-97/SD-Lora-CL`` 8bacded (shown under "Results" in its README), Acc
             (std) / AAA, 10 tasks: L2P **71.26** (0.44) / 76.13, DualPrompt **68.22** (0.20)
             / 73.81, CODA-Prompt **74.05** (0.41) / 78.14, InfLoRA **74.75** (0.64) / 80.67,
             SD-LoRA **77.34** (0.35) / 82.04. 5 tasks (Acc): L2P 73.04, DualPrompt 69.99,
             CODA-Prompt 76.63, InfLoRA 76.95, SD-LoRA 79.15. 20 tasks (Acc): L2P 68.97,
             DualPrompt 65.23, CODA-Prompt 69.38, InfLoRA 69.89, SD-LoRA 75.26. (The caption
             does not say which backbone or split the rerun comparators used.)
           - SD-LoRA log ``logs/InR-T20.log`` (same commit; the name counts classes per task:
             init_cls 20, 10 tasks; seed 1995, one run): final 78.17, average 82.59. That log's
             config line names ``exps/finetune_inr1.json`` with lr 8e-3 and decay 0.05, not the
             published ``exps/sdlora_inr.json`` (lr 1e-2) this config follows.
           - InfLoRA, the official logs (``liangyanshuo/InfLoRA`` e08b00e,
             ``logs/ImageNet_R/20_20_sip/InfLoRA/adam/10/0.98_1.0-0.0005/{0,1993}.log``, last
             "CNN top1 curve" entry): seed 0 **74.93**, seed 1993 75.97.
           - RanPAC (``RanPAC/RanPAC`` 012927f, ``paper_tables/Table_data_main_imagenetr.csv``,
             seed 1993, timm ``vit_base_patch16_224``, i.e. in21k + in1k fine-tuned, not the
             in21k backbone here): Algorithm 1 77.9; "No Phase 1" (frozen backbone, what
             ``ranpac`` here is) 71.8; "NCM only" (what ``simplecil`` is) 61.2; joint linear
             probe 72.0.
           - SimpleCIL (``zhoudw-zdw/RevisitingCIL`` a2e6b71,
             ``logs/simplecil/imagenetr/exp_1993_pretrained_vit_b16_224_in21k.log``, in21k, 40
             tasks of 5 classes, the code's own ImageNet-R split): final **54.55** (class means
             do not depend on the task split).

Rows: as ``vit_comparators_cifar100`` (whose docstring lists each method's source and the
common departures), with the ImageNet-R settings of the codes that have them:
- ``dualprompt``: ``google-research/l2p`` ``configs/imr_dualprompt.py``: E-prompt length 20
  (G 5), per-row test selection (``batchwise_prompt=False``), Adam constant, clip 1.0, 50
  epochs; lr 0.005 for batch 256 scaled to this config's batch 128 (``train_continual.py``
  l.638-639): **0.0025**.
- ``l2p``: the L2P repository has no ImageNet-R config; its CIFAR-100 optimiser (Adam, lr 0.03
  scaled to 0.015 at batch 128, constant, clip 1.0) is kept with DualPrompt's 50 ImageNet-R
  epochs (a choice, not the code's).
- ``coda_prompt``: ``GT-RIPL/CODA-Prompt`` ``configs/imnet-r_prompt.yaml``: Adam lr 1e-3,
  batch 128, 50 epochs, the per-epoch ``CosineSchedule`` (``lr_schedules``, as on CIFAR-100).
- ``sd_lora``: ``WuYichen-97/SD-Lora-CL`` 8bacded ``exps/sdlora_inr.json`` (the json
  ``run.sh`` launches): lr **1e-2** (``init_lr`` = ``lrate``), batch 128, 20 epochs,
  milestones [10000] (constant); SGD momentum 0.9 as hard-coded in ``models/sdlora.py``
  ``_train`` (the json's ``"optimizer": "adam"`` is not read there).
- ``inflora`` / ``lora``: ``vit_inflora`` (lamb 0.98, Adam 5e-4, InfLoRA's per-epoch cosine, 50
  epochs).
- ``ranpac`` / ``simplecil``: unchanged (nothing trained).
Split: InfLoRA's (``random_split`` of the class folders after ``torch.manual_seed(seed)``,
24,000 / 6,000), as ``vit_inflora``; the other codes split ImageNet-R their own way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# ImageNet-R's raw folder (200 class folders), as vit_inflora.
IMAGENET_R = os.environ.get("CLX_IMAGENET_R", "data/imagenet-r")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vit_comparators_cifar100 as cifar100  # noqa: E402  (registers the stream too)


def get_config():
  config = cifar100.get_config()
  config["name"] = "vit_comparators_imr"
  config["stream"].update(dataset="imagenet_r", source="folder", root=IMAGENET_R)
  config["train"]["epochs"] = 50
  config["method_args"]["inflora"]["lamb"] = 0.98
  config["method_args"]["dualprompt"].update(e_length=20, batchwise=False)
  over = config["train_overrides"]
  # configs/imr_dualprompt.py lr 0.005 for batch 256, scaled to the batch (train_continual.py).
  over["dualprompt"].update(learning_rate=0.005 * cifar100.L2P_BATCH / 256.0, epochs=50)
  over["l2p"]["epochs"] = 50
  over["sd_lora"].update(learning_rate=1e-2, epochs=20)  # exps/sdlora_inr.json
  return config
