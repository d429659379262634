"""10-split CIFAR-100, AlexNet: BECAME's Table 1 setting, every row at BECAME's settings (pods).

Command:   clx run cifar100_became_table --workdir runs/cifar100_became_table --set seed=0
           (``--set stream.num_tasks=20`` for the 20-split)
Needs:     as ``cifar100_gpm`` (a prepared TFDS ``cifar100``).
Hardware:  as ``cifar100_gpm``.
Run time:  as ``cifar100_gpm`` (NOT MEASURED end to end).
Expected:  BECAME paper Table 1: BECAME + GPM/SGP above its GPM/SGP baselines by about 1-2 points
           ACC (exact numbers not retrievable offline). Unlike ``cifar100_gpm``, whose ``gpm`` and
           ``sgp`` rows run their own papers' settings, every row here runs BECAME's
           ``scripts/run.sh`` (baseline and "Ours" lines: lr 0.05, lr_min 5e-5, scale_coff 5,
           lr2 0.05, lr2_min 5e-5), so BECAME and its base method differ only by the merge: the
           comparison that isolates BECAME's claim. Numbers are ``acc`` (mean over tasks; equal
           task sizes, so ``acc_samples`` is the same).

Setup: that of ``cifar100_gpm`` (data, model, thresholds, samples, plateau rule, Fisher).
"""

from clx.experiment import load_config


def get_config():
  config = load_config("cifar100_gpm")  # same data, model, methods and method settings
  config["name"] = "cifar100_became_table"
  config["method_args"]["sgp"]["scale_coff"] = 5.0  # BECAME run.sh --scale_coff 5
  config["train_overrides"] = {}                     # every row at BECAME's lr / lr_min
  return config
