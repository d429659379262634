"""Multi-process data parallelism: 2 processes × 2 CPU devices == 1 process × 4 devices.

Starts ``tests/train/multiprocess_worker.py`` as 2 processes on localhost that
join through ``jax.distributed`` from clx's environment variables
(``CLX_COORDINATOR``/``CLX_NUM_PROCESSES``/``CLX_PROCESS_ID``, read by
:func:`clx.train.sharding.maybe_initialize_distributed`) with Gloo CPU
collectives, and compares with the same run in 1 process over 4 devices: the
same 4-device mesh and global batches, only split over 2 processes, each
feeding its own rows. Accuracy matrices must be equal, final states equal up to
float32 reduction order, and the checkpoints written jointly by both processes
must restore (and resume) exactly.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = "tests.train.multiprocess_worker"
TIMEOUT_S = 150  # per launch; a run takes ~5-10 s on 2 idle cores
# Final params: max |2-process − 1-process| per leaf, relative to the leaf's
# largest magnitude (measured: ≤ 1.5e-7, float32 reduction order only).
RTOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("CLX_") or k == "CLX_CACHE_DIR"}
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env.update({
      "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
      "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "CLX_OFFLINE": "1",
      "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
      **extra})
  return env


def _launch(tmp: Path, name: str, num_processes: int, devices_per_process: int,
            checkpoints: Path) -> list[dict]:
  """Runs the worker in ``num_processes`` processes; returns their JSON records."""
  out = tmp / name
  port = _free_port()
  procs, logs = [], []
  for i in range(num_processes):
    extra = {}
    if num_processes > 1:
      extra = {"CLX_COORDINATOR": f"127.0.0.1:{port}", "CLX_NUM_PROCESSES": str(num_processes),
               "CLX_PROCESS_ID": str(i)}
    log = open(tmp / f"{name}_{i}.log", "w+b")  # files, not pipes: no pipe-buffer deadlock
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, "-m", WORKER, str(out), "--checkpoints", str(checkpoints)],
        cwd=ROOT, env=_env(devices_per_process, **extra), stdout=log, stderr=subprocess.STDOUT))

  def outputs() -> str:
    parts = []
    for i, log in enumerate(logs):
      log.flush()
      log.seek(0)
      text = log.read().decode(errors="replace")
      parts.append(f"--- process {i} (exit code {procs[i].poll()}) output:\n{text[-6000:]}")
    return "\n".join(parts)

  try:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
      codes = [p.poll() for p in procs]
      if all(c == 0 for c in codes):
        break
      # A failed process leaves its peers blocked in a collective: stop them all now.
      failed = any(c not in (None, 0) for c in codes)
      if failed or time.monotonic() > deadline:
        for p in procs:
          if p.poll() is None:
            p.kill()
        for p in procs:
          p.wait()
        why = "a process failed" if failed else f"timed out after {TIMEOUT_S} s"
        pytest.fail(f"{name} run ({num_processes} process(es) × {devices_per_process} CPU "
                    f"devices): {why}\n{outputs()}", pytrace=False)
      time.sleep(0.1)
    records = []
    for i in range(num_processes):
      path = out / f"process_{i}.json"
      assert path.is_file(), f"process {i} exited 0 without writing {path}\n{outputs()}"
      records.append(json.loads(path.read_text()))
    return records
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The 2-process run (both records), then the 1-process run over 4 devices."""
  tmp = tmp_path_factory.mktemp("multiprocess")
  t0 = time.perf_counter()
  two = _launch(tmp, "two", 2, 2, tmp / "two_ckpt")
  t1 = time.perf_counter()
  (one,) = _launch(tmp, "one", 1, 4, tmp / "one_ckpt")
  t2 = time.perf_counter()
  print(f"\n2 processes × 2 devices: {t1 - t0:.1f} s; 1 process × 4 devices: {t2 - t1:.1f} s")
  return {"tmp": tmp, "two": two, "one": one}


