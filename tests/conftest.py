"""Test-wide setup: 4 simulated CPU devices (set before JAX is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402



@pytest.fixture
def gaussian_stream():
  from tests.helpers import make_gaussian_stream
  return make_gaussian_stream()
