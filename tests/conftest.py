"""Shared pytest fixtures: where the shared CT/report fixtures live, and offline model hubs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config.settings import default_shared_data_dir

# Nothing in the test suite may reach a model hub: fail fast instead of retrying for ~23 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Nodes started by tests (in-process or `medfinder serve`) serve no REST API unless the test asks for one:
# the default port 8080 would collide between tests running at the same time.
os.environ.setdefault("MEDFINDER__API__HTTP_PORT", "0")

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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny MedFinder training run (tiny preset, a few seconds) shared by the model bundle tests."""
    from config import load_settings
    from trainer.engine.loop import train

    work = tmp_path_factory.mktemp("bundle-train")
    settings = load_settings("tiny", overrides={"paths": {"work_dir": str(work)}, "train": {"progress": False}})
    train(settings, work / "run")
    return work / "run" / "best.pt"


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_checkpoint`` exported once through ``medfinder export`` (parity-checked). Tests must not modify it."""
    from medfinder.cli import main

    out = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    """The PyTorch model of ``tiny_checkpoint`` (eval mode) with its settings, to compare the runtime against."""
    from trainer.engine.loop import load_trained_model

    model, _state, settings = load_trained_model(tiny_checkpoint)
    return model, settings
