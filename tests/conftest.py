"""Shared test fixtures: where the golden fixtures and the default model are, and one Numba cache for the run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Before numba is imported anywhere: every test process reuses the kernels compiled by earlier runs.
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO_ROOT / ".numba_cache"))

from engine.default_model import pull_default_model  # noqa: E402  (needs NUMBA_CACHE_DIR set first)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    path = Path(os.environ.get("BITSERVE_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))
    if not (path / "manifest.json").is_file():
        pytest.fail(f"golden fixtures not found at {path}; set BITSERVE_FIXTURES")
    return path


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default GGUF, pulled into the models directory once (later runs reuse it offline)."""
    return pull_default_model(log=lambda message: None)
