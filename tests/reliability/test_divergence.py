"""Divergence detection does not depend on display (issue 16, item 3).

Before: ``Fitter.fit`` checked the loss only when a progress bar or the
summary line read it, so ``--quiet`` off a terminal trained on NaN weights and
exited 0 with ~10 % accuracy.
"""

import pytest

from clx import cli
from clx.methods import build
from clx.models.mlp import mlp
from clx.train.loop import TrainConfig, TrainingDivergedError, run_method
from tests.helpers import make_gaussian_stream
from tests.reliability import _relb_configs


@pytest.mark.parametrize("quiet,progress", [(True, False), (False, False)])
def test_diverging_run_raises_whatever_the_display(quiet, progress):
  stream = make_gaussian_stream(num_tasks=2)
  method = build("finetune", mlp(stream.input_shape, (16,)))
  cfg = TrainConfig(epochs=2, batch_size=16, optimizer="sgd", learning_rate=1e30)
  with pytest.raises(TrainingDivergedError) as info:
    run_method(method, stream, cfg, quiet=quiet, progress=progress)
  message = str(info.value)
  assert "finetune task 1/2" in message and "epoch 1/2" in message and "1e+30" in message


def test_finite_run_is_not_flagged():
  stream = make_gaussian_stream(num_tasks=2)
  method = build("finetune", mlp(stream.input_shape, (16,)))
  cfg = TrainConfig(epochs=1, batch_size=16, optimizer="sgd", learning_rate=0.05)
  result = run_method(method, stream, cfg, quiet=True, progress=False)
  assert result.acc_matrix[1, 1] > 50


def test_cli_quiet_divergence_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
  _relb_configs.install(tmp_path / "experiments", monkeypatch)
  workdir = tmp_path / "run"
  rc = cli.main(["run", "relb_digits", "--quiet", "--workdir", str(workdir),
                 "--set", "train.learning_rate=1e30"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2, err
  lines = [line for line in err if line.startswith("clx: error:")]
  assert len(lines) == 1 and "diverged" in lines[0] and "finetune task 1/2" in lines[0], err
  assert not (workdir / "metrics.json").exists()  # no result was recorded
