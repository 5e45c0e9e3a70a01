"""C-FIND SCP (Study Root FIND, STUDY level) with real peers.

* Pure parts: PS3.4 matching rules, identifier parsing, response building (private block, rank prefix,
  identity policy), study attributes in the state store and their backfill.
* An in-process node SCP (StorageSCP) queried by a pynetdicom SCU: the two called AE titles, the allow-list,
  failure statuses with Error Comments, C-CANCEL answered 0xFE00.
* ``medfinder serve`` with the two lung-pet-ct-dx studies indexed, queried by dcmtk findscu: similar cases on
  MEDFINDER_SIM (A0001 -> A0002 as match 1 with a score), a text query, ordinary C-FIND on MEDFINDER (wildcard,
  date range, UID list), unknown study, malformed identifier, a refused calling AE, and the C-FIND round trip
  p50 (printed, not asserted).
"""

from __future__ import annotations

import contextlib
import re
import socket
import sqlite3
import statistics
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_helpers import (
    free_port,
    nodelay_env,
    require_tools,
    start_node,
    stop_process,
    storescu,
    wait_for,
    write_node_config,
)
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT_FIND

from config import load_settings
from config.settings import QuerySettings, Settings
from dicom_node.query.identifier import parse_similar_query, parse_study_query
from dicom_node.query.matching import (
    IdentifierError,
    any_text_matches,
    normal_time,
    parse_date_range,
    parse_time_range,
    parse_uid_list,
    text_matches,
    time_in_range,
)
from dicom_node.query.private_block import requested_limit
from dicom_node.query.responses import failure_status, rank_prefix, similar_response, study_response
from dicom_node.query.study_find import find_studies
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.study_header import backfill_study_attributes
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import InstanceRecord, StateStore, StudyAttributes
from model_export.registry import install_bundle
from workers.search import QueryError, SearchHit, SearchResult, StudyNotFoundError

# Several tests send deliberately malformed identifiers; pydicom warns about their values.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

A0001_SERIES = "Lung_Dx-A0001_series2_5mm"
A0002_SERIES = "Lung_Dx-A0002_series2_B70f"
QUERY = QuerySettings()


def identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def round_trip(ds: Dataset, implicit: bool) -> Dataset:
    """``ds`` as a peer decodes it off the wire (Little Endian, Implicit or Explicit VR)."""
    encoded = encode(ds, implicit, True)
    assert encoded
    return decode(BytesIO(encoded), implicit, True)


def study_level(**keys: Any) -> Dataset:
    return identifier(QueryRetrieveLevel="STUDY", **keys)


# --- matching rules (pure) -----------------------------------------------------------------------------------


def test_text_matching_single_value_wildcards_and_universal() -> None:
    assert text_matches("Chest", "Chest") and not text_matches("Chest", "chest")
    assert text_matches("Th*", "Thorax^A") and text_matches("*rax*", "Thorax^A") and not text_matches("Th*", "Chest")
    assert text_matches("C?est", "Chest") and not text_matches("C?est", "Cheest")
    assert text_matches("", None) and text_matches("*", None) and not text_matches("Chest", None)
    assert text_matches("a.b", "a.b") and not text_matches("a.b", "axb"), "regex characters are literal"
    assert text_matches("doe^j*", "DOE^JOHN", ignore_case=True), "person names match case-insensitively"
    assert any_text_matches("MR\\CT", ("PT", "CT")) and not any_text_matches("MR", ("PT", "CT"))
    assert any_text_matches("C*", ("PT", "CT"))


def test_uid_lists() -> None:
    assert parse_uid_list("1.2.3") == ("1.2.3",)
    assert parse_uid_list("1.2.3\\1.2.4") == ("1.2.3", "1.2.4")
    for bad in ("1.2.*", "1.2.?", "abc", "1..2"):
        with pytest.raises(IdentifierError) as caught:
            parse_uid_list(bad)
        assert caught.value.keyword == "StudyInstanceUID" and caught.value.status == 0xA900


def test_date_ranges() -> None:
    assert parse_date_range("20070404").contains("20070404") and not parse_date_range("20070404").contains("20070405")
    both = parse_date_range("20070401-20070410")
    assert both.contains("20070401") and both.contains("20070410") and not both.contains("20070425")
    assert parse_date_range("20070420-").contains("20991231") and not parse_date_range("20070420-").contains("20070404")
    assert parse_date_range("-20070410").contains("19000101") and not parse_date_range("-20070410").contains("20070425")
    assert not both.contains(None)
    for bad in ("2007-04-01", "20070231", "20070410-20070401", "-", "2007", "20070101-20070102-20070103"):
        with pytest.raises(IdentifierError):
            parse_date_range(bad)


