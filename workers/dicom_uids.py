"""DICOM UID validity, in one place for everything that takes a UID from outside (the SCP, the REST API, the
query engine, the spool's folder names): digits and dots, no leading zeros, at most 64 characters."""

from __future__ import annotations

import re

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUIDError(ValueError):
    """A UID that is empty, too long or not digits-and-dots (and so unsafe as a file name)."""


def check_uid(value: object, what: str) -> str:
    """``value`` as a valid DICOM UID string, else :class:`InvalidUIDError` naming ``what``."""
    text = str(value or "").strip().rstrip("\x00")
    if not text:
        raise InvalidUIDError(f"{what} is empty")
    if len(text) > 64 or not UID_PATTERN.match(text):
        raise InvalidUIDError(f"{what} {text[:80]!r} is not a valid UID")
    return text
