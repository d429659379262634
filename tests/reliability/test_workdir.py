"""Issue 16 items 4, 5, 7, 8, 9, 11 (and the workdir parts of 10): a workdir is one
configuration's true record, used by one run at a time.

Most probes call ``clx.cli.main`` in-process on copies of one finished tiny run
(refusals happen before any data loads, so they take milliseconds); kills and
races use real ``python -m clx.cli`` subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from clx import cli
from tests.reliability.clx_runs import tiny_runs  # noqa: F401 (session fixture)
from tests.reliability.clx_runs import (assert_one_error_line, clx_popen, env_for, flip_digit,
                                        metrics, output, snapshot)


@pytest.fixture
def runs(tiny_runs):
  return tiny_runs


@pytest.fixture
def copy_run(runs, tmp_path, monkeypatch):
  root, experiments = runs
  monkeypatch.setenv("CLX_EXPERIMENTS_DIR", str(experiments))

  def copy(name):
    shutil.copytree(root / name, tmp_path / name)
    return tmp_path / name

  return copy


def _run(workdir, *sets, experiment="tiny"):
  args = ["run", experiment, "--workdir", str(workdir), "--quiet"]
  for s in sets:
    args += ["--set", s]
  return cli.main(args)


# ------------------------------------------------------------ 4, 5: one configuration


@pytest.mark.parametrize("method, sets, experiment, key", [
    ("lora", ["seed=1"], "tiny", "seed: 0 → 1"),
    ("lora", ["train.epochs=2"], "tiny", "train.epochs: 1 → 2"),
    ("lora", ["stream.num_tasks=3"], "tiny", "stream.num_tasks: 2 → 3"),
    ("lora", ["model.hidden=8"], "tiny", "model.hidden"),
    ("lora", [], "tiny_b", 'name: "tiny" → "tiny_b"'),
    ("finetune", ["seed=1"], "tiny", "seed: 0 → 1"),  # a resume under another seed
])
def test_run_under_another_configuration_is_refused_and_changes_nothing(copy_run, capsys, method,
                                                                        sets, experiment, key):
  """Probes 4+5: another method under another config used to be added (and config.json
  overwritten), leaving one table over two configurations; a resume under another seed
  overwrote config.json before failing with a traceback."""
  workdir = copy_run("ft")
  before = snapshot(workdir)
  capsys.readouterr()
  assert _run(workdir, f"methods={method}", *sets, experiment=experiment) == 2
  assert_one_error_line(capsys.readouterr().err, "records another configuration", key)
  assert snapshot(workdir) == before


def test_new_method_under_the_same_configuration_is_added(runs, copy_run, capsys):
  root, _ = runs
  workdir = copy_run("both")
  config = json.loads((workdir / "config.json").read_text())
  assert config["methods"] == ["finetune", "lora"]  # the workdir's record, not the last command
  m, ft = metrics(workdir), metrics(root / "ft")
  assert list(m["runs"]) == ["finetune", "lora"]
  assert m["runs"]["finetune"] == ft["runs"]["finetune"]  # carried over verified, unchanged
  # Once lora has results, its arguments are part of the configuration.
  before = snapshot(workdir)
  capsys.readouterr()
  assert _run(workdir, "methods=finetune", "method_args.lora.rank=3") == 2
  assert_one_error_line(capsys.readouterr().err, "method_args.lora.rank: 2 → 3")
  assert snapshot(workdir) == before
  assert cli.main(["report", str(workdir), "--no-plots"]) == 0
  out = capsys.readouterr().out
  assert "WARNING" not in out and "seed 0" in out


def _strip_hashes(workdir):
  """metrics.json as an older clx wrote it: no sha256, no per-run configuration hash."""
  data = metrics(workdir)
  del data["sha256"]
  for run in data["runs"].values():
    del run["config_sha256"]
  (workdir / "metrics.json").write_text(json.dumps(data))


def _edit_config_seed(workdir):
  config = json.loads((workdir / "config.json").read_text())
  config["seed"] = 5
  (workdir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, why", [(_strip_hashes, "cannot be verified"),
                                         (_edit_config_seed, "not produced under")])
def test_report_never_mixes_configurations_silently(copy_run, capsys, damage, why):
  workdir = copy_run("both")
  damage(workdir)
  capsys.readouterr()
  assert cli.main(["report", str(workdir), "--no-plots"]) == 0
  out = capsys.readouterr().out
  warning = out.index("WARNING")
  assert why in out[warning:].splitlines()[0]
  table = out[warning:]
  assert "finetune " in table and "lora " in table  # listed apart, under the warning
  assert "method " not in out[:warning]  # no table claims they share one configuration


def test_report_leaves_heatmaps_alone_while_a_run_holds_the_workdir(copy_run, capsys):
  """A report must not write into a workdir a run is using (its temp files would be the
  run's to clean up)."""
  from clx import workdir as wd
  workdir = copy_run("ft")
  png = workdir / "finetune" / "acc_matrix.png"
  png.write_bytes(b"old")
  capsys.readouterr()
  with wd.WorkdirLock(workdir, "a run"):
    assert cli.main(["report", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "heatmaps not refreshed" in out and "in use by another clx process" in out
    assert png.read_bytes() == b"old"
  assert cli.main(["report", str(workdir)]) == 0
  assert png.read_bytes()[:4] == b"\x89PNG" and not (workdir / LOCK_FILE).exists()


# ------------------------------------------------------------ 9: damaged metrics.json


def _garbage(path):
  path.write_bytes(b'{"experiment": "tiny", "ru\x00\xff')


def _flip_finetune_acc(path):
  flip_digit(path, '"finetune": {\n      "acc_matrix": [\n        [\n          ', 0)


def _truncate(path):
  os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [_garbage, _flip_finetune_acc, _truncate])
def test_damaged_metrics_json_is_rebuilt_from_the_checkpoints(runs, copy_run, capsys, damage):
  """Probe 9: a damaged metrics.json blocked every re-run with a traceback, and a flipped
  digit in a method not re-run was carried over silently."""
  root, _ = runs
  workdir = copy_run("both")
  damage(workdir / "metrics.json")
  capsys.readouterr()
  assert cli.main(["report", str(workdir), "--no-plots"]) == 2
  assert_one_error_line(capsys.readouterr().err, str(workdir / "metrics.json"))
  assert _run(workdir, "methods=lora") == 0  # finetune is not re-run: rebuilt from checkpoints
  err = capsys.readouterr().err
  assert "rebuilding the results of finetune" in err and str(workdir / "metrics.json") in err
  fixed, good = metrics(workdir), metrics(root / "both")
  assert list(fixed["runs"]) == ["finetune", "lora"]
  for name in ("finetune", "lora"):
    for key in ("acc_matrix", "acc", "aia", "bwt", "forgetting", "config_sha256"):
      assert fixed["runs"][name][key] == good["runs"][name][key], (name, key)
    # A resumed run reports the wall time stored with its last task, which excludes the
    # last checkpoint write (run_method's bookkeeping): equal up to that write.
    assert fixed["runs"][name]["wall_time_s"] == pytest.approx(good["runs"][name]["wall_time_s"],
                                                               abs=2.0)
  from clx import workdir as wd
  assert wd.load_metrics(workdir / "metrics.json")[1] is None


# ------------------------------------------------------------ 11: temp files


def test_temp_files_of_killed_writes_are_removed_by_the_next_run(copy_run):
  workdir = copy_run("ft")
  leftovers = [workdir / ".metrics.json.0123456789abcdef0123456789abcdef.tmp",
               workdir / ".config.json.fedcba9876543210fedcba9876543210.tmp",
               workdir / "finetune" / "tmpk3j4_x9a.png.tmp",
               workdir / "finetune" / ".acc_matrix.png.00112233445566778899aabbccddeeff.tmp"]
  keep = [workdir / "notes.tmp", workdir / "finetune" / "my.png"]
  for p in leftovers + keep:
    p.write_bytes(b"partial")
  assert _run(workdir, "methods=finetune") == 0
  assert [p for p in leftovers if p.exists()] == []
  assert all(p.exists() for p in keep)


# ------------------------------------------------------------ 8: cleanup of a failed run


def _fail_lora_at(monkeypatch, task):
  """Makes lora raise at the end of ``task`` (before that task's checkpoint)."""
  from clx.train import loop
  real = loop.run_method

  def run_method(method, *args, **kwargs):
    if method.name == "lora":
      def boom(t, acc):
        if t == task:
          raise RuntimeError("injected")
      kwargs["on_task_end"] = boom
    return real(method, *args, **kwargs)

  monkeypatch.setattr(loop, "run_method", run_method)
  return real


def test_failed_run_removes_only_what_it_created(copy_run, tmp_path, monkeypatch):
  _fail_lora_at(monkeypatch, 0)
  workdir = copy_run("ft")
  before = snapshot(workdir)
  with pytest.raises(RuntimeError, match="injected"):
    _run(workdir, "methods=lora")
  assert snapshot(workdir) == before  # lora's folder and config.json's new method list gone
  monkeypatch.chdir(tmp_path)  # a relative --workdir whose parent is new too
  with pytest.raises(RuntimeError, match="injected"):
    _run("new/fresh", "methods=lora")
  assert not (tmp_path / "new").exists()


def test_failed_run_keeps_its_finished_tasks(copy_run, monkeypatch):
  real = _fail_lora_at(monkeypatch, 1)
  workdir = copy_run("ft")
  before = metrics(workdir)
  with pytest.raises(RuntimeError, match="injected"):
    _run(workdir, "methods=lora")
  assert (workdir / "lora" / "checkpoints" / "0" / "meta" / "metadata").is_file()
  assert json.loads((workdir / "config.json").read_text())["methods"] == ["finetune", "lora"]
  assert metrics(workdir) == before
  from clx.train import loop
  monkeypatch.setattr(loop, "run_method", real)
  assert _run(workdir, "methods=lora") == 0
  assert metrics(workdir)["runs"]["lora"]["resumed_from_task"] == 0


# ------------------------------------------------------------ 10: one line, not a traceback


def test_foreign_checkpoint_without_config_json_is_one_error_line(copy_run, capsys):
  workdir = copy_run("ft")
  (workdir / "config.json").unlink()
  capsys.readouterr()
  assert _run(workdir, "methods=finetune", "seed=1") == 2
  assert_one_error_line(capsys.readouterr().err, "task 0", "'fingerprint'")


def test_workdir_that_is_a_file_is_one_error_line(tmp_path, runs, monkeypatch, capsys):
  monkeypatch.setenv("CLX_EXPERIMENTS_DIR", str(runs[1]))
  (tmp_path / "file").write_text("x")
  for workdir in (tmp_path / "file", tmp_path / "file" / "sub"):
    assert _run(workdir, "methods=finetune") == 2
    assert_one_error_line(capsys.readouterr().err, "is a file")
  assert (tmp_path / "file").read_text() == "x"


# ------------------------------------------------------------ 7, 8: real processes


LOCK_FILE = ".clx.lock"


def _wait(predicate, timeout, what):
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.05)


def _holder_pid(workdir):
  try:
    return json.loads((workdir / LOCK_FILE).read_text())["pid"]
  except (OSError, ValueError, KeyError):
    return None


def test_second_concurrent_run_is_refused_and_a_kill_frees_the_workdir(runs, tmp_path):
  """Probe 7: two runs on one workdir both exited 0 and metrics.json kept one method."""
  env = env_for(runs[1])
  workdir = tmp_path / "w"
  first = clx_popen(["run", "tiny_slow", "--workdir", str(workdir), "--quiet",
                     "--set", "methods=finetune"], env, tmp_path / "first.log")
  try:
    _wait(lambda: _holder_pid(workdir) == first.pid or first.poll() is not None, 240,
          "the first run to lock the workdir")
    assert first.poll() is None, output(first)
    second = clx_popen(["run", "tiny_slow", "--workdir", str(workdir), "--quiet",
                        "--set", "methods=lora"], env, tmp_path / "second.log")
    assert second.wait(240) == 2
    assert_one_error_line(output(second), "in use by another clx process",
                          f"pid {first.pid}")
    assert first.poll() is None  # the holder goes on
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # kill -9 leaves the lock file but not the lock: the next user gets it at once.
  assert (workdir / LOCK_FILE).exists()
  from clx import workdir as wd
  with wd.WorkdirLock(workdir, "test"):
    assert _holder_pid(workdir) == os.getpid()


def test_failed_run_never_deletes_a_workdir_another_run_uses(runs, tmp_path):
  """Probe 8: a run that failed before its first checkpoint rmtree'd the workdir, even one
  that another run had just created and was training in."""
  env = env_for(runs[1])
  workdir, marker, go = tmp_path / "w", tmp_path / "loading", tmp_path / "go"
  # Process X: fails while "loading data" (held until the test says go).
  code = (
      "import sys, time, pathlib\n"
      "import clx.experiment as e\n"
      "marker, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
      "def slow_fail(config):\n"
      "  marker.touch()\n"
      "  deadline = time.time() + 300\n"
      "  while not go.exists() and time.time() < deadline:\n"
      "    time.sleep(0.05)\n"
      "  raise RuntimeError('injected failure while loading data')\n"
      "e.build_stream = slow_fail\n"
      "from clx import cli\n"
      "sys.exit(cli.main(sys.argv[3:]))\n")
  x = clx_popen([str(marker), str(go), "run", "tiny_slow", "--workdir", str(workdir), "--quiet",
                 "--set", "methods=finetune"], env, tmp_path / "x.log", python_code=code)
  y = None
  try:
    _wait(lambda: marker.exists() or x.poll() is not None, 240, "X to start loading data")
    y = clx_popen(["run", "tiny_slow", "--workdir", str(workdir), "--quiet",
                   "--set", "methods=lora"], env, tmp_path / "y.log")
    # Y is either refused (X holds the workdir) or, without a lock, starts training in it.
    _wait(lambda: y.poll() is not None or (workdir / "config.json").exists(), 240,
          "Y to be refused or to start")
    go.touch()
    x.wait(240)
    _wait(lambda: y.poll() is not None, 15, "Y to end")
  finally:
    go.touch()
    for proc in (x, y):
      if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
  assert y.returncode == 2, output(y)
  assert_one_error_line(output(y), "in use by another clx process", f"pid {x.pid}")
  assert "injected failure" in output(x)
  assert not workdir.exists()  # X made it, X (holding the lock) removed it


def test_race_of_two_runs_on_a_fresh_workdir(runs, tmp_path):
  """Two runs started together on a new workdir: one runs, the other gets one error line."""
  env = env_for(runs[1])
  workdir = tmp_path / "w"
  procs = [clx_popen(["run", "tiny_slow", "--workdir", str(workdir), "--quiet",
                      "--set", f"methods={m}"], env, tmp_path / f"{m}.log")
           for m in ("finetune", "lora")]
  try:
    _wait(lambda: any(p.poll() is not None for p in procs), 300, "one run to be refused")
    loser = next(p for p in procs if p.poll() is not None)
    winner = procs[1 - procs.index(loser)]
    assert loser.returncode == 2, output(loser)
    assert_one_error_line(output(loser), "in use by another clx process",
                          f"pid {winner.pid}")
    assert winner.poll() is None and workdir.is_dir()  # the loser removed nothing
    _wait(lambda: (workdir / "config.json").exists() or winner.poll() is not None, 240,
          "the winner to be accepted")
    assert winner.poll() is None, output(winner)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait()


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_process_run(runs, tmp_path, workdir, name, *sets):
  """``clx run tiny`` as 2 JAX processes (1 CPU device each); returns their (rc, output)."""
  env = {**env_for(runs[1]), "CLX_NUM_PROCESSES": "2",
         "CLX_COORDINATOR": f"127.0.0.1:{_free_port()}"}
  procs = [clx_popen(["run", "tiny", "--workdir", str(workdir), "--quiet", *sets],
                     {**env, "CLX_PROCESS_ID": str(i)}, tmp_path / f"{name}_{i}.log")
           for i in range(2)]
  try:
    for p in procs:
      p.wait(240)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait()
  return [(p.returncode, output(p)) for p in procs]


def test_multi_process_runs_are_refused_together(copy_run, runs, tmp_path):
  """Process 0 alone locks and checks the workdir; its refusal (here: another seed; a held
  lock takes the same path) reaches every process, so none waits forever in a collective,
  and each ends with one error line. A 2-process run that is accepted is exercised by
  tests/train/test_multiprocess.py (checkpoints) and the README's CLI example."""
  workdir = copy_run("ft")
  before = snapshot(workdir)
  (rc0, out0), (rc1, out1) = _two_process_run(runs, tmp_path, workdir, "seed", "--set",
                                              "methods=lora", "--set", "seed=1")
  assert (rc0, rc1) == (2, 2), out0[-2000:] + out1[-2000:]
  assert_one_error_line(out0, "records another configuration", "seed: 0 → 1")
  assert_one_error_line(out1, "process 0 refused")
  assert snapshot(workdir) == before


def test_lr_schedules_count_per_method_and_old_hashes_stay():
  """A schedule given to one method changes neither another method's result hash nor its
  configuration check; configs without ``lr_schedules`` hash as before the key existed."""
  import hashlib
  from clx import workdir as wd
  config = {"name": "x", "stream": {"name": "s"}, "methods": ["l2p", "coda_prompt"],
            "method_args": {"l2p": {"pool": 10}}, "train": {"epochs": 2},
            "train_overrides": {"coda_prompt": {"learning_rate": 1e-3}}, "seed": 0}
  for name in ("l2p", "coda_prompt"):  # the formula before lr_schedules existed
    shared = {k: v for k, v in config.items()
              if k not in ("methods", "method_args", "train_overrides")}
    own = {k: config[k].get(name, {}) for k in ("method_args", "train_overrides")}
    h = hashlib.sha256(b"clx.method_config_sha256.v1\0")
    h.update(wd._canonical({"shared": shared, "method": name, **own}))  # pylint: disable=protected-access
    assert wd.method_config_sha256(config, name) == h.hexdigest()
  scheduled = {**config, "lr_schedules": {"coda_prompt": "m:f"}}
  assert wd.method_config_sha256(scheduled, "l2p") == wd.method_config_sha256(config, "l2p")
  assert wd.method_config_sha256(scheduled, "coda_prompt") != wd.method_config_sha256(
      config, "coda_prompt")
  assert wd.config_differences(config, scheduled, ["l2p"]) == []
  assert wd.config_differences(config, scheduled, ["coda_prompt"]) == [
      'lr_schedules.coda_prompt: {} → "m:f"']
