"""Checkpoints: everything needed to resume bit-for-bit and to export a bundle later.

A checkpoint holds the trainable weights (the frozen text tower is rebuilt from the stored settings),
optimiser, scheduler and grad-scaler state, the epoch and step, the full settings, every RNG state,
the best validation metric and the metrics of the last validation. Writes are atomic.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_export.atomic_files import atomic_path

CHECKPOINT_FORMAT = "medfinder-checkpoint/1"


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (with the format tag) to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    with atomic_path(path) as temporary:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, temporary)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, refusing anything else clearly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a MedFinder checkpoint ({CHECKPOINT_FORMAT})")
    return payload
