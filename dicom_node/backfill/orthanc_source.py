"""Orthanc over its REST API, for sites where the node has no Query/Retrieve rights on the PACS: studies of a
day from ``/tools/find``, each instance downloaded from ``/instances/{id}/file`` and C-STOREd to the node.

orthanc-api-client (0.25.3) does the REST side: ``studies.find`` (``/tools/find``), ``studies.get_modalities``,
``studies.get_instances_ids``, the study statistics and ``instances.get_file``. Where it falls short (checked
against Debian's Orthanc 1.10.1):

* ``studies.get_instances`` posts ``ParentStudy``/``ResponseContent`` (Orthanc 1.12.5+ keys); 1.10 ignores
  them and answers bare ids, on which the client fails (AttributeError) — ``get_instances_ids`` is used instead;
* ``instances.get_file`` returns the whole object in memory (no streaming to a file), so one very large
  multi-frame object is held in memory while it is forwarded;
* ``studies.find`` returns whatever one ``/tools/find`` answers; an Orthanc configured with
  ``LimitFindResults`` (0 = no limit, the default) cuts that answer short without saying so, which the
  day-by-day query keeps unlikely but cannot rule out.
"""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path
from typing import Any

from dicom_node.backfill.dimse import SUCCESS, WARNING, FetchResult
from dicom_node.backfill.forward import ForwardError, NodeAddress, NodeSender
from dicom_node.backfill.progress import StudyHit

logger = logging.getLogger(__name__)


class OrthancSourceError(RuntimeError):
    """Orthanc could not be reached or answered an error (the URL and the HTTP failure are in the text)."""


class OrthancSource:
    """Orthanc at ``url`` (HTTP basic auth when a user is given; the password is read from a file)."""

    method = "orthanc-rest"

    def __init__(self, url: str, node: NodeAddress, calling_ae_title: str, timeout_s: float,
                 user: str | None = None, password_file: Path | None = None) -> None:
        from orthanc_api_client import OrthancApiClient

        password = password_file.read_text(encoding="utf-8").strip() if password_file is not None else None
        if user and password is None:
            raise OrthancSourceError("--orthanc-user needs --orthanc-password-file")
        self.url = url.rstrip("/")
        self.client = OrthancApiClient(self.url, user=user, pwd=password)
        self.node = node
        self.calling_ae_title = calling_ae_title
        self.timeout_s = timeout_s

    @property
    def label(self) -> str:
        return f"orthanc:{self.url}"

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            raise OrthancSourceError(f"Orthanc at {self.url}: {what} failed: {type(error).__name__}: "
                                     f"{str(error)[:200]}") from error

    def find_day(self, day: date, modality: str) -> list[StudyHit]:
        query: dict[str, str] = {"StudyDate": f"{day:%Y%m%d}"}
        if modality:
            query["ModalitiesInStudy"] = modality
        studies = self._call("tools/find", self.client.studies.find, query=query)
        hits = []
        for study in studies:
            uid = str(study.dicom_id or "").strip()
            if not uid:
                continue
            count = self._call("study statistics", self.client.studies.get_json_statistics, study.orthanc_id)["CountInstances"]
            modalities = self._call("study modalities", self.client.studies.get_modalities, study.orthanc_id)
            hits.append(StudyHit(uid, f"{day:%Y%m%d}", tuple(sorted(m for m in modalities if m)), int(count),
                                 study.orthanc_id))
        return hits

    def fetch(self, hit: StudyHit) -> FetchResult:
        if hit.source_ref is None:
            raise OrthancSourceError(f"no Orthanc id recorded for study {hit.study_uid}")
        instance_ids = self._call("study instances", self.client.studies.get_instances_ids, hit.source_ref)
        completed = failed = 0
        first_error = ""
        with NodeSender(self.node, self.calling_ae_title, self.timeout_s) as sender:
            for instance_id in instance_ids:
                data = self._call("instance download", self.client.instances.get_file, instance_id)
                try:
                    if sender.send_bytes(data):
                        completed += 1
                except ForwardError as error:
                    failed += 1
                    first_error = first_error or str(error)
        if failed:
            return FetchResult(completed, failed, 0, WARNING, first_error)
        return FetchResult(completed, 0, 0, SUCCESS)
