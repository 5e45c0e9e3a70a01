"""Atomic file writes: readers see the old file or the new one, never half of one.

Every writer of the project (checkpoints, NIfTI volumes, manifests, outcome files, SRs, index metadata) goes
through :func:`atomic_path`: it hands out a temporary sibling of the target and renames it over the target only
when the block finished. The temporary name keeps the target's full suffix (``.nii.gz``, ``.npy``), because some
writers choose their format from it, and starts with a dot, so folder scans (bundle hashing, spool globs) skip it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds and removed when it fails."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{target.name}")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_atomic(path, text.encode("utf-8"))
