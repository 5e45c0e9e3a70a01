"""The node's private block in C-FIND identifiers: creator ``MEDFINDER`` in group 0x0099.

Responses carry (0099,1001) FD score and (0099,1002) US rank; a request may carry (0099,1003) US limit. C-FIND
often runs in Implicit VR, where a peer without this private dictionary sees these values as UN bytes (field
notes 7): rank and score are therefore also written as a ``#1 0.87`` prefix of StudyDescription, and a limit
that arrives as UN bytes is read as the little-endian US it is defined to be.
"""

from __future__ import annotations

import struct

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

PRIVATE_GROUP = 0x0099
PRIVATE_CREATOR = "MEDFINDER"
SCORE_ELEMENT = 0x01  # (0099,1001) FD
RANK_ELEMENT = 0x02  # (0099,1002) US
LIMIT_ELEMENT = 0x03  # (0099,1003) US, requests only


def add_rank_and_score(dataset: Dataset, rank: int, score: float) -> None:
    """Write rank and score into the MEDFINDER block (reserved at (0099,0010) in a dataset without one)."""
    block = dataset.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(SCORE_ELEMENT, "FD", float(score))
    block.add_new(RANK_ELEMENT, "US", int(rank))


def requested_limit(identifier: Dataset) -> int | None:
    """The (0099,1003) limit a request asks for, or None when it asks none; ValueError when it is not a US."""
    try:
        block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return None
    if LIMIT_ELEMENT not in block:
        return None
    element = block[LIMIT_ELEMENT]
    value = element.value
    if value is None or value == b"" or value == "":
        return None
    if isinstance(value, (bytes, bytearray)):  # UN: Implicit VR, or a peer without our dictionary
        if len(value) != 2:
            raise ValueError("limit (0099,1003) must be one US value (2 bytes)")
        return int(struct.unpack("<H", bytes(value))[0])
    if isinstance(value, MultiValue):
        if len(value) != 1:
            raise ValueError("limit (0099,1003) must be one value")
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError("limit (0099,1003) must be a number") from None
