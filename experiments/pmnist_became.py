"""Permuted-MNIST, 10 tasks: BECAME on top of GPM and SGP against the plain projection methods.

Command:   clx run pmnist_became          (--set seed=N; methods: gpm, became_gpm, sgp, became_sgp)
Hardware:  2 CPU cores (or any single accelerator).
Run time:  about twice pmnist_gpm per BECAME method (stage 2 doubles the training);
           see experiments/BENCHMARKS.md and RESULTS.md for measured numbers.
Expected:  BECAME+GPM ACC ≥ GPM ACC on the same seed (BECAME trades a little BWT for much
           better plasticity on later tasks); λ per task is printed and decreases as the
           accumulated Fisher of old tasks grows.

Setup: the official GPM PMNIST setup (see pmnist_gpm.py). BECAME's stage 2 re-uses the
stage-1 optimiser settings (plain SGD lr 0.01, 5 epochs, a fresh optimiser); the diagonal
Fisher is the official 'true' Fisher (argmax labels) with batched squared gradients at the
training batch size; γ = 1. The BECAME paper does not report PMNIST, so these settings are
our choice where its CIFAR/miniImageNet code uses a validation-driven schedule.
"""


def get_config():
  gpm_args = {"threshold": [0.95, 0.99, 0.99], "num_samples": 300}
  return {
      "name": "pmnist_became",
      "stream": {"name": "pmnist", "seed": None},  # task order follows the run seed
      "model": {"name": "mlp", "hidden": [100, 100], "use_bias": False},
      "methods": ["gpm", "became_gpm", "sgp", "became_sgp"],
      "method_args": {"gpm": gpm_args, "became_gpm": gpm_args,
                      "sgp": {**gpm_args, "scale_coff": 10.0},
                      "became_sgp": {**gpm_args, "scale_coff": 10.0}},
      "train": {"epochs": 5, "batch_size": 10, "optimizer": "sgd", "learning_rate": 0.01,
                "eval_batch_size": 1000},
      "seed": 2,
  }
