"""The PDF companion of the similar-case SR: real text (the table, the footer), thumbnails or placeholders, no
other patient's identity; wrapped as a dciodvfy-clean Encapsulated PDF in the query study with deterministic UIDs;
sent next to the SR by a running node unless ``results.companion`` is "off"."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from node_helpers import dciodvfy, storescp, storescu, wait_for
from sr_helpers import pdf_text, squash

from config import Settings, load_settings
from config.settings import ResultSettings
from dicom_node.node import Node
from dicom_node.report import reporting, thumbnails
from dicom_node.report.companion import (
    DISCLAIMER,
    ENCAPSULATED_PDF_STORAGE,
    PDF_SERIES_DESCRIPTION,
    PDF_SERIES_NUMBER,
    TITLE,
    QueryStudy,
    build_companion_dicom,
    build_companion_pdf,
    companion_bytes,
)
from dicom_node.report.similar_case_sr import SimilarCase, build_similar_case_sr
from dicom_node.report.thumbnails import ThumbnailError, render_thumbnail
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import DeliveryState, StateStore
from model_export.registry import install_bundle

SETTINGS = ResultSettings()
BUNDLE = {"bundle_id": "b" * 64, "bundle_name": "medfinder-ref", "bundle_version": "1.2.0"}
QUERY_SERIES = "Lung_Dx-A0001_series2_5mm"
OTHER_SERIES = "Lung_Dx-A0002_series2_B70f"


def header(folder: Path) -> pydicom.Dataset:
    return pydicom.dcmread(min(folder.glob("*.dcm")), stop_before_pixels=True)


@pytest.fixture(scope="module")
def lung(lung_ct_dir: Path) -> dict[str, object]:
    """The query header (patient A0001), the other patient's header (A0002) and both thumbnails."""
    query, other = header(lung_ct_dir / QUERY_SERIES), header(lung_ct_dir / OTHER_SERIES)
    return {"query": query, "other": other,
            "images": {str(query.StudyInstanceUID): render_thumbnail(lung_ct_dir / QUERY_SERIES),
                       str(other.StudyInstanceUID): render_thumbnail(lung_ct_dir / OTHER_SERIES)}}


def cases_for(other: pydicom.Dataset) -> list[SimilarCase]:
    return [
        SimilarCase(rank=2, score=0.41234567, study_uid="1.2.826.0.1.3680043.8.498.999", accession="ACC-77",
                    study_date="20200131", description="CT THORAX <HIGH-RES> & LOW DOSE"),
        SimilarCase(rank=1, score=0.87654321, study_uid=str(other.StudyInstanceUID), accession="ACC-42",
                    study_date=str(other.StudyDate), description=str(other.get("StudyDescription", "")) or None),
    ]


def build_pdf(lung: dict[str, object], images: dict[str, bytes | None] | None = None, version: int = 1) -> bytes:
    query, other = lung["query"], lung["other"]
    return build_companion_pdf(QueryStudy.from_header(query), cases_for(other),  # type: ignore[arg-type]
                               thumbnails=lung["images"] if images is None else images,  # type: ignore[arg-type]
                               result_version=version, **BUNDLE)


def test_pdf_has_the_table_as_real_text_and_no_patient_identity(lung: dict[str, object]) -> None:
    pdf = build_pdf(lung)
    assert pdf.startswith(b"%PDF-")
    text = pdf_text(pdf)
    query, other = lung["query"], lung["other"]
    needles = [TITLE, "Query study", "Similar studies (other patients)", "Rank", "Image", "Score", "Study date",
               "Accession", str(query.StudyInstanceUID), f"Study date {str(query.StudyDate)[:4]}-",
               str(other.StudyInstanceUID), "1.2.826.0.1.3680043.8.498.999",
               "0.877", "0.412",  # the scores as numbers beside their bars
               "ACC-42", "ACC-77", "2020-01-31",
               "CT THORAX <HIGH-RES> & LOW DOSE",  # markup in a description is text, not layout
               DISCLAIMER, "medfinder-ref 1.2.0", BUNDLE["bundle_id"]]
    for needle in needles:
        assert squash(needle) in text, needle
    assert text.index("ACC-42") < text.index("ACC-77"), "rank order"
    for person in (query, other):
        for keyword in ("PatientName", "PatientID"):
            value = str(person.get(keyword, "")).strip()
            if value:
                assert value.encode() not in pdf, f"{keyword} must never be in the PDF"
    assert pdf.count(b"/Subtype /Image") == 2, "query and rank-1 thumbnails; the unknown study gets a placeholder"
    assert squash("no image") in text
    assert build_pdf(lung) == pdf, "the same inputs give the same bytes"


def test_pdf_without_thumbnails_or_matches(lung: dict[str, object]) -> None:
    pdf = build_pdf(lung, images={})
    assert b"/Subtype /Image" not in pdf and pdf_text(pdf).count(squash("no image")) == 3
    empty = build_companion_pdf(QueryStudy.from_header(lung["query"]), [], thumbnails={},  # type: ignore[arg-type]
                                result_version=1, **BUNDLE)
    assert squash("no similar case found") in pdf_text(empty)