def test_time_ranges() -> None:
    assert normal_time("1015") == "101500.000000" and normal_time("1015", latest=True) == "101559.999999"
    assert normal_time("10:15:30.5") == "101530.500000" and normal_time("2500") is None
    morning = parse_time_range("0800-1200")
    assert time_in_range("101500", morning) and time_in_range("120059.9", morning)
    assert not time_in_range("130000", morning) and not time_in_range(None, morning)
    assert time_in_range("185824", parse_time_range("18-")) and time_in_range("185824.468", parse_time_range("185824"))
    assert time_in_range("185824", parse_time_range("1858")) and not time_in_range("1858", parse_time_range("185824"))
    with pytest.raises(IdentifierError):
        parse_time_range("noon")


# --- identifiers (pure) --------------------------------------------------------------------------------------


def test_study_query_level_checked_and_keys_sorted_out() -> None:
    for bad in (identifier(StudyInstanceUID=""), identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID="")):
        with pytest.raises(IdentifierError) as caught:
            parse_study_query(bad, QUERY)
        assert caught.value.keyword == "QueryRetrieveLevel"
    query = parse_study_query(study_level(StudyDate="20070401-", StudyDescription="", InstitutionName="X",
                                          NumberOfStudyRelatedSeries="2", PatientName=""), QUERY)
    assert [c.spec.keyword for c in query.conditions] == ["StudyDate"]
    assert set(query.unsupported) == {"InstitutionName", "NumberOfStudyRelatedSeries"}
    assert [k.keyword for k in query.return_keys] == ["StudyDate", "InstitutionName", "StudyDescription",
                                                      "PatientName", "NumberOfStudyRelatedSeries"]


def test_patient_identity_matching_follows_the_policy() -> None:
    with pytest.raises(IdentifierError) as caught:
        parse_study_query(study_level(PatientID="Lung_Dx-A0001"), QUERY)
    assert caught.value.status == 0xC000 and caught.value.keyword == "PatientID"
    assert parse_study_query(study_level(PatientName="*"), QUERY).conditions == (), "'*' alone is universal"
    allowed = parse_study_query(study_level(PatientID="Lung_Dx-A0001"), QuerySettings(return_patient_identity=True))
    assert [c.spec.keyword for c in allowed.conditions] == ["PatientID"]


def test_similar_query_by_study_by_text_and_what_is_malformed() -> None:
    by_study = parse_similar_query(study_level(StudyInstanceUID="1.2.3", StudyDescription="", StudyDate=""), QUERY)
    assert by_study.kind == "study" and by_study.study_uid == "1.2.3" and by_study.limit == QUERY.default_limit
    assert by_study.filters is None and by_study.unsupported == ()
    by_text = parse_similar_query(study_level(StudyDescription="consolidation right lower lobe",
                                              StudyDate="20070101-20071231", ModalitiesInStudy="CT",
                                              PatientSex="F", AccessionNumber="A1"), QUERY)
    assert by_text.kind == "text" and by_text.text == "consolidation right lower lobe"
    assert by_text.filters is not None and by_text.filters.model_dump(exclude_none=True) == {
        "modality": "CT", "study_date_from": "20070101", "study_date_to": "20071231", "sex": "F"}
    assert by_text.unsupported == ("AccessionNumber",)
    malformed = {
        "StudyInstanceUID": [study_level(StudyInstanceUID="1.2.*"), study_level(StudyInstanceUID="1.2\\1.3"),
                             study_level(StudyDescription="")],
        "StudyDescription": [study_level(StudyDescription="pneum*"),
                             study_level(StudyInstanceUID="1.2.3", StudyDescription="text")],
        "StudyDate": [study_level(StudyInstanceUID="1.2.3", StudyDate="last week")],
        "ModalitiesInStudy": [study_level(StudyInstanceUID="1.2.3", ModalitiesInStudy="CT\\MR")],
        "QueryRetrieveLevel": [identifier(StudyInstanceUID="1.2.3")],
    }
    for keyword, identifiers in malformed.items():
        for ds in identifiers:
            with pytest.raises(IdentifierError) as caught:
                parse_similar_query(ds, QUERY)
            assert caught.value.keyword == keyword and caught.value.status == 0xA900
            assert len(caught.value.message) <= 64, "an Error Comment is an LO (64 characters)"


def _with_limit(ds: Dataset, vr: str, value: Any) -> Dataset:
    block = ds.private_block(0x0099, "MEDFINDER", create=True)
    block.add_new(0x03, vr, value)
    return ds


