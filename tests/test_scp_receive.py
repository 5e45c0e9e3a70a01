"""The receive side with real peers: dcmtk echoscu/storescu and a pynetdicom SCU that sends broken objects as
they are, against the node's StorageSCP on 127.0.0.1 (free port). Each test checks what the spool, the state
store and the quarantine hold afterwards, and that the SCP still answers C-ECHO."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from node_helpers import dataset_bytes, echoscu, meta_end, nodelay_env, require_tools, storescp, storescu, wait_for
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid
from receive_helpers import CT_IMAGE_STORAGE, receive_settings, running_scp, send_dataset, send_files

from dicom_node.receive.ingest import (
    STATUS_BAD_UIDS,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_SOP_INSTANCE_MISMATCH,
    STATUS_UNREADABLE,
    Ingestor,
    reconcile_spool,
)
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import StateStore

SERIES = "Lung_Dx-A0002_series2_B70f"  # 30 slices, Explicit VR Little Endian
SERIES_IMPLICIT = "Lung_Dx-A0001_series2_5mm"  # 64 slices, Implicit VR Little Endian


def _echo_output(port: int, calling_ae: str) -> subprocess.CompletedProcess:
    require_tools("echoscu")
    return subprocess.run(["echoscu", "-v", "-aet", calling_ae, "-aec", "MEDFINDER", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30, env=nodelay_env())


def _spool_files(layout: NodeLayout) -> list[Path]:
    return sorted(layout.spool.glob("*/*/*.dcm"))


def _quarantined(layout: NodeLayout) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(layout.quarantine.glob("*.dcm")):
        reason = path.with_name(path.name[:-4] + ".reason.json")
        assert reason.is_file(), f"no reason file next to {path.name}"
        found.append((path, json.loads(reason.read_text())))
    return found


def _as_sent_by_storescu(tmp_path: Path, files: Path | list[Path], extra: list[str],
                         storescp_options: tuple[str, ...]) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes exactly as storescu puts them on the wire, captured by a dcmtk
    storescp in bit-preserving mode (+B) that accepts the transfer syntax our SCP negotiates. storescu
    re-encodes (e.g. undefined-length sequences get explicit lengths), so this, not the source file, is
    "what was sent"."""
    out = tmp_path / "dcmtk-reference"
    with storescp(out, "MEDFINDER", options=storescp_options) as port:
        result = storescu(port, files, extra=extra)
        assert result.returncode == 0, result.stderr[-2000:]
    captured = {}
    for path in out.iterdir():
        captured[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = dataset_bytes(path)
    return captured


def test_echo_answers(tmp_path: Path) -> None:
    with running_scp(tmp_path / "node") as node:
        assert echoscu(node.port)


def test_storescu_series_spooled_as_sent_and_resend_is_harmless(tmp_path: Path, lung_ct_dir: Path) -> None:
    """A series sent by storescu lands byte for byte (dataset part) in the spool, one row per instance;
    the same series again is all successes, with no new rows, no rewritten file and no new notification."""
    series = lung_ct_dir / SERIES_IMPLICIT
    sent = _as_sent_by_storescu(tmp_path, series, [], ("+xi",))  # the files are implicit VR, kept so by us
    with running_scp(tmp_path / "node") as node:
        result = storescu(node.port, series)
        assert result.returncode == 0, result.stderr[-2000:]
        files = _spool_files(node.layout)
        assert len(files) == len(sent) == 64
        for path in files:
            assert dataset_bytes(path) == sent[path.stem], f"{path.name} differs from what was sent"
        study_uid = files[0].parent.parent.name
        assert len(node.store.instances(study_uid)) == 64
        assert node.store.study(study_uid).n_instances == 64
        assert len(node.stored) == 64
        mtimes = {p: p.stat().st_mtime_ns for p in files}

        again = storescu(node.port, series)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "Status" not in again.stderr or "Success" in again.stderr
        assert len(node.store.instances(study_uid)) == 64
        assert node.store.study(study_uid).n_instances == 64
        assert len(node.stored) == 64, "a re-sent instance notified the assembler again"
        assert {p: p.stat().st_mtime_ns for p in _spool_files(node.layout)} == mtimes
        assert node.scp.ingestor.counts["duplicate"] == 64
        assert not list(node.layout.quarantine.iterdir())
        assert echoscu(node.port)


# storescu proposes one compressed transfer syntax per option, so each NEMA encoding gets its own run.
PROPOSE = {"J2KR": "-xv", "J2KI": "-xw", "JLSL": "-xt", "JLSN": "-xu", "JPLL": "-xs", "RLE": "-xr", "UNC": "-xe"}


def test_storescu_compressed_kept_as_received(tmp_path: Path, shared_data: Path) -> None:
    """storescu -R with -xs (JPEG lossless), -xv/-xw (JPEG 2000), -xt/-xu (JPEG-LS), -xr (RLE) sends the NEMA
    files in their own syntaxes; each is spooled exactly as sent (compared with a bit-preserving dcmtk
    storescp fed the same way) and recorded with its syntax."""
    nema = shared_data / "ct" / "nema-wg04-ct"
    files = sorted(nema.glob("*.dcm"))
    sent: dict[str, bytes] = {}
    for encoding, option in PROPOSE.items():
        sent.update(_as_sent_by_storescu(tmp_path / encoding, sorted(nema.glob(f"*_{encoding}.dcm")),
                                         ["-R", option], ("+xa",)))
    with running_scp(tmp_path / "node", stream_to_disk=False) as node:
        for encoding, option in PROPOSE.items():
            result = storescu(node.port, sorted(nema.glob(f"*_{encoding}.dcm")), extra=["-R", option])
            assert result.returncode == 0, f"{encoding}: {result.stderr[-2000:]}"
        spooled = {p.stem: p for p in _spool_files(node.layout)}
        assert len(spooled) == len(files) == len(sent) == 14
        for source in files:
            source_header = dcmread(source, stop_before_pixels=True)
            target = spooled[source_header.SOPInstanceUID]
            assert dataset_bytes(target) == sent[source_header.SOPInstanceUID], source.name
            assert dcmread(target).file_meta.TransferSyntaxUID == source_header.file_meta.TransferSyntaxUID
            assert dcmread(target).PixelData == dcmread(source).PixelData, f"{source.name}: pixel data changed"
        syntaxes = {row["transfer_syntax"] for study in {p.parent.parent.name for p in spooled.values()}
                    for row in node.store.instances(study)}
        assert {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.80",
                "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5"} <= syntaxes
        assert echoscu(node.port)


def _ct_file(source: Path, target: Path, cut: int = 0, garbage: bytes | None = None,
             meta_sop_uid: str | None = None) -> Path:
    """A copy of ``source``, optionally cut short by ``cut`` bytes, with its dataset replaced by ``garbage``,
    or with another SOP Instance UID in its file meta (what the SCU puts in the C-STORE command)."""
    data = source.read_bytes()
    if meta_sop_uid is not None:  # patched in place (same length) so the dataset bytes stay as they were
        uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID).encode()
        assert len(meta_sop_uid) == len(uid)
        end = meta_end(data)
        data = data[:end].replace(uid, meta_sop_uid.encode(), 1) + data[end:]
    if garbage is not None:
        data = data[:meta_end(data)] + garbage
    if cut:
        data = data[:-cut]
    target.write_bytes(data)
    return target


