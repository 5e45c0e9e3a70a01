"""Test helpers for model bundles: cheap copies (hard links) and single-byte corruption."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def clone_bundle(source: Path, target: Path, writable: tuple[str, ...] = ()) -> Path:
    """Copy a bundle folder; files not in ``writable`` are hard links (fast, and never modified)."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name in writable:
            shutil.copy2(path, target / path.name)
        else:
            os.link(path, target / path.name)
    return target


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte of ``path`` (the middle one by default)."""
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))
