"""C-STORE to the node's own SCP, for the fetch paths where the backfill process holds the objects itself (C-GET
from the PACS, downloads from Orthanc's REST API).

One association to the node is held open for a whole study. Each CT storage class is proposed once per transfer
syntax the node accepts (one syntax per context), so an object goes out exactly as the source encoded it.
Objects of other classes are not sent: the node keeps CT only (``node.other_storage``).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Self

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE

from config.settings import Settings
from dicom_node.receive.codecs import ACCEPTED_TRANSFER_SYNTAXES
from dicom_node.receive.ingest import CT_STORAGE_CLASSES

logger = logging.getLogger(__name__)

# C-STORE warnings the standard counts as stored (coercion, elements discarded, data set does not match class).
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class ForwardError(RuntimeError):
    """The node refused the association or an object (its status is in the message)."""


@dataclass(frozen=True)
class NodeAddress:
    """Where the node's SCP listens, from its settings: a wildcard bind is reached on 127.0.0.1."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeAddress:
        node = settings.node
        host = node.bind if node.bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return cls(node.ae_title, host, node.port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class NodeSender:
    """An open association to the node; ``send`` stores one object; use as a context manager."""

    def __init__(self, node: NodeAddress, calling_ae_title: str, timeout_s: float) -> None:
        self.node = node
        ae = AE(ae_title=calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
        for sop_class in CT_STORAGE_CLASSES:
            for syntax in ACCEPTED_TRANSFER_SYNTAXES:
                ae.add_requested_context(sop_class, syntax)
        self._ae = ae
        self._assoc: Any = None
        self.sent = 0
        self.skipped = 0  # objects of a class the node does not keep

    def __enter__(self) -> Self:
        assoc = self._ae.associate(self.node.host, self.node.port, ae_title=self.node.ae_title)
        if not assoc.is_established:
            raise ForwardError(f"the node {self.node} refused the association (is `medfinder serve` running, and "
                               f"does node.allow admit AE title {self._ae.ae_title!r}?)")
        self._assoc = assoc
        return self

    def __exit__(self, *exc: object) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    def send(self, dataset: Dataset) -> bool:
        """Store one object (``file_meta`` set); False when it was skipped (not a CT storage class)."""
        if str(dataset.SOPClassUID) not in CT_STORAGE_CLASSES:
            self.skipped += 1
            return False
        if self._assoc is None or not self._assoc.is_established:
            raise ForwardError(f"the association to the node {self.node} was lost")
        status = self._assoc.send_c_store(dataset)
        code = int(getattr(status, "Status", -1)) if status is not None else -1
        if code not in STORED_STATUSES:
            comment = str(getattr(status, "ErrorComment", "") or "") if status is not None else "no response"
            raise ForwardError(f"the node answered C-STORE with status 0x{code & 0xFFFF:04X} {comment}".rstrip())
        self.sent += 1
        return True

    def send_bytes(self, data: bytes) -> bool:
        """Store one Part 10 file held in memory (an Orthanc download)."""
        return self.send(pydicom.dcmread(io.BytesIO(data)))
