"""10-split CIFAR-100, 5-layer AlexNet: GPM, SGP and their BECAME variants, each at its paper's settings (pods).

Command:   clx run cifar100_gpm --workdir runs/cifar100_gpm --set seed=0
           (methods: gpm, sgp, became_gpm, became_sgp, finetune; ``--set stream.num_tasks=20``
           for the 20-split; TFDS_DATA_DIR must hold a prepared ``cifar100``).
           For BECAME's controlled comparison (every row at BECAME's settings, the setting of
           its Table 1 baselines) run ``clx run cifar100_became_table`` instead.
Needs:     TFDS ``cifar100`` prepared as array_record (clx never downloads; on a machine with
           internet: ``tfds build cifar100 --data_dir $TFDS_DATA_DIR --file_format=array_record``).
           Offline the run stops at once with the catalog's DatasetNotPreparedError.
Hardware:  one GPU (any; the net has 6.5M parameters) or a TPU host; CPU works but is slow.
Run time:  NOT MEASURED end to end (no CIFAR-100 on the development machine). Measured
           (experiments/bench_alexnet_gpm.py, BENCHMARKS.md): one projected AlexNet training step
           at batch 64 takes 160-180 ms on 2 CPU cores, 0.5-0.8x the official-style PyTorch step
           measured in the same run. A task of the 10-split has 4,750 training images (250 more
           are its validation split) = 75 steps per epoch (2,375 = 38 steps on the 20-split);
           the validation-loss schedule (patience 6, factor 2, down to lr_min) stops after
           60-200 epochs, so up to ≈ 15,000 steps per task: ≈ 20-40 min per task and method on
           2 CPU cores; on one GPU the step is a few ms, so minutes per method. BECAME adds a
           second (stage-2) phase and three Fisher passes per task: about twice the time of its
           base method.
Expected:  which table each row's number comes from, and the settings it runs (below):
           - ``gpm``: GPM paper (Saha et al. 2021), 10-split CIFAR-100: ACC 72.48 ± 0.40,
             BWT -0.9 (5 seeds), run with the GPM repo's defaults (lr 0.01, lr_min 1e-5).
           - ``sgp``: SGP paper (Saha & Roy 2023) ≈ 1 point above GPM (from memory, unverified),
             run with the SGP repo's defaults (lr 0.05, lr_min 5e-5, scale_coff 10).
           - ``became_gpm``/``became_sgp``: BECAME paper Table 1 (Li et al. 2025), above its own
             GPM/SGP baselines by about 1-2 points ACC (exact numbers not retrievable offline,
             ../shared/research/inflora_became.md §2.3), run with BECAME's scripts/run.sh
             (lr = lr2 = 0.05, lr_min = lr2_min = 5e-5, scale_coff 5). Their baselines are not
             the ``gpm``/``sgp`` rows here (other settings): see ``cifar100_became_table``.
           - ``finetune``: no paper number; forgets strongly (BWT ≪ 0). BECAME's settings.
           All these numbers are ``acc`` (mean over tasks); every task has 1,000 test images,
           so ``acc_samples`` (mean over test samples) is the same number here.
           On the 20-split the GPM and SGP papers report no CIFAR-100 result; BECAME's Table 1
           does (its settings, ``cifar100_became_table``).

Setup, from the official code (sahagobinda/GPM ``main_cifar100.py``; sahagobinda/SGP
``main_sgp_cifar100.py``; BECAME ``GPM-based/scripts/run.sh`` and ``main_cifar100.py``):
- data: the official 10-split loader (:func:`clx.data.streams.official_gpm_cifar100`): classes
  in order, 10 per task, GPM's per-channel normalisation, 5 % validation split per task
  (sklearn shuffle with the run seed), task-incremental (one bias-free head per task);
- model: AlexNet 3 conv (64/128/256, kernels 4/3/2) + 2 FC (2048), bias-free, batch norm with
  batch statistics (``track_running_stats=False``), dropout 0.2 (conv) / 0.5; the last test
  and Fisher batches are scored as if alone (padding masked out of the batch statistics,
  :mod:`clx.methods.passes`), as the official loops;
- training: plain SGD (no momentum), batch 64, up to 200 epochs; after every epoch the
  validation loss: patience 6, lr / 2 on a plateau, stop when lr < lr_min, restore the best
  epoch; lr / lr_min per row as above (``train_overrides``);
- GPM: thresholds 0.97 + 0.003·t on all 5 layers (all three repos; on the 20-split ε_t ≥ 1 for
  t = 10…19, where clx caps at 1 and the official code appends null directions, see
  :func:`clx.methods.gpm.gpm`); representations of 125 random training images, of which conv1
  uses the first 24, conv2/conv3 100, fc1/fc2 125 (official ``batch_list``), conv layers as
  im2col patch matrices; batch-norm parameters frozen from the second task on; the per-task
  heads are not projected;
- SGP: the same, with the importance scale coefficient of its row (10 or 5);
- BECAME: stage 2 from θ_GP with a fresh SGD at lr2 0.05 and the same plateau rule down to
  lr2_min 5e-5, keeping the last model (``early_stop``, no best restore); true Fisher with the
  model's argmax labels at batch 64 over the current head, in train mode as the official
  ``compute_fisher_matrix_diag`` (dropout on, from a fixed per-task key; ``--set
  method_args.became_gpm.fisher_dropout=false`` for a deterministic pass); one global λ; γ = 1.
"""

