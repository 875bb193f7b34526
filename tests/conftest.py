"""Shared test settings: a private agejax cache per session and quiet JAX logs."""

import os
import tempfile

import pytest

os.environ.setdefault("AGEJAX_CACHE", tempfile.mkdtemp(prefix="agejax_test_cache_"))

UTKFACE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "shared", "data", "UTKFace")


@pytest.fixture
def utkface_root() -> str:
  if not os.path.isdir(UTKFACE):
    pytest.skip(f"real UTKFace folder not found at {UTKFACE} (shared/data is beside the repo in CI)")
  return UTKFACE


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
  """The tiny demo study (tests/scaleout.py) on one CPU device, uninterrupted: (workdir, probe report)."""
  from scaleout import run_probe

  workdir = tmp_path_factory.mktemp("tiny_reference")
  return workdir, run_probe(workdir, "--config.checkpoint.enabled=False")
