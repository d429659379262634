"""10-split CIFAR-100, 5-layer AlexNet: GPM, SGP and their BECAME variants (pods).

Command:   clx run cifar100_gpm --workdir runs/cifar100_gpm --set seed=0
           (methods: gpm, became_gpm, sgp, became_sgp, finetune; ``--set stream.num_tasks=20``
           for the 20-split; TFDS_DATA_DIR must hold a prepared ``cifar100``)
Needs:     TFDS ``cifar100`` prepared as array_record (clx never downloads; on a machine with
           internet: ``tfds build cifar100 --data_dir $TFDS_DATA_DIR --file_format=array_record``).
           Offline the run stops at once with the catalog's DatasetNotPreparedError.
Hardware:  one GPU (any; the net has 6.5M parameters) or a TPU host; CPU works but is slow.
Run time:  NOT MEASURED end to end (no CIFAR-100 on the development machine). Measured
           (experiments/bench_alexnet_gpm.py, BENCHMARKS.md): one projected AlexNet training step
           at batch 64 takes 160-180 ms on 2 CPU cores, 0.5-0.8x the official-style PyTorch step
           measured in the same run. A task has 2,375 training images = 38 steps per epoch;
           the validation-loss schedule (patience 6, factor 2, lr 0.05 → below 5e-5) stops
           after 60-200 epochs, so up to ≈ 7,600 steps per task: ≈ 10-20 min per task and
           method on 2 CPU cores (2-3 h per method for 10 tasks); on one GPU the step is a few
           ms, so minutes per method. BECAME adds a second (stage-2) phase and three Fisher
           passes per task: about twice the time of its base method.
Expected:  GPM ACC 72.48 ± 0.40, BWT -0.9 (GPM paper, 5 seeds; the official code's numbers).
           SGP ≈ 1 point above GPM (SGP paper, from memory, unverified); BECAME + GPM/SGP above
           its base method by about 1-2 points ACC (BECAME paper, Table 1; its exact numbers
           could not be retrieved offline, see ../shared/research/inflora_became.md §2.3).
           Sequential fine-tuning forgets strongly (BWT ≪ 0).

Setup, from the official code (sahagobinda/GPM ``main_cifar100.py``; BECAME
``GPM-based/scripts/run.sh`` and ``main_cifar100.py``):
- data: the official 10-split loader (:func:`clx.data.streams.official_gpm_cifar100`): classes
  in order, 10 per task, GPM's per-channel normalisation, 5 % validation split per task
  (sklearn shuffle with the run seed), task-incremental (one bias-free head per task);
- model: AlexNet 3 conv (64/128/256, kernels 4/3/2) + 2 FC (2048), bias-free, batch norm with
  batch statistics (``track_running_stats=False``), dropout 0.2 (conv) / 0.5;
- training: plain SGD (no momentum) lr 0.05, batch 64, up to 200 epochs; after every epoch the
  validation loss: patience 6, lr / 2 on a plateau, stop when lr < 5e-5, restore the best epoch
  (``lr_patience``/``lr_factor``/``lr_min``/``restore_best`` of :class:`clx.train.TrainConfig`);
- GPM: thresholds 0.97 + 0.003·t on all 5 layers; representations of 125 random training
  images, of which conv1 uses the first 24, conv2/conv3 100, fc1/fc2 125 (official
  ``batch_list``), conv layers as im2col patch matrices; batch-norm parameters frozen from the
  second task on; the per-task heads are not projected;
- SGP: the same, with importance scale coefficient 5 (``--scale_coff 5``);
- BECAME: stage 2 from θ_GP with a fresh SGD at lr2 0.05 and the same plateau rule down to
  lr2_min 5e-5, keeping the last model (``early_stop``, no best restore); true Fisher with the
  model's argmax labels at batch 64 over the current head; one global λ; γ = 1.
  Difference: the official Fisher pass runs in ``model.train()`` (dropout on); clx computes it
  without dropout (deterministic; batch statistics as in training).
"""

ALEXNET_SITE_SAMPLES = {"conv1/kernel": 24, "conv2/kernel": 100, "conv3/kernel": 100,
                        "fc1/kernel": 125, "fc2/kernel": 125}


def _gpm_args(**extra):
  return {"threshold": 0.97, "threshold_increment": 0.003, "num_samples": 125,
          "site_samples": dict(ALEXNET_SITE_SAMPLES), "project_head": False, **extra}


def get_config():
  stage2 = {"learning_rate": 0.05, "lr_min": 5e-5, "restore_best": False}
  return {
      "name": "cifar100_gpm",
      "stream": {"name": "gpm_cifar100", "num_tasks": 10, "pc_valid": 0.05, "seed": None},
      "model": {"name": "alexnet"},
      "methods": ["gpm", "became_gpm", "sgp", "became_sgp", "finetune"],
      "method_args": {
          "gpm": _gpm_args(),
          "sgp": _gpm_args(scale_coff=5.0),
          "became_gpm": _gpm_args(stage2=stage2, fisher="true", gamma=1.0),
          "became_sgp": _gpm_args(scale_coff=5.0, stage2=stage2, fisher="true", gamma=1.0),
      },
      "train": {"epochs": 200, "batch_size": 64, "optimizer": "sgd", "learning_rate": 0.05,
                "lr_patience": 6, "lr_factor": 2.0, "lr_min": 5e-5, "restore_best": True,
                "eval_batch_size": 64},
      "seed": 0,
  }
