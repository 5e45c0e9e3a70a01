"""Validate and spool one received object: the whole of what the C-STORE handler does (no network code).

The handler runs in the association's thread and the sender waits for its answer, so this does the least that
keeps the spool trustworthy: parse the header (and check the pixel data is all there), check the UIDs that key
the spool, write the raw bytes as received (temp file + atomic rename), note the instance in the state store,
answer. Decoding happens later, in the workers.

Status codes (PS3.4 B.2.3 / GG.4; the C-STORE response carries the code and an Error Comment):

* ``0x0000`` success; also for a re-sent instance (nothing rewritten, nothing re-triggered) and for an
  ignored storage class (``node.other_storage: ignore``).
* ``0xA700`` *Refused: Out of Resources*, only for a genuine shortage: the spool's disk is below
  ``node.min_free_disk_mb`` or a write to it failed. The object is not quarantined (no room, and the sender
  still has it): a PACS retries this status, and a retry can succeed once space returns.
* ``0xA900`` *Error: Data Set does not match SOP Class*: the dataset's SOP Class UID differs from the
  command's (quarantined).
* ``0xC0xx`` *Error: Cannot understand* (quarantined; retrying the same object cannot succeed):
  ``0xC001`` not DICOM, unparseable or truncated (incl. Pixel Data shorter than declared or missing);
  ``0xC002`` Study/Series/SOP Instance UID empty or invalid (they name the spool's folders and files);
  ``0xC003`` the dataset's SOP Instance UID differs from the command's.
* ``0x0110`` *Processing failure*: handling failed in a way no rule foresaw (a bug); quarantined when the
  object is still at hand (:meth:`Ingestor.fail_unexpected`).

Every refusal of an object that arrived is quarantined with a reason file; what counts as malformed, and how
it is found without loading the pixels, is :mod:`dicom_node.receive.header_check`.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from config.settings import Settings
from dicom_node.receive.header_check import (
    STATUS_BAD_UIDS,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_SOP_INSTANCE_MISMATCH,
    STATUS_SUCCESS,
    STATUS_UNREADABLE,
    RefusedObject,
    kind,
    read_header,
    value,
)
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


def _short(error: BaseException, limit: int = 200) -> str:
    text = str(error).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _uids(dataset: Dataset, sop_class_uid: str, sop_instance_uid: str) -> tuple[str, str, str]:
    """(study, series, sop) UIDs after checking them against each other and the C-STORE command."""
    try:
        study = check_uid(value(dataset, "StudyInstanceUID", STATUS_BAD_UIDS), "StudyInstanceUID")
        series = check_uid(value(dataset, "SeriesInstanceUID", STATUS_BAD_UIDS), "SeriesInstanceUID")
        sop = check_uid(value(dataset, "SOPInstanceUID", STATUS_BAD_UIDS), "SOPInstanceUID")
    except InvalidUIDError as error:
        raise RefusedObject(STATUS_BAD_UIDS, str(error)) from None
    dataset_class = str(value(dataset, "SOPClassUID") or "").strip().rstrip("\x00")
    if dataset_class != sop_class_uid:
        raise RefusedObject(STATUS_SOP_CLASS_MISMATCH, f"dataset SOP Class UID {dataset_class[:80]!r} differs "
                            f"from the command's {sop_class_uid!r}")
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

    def count(self, outcome: IngestOutcome) -> None:
        """Count an answer given elsewhere (a receiving process, dicom_node.receive.receivers)."""
        if outcome.ok:
            self._count("ignored" if outcome.ignored else "duplicate" if outcome.duplicate else "stored")
        else:
            self._count({STATUS_OUT_OF_RESOURCES: "out_of_resources",
                         STATUS_PROCESSING_FAILURE: "failed"}.get(outcome.status, "refused"))

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
                header = read_header(io.BytesIO(data), len(data), require_pixels=not takes_report)
            else:
                assert path is not None
                with open(path, "rb") as handle:
                    header = read_header(handle, os.fstat(handle.fileno()).st_size, require_pixels=not takes_report)
            dataset = header.dataset
            study, series, sop = _uids(dataset, sop_class_uid, sop_instance_uid)
        except RefusedObject as refused:
            return self._refuse(data, path, refused, context)
        except Exception as error:  # noqa: BLE001 - any other failure to understand the object is still its data's
            refused = RefusedObject(STATUS_UNREADABLE, f"header check failed ({kind(error)})")
            return self._refuse(data, path, refused, context)
        if takes_report:  # kept apart from the CT spool: a report is no instance of its study's assembly
            assert self.reports is not None
            return self.reports.receive(dataset, data, path, study=study, sop=sop, context=context)
        syntax = header.transfer_syntax
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
        try:
            inserted = self.store.record_instance(record, calling_ae, peer_ip, quiet,
                                                  header=partial(study_attributes_from_header, dataset, study))
        except (sqlite3.OperationalError, OSError) as error:
            # Transient (database locked by another process, I/O): the spooled file stays, the PACS retries, and the
            # retry records it (it is not a known instance yet). 0x0110 would strand it until the next restart.
            self._count("out_of_resources")
            logger.error("event=state_write_failed status=0x%04X sop_uid=%s error=%s", STATUS_OUT_OF_RESOURCES, sop,
                         type(error).__name__)
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, "could not record the instance; retry later")
        self._count("stored" if inserted else "duplicate")
        logger.debug("event=instance_stored study_uid=%s series_uid=%s sop_uid=%s bytes=%d new=%s", study,
                     series, sop, size, inserted)
        return IngestOutcome(STATUS_SUCCESS, "", record, duplicate=not inserted)

    def fail_unexpected(self, source: bytes | Path | None, error: BaseException, *, calling_ae: str, peer_ip: str,
                        sop_class_uid: str, sop_instance_uid: str) -> IngestOutcome:
        """The answer when handling an object failed in a way no rule foresaw (a bug of ours): the object is
        quarantined if it is still at hand, and the status is *Processing failure* (0x0110), not 0xA700 (which
        tells a PACS to resend an object that would fail again) and not 0xC0xx (its data may be fine)."""
        context: dict[str, Any] = {"calling_ae": calling_ae, "peer_ip": peer_ip, "sop_class_uid": sop_class_uid,
                                   "sop_instance_uid": sop_instance_uid}
        self._count("failed")
        reason = f"internal error while storing ({kind(error)})"
        kept = isinstance(source, (bytes, bytearray)) or (isinstance(source, Path) and source.is_file())
        if kept:
            try:
                quarantine(self.layout, source, reason,  # type: ignore[arg-type]
                           status=f"0x{STATUS_PROCESSING_FAILURE:04X}", **context)
            except OSError as quarantine_error:
                kept = False
                logger.error("event=quarantine_failed error=%r sop_uid=%s", _short(quarantine_error),
                             sop_instance_uid)
        logger.error("event=store_failed status=0x%04X reason=%r quarantined=%s calling_ae=%s sop_uid=%s",
                     STATUS_PROCESSING_FAILURE, reason, kept, calling_ae, sop_instance_uid)
        return IngestOutcome(STATUS_PROCESSING_FAILURE, reason[:64])

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
    for partial_object in layout.incoming.glob("*"):  # received in part when the node stopped; the sender resends
        partial_object.unlink(missing_ok=True)
    recorded = 0
    for path in sorted(layout.spool.glob("*/*/*.dcm")):
        if store.known_instance(path.stem):
            continue
        size = path.stat().st_size
        try:
            with open(path, "rb") as handle:
                header = read_header(handle, size)
            dataset = header.dataset
            sop_class_uid = str(value(dataset, "SOPClassUID") or "").strip().rstrip("\x00")
            study, series, sop = _uids(dataset, sop_class_uid, path.stem)
            if (study, series) != (path.parent.parent.name, path.parent.name):
                raise RefusedObject(STATUS_BAD_UIDS, "UIDs differ from the file's place in the spool")
        except RefusedObject as refused:
            quarantine(layout, path, f"spool file at reconcile: {refused.reason}", status=f"0x{refused.status:04X}",
                       sop_instance_uid=path.stem)
            continue
        record = InstanceRecord(sop_uid=sop, study_uid=study, series_uid=series,
                                sop_class_uid=sop_class_uid, transfer_syntax=header.transfer_syntax, path=path,
                                size=size)
        if store.record_instance(record, None, None, quiet_seconds, now=time.time(),
                                 header=partial(study_attributes_from_header, dataset, study)):
            recorded += 1
    if recorded:
        logger.warning("event=spool_reconciled recorded=%d reason='spool files without a database row'", recorded)
    backfill_study_attributes(store)  # data folders from before study attributes were kept: once
    return recorded