ALEXNET_SITE_SAMPLES = {"conv1/kernel": 24, "conv2/kernel": 100, "conv3/kernel": 100,
                        "fc1/kernel": 125, "fc2/kernel": 125}
# Optimiser settings by source (each repo's argparse defaults / BECAME's scripts/run.sh).
GPM_PAPER = {"learning_rate": 0.01, "lr_min": 1e-5}       # GPM main_cifar100.py L455, L459
SGP_PAPER = {"learning_rate": 0.05, "lr_min": 5e-5}       # SGP main_sgp_cifar100.py L483, L487
BECAME_TABLE = {"learning_rate": 0.05, "lr_min": 5e-5}    # BECAME scripts/run.sh L13, L15
SGP_PAPER_SCALE_COFF, BECAME_SCALE_COFF = 10.0, 5.0
BECAME_STAGE2 = {"learning_rate": 0.05, "lr_min": 5e-5, "restore_best": False}  # lr2, lr2_min


def gpm_args(**extra):
  return {"threshold": 0.97, "threshold_increment": 0.003, "num_samples": 125,
          "site_samples": dict(ALEXNET_SITE_SAMPLES), "project_head": False, **extra}


def train_settings(**optimiser):
  return {"epochs": 200, "batch_size": 64, "optimizer": "sgd", "lr_patience": 6,
          "lr_factor": 2.0, "restore_best": True, "eval_batch_size": 64, **optimiser}


def get_config():
  return {
      "name": "cifar100_gpm",
      "stream": {"name": "gpm_cifar100", "num_tasks": 10, "pc_valid": 0.05, "seed": None},
      "model": {"name": "alexnet"},
      "methods": ["gpm", "sgp", "became_gpm", "became_sgp", "finetune"],
      "method_args": {
          "gpm": gpm_args(),
          "sgp": gpm_args(scale_coff=SGP_PAPER_SCALE_COFF),
          "became_gpm": gpm_args(stage2=dict(BECAME_STAGE2), fisher="true", gamma=1.0),
          "became_sgp": gpm_args(scale_coff=BECAME_SCALE_COFF, stage2=dict(BECAME_STAGE2),
                                 fisher="true", gamma=1.0),
      },
      "train": train_settings(**BECAME_TABLE),
      "train_overrides": {"gpm": dict(GPM_PAPER), "sgp": dict(SGP_PAPER)},
      "seed": 0,
  }
