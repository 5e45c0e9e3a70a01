"""C-STORE to the node's own SCP, for the fetch paths where the backfill process holds the objects itself (C-GET
from the PACS, downloads from Orthanc's REST API).

One association to the node is held open for a whole study. Each CT storage class is proposed once per transfer
syntax the node accepts (one syntax per context), so an object goes out exactly as the source encoded it.
Objects of other classes are not sent: the node keeps CT only (``node.other_storage``). When the node's SCP speaks
TLS (``node.tls``) so does this association: the node's certificate is checked against ``node.tls.ca_file`` and
the node's own certificate is presented as ours (the SCP requires a client certificate when a CA is set).
"""

from __future__ import annotations

import io
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any, Self

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE

from config.settings import Settings
from dicom_node.receive.codecs import ACCEPTED_TRANSFER_SYNTAXES
from dicom_node.receive.ingest import CT_STORAGE_CLASSES
from dicom_node.tls import client_context

logger = logging.getLogger(__name__)

# C-STORE warnings the standard counts as stored (coercion, elements discarded, data set does not match class).
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class ForwardError(RuntimeError):
    """The node refused the association or an object (its status is in the message)."""


@dataclass(frozen=True)
class NodeAddress:
    """Where the node's SCP listens, from its settings: a wildcard bind is reached on 127.0.0.1; ``tls`` is the
    client context when the SCP speaks TLS (its certificate must then name ``host``)."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeAddress:
        """Raises OSError/ssl.SSLError when ``node.tls`` names unreadable files."""
        node = settings.node
        host = node.bind if node.bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return cls(node.ae_title, host, node.port, client_context(node.tls) if node.tls.enabled else None)

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
        tls = self.node.tls
        assoc = self._ae.associate(self.node.host, self.node.port, ae_title=self.node.ae_title,
                                   tls_args=(tls, self.node.host) if tls is not None else None)
        if not assoc.is_established:
            tls_hint = (f"; over TLS its certificate must name {self.node.host} and be signed by node.tls.ca_file"
                        if tls is not None and not assoc.is_rejected else "")
            raise ForwardError(f"the node {self.node} refused the association (is `medfinder serve` running, and "
                               f"does node.allow admit AE title {self._ae.ae_title!r}{tls_hint}?)")
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
