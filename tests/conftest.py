"""Test-wide set-up: data from ../shared/data, caches in a temp dir."""

import os
import pathlib

import pytest

from diffusion_text import host_memory

# As the CLI does, before JAX starts its CPU backend (host_memory.py).
host_memory.keep_mapped()

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = pathlib.Path(os.environ.get("DIFFUSION_TEXT_DATA",
                                   REPO.parent / "shared" / "data"))
os.environ["DIFFUSION_TEXT_DATA"] = str(DATA)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
  # Prepared datasets go to a writable cache; the data dir stays read-only.
  if "DIFFUSION_TEXT_CACHE" not in os.environ:
    os.environ["DIFFUSION_TEXT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
  yield


@pytest.fixture
def data_dir():
  if not DATA.exists():
    pytest.skip(f"data directory {DATA} not found (set DIFFUSION_TEXT_DATA)")
  return DATA
