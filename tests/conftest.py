"""Shared pytest fixtures: where the shared CT/report fixtures live, and offline model hubs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config.settings import default_shared_data_dir

# Nothing in the test suite may reach a model hub: fail fast instead of retrying for ~23 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared fixture folder; tests that need it skip with a clear reason if it is absent."""
    path = default_shared_data_dir()
    if not (path / "ct").is_dir():
        pytest.skip(f"shared test data not found at {path} (set MEDFINDER_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def lung_ct_dir(shared_data: Path) -> Path:
    """The Lung-PET-CT-Dx sample: 2 chest CT studies, 4 series."""
    return shared_data / "ct" / "lung-pet-ct-dx"