def test_private_limit_as_us_and_as_un_bytes() -> None:
    assert requested_limit(study_level()) is None
    assert requested_limit(_with_limit(study_level(), "US", 3)) == 3
    assert requested_limit(_with_limit(study_level(), "UN", b"\x14\x00")) == 20, "findscu: -k (0099,1003)=14 (hex)"
    explicit = _with_limit(study_level(StudyInstanceUID="1.2.3"), "US", 2)
    decoded = round_trip(explicit, implicit=True)  # Implicit VR: the limit arrives as UN bytes
    assert parse_similar_query(decoded, QUERY).limit == 2
    for bad in (0, QUERY.max_limit + 1):
        with pytest.raises(IdentifierError):
            parse_similar_query(_with_limit(study_level(StudyInstanceUID="1.2.3"), "US", bad), QUERY)


# --- responses (pure) ----------------------------------------------------------------------------------------

STUDY = StudyAttributes(study_uid="1.2.3", study_date="20070404", study_time="185824", accession_number="ACC1",
                        study_description="Chest", modalities_in_study=("CT", "PT"), patient_name="Doe^John",
                        patient_id="P1", patient_sex="M", number_of_series=2, number_of_instances=128)


def test_study_response_fills_requested_keys_and_withholds_identity() -> None:
    query = parse_study_query(study_level(StudyDate="", PatientName="", PatientID="", ModalitiesInStudy="",
                                          NumberOfStudyRelatedInstances="", InstitutionName="",
                                          ReferencedStudySequence=[]), QUERY)
    response = study_response(STUDY, query.return_keys, QUERY)
    assert response.StudyInstanceUID == "1.2.3", "the unique key is always returned"
    assert response.StudyDate == "20070404" and list(response.ModalitiesInStudy) == ["CT", "PT"]
    assert response.NumberOfStudyRelatedInstances == 128 and response.QueryRetrieveLevel == "STUDY"
    assert response.PatientName in (None, "") and response.PatientID in (None, ""), "identity withheld"
    assert "InstitutionName" in response and response.InstitutionName in (None, ""), "unknown keys come back empty"
    assert response.ReferencedStudySequence == []
    assert "StudyDescription" not in response and "RetrieveAETitle" not in response
    assert "SpecificCharacterSet" not in response, "plain ASCII needs no character set"
    shown = study_response(STUDY, query.return_keys, QuerySettings(return_patient_identity=True,
                                                                   retrieve_ae_title="PACS"))
    assert str(shown.PatientName) == "Doe^John" and shown.PatientID == "P1" and shown.RetrieveAETitle == "PACS"


def _hit(rank: int, score: float, uid: str = "1.2.3", description: str | None = "Chest") -> SearchHit:
    return SearchHit(rank=rank, score=score, study_uid=uid, accession_number="ACC1", study_date="20070404",
                     study_description=description, modality="CT", body_part="CHEST", institution=None,
                     has_report=False)


def private_values(response: Dataset) -> tuple[float, int]:
    """(score, rank) from the MEDFINDER block, whether they arrived with their VRs or as UN bytes."""
    block = response.private_block(0x0099, "MEDFINDER")
    score, rank = block[0x01].value, block[0x02].value
    if isinstance(score, bytes):
        score = struct.unpack("<d", score)[0]
    if isinstance(rank, bytes):
        rank = struct.unpack("<H", rank)[0]
    return float(score), int(rank)


def test_similar_response_rank_prefix_private_block_and_character_set() -> None:
    assert rank_prefix(1, 0.8712) == "#1 0.87 " and rank_prefix(12, -0.05) == "#12 -0.05 "
    response = similar_response(_hit(1, 0.8712), None, (), QuerySettings(retrieve_ae_title="PACS"))
    assert response.StudyDescription == "#1 0.87 Chest" and response.AccessionNumber == "ACC1"
    assert response.StudyDate == "20070404" and response.ModalitiesInStudy == "CT"
    assert response.RetrieveAETitle == "PACS" and response.QueryRetrieveLevel == "STUDY"
    assert response[0x00990010].value == "MEDFINDER"
    assert response[0x00991001].VR == "FD" and response[0x00991002].VR == "US"
    for implicit in (True, False):  # what a peer decodes, with and without the VRs on the wire
        score, rank = private_values(round_trip(response, implicit))
        assert rank == 1 and score == pytest.approx(0.8712)
    stored = similar_response(_hit(3, 0.5), STUDY, (), QUERY)
    assert list(stored.ModalitiesInStudy) == ["CT", "PT"], "the node's stored attributes come first"
    long_text = similar_response(_hit(2, 0.5, description="x" * 64), None, (), QUERY)
    assert len(long_text.StudyDescription) == 64 and long_text.StudyDescription.startswith("#2 0.50 x")
    accented = similar_response(_hit(1, 0.9, description="Thorax Ärztin"), None, (), QUERY)
    assert accented.SpecificCharacterSet == "ISO_IR 192"
    assert "Ärztin" in round_trip(accented, implicit=False).StudyDescription


