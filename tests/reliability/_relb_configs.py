"""Tiny experiment configs shared by the rel-b reliability tests (validation, errors)."""

DIGITS = '''
"""Tiny split digits for reliability tests."""


def get_config():
  gpm_args = {"threshold": [0.95, 0.99], "num_samples": 50}
  return {
      "name": "relb_digits",
      "stream": {"name": "split_digits", "num_tasks": 2, "classes_per_task": 2, "seed": None},
      "model": {"name": "mlp", "hidden": [16]},
      "methods": ["finetune"],
      "method_args": {"gpm": gpm_args, "lora": {"rank": 4}},
      "train": {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "learning_rate": 0.05,
                "grad_clip": 0.0, "weight_decay": 0.0},
      "seed": 0,
  }
'''

PMNIST = DIGITS.replace('"relb_digits"', '"relb_pmnist"').replace(
    '"stream": {"name": "split_digits", "num_tasks": 2, "classes_per_task": 2, "seed": None}',
    '"stream": {"name": "permuted_mnist", "num_tasks": 2, "train_per_task": 600, "seed": None}')


def install(folder, monkeypatch):
  """Writes both configs into ``folder`` and points clx at it."""
  folder.mkdir(exist_ok=True)
  (folder / "relb_digits.py").write_text(DIGITS)
  (folder / "relb_pmnist.py").write_text(PMNIST)
  monkeypatch.setenv("CLX_EXPERIMENTS_DIR", str(folder))
  return folder
