"""Shared test fixtures: paths to the repository, its fixtures, and the optional ../shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

# Session fixtures for the tiny models (tiny_llama, tiny_minicpm3, data_cache) used by the training tests.
pytest_plugins = ["train_helpers"]

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "fixtures"
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (real third-party data and tokenizers); tests using it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED
