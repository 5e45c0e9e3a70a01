"""Bad manifest rows: found, named and counted, never silently dropped.

A real dataset always has a few broken rows (a volume that failed to download, a report that is empty after
translation). Training must neither crash three hours in on the first one nor quietly shrink the dataset:
``on_bad_row`` (``config.settings.DataSettings``) chooses between stopping at once with the row named and
skipping it with a warning and a summary that says exactly what was skipped and why.

Logs carry the row number, the volume id and the reason only: report text and patient ids stay out of logs.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from trainer.data.manifest import ManifestRow

logger = logging.getLogger(__name__)

OnBadRow = Literal["skip", "stop"]

# Stable reason strings: the summary counts by them, so they carry no per-row detail.
MISSING_VOLUME_ID = "volume_id is empty"
DUPLICATE_VOLUME_ID = "volume_id is a duplicate"
EMPTY_REPORT = "report is empty"
MISSING_FILE = "volume file is missing"
EMPTY_FILE = "volume file is empty"
EMPTY_FOLDER = "volume folder has no files"
UNREADABLE = "volume is unreadable"


@dataclass(frozen=True)
class BadRow:
    """One rejected row. ``detail`` adds what only this row has (the loader's message, the first duplicate)."""

    row_number: int
    volume_id: str
    volume: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        text = f"row {self.row_number} ({self.volume_id}, {self.volume}): {self.reason}"
        return f"{text} ({self.detail})" if self.detail else text


class BadRowError(ValueError):
    """Raised in ``stop`` mode; ``bad`` is the row that stopped the run."""

    def __init__(self, bad: BadRow) -> None:
        super().__init__(f"bad manifest {bad} (set data.on_bad_row=skip to skip such rows)")
        self.bad = bad


def _bad(row: ManifestRow, reason: str, detail: str = "") -> BadRow:
    return BadRow(row.row_number, row.volume_id, str(row.volume), reason, detail)


def _check_path(row: ManifestRow) -> BadRow | None:
    """Cheap existence checks: they catch most broken downloads without opening a single volume."""
    path = Path(row.volume)
    if path.is_dir():
        if not any(p.is_file() for p in path.rglob("*")):
            return _bad(row, EMPTY_FOLDER)
        return None
    if not path.is_file():
        return _bad(row, MISSING_FILE)
    if path.stat().st_size == 0:
        return _bad(row, EMPTY_FILE)
    return None


def _check_loadable(row: ManifestRow) -> BadRow | None:
    """Open the volume with the same loader as training and serving, so "readable" means the same thing."""
    # Imported here: the preprocessing stack is heavier than a manifest check and not needed without load.
    from model_export.preprocessing import VolumeError, load_volume

    try:
        load_volume(row.volume)
    except (VolumeError, OSError, ValueError) as error:
        return _bad(row, UNREADABLE, f"{type(error).__name__}: {error}")
    return None


def check_row(row: ManifestRow, load: bool = False) -> BadRow | None:
    """The first problem with ``row``, or None. ``load=True`` also reads the volume (slow, but thorough).

    Duplicate volume ids need the whole manifest, so :func:`validate_manifest` checks those.
    """
    if not row.volume_id.strip():
        return _bad(row, MISSING_VOLUME_ID)
    if not row.report.strip():
        return _bad(row, EMPTY_REPORT)
    bad = _check_path(row)
    if bad is None and load:
        bad = _check_loadable(row)
    return bad


class RowPolicy:
    """Applies ``on_bad_row`` to each bad row and remembers what was skipped for the run summary."""

    def __init__(self, on_bad_row: OnBadRow = "skip") -> None:
        if on_bad_row not in ("skip", "stop"):
            raise ValueError(f"on_bad_row must be 'skip' or 'stop', got {on_bad_row!r}")
        self.on_bad_row: OnBadRow = on_bad_row
        self.skipped: list[BadRow] = []

    def handle(self, bad: BadRow) -> None:
        """Raise :class:`BadRowError` in ``stop`` mode; otherwise log a warning and record the row."""
        if self.on_bad_row == "stop":
            raise BadRowError(bad)
        self.skipped.append(bad)
        logger.warning(
            "skipping manifest row %d (%s): %s",
            bad.row_number,
            bad.volume_id,
            bad.reason,
            extra={"row_number": bad.row_number, "volume_id": bad.volume_id, "reason": bad.reason},
        )

    def summary(self) -> dict[str, Any]:
        """What was skipped: total, count per reason, and one line per row (for the run report)."""
        return {
            "skipped": len(self.skipped),
            "reasons": dict(Counter(bad.reason for bad in self.skipped)),
            "rows": [str(bad) for bad in self.skipped],
        }


def validate_manifest(
    rows: Iterable[ManifestRow], policy: RowPolicy, load: bool = False
) -> list[ManifestRow]:
    """The good rows, in order; every bad one goes through ``policy``.

    Of rows sharing a ``volume_id`` the first is kept and later ones are bad: retrieval ground truth is keyed
    by volume id, so two volumes under one id would make one of them impossible to score.
    """
    good: list[ManifestRow] = []
    first_seen: dict[str, int] = {}
    for row in rows:
        bad = check_row(row, load=load)
        key = row.volume_id.strip()
        if bad is None and key in first_seen:
            bad = _bad(row, DUPLICATE_VOLUME_ID, f"first used by row {first_seen[key]}")
        if bad is not None:
            policy.handle(bad)
            continue
        first_seen[key] = row.row_number
        good.append(row)
    if policy.skipped:
        logger.warning("skipped %d bad manifest row(s): %s", len(policy.skipped), policy.summary()["reasons"])
    return good
