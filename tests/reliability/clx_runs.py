"""Shared helpers of the workdir / checkpoint reliability tests (tiny offline runs).

The experiments use ``split_digits`` (scikit-learn's bundled 8x8 digits, no
download) and a 16-unit MLP, so a run of 2 tasks takes seconds of compute.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TINY = '''
"""Tiny reliability-test experiment."""


def get_config():
  return {
      "name": "NAME",
      "stream": {"name": "split_digits", "num_tasks": TASKS, "classes_per_task": 2},
      "model": {"name": "mlp", "hidden": [16]},
      "methods": ["finetune", "lora"],
      "method_args": {"lora": {"rank": 2}},
      "train": {"epochs": EPOCHS, "batch_size": 32, "learning_rate": 0.01},
      "seed": 0,
  }
'''


def write_experiments(folder: Path) -> Path:
  """Writes ``tiny`` (2 tasks, 1 epoch), ``tiny_b`` (same, other name) and ``tiny_slow``
  (5 tasks, 60 epochs: seconds per task, for kills and races)."""
  folder.mkdir(parents=True, exist_ok=True)
  for name, tasks, epochs in [("tiny", 2, 1), ("tiny_b", 2, 1), ("tiny_slow", 5, 60)]:
    text = TINY.replace("NAME", name).replace("TASKS", str(tasks)).replace("EPOCHS", str(epochs))
    (folder / f"{name}.py").write_text(text)
  return folder


def env_for(experiments: Path) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("CLX_") or k == "CLX_CACHE_DIR"}
  env.update({"CLX_EXPERIMENTS_DIR": str(experiments), "JAX_PLATFORMS": "cpu",
              "TF_CPP_MIN_LOG_LEVEL": "3", "CLX_OFFLINE": "1",
              "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])})
  return env


def clx_popen(args: list[str], env: dict, log: Path | None = None, python_code: str | None = None):
  """Starts ``python -m clx.cli ARGS`` (or ``python -c CODE ARGS``) with output to a file."""
  cmd = [sys.executable, "-m", "clx.cli", *args] if python_code is None else \
      [sys.executable, "-c", python_code, *args]
  out = open(log, "w+b") if log is not None else subprocess.PIPE  # a file: no pipe deadlock
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
  proc.log = out if log is not None else None
  return proc


def output(proc) -> str:
  """Everything a :func:`clx_popen` process with a log file has printed so far."""
  proc.log.flush()
  proc.log.seek(0)
  return proc.log.read().decode(errors="replace")


def clx_run(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "clx.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, str]:
  """``{relative path: sha256 of bytes, or "<dir>"}`` of everything under ``folder``."""
  out = {}
  for p in sorted(folder.rglob("*")):
    rel = str(p.relative_to(folder))
    out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def assert_one_error_line(stderr: str, *needles: str) -> str:
  """stderr holds exactly one ``clx: error:`` line (containing ``needles``) and no traceback."""
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.startswith("clx: error:")]
  assert len(lines) == 1, stderr[-3000:]
  for n in needles:
    assert n in lines[0], lines[0]
  return lines[0]


def metrics(workdir: Path) -> dict:
  return json.loads((workdir / "metrics.json").read_text())


def flip_digit(path: Path, after: str, nth: int = 0) -> tuple[str, str]:
  """Flips the lowest bit of the ``nth`` digit after the text ``after`` (stays a digit)."""
  data = bytearray(path.read_bytes())
  start = data.index(after.encode()) + len(after)
  seen = -1
  for i in range(start, len(data)):
    if chr(data[i]).isdigit():
      seen += 1
      if seen == nth:
        old = chr(data[i])
        data[i] ^= 0x01
        path.write_bytes(bytes(data))
        return old, chr(data[i])
  raise AssertionError(f"no digit {nth} after {after!r} in {path}")


_TINY_RUNS: dict[str, tuple[Path, Path]] = {}


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
  """Finished tiny runs shared by the reliability tests (copy them before changing them).

  Returns ``(root, experiments)`` with workdirs ``root/ft`` (finetune, seed 0),
  ``root/both`` (``ft`` after adding lora under the same configuration) and
  ``root/seed1`` (finetune, seed 1).
  """
  # Each test module that imports this fixture registers its own copy; the runs are made
  # once per session all the same.
  key = str(tmp_path_factory.getbasetemp())
  if key in _TINY_RUNS:
    return _TINY_RUNS[key]
  from clx import cli
  root = tmp_path_factory.mktemp("tiny_runs")
  experiments = write_experiments(root / "experiments")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("CLX_EXPERIMENTS_DIR", str(experiments))
    for name, seed in (("ft", 0), ("seed1", 1)):
      assert cli.main(["run", "tiny", "--workdir", str(root / name), "--quiet",
                       "--set", "methods=finetune", "--set", f"seed={seed}"]) == 0
    shutil.copytree(root / "ft", root / "both")
    assert cli.main(["run", "tiny", "--workdir", str(root / "both"), "--quiet",
                     "--set", "methods=lora"]) == 0
  _TINY_RUNS[key] = root, experiments
  return root, experiments