def _other_uid(source: Path) -> str:
    uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    return uid[:-1] + ("1" if uid[-1] != "1" else "2")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's own warnings while it parses the garbage
@pytest.mark.parametrize("stream_to_disk", [True, False], ids=["streamed", "in-memory"])
def test_bad_objects_refused_and_quarantined(tmp_path: Path, lung_ct_dir: Path, stream_to_disk: bool) -> None:
    """Non-DICOM, truncated and inconsistent objects get failure statuses, land in quarantine with a reason
    file (no PHI), and the SCP keeps serving after each."""
    source = sorted((lung_ct_dir / SERIES).glob("*.dcm"))[0]
    work = tmp_path / "inputs"
    work.mkdir()
    cases = {
        "non_dicom": (_ct_file(source, work / "garbage.dcm", garbage=os.urandom(5000) + b"not DICOM at all"),
                      STATUS_UNREADABLE),
        "truncated_pixels": (_ct_file(source, work / "truncated.dcm", cut=100_000), STATUS_UNREADABLE),
        "truncated_header": (_ct_file(source, work / "header.dcm", cut=source.stat().st_size - meta_end(
            source.read_bytes()) - 300), STATUS_UNREADABLE),
        "sop_uid_mismatch": (_ct_file(source, work / "mismatch.dcm", meta_sop_uid=_other_uid(source)),
                             STATUS_SOP_INSTANCE_MISMATCH),
    }
    with running_scp(tmp_path / "node", stream_to_disk=stream_to_disk) as node:
        for name, (path, expected) in cases.items():
            before = len(_quarantined(node.layout))
            statuses = send_files(node.port, [path])
            assert statuses == [expected], f"{name}: {statuses}"
            quarantined = _quarantined(node.layout)
            assert len(quarantined) == before + 1, name
            kept, reason = quarantined[-1] if len(quarantined) == 1 else max(
                quarantined, key=lambda item: item[0].name)
            assert kept.read_bytes()[meta_end(kept.read_bytes()):] == dataset_bytes(path), name
            assert reason["calling_ae"] == "PYSCU" and reason["peer_ip"] == "127.0.0.1"
            assert reason["status"] == f"0x{expected:04X}" and reason["reason"] and reason["time"]
            text = json.dumps(reason)
            assert "PatientName" not in text and str(dcmread(source).PatientID) not in text
            assert echoscu(node.port), f"SCP stopped answering after {name}"
        assert _spool_files(node.layout) == []
        assert node.stored == []


