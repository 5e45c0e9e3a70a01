"""The tuned acceptor associations (dicom_node.receive.acceptor) against real peers: the node's StorageSCP on
127.0.0.1, dcmtk storescu/echoscu and pynetdicom requestors; release, aborts, dropped connections, the network idle
timeout, file descriptors over many associations, and the C-STORE shortcuts byte for byte against pynetdicom's own
encoders. TLS goes through the same tuning: tests/test_tls.py runs storescu/echoscu over it."""

from __future__ import annotations

import io
import itertools
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from fuzz_objects import ct_dataset
from node_helpers import dataset_bytes, echoscu, require_tools, storescu, wait_for
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from receive_helpers import running_scp

from dicom_node.receive import acceptor

VERIFICATION = "1.2.840.10008.1.1"


def _series(folder: Path, count: int, size: int = 256) -> dict[str, Path]:
    """``count`` small CT slices of one series (``size`` x ``size``, several PDUs each at storescu's PDU size),
    by SOP Instance UID."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = {}
    for index in range(count):
        ds = ct_dataset(generate_uid(), size, size)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, index + 1
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths[str(ds.SOPInstanceUID)] = path
    return paths


def _pynetdicom_header(sop_class: str, sop_uid: str, syntax: str) -> bytes:
    """What pynetdicom writes before a received data set it streams to disk."""
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_uid),
                                                  transfer_syntax=UID(syntax)))
    return buffer.getvalue()


def _tuned() -> list[acceptor._EventDrivenAssociation]:
    """Acceptor associations running in this process through the tuned path."""
    return [thread for thread in threading.enumerate() if isinstance(thread, acceptor._EventDrivenAssociation)]


def _none_open() -> bool:
    return not _tuned()


def _requestor(port: int, **timeouts: float) -> object:
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for name, value in timeouts.items():
        setattr(ae, name, value)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDFINDER")
    assert assoc.is_established
    return assoc


def test_one_association_many_instances_all_spooled_as_sent(tmp_path: Path) -> None:
    require_tools("storescu", "echoscu")
    sent = _series(tmp_path / "series", 60)
    with running_scp(tmp_path / "node") as running:
        result = storescu(running.port, tmp_path / "series")
        assert result.returncode == 0, result.stderr[-2000:]
        spooled = {path.stem: path for path in running.layout.spool.glob("*/*/*.dcm")}
        assert sorted(spooled) == sorted(sent) and len(running.stored) == 60
        for sop_uid, path in sent.items():  # the data set as sent, under the file header pynetdicom writes
            assert dataset_bytes(spooled[sop_uid]) == dataset_bytes(path)
            header = _pynetdicom_header(CTImageStorage, sop_uid, ExplicitVRLittleEndian)
            assert spooled[sop_uid].read_bytes()[:len(header)] == header
        wait_for(_none_open, 5, "the association to end after its release")
        assert echoscu(running.port)


def test_associations_are_tuned_echo_and_release(tmp_path: Path) -> None:
    with running_scp(tmp_path / "node") as running:
        assoc = _requestor(running.port)
        tuned = wait_for(_tuned, 5, "the tuned acceptor")
        assert isinstance(tuned[0].dul, acceptor._WakingDUL)
        assert isinstance(tuned[0].dul.socket, acceptor._IntoSocket)
        assert isinstance(tuned[0].dimse, acceptor._QuickStore)
        started = time.monotonic()
        for _ in range(50):
            assert int(assoc.send_c_echo().Status) == 0
        assert time.monotonic() - started < 5  # polling answered ~1 echo per 2-3 ms; waiting must not be slower
        assoc.release()
        assert assoc.is_released
        wait_for(_none_open, 5, "the acceptor to end after the release")
        assert tuned[0].is_released and not tuned[0].is_aborted


def test_peer_abort_ends_the_association(tmp_path: Path) -> None:
    require_tools("echoscu")
    with running_scp(tmp_path / "node") as running:
        assoc = _requestor(running.port)
        tuned = wait_for(_tuned, 5, "the tuned acceptor")
        assoc.abort()
        wait_for(_none_open, 5, "the acceptor to end after the peer's A-ABORT")
        assert tuned[0].is_aborted
        assert echoscu(running.port)


def test_dropped_and_garbled_connections_end_within_the_acse_timeout(tmp_path: Path) -> None:
    """Before an A-ASSOCIATE-RQ, pynetdicom's acceptor waits ``acse_timeout`` for one, as it always did."""
    require_tools("echoscu")
    with running_scp(tmp_path / "node", acse_timeout_s=1.0) as running:
        with socket.create_connection(("127.0.0.1", running.port)):  # connects, then goes away
            wait_for(_tuned, 5, "an acceptor for the raw connection")
        wait_for(_none_open, 5, "the acceptor to end after the connection closed")
        with socket.create_connection(("127.0.0.1", running.port)) as raw:
            raw.sendall(b"\x09\x00\x00\x00\x00\x04junk")  # no such PDU type, then a cut-short header
            wait_for(_tuned, 5, "an acceptor for the garbled connection")
            time.sleep(0.5)
        wait_for(_none_open, 5, "the acceptor to end once the garbling peer is gone")
        assert echoscu(running.port)


