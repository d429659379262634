"""Expected failures end in one ``clx: error:`` line (exit 2), and bad values fail
before any data loads (issue 16, items 6 and 10).

Each probe runs ``clx.cli.main`` in-process. For the config-value probes the
data loader is replaced by one that fails the test, so a probe passes only if
the value is rejected at config time, before loading.
"""

import errno
import os

import pytest

from clx import cli
from tests.reliability import _relb_configs


@pytest.fixture
def experiments(tmp_path, monkeypatch):
  return _relb_configs.install(tmp_path / "experiments", monkeypatch)


@pytest.fixture
def no_data(monkeypatch):
  """Any attempt to load a builtin dataset fails the test."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"data was loaded before the config was validated: {args}")

  monkeypatch.setattr("clx.data.streams._builtin", refuse)


def _run(capsys, *args, experiment="relb_digits", workdir=None):
  argv = ["run", experiment, "--quiet", *args]
  if workdir is not None:
    argv += ["--workdir", str(workdir)]
  rc = cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  return rc, err


def _assert_one_line(rc, err, *words):
  assert rc == 2, err
  lines = [line for line in err if line.startswith("clx: error:")]
  assert len(lines) == 1 and not any("Traceback" in line for line in err), err
  for word in words:
    assert word in lines[0], (word, lines[0])


BAD_VALUES = [
    # (--set ..., words the error line must contain)
    (["stream.num_tasks=0"], ["num_tasks", "0"]),
    (["stream.num_tasks=-2"], ["num_tasks", "-2"]),
    (["seed=-1"], ["seed", "-1"]),
    (["train.grad_clip=-1"], ["grad_clip"]),
    (["train.weight_decay=-1"], ["weight_decay"]),
    (["train.learning_rate=inf"], ["learning_rate", "finite"]),
    (["train.learning_rate=nan"], ["learning_rate"]),
    (["train.learning_rate=0"], ["learning_rate"]),
    (["train.epochs=-1"], ["epochs"]),
    (["train.batch_size=0"], ["batch_size"]),
    (["model.name=nosuch"], ["unknown model", "nosuch"]),
    (["model.hidden=0"], ["mlp", "positive"]),
    (["methods=gpm", "method_args.gpm.threshold=1.5,0.99"], ["gpm", "threshold", "1.5"]),
    (["methods=gpm", "method_args.gpm.threshold=0,0.99"], ["gpm", "threshold"]),
    (["methods=gpm", "method_args.gpm.num_samples=0"], ["gpm", "num_samples"]),
    (["methods=gpm", "method_args.gpm.num_samples=-3"], ["gpm", "num_samples"]),
    (["methods=lora", "method_args.lora.rank=0"], ["lora", "rank"]),
    (["methods=lora", "method_args.lora.rank=5000"], ["lora", "5000", "lin1/kernel"]),
]


@pytest.mark.parametrize("sets,words", BAD_VALUES, ids=[" ".join(s) for s, _ in BAD_VALUES])
def test_bad_value_is_one_line_before_data_loads(experiments, no_data, tmp_path, capsys, sets,
                                                 words):
  workdir = tmp_path / "run"
  rc, err = _run(capsys, *[a for s in sets for a in ("--set", s)], workdir=workdir)
  _assert_one_line(rc, err, *words)
  assert not workdir.exists()  # nothing written for a rejected config


@pytest.mark.parametrize("value", ["0", "-59700"])
def test_train_per_task_rejected_before_data_loads(experiments, no_data, tmp_path, capsys, value):
  # Before: -59700 trained on 300 examples (a Python slice); 0 failed after loading
  # with "cannot reshape array of size 0".
  rc, err = _run(capsys, "--set", f"stream.train_per_task={value}", experiment="relb_pmnist",
                 workdir=tmp_path / "run")
  _assert_one_line(rc, err, "train_per_task", value)


def test_workdir_that_is_a_file(experiments, no_data, tmp_path, capsys):
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  rc, err = _run(capsys, workdir=path)
  _assert_one_line(rc, err, "workdir", "not a directory")
  assert path.read_text() == "not a directory"


def test_workdir_under_a_file(experiments, no_data, tmp_path, capsys):
  path = tmp_path / "a_file"
  path.write_text("x")
  rc, err = _run(capsys, workdir=path / "sub" / "run")
  _assert_one_line(rc, err, "a_file", "is a file")


def test_workdir_not_writable(experiments, no_data, tmp_path, capsys, monkeypatch):
  # Tests may run as root, which writes anywhere: deny through os.access, the check clx uses.
  parent = tmp_path / "locked"
  parent.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(parent)
                      else real_access(p, mode, **kw))
  rc, err = _run(capsys, workdir=parent / "run")
  _assert_one_line(rc, err, "not writable", str(parent))


def test_cache_dir_that_is_a_file(experiments, tmp_path, capsys, monkeypatch):
  path = tmp_path / "cache_file"
  path.write_text("x")
  monkeypatch.setenv("CLX_CACHE_DIR", str(path))
  rc, err = _run(capsys, workdir=tmp_path / "run")
  _assert_one_line(rc, err, "cache directory", "cache_file", "CLX_CACHE_DIR")


def test_cache_dir_not_writable_when_preparing(tmp_path, monkeypatch):
  from clx.data import assets, builders
  cache = tmp_path / "cache"
  cache.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(cache) in os.fspath(p)
                      else real_access(p, mode, **kw))
  with pytest.raises(assets.CacheDirError, match="not writable"):
    builders.load_builtin("clx_digits", asset_cache=cache)
  assert not any(cache.rglob("*.array_record*"))


def _corrupt_prepared_digits(cache):
  from clx.data import builders
  builders.load_builtin("clx_digits", asset_cache=cache)
  builders.clear_cache()
  (record,) = cache.glob("tfds/clx_digits/*/*train.array_record*")
  data = bytearray(record.read_bytes())
  for i in range(len(data) // 3, len(data) // 3 + 32):
    data[i] ^= 0xFF
  record.write_bytes(bytes(data))


def test_corrupted_prepared_dataset_is_one_line(experiments, tmp_path, capsys, monkeypatch):
  cache = tmp_path / "cache"
  _corrupt_prepared_digits(cache)
  monkeypatch.setenv("CLX_CACHE_DIR", str(cache))
  rc, err = _run(capsys, workdir=tmp_path / "run")
  _assert_one_line(rc, err, "clx_digits", "damaged", "delete that folder")


@pytest.mark.parametrize("mode", ["flip", "truncate", "metadata"])
def test_corrupted_prepared_dataset_library(tmp_path, mode):
  from clx.data import builders
  cache = tmp_path / "cache"
  builders.load_builtin("clx_digits", asset_cache=cache)
  builders.clear_cache()
  if mode == "metadata":
    (info,) = cache.glob("tfds/clx_digits/*/dataset_info.json")
    info.write_text("{garbage")
  else:
    (record,) = cache.glob("tfds/clx_digits/*/*train.array_record*")
    data = bytearray(record.read_bytes())
    if mode == "truncate":
      data = data[: len(data) // 2]
    else:
      data[len(data) // 2] ^= 0x01
    record.write_bytes(bytes(data))
  with pytest.raises(builders.PreparedDatasetError, match="clx_digits.*damaged"):
    builders.load_builtin("clx_digits", asset_cache=cache)
  builders.clear_cache()


def test_disk_full_is_one_line_and_leaves_no_temp_file(experiments, tmp_path, capsys, monkeypatch):
  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full)
  workdir = tmp_path / "run"
  rc, err = _run(capsys, workdir=workdir)
  _assert_one_line(rc, err, "No space left on device")
  assert not list(tmp_path.rglob("*.tmp"))
