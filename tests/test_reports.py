"""Prior radiology reports: read from DICOM SR, attached to their study, embedded as its ``report`` vector.

The node runs in-process with its real SCP, pipeline and edge index (and the tiny bundle); reports are built
with highdicom and sent with dcmtk storescu, the CT studies are the real lung fixtures. Every log line the process
writes while it runs (our loggers at DEBUG; pynetdicom and highdicom capped as ``medfinder serve`` caps them) is
captured to prove that no report text reaches a log.
"""

from __future__ import annotations

import copy
import io
import logging
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr import CodedConcept, ContainerContentItem, TextContentItem
from highdicom.sr import RelationshipTypeValues as Rel
from node_helpers import storescu, wait_for
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, generate_uid
from sr_helpers import write_sr

from config import Settings, load_settings
from dicom_node.cli import CHATTY_LOGGERS
from dicom_node.node import Node
from dicom_node.receive.report_sr import is_own_result
from dicom_node.store.state import StudyState
from model_export.registry import install_bundle
from workers.index import point_id_for
from workers.index.base import REPORT_VECTOR
from workers.report_text import report_text
from workers.search import QueryError

A0001 = "Lung_Dx-A0001_series2_5mm"
A0002 = "Lung_Dx-A0002_series2_B70f"
# Distinctive words, so that finding them anywhere in the log can only mean the report leaked.
FIRST_FINDINGS = "Moderate left pleural effusion with heliotrope-pattern basal atelectasis."
FIRST_IMPRESSION = "Effusion, likely parapneumonic; quillwort follow-up advised."
SECOND_FINDINGS = "Resolved effusion; residual marmalade-shaped scarring in the left lower lobe."
LEAK_MARKERS = ("heliotrope", "quillwort", "marmalade", "parapneumonic", "scarring")


# --- building reports ------------------------------------------------------------------------------------


def ct_header(series_dir: Path) -> Dataset:
    return pydicom.dcmread(min(series_dir.glob("*.dcm")), stop_before_pixels=True)


def section(name: CodedConcept, *texts: str) -> ContainerContentItem:
    container = ContainerContentItem(name=name, relationship_type=Rel.CONTAINS)
    container.ContentSequence = [TextContentItem(name=codes.DCM.Finding if name == codes.DCM.Findings
                                                 else codes.DCM.Impression, value=text,
                                                 relationship_type=Rel.CONTAINS) for text in texts]
    return container


def radiology_report(header: Dataset, sections: list[ContainerContentItem], *, enhanced: bool = False) -> Dataset:
    """A radiology report SR of ``header``'s study (highdicom), with an observer name that must not be read."""
    root = ContainerContentItem(name=CodedConcept("18748-4", "LN", "Diagnostic imaging report"))
    observer = hd.sr.PnameContentItem(name=codes.DCM.PersonObserverName, value="Reader^Rita",
                                      relationship_type=Rel.HAS_OBS_CONTEXT)
    root.ContentSequence = [observer, *sections]
    kind = hd.sr.EnhancedSR if enhanced else hd.sr.ComprehensiveSR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixtures' single-component patient names
        return kind(evidence=[header], content=root, series_instance_uid=generate_uid(), series_number=77,
                    sop_instance_uid=generate_uid(), instance_number=1, manufacturer="Example RIS",
                    is_complete=True, is_final=True)


