"""Validate and spool one received object: the whole of what the C-STORE handler does (no network code).

The handler runs in the association's thread and the sender waits for its answer, so this does the least that
keeps the spool trustworthy: parse the header (and check the pixel data is all there), check the UIDs that key
the spool, write the raw bytes as received (temp file + atomic rename), note the instance in the state store,
answer. Decoding happens later, in the workers.

Status codes (PS3.4 B.2.3 / GG.4; the C-STORE response carries the code and an Error Comment):

* ``0x0000`` success; also for a re-sent instance (nothing rewritten, nothing re-triggered) and for an
  ignored storage class (``node.other_storage: ignore``).
* ``0xA700`` *Refused: Out of Resources*: the spool's disk is below ``node.min_free_disk_mb`` or a write
  failed. The object is not quarantined (no room, and the sender still has it): a PACS retries this status.
* ``0xA900`` *Error: Data Set does not match SOP Class*: the dataset's SOP Class UID differs from the
  command's (quarantined).
* ``0xC0xx`` *Error: Cannot understand* (quarantined; retrying the same object cannot succeed):
  ``0xC001`` not DICOM, unparseable or truncated (incl. Pixel Data shorter than declared or missing);
  ``0xC002`` Study/Series/SOP Instance UID empty or invalid (they name the spool's folders and files);
  ``0xC003`` the dataset's SOP Instance UID differs from the command's.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage

from config.settings import Settings
from dicom_node.receive.quarantine import move_file, quarantine
from dicom_node.receive.study_header import backfill_study_attributes, study_attributes_from_header
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import InstanceRecord, StateStore
from model_export.atomic_files import write_atomic
from workers.dicom_uids import InvalidUIDError, check_uid

if TYPE_CHECKING:
    from dicom_node.receive.report_sr import ReportReceiver

logger = logging.getLogger(__name__)

CT_STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_UNREADABLE = 0xC001
STATUS_BAD_UIDS = 0xC002
STATUS_SOP_INSTANCE_MISMATCH = 0xC003

# Values larger than this stay on disk while parsing (a streamed big object is not read into memory).
_DEFER_BYTES = 64 * 1024
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one C-STORE: the DIMSE status to answer with and what was kept."""

    status: int
    comment: str = ""
    record: InstanceRecord | None = None
    duplicate: bool = False
    ignored: bool = False

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCESS


