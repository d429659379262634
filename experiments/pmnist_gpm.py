"""Permuted-MNIST, 10 tasks, GPM with the official setup (Saha et al. 2021, main_pmnist.py).

Command:   clx run pmnist_gpm                    (--set seed=N; methods: gpm, finetune)
Hardware:  2 CPU cores (or any single accelerator).
Run time:  see experiments/BENCHMARKS.md (the official PyTorch code takes 617 s on 2 cores).
Expected:  GPM ACC ≈ 93.4-93.9 %, BWT ≈ -3 to -3.5 (official code on this machine, seed 2:
           93.40 / -3.50; paper: 93.91 ± 0.16 / -3). Sequential fine-tuning forgets more.

Setup (from the official code): MLP 784-100-100-10 without biases, one shared 10-way output
layer (projected too), plain SGD lr 0.01, batch 10, 5 epochs per task, a fresh optimizer per
task, thresholds 0.95 / 0.99 / 0.99, bases from 300 random training samples per layer,
54,000 training images per task (the first 6,000 held out as validation, unused), every
task permuted, task order from sklearn's shuffle with the run seed.
"""


def get_config():
  return {
      "name": "pmnist_gpm",
      "stream": {"name": "pmnist", "seed": None},  # task order follows the run seed
      "model": {"name": "mlp", "hidden": [100, 100], "use_bias": False},
      "methods": ["gpm", "finetune"],
      "method_args": {"gpm": {"threshold": [0.95, 0.99, 0.99], "num_samples": 300}},
      "train": {"epochs": 5, "batch_size": 10, "optimizer": "sgd", "learning_rate": 0.01,
                "eval_batch_size": 1000},
      "seed": 2,
  }