def save(dataset: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


# --- the text of an SR -----------------------------------------------------------------------------------


def test_report_text_keeps_document_order_and_headings(lung_ct_dir: Path) -> None:
    header = ct_header(lung_ct_dir / A0002)
    findings = section(codes.DCM.Findings, "Left lower lobe consolidation.", "Small effusion.")
    size = hd.sr.NumContentItem(name=CodedConcept("410668003", "SCT", "Length"), value=12,
                                unit=CodedConcept("mm", "UCUM", "millimeter"), relationship_type=Rel.CONTAINS)
    finding_code = hd.sr.CodeContentItem(name=codes.DCM.Finding, value=CodedConcept("60046008", "SCT",
                                         "Pleural effusion"), relationship_type=Rel.CONTAINS)
    findings.ContentSequence.extend([size, finding_code])
    sr = radiology_report(header, [findings, section(codes.DCM.Impression, "Pneumonia.")], enhanced=True)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"
    assert report_text(sr) == ("Findings: Left lower lobe consolidation. Small effusion. Length: 12 mm "
                               "Finding: Pleural effusion\nImpression: Pneumonia.")
    assert "Rita" not in report_text(sr), "observer context is not report text"


def test_a_text_item_outside_sections_heads_itself_and_empty_sections_vanish(lung_ct_dir: Path) -> None:
    header = ct_header(lung_ct_dir / A0002)
    empty = ContainerContentItem(name=codes.DCM.Findings, relationship_type=Rel.CONTAINS)
    empty.ContentSequence = []
    sr = radiology_report(header, [empty])
    sr.ContentSequence.append(TextContentItem(name=codes.DCM.Impression, value="  No acute   findings. ",
                                              relationship_type=Rel.CONTAINS))
    assert report_text(sr) == "Impression: No acute findings."
    assert report_text(Dataset()) == ""


def test_our_own_similar_case_sr_is_recognised(tmp_path: Path, lung_ct_dir: Path) -> None:
    _path, ours = write_sr(tmp_path / "ours")
    assert is_own_result(ours, "MedFinder Node")
    relabelled = pydicom.dcmread(_path)
    relabelled.SOPClassUID = ComprehensiveSRStorage
    del relabelled.CodingSchemeIdentificationSequence
    assert is_own_result(relabelled, "MedFinder Node"), "by its root concept, whatever the class"
    report = radiology_report(ct_header(lung_ct_dir / A0002), [section(codes.DCM.Findings, "Effusion.")])
    assert not is_own_result(report, "MedFinder Node")
    report.Manufacturer = "MedFinder Node"
    assert not is_own_result(report, "MedFinder Node"), "our manufacturer alone does not make it ours"


def test_reconcile_puts_a_stored_report_on_its_indexed_study_and_embeds_a_missing_vector(
        tmp_path: Path, data_dir: Path) -> None:
    """A node stopped between storing a report and writing its vector (or unable to embed it then) catches up
    at start: the report's text is embedded now and the point gets its ``report`` vector."""
    import threading

    from dicom_node.pipeline.report_vectors import ReportVectors
    from dicom_node.store.reports import ReportStore
    from model_export.bundle_manifest import read_manifest
    from model_export.registry import active_bundle_path
    from workers.embed_study import bundle_for
    from workers.index import open_index
    from workers.index.base import IMAGE_VECTOR

    settings = node_settings(data_dir)
    manifest = read_manifest(active_bundle_path(settings))
    bundle_id, dim = manifest.bundle_id, manifest.embedding_dim
    bundle = bundle_for(settings, bundle_id)
    index = open_index(settings, tmp_path / "index")
    index.ensure_collection(bundle_id, dim)
    try:
        uid = "1.2.3.4.5"
        image = [1.0] + [0.0] * (dim - 1)
        index.upsert(point_id_for(uid, bundle_id), {IMAGE_VECTOR: image},
                     {"study_uid": uid, "bundle_id": bundle_id, "has_report": False})
        reports = ReportStore(tmp_path / "reports")
        reports.put(uid, "Right upper lobe nodule.", "rest")  # stored without a vector
        reports.put("1.2.3.4.6", "Not indexed yet.", "rest")
        vectors = ReportVectors(reports, index, bundle, threading.RLock())
        assert vectors.reconcile() == 1
        point = index.get(point_id_for(uid, bundle_id))
        assert point is not None and point.payload["has_report"] and point.vectors[IMAGE_VECTOR] == image
        np.testing.assert_allclose(point.vectors[REPORT_VECTOR], bundle.embed_text("Right upper lobe nodule."),
                                   atol=1e-5)
        assert reports.get(uid).vector_of(bundle_id) is not None, "the vector is stored for next time"
        assert vectors.reconcile() == 1 and index.count() == 1, "idempotent"
    finally:
        index.close()


# --- reports received by a running node ------------------------------------------------------------------


def node_settings(data_dir: Path, **node: object) -> Settings:
    return load_settings(None, overrides={
        "paths": {"data_dir": str(data_dir)},
        "node": {"bind": "127.0.0.1", "port": 0, "quiet_seconds": 1.0, "poll_interval_s": 0.05, **node},
        "selection": {"min_slices": 20},
        "workers": {"onnx_threads": 1},
        "api": {"http_port": 0},  # no REST server here
    }, environ={})


@pytest.fixture
def data_dir(tmp_path: Path, tiny_bundle: Path) -> Path:
    folder = tmp_path / "node-data"
    install_bundle(tiny_bundle, folder, activate=True)
    return folder


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    """Everything logged in this process while the test runs, tracebacks included."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    previous = root.level, {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in CHATTY_LOGGERS:  # as `medfinder serve` does
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(previous[0])
        for name, level in previous[1].items():
            logging.getLogger(name).setLevel(level)


def state_of(node: Node, study_uid: str) -> StudyState | None:
    row = node.store.study(study_uid)
    return row.state if row is not None else None


def report_vector(node: Node, study_uid: str) -> tuple[list[float] | None, bool]:
    point = node.index.get(point_id_for(study_uid, node.bundle_id))
    assert point is not None, "the study is indexed"
    return point.vectors.get(REPORT_VECTOR), bool(point.payload.get("has_report"))


def test_reports_over_dicom_before_and_after_images_replace_each_other_and_never_reach_the_log(
        tmp_path: Path, lung_ct_dir: Path, data_dir: Path, captured_log: io.StringIO) -> None:
    first_header, second_header = ct_header(lung_ct_dir / A0001), ct_header(lung_ct_dir / A0002)
    study, other = str(second_header.StudyInstanceUID), str(first_header.StudyInstanceUID)
    first = save(radiology_report(second_header, [section(codes.DCM.Findings, FIRST_FINDINGS),
                                                  section(codes.DCM.Impression, FIRST_IMPRESSION)]), tmp_path / "r1")
    first_text = f"Findings: {FIRST_FINDINGS}\nImpression: {FIRST_IMPRESSION}"
    lonely_header = copy.deepcopy(second_header)
    lonely_header.StudyInstanceUID = generate_uid()  # a study the node never gets images of
    lonely = save(radiology_report(lonely_header, [section(codes.DCM.Findings, "Normal chest.")]), tmp_path / "r0")

    node = Node(node_settings(data_dir))
    node.start()
    try:
        # 1. The report comes first: kept, readable by the owner only, no study assembly started.
        assert storescu(node.scp.port, [first, lonely]).returncode == 0
        record = node.reports.get(study)
        assert record is not None and record.text == first_text and record.source == "dicom-sr"
        assert record.sop_instance_uid == pydicom.dcmread(first).SOPInstanceUID
        assert stat.S_IMODE(node.reports.path(study).stat().st_mode) == 0o600
        assert pydicom.dcmread(node.reports.sr_path(study, record.sop_instance_uid)) == pydicom.dcmread(first)
        assert node.store.studies() == [], "a study made of an SR only is no CT study to assemble"

        # 2. The images come: the pipeline indexes the study with the stored report's vector.
        assert storescu(node.scp.port, [lung_ct_dir / A0001, lung_ct_dir / A0002]).returncode == 0
        wait_for(lambda: state_of(node, study) == StudyState.REPORTED and state_of(node, other) == StudyState.REPORTED,
                 120, "both lung studies to be indexed and reported")
        vector, has_report = report_vector(node, study)
        assert has_report and vector is not None
        np.testing.assert_allclose(vector, node.bundle.embed_text(first_text), atol=1e-5)
        assert report_vector(node, other) == (None, False)
        assert {s.study_uid for s in node.store.studies()} == {study, other}, "the SR-only study never appears"
        found = node.query_engine.search_text(first_text, limit=5)
        assert found.hits[0].study_uid == study and found.hits[0].has_report and found.query["ranking"] == "rrf"

        # 3. Our own similar-case SR comes back (as sent, and relabelled as a Comprehensive SR): not a report.
        (ours,) = [path for path in sorted((data_dir / "results" / study).glob("*.dcm"))
                   if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR"]  # not its PDF companion
        relabelled = pydicom.dcmread(ours)
        relabelled.SOPClassUID = ComprehensiveSRStorage
        relabelled.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
        relabelled.SOPInstanceUID = generate_uid()
        relabelled.file_meta.MediaStorageSOPInstanceUID = relabelled.SOPInstanceUID
        relabelled_path = tmp_path / "relabelled.dcm"
        relabelled.save_as(relabelled_path, enforce_file_format=True)
        assert storescu(node.scp.port, [ours, relabelled_path], extra=["-R"]).returncode == 0  # -R: propose 3D SR
        assert node.reports.get(study) == record, "the report is untouched"
        assert not node.reports.sr_path(study, relabelled.SOPInstanceUID).exists()

        # 4. A second report replaces the first, text and vector.
        second = save(radiology_report(second_header, [section(codes.DCM.Findings, SECOND_FINDINGS)], enhanced=True),
                      tmp_path / "r2")
        assert storescu(node.scp.port, [second]).returncode == 0
        replaced = node.reports.get(study)
        assert replaced is not None and replaced.text == f"Findings: {SECOND_FINDINGS}"
        vector, has_report = report_vector(node, study)
        assert has_report
        np.testing.assert_allclose(vector, node.bundle.embed_text(replaced.text), atol=1e-5)
        assert node.query_engine.similar_to_study(study, limit=5).query["vectors"] == ["image", "report"]

        # 5. The REST path (node.attach_report): same effect; empty text and bad UIDs are query errors.
        node.attach_report(other, "Bilateral upper lobe emphysema.", "rest")
        assert report_vector(node, other)[1] and node.reports.get(other).source == "rest"
        with pytest.raises(QueryError, match="must not be empty"):
            node.attach_report(other, " \n", "rest")
        with pytest.raises(QueryError, match="not a valid UID"):
            node.attach_report("1.2.x", "Effusion.", "rest")
        assert node.reports.get(other).text == "Bilateral upper lobe emphysema."
    finally:
        node.stop()

    log = captured_log.getvalue()
    assert "event=report_attached" in log and "event=study_indexed" in log, "the log was captured"
    assert "our own similar-case SR" in log
    for marker in LEAK_MARKERS + ("emphysema", "Rita"):
        assert marker not in log, f"report text ({marker!r}) reached the log"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the node parsing the invalid UID we sent
def test_malformed_report_srs_are_quarantined_and_reports_pass_even_when_other_storage_is_refused(
        tmp_path: Path, lung_ct_dir: Path, data_dir: Path) -> None:
    header = ct_header(lung_ct_dir / A0002)
    good = save(radiology_report(header, [section(codes.DCM.Findings, "Small effusion.")]), tmp_path / "good")
    study = str(header.StudyInstanceUID)
    bad = radiology_report(copy.deepcopy(header), [section(codes.DCM.Findings, "Small effusion.")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID we mean to send
        bad.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.01"  # a leading zero: not a valid UID
        bad_path = save(bad, tmp_path / "bad")
    ours, _ = write_sr(tmp_path / "ours")  # Comprehensive 3D SR: an "other" storage class

    node = Node(node_settings(data_dir, other_storage="refuse"))
    node.start()
    try:
        assert storescu(node.scp.port, [good]).returncode == 0
        assert node.reports.get(study).text == "Findings: Small effusion."
        refused = storescu(node.scp.port, [bad_path], extra=["-v"])
        assert refused.returncode != 0 and "Error: CannotUnderstand" in refused.stderr, refused  # 0xC0xx
        refused_class = storescu(node.scp.port, [ours], extra=["-R"])
        assert "No Acceptable Presentation Contexts" in refused_class.stdout + refused_class.stderr, refused_class
    finally:
        node.stop()
    reasons = [p.read_text() for p in (data_dir / "quarantine").glob("*.reason.json")]
    assert len(reasons) == 1 and "StudyInstanceUID" in reasons[0] and "0xC002" in reasons[0]
    assert node.reports.study_uids() == [study]
    assert not list((data_dir / "spool").iterdir()), "report SRs never enter the CT spool"
