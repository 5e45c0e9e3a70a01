"""Patient-level train/val/test assignment.

Scans of one patient look alike (the same anatomy, often the same findings), so a patient whose scans straddle
train and test inflates retrieval scores: the model "finds" the sibling scan it trained on. The official
MedFinder code splits by row order, which leaks patients; this module splits by patient instead.

The assignment must be reproducible on any machine and must not move a patient when rows are added,
removed or reordered, so each patient's split comes from a hash of ``seed`` and the patient key alone, never
from a random generator or the row order.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence

from trainer.data.manifest import SPLITS, ManifestRow, with_split

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.1, 0.2)

# When a patient's pre-assigned rows already disagree, its unsplit rows join the most held-out split among
# them: adding rows to evaluation cannot make a training leak worse, adding them to training can.
_HOLD_OUT_PRIORITY = ("test", "val", "train")


def patient_key(row: ManifestRow) -> str:
    """The key that groups rows by patient.

    A row without ``patient_id`` is its own patient (keyed by ``volume_id``): we cannot know whom it belongs
    to, and guessing could merge strangers. Such a row can still leak if the same person appears elsewhere
    under an id, which only the dataset owner can fix by filling ``patient_id``.
    """
    return row.patient_id.strip() or f"volume:{row.volume_id}"


def patient_unit(key: str, seed: int = 0) -> float:
    """A uniform number in [0, 1) fixed by ``seed`` and ``key``: sha256 is the same on every platform."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Reject fractions that cannot be a partition, rather than silently renormalising a typo."""
    if len(fractions) != len(SPLITS):
        raise ValueError(f"fractions must give {len(SPLITS)} values for {SPLITS}, got {tuple(fractions)}")
    if any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be >= 0, got {tuple(fractions)}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {tuple(fractions)} (sum {sum(fractions)})")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def split_for_unit(unit: float, fractions: Sequence[float]) -> str:
    """Map a uniform number to a split by cumulative fractions.

    The fallback is the last split with a non-zero fraction, so float rounding of e.g. (0.9, 0.1, 0.0)
    can never put a patient into a split that was asked to be empty.
    """
    cumulative = 0.0
    for name, fraction in zip(SPLITS, fractions):
        cumulative += fraction
        if fraction > 0 and unit < cumulative:
            return name
    return [name for name, fraction in zip(SPLITS, fractions) if fraction > 0][-1]


def find_patient_leaks(rows: Iterable[ManifestRow]) -> dict[str, set[str]]:
    """Patients (by :func:`patient_key`) whose rows lie in more than one split; empty when the split is clean."""
    seen: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.split:
            seen[patient_key(row)].add(row.split)
    return {key: splits for key, splits in seen.items() if len(splits) > 1}


def assign_patient_splits(
    rows: Sequence[ManifestRow],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> list[ManifestRow]:
    """Fill empty splits at patient level; rows that already have a split keep it.

    An unsplit row of a patient who already has split rows follows that split, so a partial hand-made split
    is extended without leaking. Returns new rows in the input order (``row_number`` kept).
    """
    fractions = _check_fractions(fractions)
    given: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.split:
            given[patient_key(row)].add(row.split)
    conflicting = sum(1 for splits in given.values() if len(splits) > 1)
    if conflicting:
        # Counts only: patient ids are not logged.
        logger.warning(
            "%d patient(s) already lie in more than one split in the input; their unsplit rows go to the most "
            "held-out of those splits (see find_patient_leaks)",
            conflicting,
        )
    out: list[ManifestRow] = []
    for row in rows:
        if row.split:
            out.append(row)
            continue
        key = patient_key(row)
        if key in given:
            split = next(name for name in _HOLD_OUT_PRIORITY if name in given[key])
        else:
            split = split_for_unit(patient_unit(key, seed), fractions)
        out.append(with_split(row, split))
    return out