def test_failure_status_comment_and_offending_element() -> None:
    status = failure_status(0xA900, "StudyDate: not a date " + "x" * 80, "StudyDate")
    assert status.Status == 0xA900 and len(status.ErrorComment) == 64
    assert status.OffendingElement == 0x00080020


# --- study attributes in the state store ---------------------------------------------------------------------


def _record(sop: str, study: str, series: str) -> InstanceRecord:
    return InstanceRecord(sop_uid=sop, study_uid=study, series_uid=series, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          transfer_syntax="1.2.840.10008.1.2.1", path=Path(f"/spool/{sop}.dcm"), size=10)


def test_study_attributes_written_once_and_modalities_accumulated(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    first = StudyAttributes(study_uid="1.9", study_date="20070404", study_description="Chest", patient_id="P1")
    later = StudyAttributes(study_uid="1.9", study_date="20990101", study_description="changed")
    read: list[str] = []

    def header(study: StudyAttributes, modality: str, sop: str) -> Callable[[], tuple[StudyAttributes, str]]:
        return lambda: (read.append(sop), (study, modality))[1]

    for sop, series, study, modality in [("1.9.1.1", "1.9.1", first, "CT"), ("1.9.1.2", "1.9.1", later, "CT"),
                                         ("1.9.2.1", "1.9.2", later, "PT"), ("1.9.3.1", "1.9.3", later, "CT")]:
        store.record_instance(_record(sop, "1.9", series), "PACS", None, 5, header=header(study, modality, sop))
    assert read == ["1.9.1.1", "1.9.2.1", "1.9.3.1"], "the header is read for a new series only"
    store.record_instance(_record("1.8.1.1", "1.8", "1.8.1"), "PACS", None, 5)  # no header given: no attributes
    attributes = store.study_attributes("1.9")
    assert attributes is not None
    assert (attributes.study_date, attributes.study_description, attributes.patient_id) == ("20070404", "Chest", "P1")
    assert attributes.modalities_in_study == ("CT", "PT")
    assert (attributes.number_of_series, attributes.number_of_instances) == (3, 4)
    assert store.study_attributes("1.8") is None and store.study_attributes("9.9") is None
    assert [a.study_uid for a in store.all_study_attributes()] == ["1.9"]
    assert store.studies_without_attributes() == ["1.8"]
    store.close()


@contextlib.contextmanager
def node_scp(data_dir: Path, node: dict[str, Any] | None = None,
             query: dict[str, Any] | None = None) -> Iterator[StorageSCP]:
    """The node's SCP in-process on a free 127.0.0.1 port (no query engine: similar-case search unavailable)."""
    overrides = {"paths": {"data_dir": str(data_dir)},
                 "node": {"bind": "127.0.0.1", "port": free_port(), "min_free_disk_mb": 0, **(node or {})},
                 "query": query or {}}
    settings: Settings = load_settings(overrides=overrides, environ={})
    layout = NodeLayout.create(data_dir)
    store = StateStore(layout.state_db)
    scp = StorageSCP(settings, layout, store)
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()
        store.close()


def test_backfill_reads_spooled_headers_once(tmp_path: Path, lung_ct_dir: Path) -> None:
    with node_scp(tmp_path / "node") as scp:
        for series in ("Lung_Dx-A0002_series2_B70f", "Lung_Dx-A0002_series3_B40f"):
            assert storescu(scp.port, lung_ct_dir / series).returncode == 0
        (received,) = scp.store.all_study_attributes()
        assert received.study_description == "Thorax^AThoraxRoutine (Adult)" and received.patient_sex == "F"
        assert (received.number_of_series, received.number_of_instances) == (2, 60)
    with sqlite3.connect(tmp_path / "node" / "state.sqlite3") as db:  # a data folder from before attributes
        db.execute("DELETE FROM study_attributes")
        db.execute("DELETE FROM study_series")
    store = StateStore(tmp_path / "node" / "state.sqlite3")
    assert store.all_study_attributes() == []
    assert backfill_study_attributes(store) == 1
    assert store.all_study_attributes() == [received]
    assert backfill_study_attributes(store) == 0, "once"
    store.close()


# --- the SCP in-process: AE titles, allow-list, statuses, cancel ----------------------------------------------


def find(port: int, ds: Dataset, *, called: str = "MEDFINDER", calling: str = "FINDSCU"
         ) -> list[tuple[Dataset, Dataset | None]]:
    """One C-FIND on a new association: every (status, identifier) the SCP answered."""
    ae = AE(calling)
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"association to {called} not accepted"
    try:
        return list(assoc.send_c_find(ds, STUDY_ROOT_FIND))
    finally:
        assoc.release()


def associates(port: int, called: str, calling: str = "FINDSCU") -> bool:
    ae = AE(calling)
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    established = assoc.is_established
    if established:
        assoc.release()
    return established


def test_both_called_titles_accepted_and_the_allow_list_applies(tmp_path: Path) -> None:
    allow = [{"ae_title": "FINDSCU", "host": "127.0.0.1"}]
    with node_scp(tmp_path / "node", node={"allow": allow}) as scp:
        assert associates(scp.port, "MEDFINDER") and associates(scp.port, "MEDFINDER_SIM")
        assert not associates(scp.port, "SOMEONE_ELSE"), "require_called_ae_title still refuses other titles"
        assert not associates(scp.port, "MEDFINDER", calling="INTRUDER")
        assert not associates(scp.port, "MEDFINDER_SIM", calling="INTRUDER")
        (only,) = find(scp.port, study_level(StudyInstanceUID="1.2.3"), called="MEDFINDER_SIM")
        assert only[0].Status == 0xC001, "no query engine in this SCP: similar-case search unavailable"
        assert only[0].ErrorComment == "similar-case search is not available on this node"


def _fill(store: StateStore, count: int) -> list[str]:
    uids = [f"1.2.826.0.1.3680043.10.999.{i}" for i in range(count)]
    for i, uid in enumerate(uids):
        attributes = StudyAttributes(study_uid=uid, study_date=f"2007{1 + i % 12:02d}{1 + i % 28:02d}",
                                     study_description=f"Study {i}")
        store.note_series(uid, uid + ".1", attributes, "CT")
    return uids


def test_failure_statuses_carry_error_comments(tmp_path: Path) -> None:
    with node_scp(tmp_path / "node") as scp:
        _fill(scp.store, 3)
        cases = [
            (identifier(StudyInstanceUID=""), 0xA900, "QueryRetrieveLevel (0008,0052) is missing", 0x00080052),
            (study_level(StudyDate="20070410-20070401"), 0xA900, "StudyDate: range starts after it ends", 0x00080020),
            (study_level(PatientID="P*"), 0xC000, "PatientID: matching on patient identity is off", 0x00100020),
        ]
        for ds, status, comment, offending in cases:
            (only,) = find(scp.port, ds)
            assert (only[0].Status, only[0].ErrorComment) == (status, comment)
            assert only[0].OffendingElement == offending
        unsupported = find(scp.port, study_level(StudyInstanceUID="", InstitutionName="X"))
        assert [s.Status for s, _ in unsupported] == [0xFF01] * 3 + [0x0000], "pending, optional key not matched on"


def test_cancel_after_the_first_pending_response(tmp_path: Path) -> None:
    with node_scp(tmp_path / "node") as scp:
        uids = _fill(scp.store, 2000)
        ae = AE("FINDSCU")
        ae.add_requested_context(STUDY_ROOT_FIND)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="MEDFINDER")
        assert assoc.is_established
        statuses = []
        try:
            for status, _identifier in assoc.send_c_find(study_level(StudyInstanceUID="", StudyDescription=""),
                                                         STUDY_ROOT_FIND, msg_id=7):
                statuses.append(status.Status)
                if len(statuses) == 1:
                    assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
            assert associates(scp.port, "MEDFINDER"), "the SCP still answers after a cancel"
        finally:
            assoc.release()
    assert statuses[0] == 0xFF00 and statuses[-1] == 0xFE00
    assert len(statuses) - 1 < len(uids), "stopped before every match was sent"