class RefusedObject(Exception):
    """An object that cannot be stored: carries the status and the (PHI-free) reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _read_header(source: IO[bytes], total_size: int, require_pixels: bool = True) -> Dataset:
    """Parse a Part 10 object; :class:`RefusedObject` (0xC001) if it is not DICOM or is cut short.

    pydicom reads a defined-length value that runs past the end of the file without complaint and only warns
    about an undefined-length one (then drops it), so completeness is checked here: every raw top-level value
    must end inside the file, Pixel Data must be present, and native Pixel Data must hold all the bytes its
    rows, columns, samples, bits and frames imply.
    """
    try:
        dataset = dcmread(source, defer_size=_DEFER_BYTES)
    except (InvalidDicomError, EOFError) as error:
        raise RefusedObject(STATUS_UNREADABLE, f"not a DICOM Part 10 object: {_short(error)}") from None
    except Exception as error:  # pydicom raises many types on garbage (struct.error, ValueError, zlib.error)
        # Only the type: a conversion error's message can quote an element's value, which may be PHI.
        kind = f"{type(error).__module__}.{type(error).__name__}"
        raise RefusedObject(STATUS_UNREADABLE, f"unparseable DICOM ({kind})") from None
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise RefusedObject(STATUS_UNREADABLE, "no Transfer Syntax UID in the file meta")
    deflated = UID(syntax) == "1.2.840.10008.1.2.1.99"
    if not deflated:  # a deflated dataset is parsed from its inflated copy; zlib already caught truncation
        for tag in dataset.keys():
            element = dataset.get_item(tag)
            length = getattr(element, "length", 0)
            tell = getattr(element, "value_tell", None)
            if tell is not None and length != 0xFFFFFFFF and tell + length > total_size:
                raise RefusedObject(STATUS_UNREADABLE, f"truncated: element {tag} declares {length} bytes at "
                                    f"offset {tell}, object is {total_size} bytes")
    if not require_pixels:  # a report SR: no pixels to check
        return dataset
    pixel_tags = [tag for tag in _PIXEL_TAGS if tag in dataset]
    if not pixel_tags:
        raise RefusedObject(STATUS_UNREADABLE, "no Pixel Data (truncated, or not an image)")
    if not UID(syntax).is_compressed:
        _check_native_pixel_length(dataset, _value_length(dataset.get_item(pixel_tags[0])))
    return dataset


def _value_length(element: Any) -> int:
    """Bytes of a value as read: the declared length of a raw (possibly deferred) element, else the length of
    the value pydicom already converted (ambiguous-VR elements such as implicit VR Pixel Data are)."""
    if hasattr(element, "length"):
        return int(element.length)
    value = element.value
    return len(value) if isinstance(value, (bytes, bytearray)) else 0


def _check_native_pixel_length(dataset: Dataset, length: int) -> None:
    try:
        frames = int(dataset.get("NumberOfFrames") or 1)
        expected_bits = (int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel") or 1)
                         * int(dataset.BitsAllocated) * frames)
    except (AttributeError, TypeError, ValueError) as error:
        raise RefusedObject(STATUS_UNREADABLE, f"image pixel description missing or invalid: {_short(error)}"
                            ) from None
    expected = (expected_bits + 7) // 8
    if length < expected:
        raise RefusedObject(STATUS_UNREADABLE, f"truncated: Pixel Data has {length} bytes, the image needs "
                            f"{expected}")


def _short(error: BaseException, limit: int = 200) -> str:
    text = str(error).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _uids(dataset: Dataset, sop_class_uid: str, sop_instance_uid: str) -> tuple[str, str, str]:
    """(study, series, sop) UIDs after checking them against each other and the C-STORE command."""
    try:
        study = check_uid(dataset.get("StudyInstanceUID"), "StudyInstanceUID")
        series = check_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID")
        sop = check_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID")
    except InvalidUIDError as error:
        raise RefusedObject(STATUS_BAD_UIDS, str(error)) from None
    dataset_class = str(dataset.get("SOPClassUID") or "").strip().rstrip("\x00")
    if dataset_class != sop_class_uid:
        raise RefusedObject(STATUS_SOP_CLASS_MISMATCH, f"dataset SOP Class UID {dataset_class!r} differs from "
                            f"the command's {sop_class_uid!r}")
    if sop != sop_instance_uid:
        raise RefusedObject(STATUS_SOP_INSTANCE_MISMATCH, f"dataset SOP Instance UID {sop!r} differs from the "
                            f"command's {sop_instance_uid!r}")
    return study, series, sop


class Ingestor:
    """Validates and spools received objects; one instance serves every association (thread-safe)."""

    def __init__(self, settings: Settings, layout: NodeLayout, store: StateStore) -> None:
        self.settings = settings
        self.layout = layout
        self.store = store
        self.counts: Counter[str] = Counter()  # stored, duplicate, ignored, refused, out_of_resources
        # Radiology report SRs (set by the node: dicom_node.receive.report_sr); None = ignored as other storage.
        self.reports: ReportReceiver | None = None
        self._lock = threading.Lock()

    # --- public -------------------------------------------------------------------------------------

    def store_encoded(self, data: bytes, *, calling_ae: str, peer_ip: str, sop_class_uid: str,
                      sop_instance_uid: str) -> IngestOutcome:
        """Handle one object held in memory (file meta included, as ``encoded_dataset(include_meta=True)``)."""
        return self._ingest(data, None, calling_ae=calling_ae, peer_ip=peer_ip, sop_class_uid=sop_class_uid,
                            sop_instance_uid=sop_instance_uid)

    def store_file(self, path: Path | str, *, calling_ae: str, peer_ip: str, sop_class_uid: str,
                   sop_instance_uid: str) -> IngestOutcome:
        """Handle one object streamed to ``path`` (a Part 10 file); the file is moved (spool or quarantine)
        or, for duplicates and ignored classes, deleted."""
        return self._ingest(None, Path(path), calling_ae=calling_ae, peer_ip=peer_ip,
                            sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid)

    def is_ct_class(self, sop_class_uid: str) -> bool:
        return sop_class_uid in CT_STORAGE_CLASSES

    # --- steps ----------------------------------------------------------------------------------------

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _ingest(self, data: bytes | None, path: Path | None, *, calling_ae: str, peer_ip: str,
                sop_class_uid: str, sop_instance_uid: str) -> IngestOutcome:
        sop_class_uid = str(sop_class_uid or "").strip().rstrip("\x00")
        sop_instance_uid = str(sop_instance_uid or "").strip().rstrip("\x00")
        context: dict[str, Any] = {"calling_ae": calling_ae, "peer_ip": peer_ip, "sop_class_uid": sop_class_uid,
                                   "sop_instance_uid": sop_instance_uid}
        takes_report = self.reports is not None and self.reports.takes(sop_class_uid)
        if not self.is_ct_class(sop_class_uid) and not takes_report:
            return self._ignore(path, context)
        if not self._disk_has_room():
            self._discard(path)
            self._count("out_of_resources")
            comment = f"spool disk below {self.settings.node.min_free_disk_mb:g} MB free"
            logger.error("event=store_refused status=0x%04X reason=%r calling_ae=%s sop_uid=%s",
                         STATUS_OUT_OF_RESOURCES, comment, calling_ae, sop_instance_uid)
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, comment)
        try:
            if data is not None:
                dataset = _read_header(io.BytesIO(data), len(data), require_pixels=not takes_report)
            else:
                assert path is not None
                with open(path, "rb") as handle:
                    dataset = _read_header(handle, os.fstat(handle.fileno()).st_size, require_pixels=not takes_report)
            study, series, sop = _uids(dataset, sop_class_uid, sop_instance_uid)
        except RefusedObject as refused:
            return self._refuse(data, path, refused, context)
        if takes_report:  # kept apart from the CT spool: a report is no instance of its study's assembly
            assert self.reports is not None
            return self.reports.receive(dataset, data, path, study=study, sop=sop, context=context)
        syntax = str(dataset.file_meta.TransferSyntaxUID)
        target = self.layout.instance_path(study, series, sop)
        size = len(data) if data is not None else path.stat().st_size  # type: ignore[union-attr]
        record = InstanceRecord(sop_uid=sop, study_uid=study, series_uid=series, sop_class_uid=sop_class_uid,
                                transfer_syntax=syntax, path=target, size=size)
        if self.store.known_instance(sop) and target.is_file():
            self._discard(path)
            self._count("duplicate")
            logger.info("event=instance_duplicate study_uid=%s sop_uid=%s calling_ae=%s", study, sop, calling_ae)
            return IngestOutcome(STATUS_SUCCESS, "", record, duplicate=True)
        try:
            if data is not None:
                write_atomic(target, data)
            else:
                move_file(path, target)  # type: ignore[arg-type]
        except OSError as error:
            self._discard(path)
            self._count("out_of_resources")
            logger.error("event=spool_write_failed status=0x%04X sop_uid=%s error=%r", STATUS_OUT_OF_RESOURCES,
                         sop, _short(error))
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, f"could not write to the spool: {_short(error, 80)}")
        quiet = self.settings.node.quiet_seconds_for(calling_ae)
        inserted = self.store.record_instance(record, calling_ae, peer_ip, quiet,
                                              header=partial(study_attributes_from_header, dataset, study))
        self._count("stored" if inserted else "duplicate")
        logger.debug("event=instance_stored study_uid=%s series_uid=%s sop_uid=%s bytes=%d new=%s", study,
                     series, sop, size, inserted)
        return IngestOutcome(STATUS_SUCCESS, "", record, duplicate=not inserted)

    def _ignore(self, path: Path | None, context: dict[str, Any]) -> IngestOutcome:
        self._discard(path)
        self._count("ignored")
        logger.info("event=instance_ignored reason='storage class not CT' sop_class_uid=%s sop_uid=%s "
                    "calling_ae=%s", context["sop_class_uid"], context["sop_instance_uid"], context["calling_ae"])
        return IngestOutcome(STATUS_SUCCESS, "", None, ignored=True)

    def _refuse(self, data: bytes | None, path: Path | None, refused: RefusedObject,
                context: dict[str, Any]) -> IngestOutcome:
        self._count("refused")
        status = f"0x{refused.status:04X}"
        try:
            quarantine(self.layout, data if data is not None else path, refused.reason,  # type: ignore[arg-type]
                       status=status, **context)
        except OSError as error:  # refusing must not fail because the quarantine could not be written
            self._discard(path)
            logger.error("event=quarantine_failed error=%r sop_uid=%s", _short(error), context["sop_instance_uid"])
        logger.warning("event=store_refused status=%s reason=%r calling_ae=%s peer_ip=%s sop_uid=%s", status,
                       refused.reason, context["calling_ae"], context["peer_ip"], context["sop_instance_uid"])
        return IngestOutcome(refused.status, refused.reason[:64])

    def _disk_has_room(self) -> bool:
        floor = self.settings.node.min_free_disk_mb * 1024 * 1024
        if floor <= 0:
            return True
        try:
            return shutil.disk_usage(self.layout.spool).free >= floor
        except OSError:
            return False

    @staticmethod
    def _discard(path: Path | None) -> None:
        if path is not None:
            path.unlink(missing_ok=True)


def reconcile_spool(layout: NodeLayout, store: StateStore, *, quiet_seconds: float = 10.0) -> int:
    """Record spool files the database lacks (a node killed between rename and insert), and give studies
    recorded without study attributes theirs; run at start.

    Also removes the temp files of writes that never finished (nothing else writes the spool while the node
    is down). Files that no longer parse, or whose UIDs disagree with their place, go to quarantine. Returns
    how many instances were recorded.
    """
    for part in layout.spool.glob("**/.*.part"):
        part.unlink(missing_ok=True)
    recorded = 0
    for path in sorted(layout.spool.glob("*/*/*.dcm")):
        if store.known_instance(path.stem):
            continue
        size = path.stat().st_size
        try:
            with open(path, "rb") as handle:
                dataset = _read_header(handle, size)
            study, series, sop = _uids(dataset, str(dataset.get("SOPClassUID") or ""), path.stem)
            if (study, series) != (path.parent.parent.name, path.parent.name):
                raise RefusedObject(STATUS_BAD_UIDS, "UIDs differ from the file's place in the spool")
        except RefusedObject as refused:
            quarantine(layout, path, f"spool file at reconcile: {refused.reason}", status=f"0x{refused.status:04X}",
                       sop_instance_uid=path.stem)
            continue
        record = InstanceRecord(sop_uid=sop, study_uid=study, series_uid=series,
                                sop_class_uid=str(dataset.SOPClassUID), transfer_syntax=str(
                                    dataset.file_meta.TransferSyntaxUID), path=path, size=size)
        if store.record_instance(record, None, None, quiet_seconds, now=time.time(),
                                 header=partial(study_attributes_from_header, dataset, study)):
            recorded += 1
    if recorded:
        logger.warning("event=spool_reconciled recorded=%d reason='spool files without a database row'", recorded)
    backfill_study_attributes(store)  # data folders from before study attributes were kept: once
    return recorded
