"""Deterministic DICOM UIDs: the same inputs always give the same UID under our root.

Results must be re-creatable: rebuilding and re-sending the SR of a study version must produce the same SOP
Instance UID, so a PACS that already has it treats the re-send as a duplicate, not a second report.
"""

from __future__ import annotations

from pydicom.uid import generate_uid

from workers.dicom_uids import check_uid

# Separates the parts before hashing, so ("ab", "c") and ("a", "bc") give different UIDs; pydicom itself
# concatenates its entropy sources without a separator.
_SEPARATOR = "\x1f"


def deterministic_uid(root: str, *parts: str) -> str:
    """A valid UID (≤ 64 characters) under ``root``, derived from a hash of ``parts``."""
    if not parts:
        raise ValueError("deterministic_uid needs at least one part to derive the UID from")
    prefix = root if root.endswith(".") else f"{root}."
    if len(prefix) > 44:  # leave ≥ 20 digits of hash: collisions stay out of reach
        raise ValueError(f"UID root {root!r} is too long (at most 43 characters)")
    check_uid(prefix[:-1], "UID root")
    uid = str(generate_uid(prefix=prefix, entropy_srcs=[_SEPARATOR.join(str(p) for p in parts)]))
    return check_uid(uid, "derived UID")