class _RecordingEngine:
    """Stands in for the query engine to drive the SCP's translation of its answers and errors (the engine itself
    is tested in test_search_engine.py and end to end below)."""

    def __init__(self, outcome: Exception | list[SearchHit]) -> None:
        self.outcome = outcome
        self.calls: list[dict[str, Any]] = []

    def _answer(self, **call: Any) -> Any:
        self.calls.append(call)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return SearchResult(kind="study", query={}, bundle_id="b", hits=self.outcome)

    def similar_to_study(self, study_uid: str, **kwargs: Any) -> Any:
        return self._answer(study_uid=study_uid, **kwargs)

    def search_text(self, text: str, **kwargs: Any) -> Any:
        return self._answer(text=text, **kwargs)


def test_engine_answers_and_errors_become_c_find_statuses(tmp_path: Path) -> None:
    with node_scp(tmp_path / "node", query={"default_limit": 7}) as scp:
        scp.query_engine = _RecordingEngine(QueryError("min_score must be a cosine similarity from -1 to 1"))
        (only,) = find(scp.port, study_level(StudyInstanceUID="1.2.3"), called="MEDFINDER_SIM")
        assert (only[0].Status, only[0].ErrorComment) == (0xC000, "min_score must be a cosine similarity from -1 to 1")
        scp.query_engine = _RecordingEngine(StudyNotFoundError("study 1.2.3 is neither indexed nor held"))
        assert [s.Status for s, _ in find(scp.port, study_level(StudyInstanceUID="1.2.3"), called="MEDFINDER_SIM")] \
            == [0x0000], "an unknown study is zero matches"
        hits = [_hit(2, 0.5, uid="1.2.5"), _hit(1, 0.9, uid="1.2.4")]
        engine = _RecordingEngine(hits)
        scp.query_engine = engine
        responses = find(scp.port, study_level(StudyDescription="pleural effusion", ModalitiesInStudy="CT"),
                         called="MEDFINDER_SIM")
        assert [r.StudyInstanceUID for _, r in responses[:-1]] == ["1.2.4", "1.2.5"], "pending in rank order"
        assert [r.StudyDescription for _, r in responses[:-1]] == ["#1 0.90 Chest", "#2 0.50 Chest"]
        (call,) = engine.calls
        assert call["text"] == "pleural effusion" and call["limit"] == 7
        assert call["filters"].modality == "CT"


