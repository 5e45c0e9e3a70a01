"""The PACS over DIMSE (pynetdicom SCU): Study Root C-FIND for one day, then C-MOVE a study to the node or
C-GET it here and C-STORE it on to the node.

Not every PACS answers every key: dcmqrscp, for one, ignores ``ModalitiesInStudy`` and returns no
``NumberOfStudyRelatedInstances``. So a study whose answer lacks the modalities is checked at SERIES level
(``Modality``), and one without an instance count is counted at IMAGE level, on the same association. Only
the keys the backfill needs are asked for (no patient attributes: they are not needed and stay out of logs).

A PACS with ``tls: true`` is reached over TLS (BCP 195, :func:`dicom_node.tls.client_context` from ``node.tls``):
its certificate must name ``pacs.host`` and be signed by ``node.tls.ca_file``; the node's certificate is ours.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from config.settings import Destination
from dicom_node.backfill.forward import NodeAddress, NodeSender
from dicom_node.backfill.progress import StudyHit
from dicom_node.receive.codecs import ACCEPTED_TRANSFER_SYNTAXES
from dicom_node.receive.ingest import CT_STORAGE_CLASSES

logger = logging.getLogger(__name__)

PENDING = {0xFF00, 0xFF01}
MOVE_PENDING = 0xFF00
SUCCESS = 0x0000
WARNING = 0xB000  # sub-operations complete, one or more failures or warnings


class PacsError(RuntimeError):
    """The PACS refused an association or answered a request with a failure (status and comment in the text)."""


@dataclass(frozen=True)
class FetchResult:
    """What a C-MOVE / C-GET / download reported: sub-operations completed, failed, warned."""

    completed: int
    failed: int
    warning: int
    status: int  # the final status (0x0000 success, 0xB000 with failures, else a failure)
    comment: str = ""

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS and self.failed == 0


def _status(dataset: Dataset | None) -> int:
    return int(dataset.Status) if dataset is not None and "Status" in dataset else -1


def _comment(dataset: Dataset | None) -> str:
    return str(dataset.get("ErrorComment", "") or "") if dataset is not None else ""


class DimseSource:
    """A PACS reached as AET@HOST:PORT by our calling AE; ``method`` is ``move`` (to the node's AE title, which
    the PACS must know) or ``get`` (objects come back here and are forwarded to the node); ``tls`` is the client
    context, required when ``pacs.tls`` (a TLS PACS refuses plain associations, so none is tried)."""

    def __init__(self, pacs: Destination, calling_ae_title: str, node: NodeAddress, method: str,
                 timeout_s: float, tls: ssl.SSLContext | None = None) -> None:
        if pacs.tls and tls is None:
            raise ValueError(f"the PACS {pacs.label} is reached over TLS: a client TLS context is needed")
        self.pacs = pacs
        self.tls = tls if pacs.tls else None
        self.calling_ae_title = calling_ae_title
        self.node = node
        self.method = method
        self.timeout_s = timeout_s

    @property
    def label(self) -> str:
        return self.pacs.label

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        return ae

    def _associate(self, ae: AE, **kwargs: Any) -> Any:
        tls_args = (self.tls, self.pacs.host) if self.tls is not None else None
        assoc = ae.associate(self.pacs.host, self.pacs.port, ae_title=self.pacs.ae_title, tls_args=tls_args, **kwargs)
        if not assoc.is_established:
            tls_hint = (f" over TLS (its certificate must name {self.pacs.host} and be signed by node.tls.ca_file; "
                        f"the log has the handshake error)" if self.tls is not None and not assoc.is_rejected else "")
            raise PacsError(f"the PACS {self.pacs.label} refused or did not answer an association from AE title "
                            f"{self.calling_ae_title!r}{tls_hint}")
        return assoc

    # --- C-FIND ---------------------------------------------------------------------------------------

    def find_day(self, day: date, modality: str) -> list[StudyHit]:
        """The studies of one day that hold ``modality`` series, with their instance counts."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae)
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ""
            query.StudyDate = f"{day:%Y%m%d}"
            query.ModalitiesInStudy = modality
            query.NumberOfStudyRelatedInstances = ""
            hits = []
            for answer in list(self._find(assoc, query)):
                uid = str(answer.get("StudyInstanceUID", "") or "").strip()
                if not uid:
                    continue
                modalities = tuple(str(m) for m in _values(answer.get("ModalitiesInStudy")))
                if not modalities:  # the PACS did not answer the key: ask its series
                    modalities = self._series_modalities(assoc, uid)
                if modality and modality not in modalities:
                    continue
                count = answer.get("NumberOfStudyRelatedInstances")
                expected = int(count) if count not in (None, "") else self._count_instances(assoc, uid)
                hits.append(StudyHit(uid, f"{day:%Y%m%d}", modalities, expected))
            return hits
        finally:
            assoc.release()

    def _find(self, assoc: Any, query: Dataset) -> Iterator[Dataset]:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = _status(status)
            if code in PENDING:
                if identifier is not None:
                    yield identifier
                continue
            if code == SUCCESS:
                return
            raise PacsError(f"the PACS {self.pacs.label} answered a {query.QueryRetrieveLevel}-level C-FIND with "
                            f"status 0x{code & 0xFFFF:04X} {_comment(status)}".rstrip()
                            if code >= 0 else f"the PACS {self.pacs.label} did not answer a C-FIND (timeout or abort)")

    def _series_modalities(self, assoc: Any, study_uid: str) -> tuple[str, ...]:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        found = [str(a.get("Modality", "") or "").strip() for a in self._find(assoc, query)]
        return tuple(dict.fromkeys(m for m in found if m))

    def _count_instances(self, assoc: Any, study_uid: str) -> int:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.SOPInstanceUID = ""
        return len({str(a.get("SOPInstanceUID", "")) for a in self._find(assoc, query)})

    # --- C-MOVE / C-GET -------------------------------------------------------------------------------

    def fetch(self, hit: StudyHit) -> FetchResult:
        return self._move(hit.study_uid) if self.method == "move" else self._get(hit.study_uid)

    def _study_identifier(self, study_uid: str) -> Dataset:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_uid
        return identifier

    def _move(self, study_uid: str) -> FetchResult:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = self._associate(ae)
        try:
            responses = assoc.send_c_move(self._study_identifier(study_uid), self.node.ae_title,
                                          StudyRootQueryRetrieveInformationModelMove)
            return _final(responses, f"C-MOVE to {self.node.ae_title}")
        finally:
            if assoc.is_established:
                assoc.release()

    def _get(self, study_uid: str) -> FetchResult:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        roles = []
        for sop_class in CT_STORAGE_CLASSES:  # 1 + 2 x 11 contexts; we take CT only, exactly as encoded
            for syntax in ACCEPTED_TRANSFER_SYNTAXES:
                ae.add_requested_context(sop_class, syntax)
            roles.append(build_role(sop_class, scp_role=True))
        errors: list[str] = []
        with NodeSender(self.node, self.calling_ae_title, self.timeout_s) as sender:

            def on_store(event: Any) -> int:
                dataset = event.dataset
                dataset.file_meta = event.file_meta
                try:
                    sender.send(dataset)
                except Exception as error:  # noqa: BLE001 - answer the PACS; the sub-operation counts as failed
                    errors.append(str(error))
                    return 0xA700
                return 0x0000

            assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
            try:
                result = _final(assoc.send_c_get(self._study_identifier(study_uid),
                                                 StudyRootQueryRetrieveInformationModelGet), "C-GET")
            finally:
                if assoc.is_established:
                    assoc.release()
        if errors:
            return FetchResult(result.completed, max(result.failed, len(errors)), result.warning, WARNING,
                               f"forwarding to the node failed: {errors[0]}")
        return result


def _values(value: Any) -> list[Any]:
    """A DICOM value as a list (a multi-valued CS comes as a MultiValue, a single one as a str)."""
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def _final(responses: Any, what: str) -> FetchResult:
    """Read a C-MOVE / C-GET response stream to its final response."""
    last: Dataset | None = None
    for status, _identifier in responses:
        code = _status(status)
        last = status
        if code == MOVE_PENDING:
            continue
        break
    code = _status(last)
    if last is None or code < 0:
        return FetchResult(0, 0, 0, -1, f"no final {what} response (timeout or abort)")

    def number(keyword: str) -> int:
        value = last.get(keyword) if last is not None else None
        return int(value) if value not in (None, "") else 0

    return FetchResult(number("NumberOfCompletedSuboperations"), number("NumberOfFailedSuboperations"),
                       number("NumberOfWarningSuboperations"), code, _comment(last))