def _leaf_diffs(a: dict, b: dict) -> dict[str, float]:
  """``{path: max|a − b| / max|a|}`` over the leaves of two state records."""
  assert a.keys() == b.keys()
  out = {}
  for path in a:
    assert (a[path]["dtype"], a[path]["shape"]) == (b[path]["dtype"], b[path]["shape"]), path
    x, y = np.asarray(a[path]["values"]), np.asarray(b[path]["values"])
    scale = np.abs(x).max() if x.size else 0.0
    out[path] = float(np.abs(x - y).max() / scale) if scale else float(np.abs(x - y).max(initial=0))
  return out


def test_every_process_joined_and_agrees(runs):
  two, one = runs["two"], runs["one"]
  for i, rec in enumerate(two):
    assert (rec["process_index"], rec["process_count"], rec["device_count"],
            rec["local_device_count"]) == (i, 2, 4, 2)
  assert (one["process_count"], one["device_count"], one["local_device_count"]) == (1, 4, 4)
  # Each process fed its own rows, and together they make up exactly the
  # planned global batches, also when the mesh interleaves the processes' devices.
  for rec in [*two, one]:
    assert rec["feeding"] == {mesh: {"index_chunks": True, "device_batches": True}
                              for mesh in ("default", "interleaved")}, rec["feeding"]
  # Replicated results: both processes hold the very same numbers.
  for name in two[0]["runs"]:
    a, b = two[0]["runs"][name], two[1]["runs"][name]
    assert a["acc_matrix"] == b["acc_matrix"], name
    assert ({k: v["sha256"] for k, v in a["state"].items()}
            == {k: v["sha256"] for k, v in b["state"].items()}), name


def test_two_processes_match_one_process(runs):
  two, one = runs["two"][0], runs["one"]
  assert two["runs"].keys() == one["runs"].keys() == {"finetune", "gpm"}
  for name, ref in one["runs"].items():
    got = two["runs"][name]
    assert got["acc_matrix"] == ref["acc_matrix"], (
        f"{name}: accuracy matrices differ\n2 processes: {got['acc_matrix']}\n"
        f"1 process:   {ref['acc_matrix']}")
    diffs = _leaf_diffs(ref["state"], got["state"])
    print(f"{name}: max relative difference of the final state leaves {max(diffs.values()):.2e}")
    bad = {k: v for k, v in diffs.items() if v > RTOL}
    assert not bad, f"{name}: final state leaves differ by more than {RTOL} (relative): {bad}"
    # The run learns something (the comparison is not between two broken runs).
    diag = [ref["acc_matrix"][t][t] for t in range(len(ref["acc_matrix"]))]
    assert min(diag) > 70, diag
  # GPM's memory ranks are integers: equal.
  ranks = [k for k in one["runs"]["gpm"]["state"] if "rank" in k]
  assert ranks
  for k in ranks:
    assert one["runs"]["gpm"]["state"][k]["values"] == two["runs"]["gpm"]["state"][k]["values"]


def test_checkpoints_written_by_two_processes_restore_and_resume(runs):
  tmp, two = runs["tmp"], runs["two"]
  for name, run in two[0]["runs"].items():
    # Restored from the jointly written steps: bitwise the state in memory.
    assert ({k: v["sha256"] for k, v in run["restored_state"].items()}
            == {k: v["sha256"] for k, v in run["state"].items()}), name
    assert run["checkpoint_acc_matrix"] == [row[:t + 1] for t, row in
                                            enumerate(run["acc_matrix"])], name
    steps = sorted(p.name for p in (tmp / "two_ckpt" / name).iterdir())
    assert steps == ["0", "1", "2"], f"{name}: unexpected entries {steps}"
  # Resume in 2 processes after losing the last task's step: the same result, bit for bit.
  resumed = tmp / "resume_ckpt"
  shutil.copytree(tmp / "two_ckpt", resumed)
  for name in two[0]["runs"]:
    shutil.rmtree(resumed / name / "2")
  again = _launch(tmp, "resume", 2, 2, resumed)
  for rec in again:
    for name, run in rec["runs"].items():
      assert run["resumed_from"] == 1, name
      assert run["acc_matrix"] == two[0]["runs"][name]["acc_matrix"], name
      assert ({k: v["sha256"] for k, v in run["state"].items()}
              == {k: v["sha256"] for k, v in two[0]["runs"][name]["state"].items()}), name
