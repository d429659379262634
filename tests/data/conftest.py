"""Shared fixtures for clx.data tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """A TFDS data dir with clx_digits prepared once per session."""
  from clx.data import builders
  data_dir = tmp_path_factory.mktemp("tfds")
  builders.prepare("clx_digits", data_dir)
  return data_dir


@pytest.fixture(scope="session")
def digits_splits(digits_data_dir):
  from clx.data import builders
  return builders.load_builtin("clx_digits", digits_data_dir)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
  """An empty clx cache selected through $CLX_CACHE_DIR."""
  cache = tmp_path / "clx-cache"
  monkeypatch.setenv("CLX_CACHE_DIR", str(cache))
  monkeypatch.delenv("CLX_OFFLINE", raising=False)
  monkeypatch.delenv("CLX_FIND_LINKS", raising=False)
  return cache