def test_encapsulated_pdf_is_valid_in_the_query_study_with_deterministic_uids(lung: dict[str, object],
                                                                               tmp_path: Path) -> None:
    query, other = lung["query"], lung["other"]
    pdf = build_pdf(lung)
    ds = build_companion_dicom(query, pdf, result_version=1, settings=SETTINGS, **BUNDLE)  # type: ignore[arg-type]
    path = tmp_path / "companion.dcm"
    path.write_bytes(companion_bytes(ds))
    errors, _warnings = dciodvfy(path)
    assert errors == []

    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert back.SOPClassUID == ENCAPSULATED_PDF_STORAGE and back.Modality == "DOC"
    assert back.SpecificCharacterSet == "ISO_IR 192" and back.DocumentTitle == TITLE
    assert (back.SeriesNumber, back.SeriesDescription) == (PDF_SERIES_NUMBER, PDF_SERIES_DESCRIPTION)
    assert (back.ConversionType, back.BurnedInAnnotation) == ("WSD", "YES")
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert bytes(back.EncapsulatedDocument)[:back.EncapsulatedDocumentLength] == pdf
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber"):
        assert back.get(keyword) == query.get(keyword), keyword
    assert back.SeriesInstanceUID != query.SeriesInstanceUID
    assert back.SourceInstanceSequence[0].ReferencedSOPInstanceUID == query.SOPInstanceUID

    again = build_companion_dicom(query, pdf, result_version=1, settings=SETTINGS, **BUNDLE)  # type: ignore[arg-type]
    v2 = build_companion_dicom(query, build_pdf(lung, version=2), result_version=2, settings=SETTINGS,
                               **BUNDLE)  # type: ignore[arg-type]
    sr = build_similar_case_sr(query, cases_for(other), result_version=1, settings=SETTINGS,  # type: ignore[arg-type]
                               **BUNDLE)
    assert again.SOPInstanceUID == ds.SOPInstanceUID and again.SeriesInstanceUID == ds.SeriesInstanceUID
    assert v2.SOPInstanceUID != ds.SOPInstanceUID and v2.SeriesInstanceUID == ds.SeriesInstanceUID
    assert {ds.SOPInstanceUID, ds.SeriesInstanceUID}.isdisjoint({sr.SOPInstanceUID, sr.SeriesInstanceUID})
    assert sr.StudyInstanceUID == ds.StudyInstanceUID

    with pytest.raises(ValueError, match="not a PDF"):
        build_companion_dicom(query, b"hello", result_version=1, settings=SETTINGS, **BUNDLE)  # type: ignore[arg-type]


def test_a_thumbnail_that_cannot_be_drawn_becomes_a_placeholder(tmp_path: Path, lung_ct_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(series_dir: Path, **kwargs: object) -> bytes:
        raise ThumbnailError("the series cannot be loaded as a volume (PixelDecodeError)")

    monkeypatch.setattr(thumbnails, "render_thumbnail", broken)
    layout = NodeLayout.create(tmp_path / "node")
    store = StateStore(layout.state_db)
    query = header(lung_ct_dir / QUERY_SERIES)
    folder = layout.study_spool(str(query.StudyInstanceUID)) / str(query.SeriesInstanceUID)
    folder.mkdir(parents=True)
    images = reporting._thumbnails(load_settings(None), layout, store, str(query.StudyInstanceUID),
                                   str(query.SeriesInstanceUID), cases_for(query))
    store.close()
    assert images and set(images.values()) == {None}


# --- a running node sends SR + PDF (or the SR alone) --------------------------------------------------------------


def node_settings(data_dir: Path, pacs_port: int, companion: str) -> Settings:
    return load_settings(None, overrides={
        "paths": {"data_dir": str(data_dir)},
        "node": {"bind": "127.0.0.1", "port": 0, "quiet_seconds": 1.0, "poll_interval_s": 0.05,
                 "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]},
        "selection": {"min_slices": 20},
        "workers": {"onnx_threads": 1},
        "results": {"companion": companion},
    })


def received(pacs: Path, prefix: str) -> list[Path]:
    return sorted(pacs.glob(f"{prefix}*"))


@pytest.mark.parametrize("companion", ["pdf", "off"])
def test_node_sends_the_companion_beside_the_sr_unless_off(tmp_path: Path, lung_ct_dir: Path, tiny_bundle: Path,
                                                           companion: str) -> None:
    data_dir = tmp_path / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    pacs = tmp_path / "pacs"
    files = sorted((lung_ct_dir / OTHER_SERIES).glob("*.dcm"))
    with storescp(pacs) as pacs_port:
        node = Node(node_settings(data_dir, pacs_port, companion))
        node.start()
        try:
            assert storescu(node.scp.port, files).returncode == 0
            expected = 2 if companion == "pdf" else 1
            wait_for(lambda: len(node.store.deliveries(state=DeliveryState.DELIVERED)) == expected, 90,
                     "the deliveries")
            deliveries = node.store.deliveries()
        finally:
            node.stop()
    assert len(received(pacs, "SR")) == 1
    assert len(deliveries) == (2 if companion == "pdf" else 1)
    pdfs = received(pacs, "PDF")
    if companion == "off":
        assert pdfs == []
        return
    (pdf_path,) = pdfs
    assert dciodvfy(pdf_path)[0] == []
    sr, doc = pydicom.dcmread(received(pacs, "SR")[0]), pydicom.dcmread(pdf_path)
    assert doc.StudyInstanceUID == sr.StudyInstanceUID == header(lung_ct_dir / OTHER_SERIES).StudyInstanceUID
    assert doc.SeriesInstanceUID != sr.SeriesInstanceUID
    document = bytes(doc.EncapsulatedDocument)[:doc.EncapsulatedDocumentLength]
    assert squash(TITLE) in pdf_text(document) and b"/Subtype /Image" in document, "the query's thumbnail was drawn"
    study_uid = str(doc.StudyInstanceUID)
    assert list((data_dir / "thumbnails" / study_uid).glob("*-lung-192.png")), "drawn through the cache"
