"""Shared fixtures for tests/ops.

`x64` enables float64 for one test only (jax.enable_x64 is a context manager),
so it never leaks into other test modules. Hypothesis tests cannot use
function-scoped fixtures, so they enter `jax.enable_x64(True)` in their body.
"""

from __future__ import annotations

import jax
import pytest


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.fixture(autouse=True)
def _x64_does_not_leak():
  before = jax.config.jax_enable_x64
  yield
  assert jax.config.jax_enable_x64 == before, "a test leaked jax_enable_x64"
