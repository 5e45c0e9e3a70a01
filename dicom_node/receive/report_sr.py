"""Radiology reports received as DICOM SR (Basic Text, Enhanced, Comprehensive): kept, read, attached.

The Ingestor has already checked the object (parseable, complete, UIDs valid and matching the command; malformed
ones are quarantined like CTs). Here the SR is kept as received under ``reports/sr/`` — never in the CT spool,
so it is no instance of its study and never starts study assembly or a new result version — its text is read
(:func:`workers.report_text.report_text`) and attached to its StudyInstanceUID through the node.

Our own similar-case result must never be taken for a radiology report if a PACS sends it back. It is a
Comprehensive 3D SR, a class not accepted here, but a PACS may convert it; so an SR is ours when its root
concept or its Coding Scheme Identification uses our private scheme ``99MEDFINDER``, or when its manufacturer
and series description are those we write (``results.manufacturer``, "MedFinder similar cases"). Ours are
accepted and discarded (success), as other storage classes are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from config.settings import Settings
from dicom_node.receive.ingest import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, IngestOutcome
from dicom_node.report.similar_case_sr import SCHEME, SERIES_DESCRIPTION
from dicom_node.store.reports import ReportStore
from workers.report_text import REPORT_SR_CLASSES, report_text

logger = logging.getLogger(__name__)

# attach(study_uid, text, source, sop_instance_uid=...): the node's report attachment
Attach = Callable[..., object]


def is_own_result(dataset: Dataset, manufacturer: str) -> bool:
    """Whether this SR is a MedFinder similar-case result (ours), whatever SOP class it arrives as; an
    unreadable value (pydicom converts on first access) means not ours: the SR is kept as received."""
    try:
        return _is_own_result(dataset, manufacturer)
    except Exception:  # noqa: BLE001 - received data; garbage raises many types
        return False


def _is_own_result(dataset: Dataset, manufacturer: str) -> bool:
    names = dataset.get("ConceptNameCodeSequence")
    if names and str(names[0].get("CodingSchemeDesignator", "")).strip() == SCHEME:
        return True
    for scheme in dataset.get("CodingSchemeIdentificationSequence") or []:
        if str(scheme.get("CodingSchemeDesignator", "")).strip() == SCHEME:
            return True
    return (str(dataset.get("Manufacturer", "")).strip() == manufacturer
            and str(dataset.get("SeriesDescription", "")).strip() == SERIES_DESCRIPTION)


class ReportReceiver:
    """The SR branch of the C-STORE handler (runs in the association's thread)."""

    def __init__(self, settings: Settings, reports: ReportStore, attach: Attach) -> None:
        self.settings = settings
        self.reports = reports
        self.attach = attach

    @staticmethod
    def takes(sop_class_uid: str) -> bool:
        return sop_class_uid in REPORT_SR_CLASSES

    def receive(self, dataset: Dataset, data: bytes | None, path: Path | None, *, study: str, sop: str,
                context: dict[str, object]) -> IngestOutcome:
        """Keep the SR, read its text and attach it; answers success once the SR is safely kept."""
        calling_ae = context.get("calling_ae")
        if is_own_result(dataset, self.settings.results.manufacturer):
            _discard(path)
            logger.info("event=instance_ignored reason='our own similar-case SR' sop_uid=%s calling_ae=%s", sop,
                        calling_ae)
            return IngestOutcome(STATUS_SUCCESS, "", None, ignored=True)
        target = self.reports.sr_path(study, sop)
        if target.is_file():
            _discard(path)
            logger.info("event=report_sr_duplicate study_uid=%s sop_uid=%s calling_ae=%s", study, sop, calling_ae)
            return IngestOutcome(STATUS_SUCCESS, "", None, duplicate=True)
        try:
            raw = data if data is not None else path.read_bytes()  # type: ignore[union-attr]
            self.reports.save_sr(study, sop, raw)
        except OSError as error:
            _discard(path)
            logger.error("event=report_sr_write_failed sop_uid=%s error=%r", sop, type(error).__name__)
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, "could not keep the report SR")
        _discard(path)
        try:
            text = report_text(dcmread(target))  # the whole SR (the Ingestor's parse deferred large values)
        except Exception as error:  # noqa: BLE001 - kept as received; a retry of the same object cannot help
            logger.error("event=report_unreadable study_uid=%s sop_uid=%s error=%s", study, sop, type(error).__name__)
            return IngestOutcome(STATUS_SUCCESS, "")
        if not text:
            logger.warning("event=report_empty study_uid=%s sop_uid=%s calling_ae=%s", study, sop, calling_ae)
            return IngestOutcome(STATUS_SUCCESS, "")
        try:
            self.attach(study, text, "dicom-sr", sop_instance_uid=sop)
        except Exception:  # noqa: BLE001 - the SR and its text are kept; the node's start-up reconcile retries
            logger.exception("event=report_attach_failed study_uid=%s sop_uid=%s", study, sop)
        return IngestOutcome(STATUS_SUCCESS, "")


def _discard(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)