def test_ordinary_matching_over_stored_studies(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    uids = _fill(store, 30)
    by_date = parse_study_query(study_level(StudyDate="20070101-20070131"), QUERY)
    assert {s.study_uid for s in find_studies(by_date, store)} == {uids[0], uids[12], uids[24]}
    by_list = parse_study_query(study_level(StudyInstanceUID=f"{uids[3]}\\{uids[4]}\\1.2.3"), QUERY)
    assert [s.study_uid for s in find_studies(by_list, store)] == [uids[3], uids[4]]
    wildcard = parse_study_query(study_level(StudyDescription="Study 2?"), QUERY)
    assert [s.study_uid for s in find_studies(wildcard, store)] == uids[20:30]
    store.close()


# --- the node end to end with dcmtk findscu -----------------------------------------------------------------


@dataclass(frozen=True)
class LungNode:
    port: int
    a0001: str
    a0002: str
    workdir: Path


def _study_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(iter(sorted(folder.glob("*.dcm")))), stop_before_pixels=True).StudyInstanceUID)


def _indexed(state_db: Path, uids: set[str]) -> bool:
    if not state_db.is_file():
        return False
    with sqlite3.connect(state_db) as db:
        rows = db.execute("SELECT study_uid FROM studies WHERE state IN ('indexed', 'reported')").fetchall()
    return uids <= {row[0] for row in rows}


@pytest.fixture(scope="module")
def lung_node(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, lung_ct_dir: Path) -> Iterator[LungNode]:
    """``medfinder serve`` holding and indexing both lung studies (one series each); FINDSCU may query it."""
    require_tools("findscu", "storescu")
    workdir = tmp_path_factory.mktemp("cfind")
    data_dir = workdir / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    config = write_node_config(workdir / "node.yaml", data_dir, None, query={"retrieve_ae_title": "PACS"},
                               api={"http_port": 0})
    port = free_port()
    node = start_node(config, port, workdir / "node.log", "--allow-ae", "STORESCU@127.0.0.1",
                      "--allow-ae", "FINDSCU@127.0.0.1")
    try:
        a0001, a0002 = _study_uid(lung_ct_dir / A0001_SERIES), _study_uid(lung_ct_dir / A0002_SERIES)
        for series in (A0001_SERIES, A0002_SERIES):
            result = storescu(port, lung_ct_dir / series)
            assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: _indexed(data_dir / "state.sqlite3", {a0001, a0002}), 240,
                 "both studies indexed\n" + (workdir / "node.log").read_text(errors="replace")[-3000:], interval=0.5)
        yield LungNode(port, a0001, a0002, workdir)
    finally:
        stop_process(node)


