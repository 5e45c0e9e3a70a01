"""Helpers for the receive-side tests: an in-process StorageSCP on a free 127.0.0.1 port, a pynetdicom SCU that
sends files as they are (so broken objects reach the SCP unchanged), and Part 10 byte helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node_helpers import free_port
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom import AE, _config

from config import load_settings
from config.settings import Settings
from dicom_node.receive.scp import StorageSCP
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import InstanceRecord, StateStore

CT_IMAGE_STORAGE = CTImageStorage


def receive_settings(data_dir: Path, **node: Any) -> Settings:
    """Node settings for a test SCP: 127.0.0.1, a free port, no disk watermark unless asked."""
    values: dict[str, Any] = {"bind": "127.0.0.1", "port": free_port(), "min_free_disk_mb": 0,
                              "network_timeout_s": 20, "dimse_timeout_s": 20, "acse_timeout_s": 20}
    values.update(node)
    return load_settings(overrides={"paths": {"data_dir": str(data_dir)}, "node": values}, environ={})


@dataclass
class RunningSCP:
    scp: StorageSCP
    layout: NodeLayout
    store: StateStore
    settings: Settings
    stored: list[InstanceRecord] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.scp.port


@contextlib.contextmanager
def running_scp(data_dir: Path, **node: Any) -> Iterator[RunningSCP]:
    """A started StorageSCP (stopped, and its store closed, on exit)."""
    settings = receive_settings(data_dir, **node)
    layout = NodeLayout.create(data_dir)
    store = StateStore(layout.state_db)
    stored: list[InstanceRecord] = []
    scp = StorageSCP(settings, layout, store, on_stored=stored.append)
    scp.start()
    try:
        yield RunningSCP(scp, layout, store, settings, stored)
    finally:
        scp.stop()
        store.close()


def send_files(port: int, files: list[Path], *, calling_ae: str = "PYSCU", called_ae: str = "MEDFINDER",
               sop_class: str = CT_IMAGE_STORAGE, transfer_syntaxes: list[str] | None = None,
               keep_open: Any = None) -> list[int | None]:
    """C-STORE each file *as it is on disk* (pynetdicom reads only its file meta); returns the statuses
    (None: no response). ``keep_open(assoc)`` runs after the sends, before the release."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for syntax in transfer_syntaxes or ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"]:
        ae.add_requested_context(sop_class, syntax)  # one context each: sent exactly as in the file
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError("association not established")
    statuses: list[int | None] = []
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's dataset bytes unparsed (UIDs from its file meta)
    try:
        for path in files:
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if "Status" in status else None)
        if keep_open is not None:
            keep_open(assoc)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return statuses


def send_dataset(port: int, dataset: Dataset, *, calling_ae: str = "PYSCU",
                 called_ae: str = "MEDFINDER") -> int | None:
    """C-STORE one in-memory dataset (Explicit VR Little Endian); None when no context was accepted."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(dataset.SOPClassUID, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if assoc.is_rejected:
        raise ConnectionError("association rejected")
    if not assoc.is_established:  # pynetdicom aborts an association without any accepted context
        return None
    try:
        status = assoc.send_c_store(dataset)
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()