def test_stop_with_an_open_association_returns_promptly(tmp_path: Path) -> None:
    with running_scp(tmp_path / "node") as running:
        assoc = _requestor(running.port)
        wait_for(_tuned, 5, "the tuned acceptor")
        started = time.monotonic()
        running.scp.stop()
        assert time.monotonic() - started < 5
        wait_for(lambda: assoc.is_aborted or not assoc.is_established, 5, "the requestor to see the abort")
    wait_for(_none_open, 5, "no acceptor left")


def test_network_idle_timeout_still_ends_an_idle_association(tmp_path: Path) -> None:
    with running_scp(tmp_path / "node", network_timeout_s=1.0) as running:
        assoc = _requestor(running.port)
        tuned = wait_for(_tuned, 5, "the tuned acceptor")
        started = time.monotonic()
        wait_for(lambda: assoc.is_aborted, 10, "the node to abort the idle association", interval=0.05)
        waited = time.monotonic() - started
        assert 0.8 <= waited < 5, waited
        wait_for(_none_open, 5, "the acceptor to end")
        assert tuned[0].is_aborted


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_no_file_descriptor_left_after_many_associations(tmp_path: Path) -> None:
    require_tools("storescu")
    _series(tmp_path / "one", 1, size=64)
    with running_scp(tmp_path / "node") as running:
        warm = _requestor(running.port)  # warm-up: imports, lazily opened files
        assert int(warm.send_c_echo().Status) == 0
        warm.release()
        wait_for(_none_open, 5, "the warm-up association to end")
        before = _open_fds()
        duls = []
        for index in range(50):
            if index % 10 == 0:  # some with a store, from another process
                assert storescu(running.port, tmp_path / "one").returncode == 0
            else:
                assoc = _requestor(running.port)
                duls.extend(tuned.dul for tuned in _tuned())
                assert int(assoc.send_c_echo().Status) == 0
                if index % 3:
                    assoc.release()
                else:
                    assoc.abort()
        wait_for(_none_open, 10, "every acceptor to end")
        assert all(dul._wake_pair is None for dul in duls if isinstance(dul, acceptor._WakingDUL))
        assert _open_fds() <= before + 2, (before, _open_fds())


def test_quick_store_response_is_pynetdicoms_encoding() -> None:
    def reference(primitive: C_STORE) -> bytes:
        message = C_STORE_RSP()
        message.primitive_to_message(primitive)
        (pdata,) = list(message.encode_msg(1, 0))
        return bytes(pdata.presentation_data_value_list[0][1][1:])

    cases = itertools.product([CTImageStorage, "1.2.840.10008.5.1.4.1.1.2.1", None],
                              ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.12", None, "1" * 64],
                              [0, 1, 65535], [0x0000, 0xA700, 0xC001, 0xB000, 0x0110])
    for class_uid, instance_uid, message_id, status in cases:
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = message_id
        if class_uid is not None:
            primitive.AffectedSOPClassUID = class_uid
        if instance_uid is not None:
            primitive.AffectedSOPInstanceUID = instance_uid
        primitive.Status = status
        assert acceptor._store_response_command(primitive) == reference(primitive)
    primitive.ErrorComment = "disk full"
    assert acceptor._store_response_command(primitive) is None  # pynetdicom's own path


def test_quick_store_file_header_is_pynetdicoms() -> None:
    for class_uid, instance_uid, syntax in itertools.product(
            [CTImageStorage, "1.2.840.10008.5.1.4.1.1.2.1"], ["1.2.3.4", "1.2.3.45", "9" * 64],
            [ExplicitVRLittleEndian, "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1.99"]):
        assert acceptor.store_file_header(UID(class_uid), UID(instance_uid), UID(syntax)) == _pynetdicom_header(
            class_uid, instance_uid, syntax)
    assert acceptor.store_file_header(UID(CTImageStorage), UID(""), UID(ExplicitVRLittleEndian)) is None