def findscu(node: LungNode, keys: list[str], *, called: str = "MEDFINDER_SIM", calling: str = "FINDSCU",
            extra: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, list[Dataset]]:
    """dcmtk findscu (Study Root) with ``-k`` keys; the pending responses it extracted (-X), in arrival order."""
    out_dir = node.workdir / f"findscu-{time.monotonic_ns()}"
    out_dir.mkdir()
    command = ["findscu", "-v", "-S", "-aet", calling, "-aec", called, "-X", "-od", str(out_dir), *extra]
    for key in keys:
        command += ["-k", key]
    result = subprocess.run([*command, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=120,
                            env=nodelay_env(), check=False)
    return result, [pydicom.dcmread(path) for path in sorted(out_dir.glob("rsp*.dcm"))]


RANK_PREFIX = re.compile(r"^#(\d+) (-?\d+\.\d\d) ")


@pytest.mark.parametrize("syntax", [(), ("-xi",)], ids=["explicit-vr", "implicit-vr"])
def test_findscu_similar_to_a0001_gives_a0002_first(lung_node: LungNode, syntax: tuple[str, ...]) -> None:
    result, responses = findscu(lung_node, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={lung_node.a0001}",
                                            "StudyDescription", "StudyDate", "AccessionNumber", "PatientName"],
                                extra=syntax)
    assert result.returncode == 0, result.stdout + result.stderr
    assert responses, result.stderr
    first = responses[0]
    assert first.StudyInstanceUID == lung_node.a0002, "A0002 is match 1"
    assert lung_node.a0001 not in {r.StudyInstanceUID for r in responses}, "never the query study itself"
    match = RANK_PREFIX.match(first.StudyDescription)
    assert match and match.group(1) == "1", first.StudyDescription
    assert first.StudyDescription.endswith("Thorax^AThoraxRoutine (Adult)")
    score, rank = private_values(first)
    assert rank == 1 and f"{score:.2f}" == match.group(2) and -1.0 <= score <= 1.0
    assert first.StudyDate == "20070425" and first.QueryRetrieveLevel == "STUDY" and first.RetrieveAETitle == "PACS"
    assert first.ModalitiesInStudy == "CT"
    assert not first.get("PatientName"), "patient identity withheld by default"


def test_findscu_text_query_returns_ranked_matches(lung_node: LungNode) -> None:
    result, responses = findscu(lung_node, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                                            "StudyDescription=consolidation in the right lower lobe"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert {r.StudyInstanceUID for r in responses} == {lung_node.a0001, lung_node.a0002}
    ranks_scores = [private_values(r) for r in responses]
    assert [rank for _, rank in ranks_scores] == list(range(1, len(responses) + 1)), "pending responses in rank order"
    scores = [score for score, _ in ranks_scores]
    assert scores == sorted(scores, reverse=True)
    assert all(RANK_PREFIX.match(r.StudyDescription) for r in responses)


def test_findscu_limit_in_the_private_block(lung_node: LungNode) -> None:
    # findscu writes an unknown private tag as UN from hexadecimal bytes: "01" is the US value 1.
    _, responses = findscu(lung_node, ["QueryRetrieveLevel=STUDY", "StudyDescription=lung nodule",
                                       "(0099,0010)=MEDFINDER", "(0099,1003)=01"])
    assert len(responses) == 1


def test_findscu_unknown_study_is_zero_matches(lung_node: LungNode) -> None:
    result, responses = findscu(lung_node, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.826.0.1.3680043.99.1"])
    assert result.returncode == 0 and responses == []
    assert "Success" in result.stdout + result.stderr


def test_findscu_malformed_identifier_fails_with_a_comment(lung_node: LungNode) -> None:
    result, responses = findscu(lung_node, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.3.6.1.4.1.14519.*"],
                                extra=("-d",))  # debug output shows the status detail
    output = result.stdout + result.stderr
    assert responses == []
    assert "DIMSE Status                  : 0xa900" in output, output[-3000:]
    assert "ErrorComment" in output and "StudyInstanceUID: one UID, no wildcards or lists" in output
    (only,) = find(lung_node.port, study_level(StudyInstanceUID="1.3.6.1.4.1.14519.*"), called="MEDFINDER_SIM")
    assert only[0].Status == 0xA900
    assert only[0].ErrorComment == "StudyInstanceUID: one UID, no wildcards or lists"
    (neither,) = find(lung_node.port, study_level(StudyDate=""), called="MEDFINDER_SIM")
    assert neither[0].Status == 0xA900 and "StudyInstanceUID" in neither[0].ErrorComment
    (level,) = find(lung_node.port, identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=lung_node.a0001),
                    called="MEDFINDER_SIM")
    assert level[0].Status == 0xA900 and "STUDY" in level[0].ErrorComment


def test_findscu_ordinary_cfind_on_the_node_title(lung_node: LungNode) -> None:
    def uids(*keys: str) -> list[str]:
        result, responses = findscu(lung_node, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", *keys],
                                    called="MEDFINDER")
        assert result.returncode == 0, result.stdout + result.stderr
        return sorted(str(r.StudyInstanceUID) for r in responses)

    both = sorted([lung_node.a0001, lung_node.a0002])
    assert uids("StudyDescription=Thor*") == [lung_node.a0002]
    assert uids("StudyDescription=Ch?st") == [lung_node.a0001]
    assert uids("StudyDescription=chest") == [], "text matching is case-sensitive"
    assert uids("StudyDate=20070401-20070410") == [lung_node.a0001]
    assert uids("StudyDate=20070420-") == [lung_node.a0002]
    assert uids("StudyDate=-20070430") == both
    assert uids(f"StudyInstanceUID={lung_node.a0001}\\{lung_node.a0002}") == both
    assert uids(f"StudyInstanceUID={lung_node.a0002}") == [lung_node.a0002]
    assert uids("ModalitiesInStudy=CT") == both
    assert uids("StudyDate=19990101-19991231") == []
    _, responses = findscu(lung_node, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={lung_node.a0001}",
                                       "PatientName", "PatientSex", "StudyTime", "NumberOfStudyRelatedSeries",
                                       "NumberOfStudyRelatedInstances", "StudyDescription"], called="MEDFINDER")
    (a0001,) = responses
    assert not a0001.get("PatientName") and a0001.PatientSex == "M" and a0001.StudyTime == "185824"
    assert (a0001.NumberOfStudyRelatedSeries, a0001.NumberOfStudyRelatedInstances) == (1, 64)
    assert a0001.StudyDescription == "Chest", "no rank prefix on the ordinary AE"
    assert a0001.RetrieveAETitle == "PACS"