def test_totalsegmentator_blank_uids_refused(tmp_path: Path, shared_data: Path) -> None:
    """The J2K files with empty Study/Series/SOP Instance UIDs: storescu cannot even propose them (their
    dataset's SOP Class UID is blank); sent by an SCU that takes the UIDs from the file meta, each gets
    0xC002 with the reason 'StudyInstanceUID is empty' and is quarantined."""
    folder = shared_data / "ct" / "totalsegmentator-j2k"
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 20
    with running_scp(tmp_path / "node") as node:
        result = storescu(node.port, files[:1], extra=["-xs"])
        assert result.returncode != 0 or "No presentation context" in result.stderr + result.stdout
        statuses = send_files(node.port, files)
        assert statuses == [STATUS_BAD_UIDS] * 20
        quarantined = _quarantined(node.layout)
        assert len(quarantined) == 20
        assert all(reason["reason"] == "StudyInstanceUID is empty" for _, reason in quarantined)
        assert _spool_files(node.layout) == []
        assert echoscu(node.port)


def test_unknown_calling_ae_refused_at_association(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        with running_scp(tmp_path / "node", allow=[{"ae_title": "PACS1"}]) as node:
            refused = _echo_output(node.port, "STRANGER")
            assert refused.returncode != 0
            assert "Association Rejected" in refused.stdout + refused.stderr
            assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
            assert echoscu(node.port, calling_ae="PACS1")
            with pytest.raises(ConnectionError):
                send_files(node.port, [], calling_ae="STRANGER")
    assert any("event=association_rejected" in r.getMessage() and "STRANGER" in r.getMessage()
               for r in caplog.records)
    assert not any("event=allow_list_empty" in r.getMessage() for r in caplog.records)


def test_known_ae_from_wrong_ip_refused(tmp_path: Path) -> None:
    """PACS1 is bound to 10.0.0.99 and so refused from 127.0.0.1; PACS2 bound to 127.0.0.1 is accepted."""
    allow = [{"ae_title": "PACS1", "host": "10.0.0.99"}, {"ae_title": "PACS2", "host": "127.0.0.1"}]
    with running_scp(tmp_path / "node", allow=allow) as node:
        refused = _echo_output(node.port, "PACS1")
        assert refused.returncode != 0 and "Association Rejected" in refused.stdout + refused.stderr
        assert echoscu(node.port, calling_ae="PACS2")


def test_empty_allow_list_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        with running_scp(tmp_path / "node") as node:
            port = node.port
            assert echoscu(port, calling_ae="ANYONE")
    warnings = [r for r in caplog.records if "event=allow_list_empty" in r.getMessage()]
    assert warnings and warnings[0].levelno == logging.WARNING
    assert any("event=scp_ready" in r.getMessage() and f"port={port}" in r.getMessage()
               for r in caplog.records)


def _secondary_capture() -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "OT"
    dataset.Rows = dataset.Columns = 4
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = bytes(16)
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset


def test_other_storage_classes_ignored_or_refused(tmp_path: Path) -> None:
    with running_scp(tmp_path / "ignore", other_storage="ignore") as node:
        assert send_dataset(node.port, _secondary_capture()) == 0x0000
        assert node.scp.ingestor.counts["ignored"] == 1
        assert _spool_files(node.layout) == [] and node.stored == []
    with running_scp(tmp_path / "refuse", other_storage="refuse") as node:
        assert send_dataset(node.port, _secondary_capture()) is None  # no presentation context accepted
        assert node.scp.ingestor.counts["ignored"] == 0


def test_studies_in_flight_while_association_open(tmp_path: Path, lung_ct_dir: Path) -> None:
    files = sorted((lung_ct_dir / SERIES).glob("*.dcm"))[:2]
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    seen: list[set[str]] = []
    with running_scp(tmp_path / "node") as node:
        statuses = send_files(node.port, files, keep_open=lambda _assoc: seen.append(node.scp.studies_in_flight()))
        assert statuses == [0, 0]
        assert seen == [{study_uid}]
        wait_for(lambda: node.scp.studies_in_flight() == set(), 10, "the closed association to leave in-flight")


def test_sop_class_mismatch_and_low_disk(tmp_path: Path, lung_ct_dir: Path) -> None:
    """Ingestor rules without the network: 0xA900 for a dataset of another class than the command's (kept in
    quarantine); 0xA700 when the spool disk is below the watermark (not quarantined: the sender retries)."""
    source = sorted((lung_ct_dir / SERIES).glob("*.dcm"))[0]
    data = source.read_bytes()
    uid = dcmread(source, stop_before_pixels=True).SOPInstanceUID
    layout = NodeLayout.create(tmp_path / "node")
    store = StateStore(layout.state_db)
    try:
        ingestor = Ingestor(receive_settings(layout.root), layout, store)
        outcome = ingestor.store_encoded(data, calling_ae="X", peer_ip="127.0.0.1",
                                         sop_class_uid=EnhancedCTImageStorage, sop_instance_uid=uid)
        assert outcome.status == STATUS_SOP_CLASS_MISMATCH and "SOP Class" in outcome.comment
        assert len(_quarantined(layout)) == 1

        full = Ingestor(receive_settings(layout.root, min_free_disk_mb=1e12), layout, store)
        outcome = full.store_encoded(data, calling_ae="X", peer_ip="127.0.0.1", sop_class_uid=CT_IMAGE_STORAGE,
                                     sop_instance_uid=uid)
        assert outcome.status == STATUS_OUT_OF_RESOURCES
        assert len(_quarantined(layout)) == 1 and _spool_files(layout) == []

        stored = ingestor.store_encoded(data, calling_ae="X", peer_ip="127.0.0.1", sop_class_uid=CT_IMAGE_STORAGE,
                                        sop_instance_uid=uid)
        assert stored.ok and not stored.duplicate and stored.record.path.read_bytes() == data
    finally:
        store.close()


def test_reconcile_spool_records_orphans(tmp_path: Path, lung_ct_dir: Path) -> None:
    """A spool file without a database row (node killed between rename and insert) is recorded at start;
    half-written temp files are removed; a second pass finds nothing."""
    source = sorted((lung_ct_dir / SERIES).glob("*.dcm"))[0]
    header = dcmread(source, stop_before_pixels=True)
    layout = NodeLayout.create(tmp_path / "node")
    target = layout.instance_path(header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID)
    target.parent.mkdir(parents=True)
    shutil.copyfile(source, target)
    part = target.with_name(f".{target.name}.abc.part")
    part.write_bytes(b"half")
    store = StateStore(layout.state_db)
    try:
        assert not store.known_instance(header.SOPInstanceUID)
        assert reconcile_spool(layout, store) == 1
        assert store.known_instance(header.SOPInstanceUID)
        study = store.study(header.StudyInstanceUID)
        assert study is not None and study.n_instances == 1 and study.state == "receiving"
        assert not part.exists()
        assert reconcile_spool(layout, store) == 0
    finally:
        store.close()


def test_big_object_streams_to_disk(tmp_path: Path, lung_ct_dir: Path) -> None:
    """With streaming on, pynetdicom writes each dataset to a temp file and the handler moves that file into
    the spool: the in-memory path is never taken, and the spooled bytes are what was sent."""
    files = sorted((lung_ct_dir / SERIES).glob("*.dcm"))[:3]
    with running_scp(tmp_path / "node", stream_to_disk=True) as node:
        def in_memory(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("the in-memory path was used while streaming")

        node.scp.ingestor.store_encoded = in_memory  # type: ignore[method-assign]
        started = time.monotonic()
        assert send_files(node.port, files) == [0, 0, 0]
        assert time.monotonic() - started < 30
        spooled = _spool_files(node.layout)
        assert len(spooled) == 3
        for path in spooled:
            assert dataset_bytes(path) == dataset_bytes(next(f for f in files if dcmread(
                f, stop_before_pixels=True).SOPInstanceUID == path.stem))