def test_findscu_from_an_ae_not_on_the_allow_list_is_refused(lung_node: LungNode) -> None:
    for called in ("MEDFINDER", "MEDFINDER_SIM"):
        result, responses = findscu(lung_node, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], called=called,
                                    calling="INTRUDER")
        assert result.returncode != 0 and responses == []
        assert "Association Rejected" in result.stdout + result.stderr


def _timed_queries(port: int, called: str, ds: Dataset, *, nodelay: bool, count: int = 30) -> list[float]:
    """Milliseconds per C-FIND (request to final response) on one open association."""
    ae = AE("FINDSCU")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    if nodelay:  # pynetdicom leaves Nagle on: each request then waits for the SCP's delayed ACK (~40 ms)
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            statuses = [s.Status for s, _ in assoc.send_c_find(ds, STUDY_ROOT_FIND)]
            times.append((time.perf_counter() - started) * 1000)
            assert statuses[-1] == 0x0000 and len(statuses) >= 2
    finally:
        assoc.release()
    return times


def test_cfind_round_trip_p50(lung_node: LungNode, capsys: pytest.CaptureFixture[str]) -> None:
    """pynetdicom SCU, 30 queries per line: on an open association (with and without TCP_NODELAY on the SCU's
    socket; the SCP sets it on its side) and with an association set up per query."""
    queries = {
        "similar by study": ("MEDFINDER_SIM", study_level(StudyInstanceUID=lung_node.a0001, StudyDescription="",
                                                          StudyDate="", AccessionNumber="")),
        "similar by text": ("MEDFINDER_SIM", study_level(StudyDescription="right lower lobe consolidation",
                                                         StudyInstanceUID="")),
        "ordinary wildcard": ("MEDFINDER", study_level(StudyDescription="Th*", StudyInstanceUID="")),
    }
    lines = []
    for name, (called, ds) in queries.items():
        nodelay = _timed_queries(lung_node.port, called, ds, nodelay=True)
        nagle = _timed_queries(lung_node.port, called, ds, nodelay=False)
        with_association = []
        for _ in range(30):
            started = time.perf_counter()
            responses = find(lung_node.port, ds, called=called)
            with_association.append((time.perf_counter() - started) * 1000)
            assert responses[-1][0].Status == 0x0000
        lines.append(f"C-FIND round trip {name:17s} p50: {statistics.median(nodelay):6.1f} ms (open association, "
                     f"SCU TCP_NODELAY), {statistics.median(nagle):6.1f} ms (SCU with Nagle), "
                     f"{statistics.median(with_association):6.1f} ms (association per query); n=30 each")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
