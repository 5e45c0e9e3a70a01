"""The human-readable companion of every similar-case SR: a one-to-few page PDF wrapped as Encapsulated PDF.

Why: many PACS viewers render SR poorly or not at all (field notes 13.2); a PDF opens everywhere. It carries the
same table as the SR (rank, score, study date, description, accession, Study UID) plus thumbnails, in the query
study, in its own series, so it lands next to the SR.

PDF layout (A4 portrait, real text, Helvetica; built with reportlab ``invariant=1`` so the same inputs give the
same bytes and a rebuilt result version is byte-identical):

* title "Similar cases — MedFinder", then one line: result version, how many cases, that rank 1 is most similar;
* the query study: its thumbnail beside date, description, accession and Study UID;
* the table, one row per similar case: rank, thumbnail (a grey "no image" box when the node no longer holds that
  study or it cannot be drawn), the score as a bar (cosine similarity, 0 to 1) with its number, study date,
  accession, description with the Study UID under it;
* on every page a footer: model name and version, bundle id, "Decision support, not a diagnosis.", page number.

Patients: matches are other patients' studies and appear only by date, accession, description and Study UID;
no patient name or id is ever written into the PDF (not even the query patient's: the DICOM header carries it).
Text is limited to what the built-in PDF fonts can show (Windows-1252); other characters print as "?".

The DICOM wrapper: Encapsulated PDF Storage, Modality DOC, ConversionType WSD, BurnedInAnnotation YES, patient
and study attributes inherited from the query instance exactly as the SR does (``similar_case_sr``), UIDs derived
from (study, bundle[, version]) with a "pdf" part so they never equal the SR's, Explicit VR Little Endian,
Specific Character Set ISO_IR 192 (the title's em dash).
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from reportlab.graphics.shapes import Drawing, Rect, String
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    Image,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from config.settings import ResultSettings
from dicom_node.report.similar_case_sr import (
    IHE_SCHEME,
    SimilarCase,
    coding_schemes,
    contributing_equipment,
    format_date,
    node_version,
    query_evidence,
)
from dicom_node.report.uids import deterministic_uid

TITLE = "Similar cases — MedFinder"
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
PDF_SERIES_NUMBER = 9902
PDF_SERIES_DESCRIPTION = "MedFinder similar cases (PDF)"
DISCLAIMER = "Decision support, not a diagnosis."

_PAGE_W, _PAGE_H = A4
_MARGIN = 15 * mm
_CONTENT_W = _PAGE_W - 2 * _MARGIN
_THUMB = 24 * mm
_QUERY_THUMB = 40 * mm
_BAR_W, _BAR_H = 16 * mm, 3.2 * mm
# Table columns: rank, image, score, date, accession, description + Study UID (the rest of the width).
_COLUMNS = [12 * mm, _THUMB + 3 * mm, 31 * mm, 21 * mm, 24 * mm]
_COLUMNS.append(_CONTENT_W - sum(_COLUMNS))
_HEADER_BG = colors.HexColor("#dde3ea")
_ZEBRA = colors.HexColor("#f4f6f8")
_BAR_FILL = colors.HexColor("#2f6f9f")
_BAR_TRACK = colors.HexColor("#d9dee4")


@dataclass(frozen=True)
class QueryStudy:
    """What the PDF says about the query study (no patient identity)."""

    study_uid: str
    study_date: str | None
    description: str | None
    accession: str | None

    @classmethod
    def from_header(cls, header: Dataset) -> QueryStudy:
        """Read from the query instance's header."""
        return cls(study_uid=str(header.StudyInstanceUID), study_date=_text(header.get("StudyDate")),
                   description=_text(header.get("StudyDescription")), accession=_text(header.get("AccessionNumber")))


def _text(value: object) -> str | None:
    text = str(value).strip() if value not in (None, "") else ""
    return text or None


def pdf_series_uid(settings: ResultSettings, study_uid: str, bundle_id: str) -> str:
    """One PDF series per (query study, bundle), never the SR's series (distinct "pdf" part)."""
    return deterministic_uid(settings.uid_root, "pdf-series", study_uid, bundle_id)


def pdf_instance_uid(settings: ResultSettings, study_uid: str, bundle_id: str, result_version: int) -> str:
    """One SOP Instance UID per (query study, bundle, result version), distinct from the SR's."""
    return deterministic_uid(settings.uid_root, "pdf-instance", study_uid, bundle_id, str(int(result_version)))


# --- the PDF -------------------------------------------------------------------------------------------------


def _cp1252(value: str | None, fallback: str) -> str:
    """Text limited to what the built-in PDF fonts encode (Windows-1252); others become "?"."""
    text = (value or "").strip() or fallback
    return text.encode("cp1252", errors="replace").decode("cp1252")


def _pdf_safe(value: str | None, fallback: str) -> str:
    """:func:`_cp1252` text escaped for Paragraph markup."""
    return escape(_cp1252(value, fallback))


def _styles() -> dict[str, ParagraphStyle]:
    base = getSampleStyleSheet()
    body = ParagraphStyle("mf-body", parent=base["BodyText"], fontName="Helvetica", fontSize=8.5, leading=10.5)
    return {
        "title": ParagraphStyle("mf-title", parent=base["Title"], fontName="Helvetica-Bold", fontSize=18,
                                leading=22, alignment=0, spaceAfter=2 * mm),
        "h2": ParagraphStyle("mf-h2", parent=base["Heading2"], fontName="Helvetica-Bold", fontSize=11.5,
                             leading=14, spaceBefore=4 * mm, spaceAfter=2 * mm),
        "body": body,
        "cell": ParagraphStyle("mf-cell", parent=body, fontSize=8, leading=9.8),
        "head": ParagraphStyle("mf-head", parent=body, fontName="Helvetica-Bold", fontSize=8, leading=9.8),
        "uid": ParagraphStyle("mf-uid", parent=body, fontName="Courier", fontSize=6.5, leading=7.8,
                              textColor=colors.HexColor("#444444")),
    }


def _thumbnail(png: bytes | None, edge: float, reason: str) -> Image | Drawing:
    """The thumbnail at ``edge`` points, or a grey placeholder box that says why there is none."""
    if png:
        return Image(io.BytesIO(png), width=edge, height=edge)
    box = Drawing(edge, edge)
    box.add(Rect(0, 0, edge, edge, fillColor=colors.HexColor("#e6e6e6"), strokeColor=colors.HexColor("#b0b0b0"),
                 strokeWidth=0.5))
    box.add(String(edge / 2, edge / 2 - 3, reason, fontName="Helvetica", fontSize=6.5, textAnchor="middle",
                   fillColor=colors.HexColor("#666666")))
    return box


def _score_bar(score: float) -> Drawing:
    """The score as a bar over [0, 1] (cosine similarity; below 0 draws empty) and its number."""
    fraction = min(1.0, max(0.0, float(score)))
    drawing = Drawing(_BAR_W + 12 * mm, _BAR_H + 1)
    drawing.add(Rect(0, 0.5, _BAR_W, _BAR_H, fillColor=_BAR_TRACK, strokeColor=None))
    if fraction > 0:
        drawing.add(Rect(0, 0.5, _BAR_W * fraction, _BAR_H, fillColor=_BAR_FILL, strokeColor=None))
    drawing.add(String(_BAR_W + 1.5 * mm, 1.2, f"{float(score):.3f}", fontName="Helvetica", fontSize=8))
    return drawing


def _query_block(query: QueryStudy, png: bytes | None, styles: dict[str, ParagraphStyle],
                 placeholder: str) -> Table:
    facts = [
        Paragraph(f"<b>Study date</b> {_pdf_safe(format_date(query.study_date), '')}", styles["body"]),
        Paragraph(f"<b>Description</b> {_pdf_safe(query.description, 'no description')}", styles["body"]),
        Paragraph(f"<b>Accession</b> {_pdf_safe(query.accession, 'not recorded')}", styles["body"]),
        Paragraph(f"<b>Study UID</b> {_pdf_safe(query.study_uid, '')}", styles["uid"]),
    ]
    block = Table([[_thumbnail(png, _QUERY_THUMB, placeholder), facts]],
                  colWidths=[_QUERY_THUMB + 4 * mm, _CONTENT_W - _QUERY_THUMB - 4 * mm])
    block.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (0, 0), 0)]))
    return block


def _cases_table(cases: Sequence[SimilarCase], thumbnails: Mapping[str, bytes | None],
                 styles: dict[str, ParagraphStyle], placeholder: str) -> Table:
    head = [Paragraph(text, styles["head"]) for text in
            ("Rank", "Image", "Score", "Study date", "Accession", "Description · Study UID")]
    rows: list[list[object]] = [head]
    for case in cases:
        description = _pdf_safe(case.description, "no description")
        rows.append([
            Paragraph(str(int(case.rank)), styles["cell"]),
            _thumbnail(thumbnails.get(case.study_uid), _THUMB, placeholder),
            _score_bar(case.score),
            Paragraph(_pdf_safe(format_date(case.study_date), ""), styles["cell"]),
            Paragraph(_pdf_safe(case.accession, "not recorded"), styles["cell"]),
            [Paragraph(description, styles["cell"]), Paragraph(_pdf_safe(case.study_uid, ""), styles["uid"])],
        ])
    table = Table(rows, colWidths=_COLUMNS, repeatRows=1)
    style = [
        ("BACKGROUND", (0, 0), (-1, 0), _HEADER_BG),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("LINEBELOW", (0, 0), (-1, -1), 0.25, colors.HexColor("#c0c6cc")),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
    ]
    style += [("BACKGROUND", (0, row), (-1, row), _ZEBRA) for row in range(2, len(rows), 2)]
    table.setStyle(TableStyle(style))
    return table


def build_companion_pdf(query: QueryStudy, cases: Sequence[SimilarCase], *, thumbnails: Mapping[str, bytes | None],
                        bundle_id: str, bundle_name: str, bundle_version: str, result_version: int,
                        placeholder: str = "no image") -> bytes:
    """The PDF; ``thumbnails`` maps Study UIDs (query and matches) to PNG bytes, missing/None → placeholder."""
    styles = _styles()
    ordered = sorted(cases, key=lambda case: case.rank)
    if ordered:
        summary = (f"Result version {int(result_version)}: {len(ordered)} similar case(s) found by "
                   f"{bundle_name} {bundle_version}; rank 1 is the most similar. Scores are cosine similarities.")
    else:
        summary = f"Result version {int(result_version)}: no similar case found; no other indexed study qualified."
    story: list[object] = [
        Paragraph(escape(TITLE), styles["title"]),
        Paragraph(_pdf_safe(summary, ""), styles["body"]),
        Paragraph("Query study", styles["h2"]),
        _query_block(query, thumbnails.get(query.study_uid), styles, placeholder),
        Paragraph("Similar studies (other patients)", styles["h2"]),
    ]
    if ordered:
        story.append(_cases_table(ordered, thumbnails, styles, placeholder))
    else:
        story.append(Paragraph("No similar studies.", styles["body"]))
    story.append(Spacer(1, 4 * mm))

    footer = _cp1252(f"Model {bundle_name} {bundle_version} · bundle {bundle_id} · "
                       f"MedFinder Node {node_version()}", "")

    def draw_footer(canvas: Canvas, document: SimpleDocTemplate) -> None:
        canvas.saveState()
        canvas.setStrokeColor(colors.HexColor("#c0c6cc"))
        canvas.line(_MARGIN, 14 * mm, _PAGE_W - _MARGIN, 14 * mm)
        canvas.setFont("Helvetica", 7)
        canvas.drawString(_MARGIN, 10 * mm, footer)
        canvas.setFont("Helvetica-Bold", 7.5)
        canvas.drawString(_MARGIN, 6.5 * mm, DISCLAIMER)
        canvas.setFont("Helvetica", 7)
        canvas.drawRightString(_PAGE_W - _MARGIN, 6.5 * mm, f"Page {document.page}")
        canvas.restoreState()

    buffer = io.BytesIO()
    document = SimpleDocTemplate(buffer, pagesize=A4, leftMargin=_MARGIN, rightMargin=_MARGIN, topMargin=_MARGIN,
                                 bottomMargin=20 * mm, title=TITLE, author="MedFinder Node",
                                 subject="Similar-case search result (decision support)", creator="MedFinder Node",
                                 invariant=1, pageCompression=0)
    document.build(story, onFirstPage=draw_footer, onLaterPages=draw_footer)
    return buffer.getvalue()


# --- the DICOM wrapper ---------------------------------------------------------------------------------------


def build_companion_dicom(query_instance: Dataset, pdf: bytes, *, bundle_id: str, bundle_name: str,
                          bundle_version: str, result_version: int, settings: ResultSettings,
                          now: dt.datetime | None = None) -> pydicom.Dataset:
    """The PDF as an Encapsulated PDF Storage instance in the query study (own series, deterministic UIDs)."""
    if int(result_version) < 1:
        raise ValueError(f"result_version must be ≥ 1, got {result_version}")
    if not bundle_id:
        raise ValueError("bundle_id must not be empty")
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("the document to encapsulate is not a PDF")
    evidence = query_evidence(query_instance)
    study_uid = str(evidence.StudyInstanceUID)
    moment = now or dt.datetime.now()

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for element in evidence:  # patient and study attributes, inherited as the SR does
        if element.keyword not in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
            ds.add(element)
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = pdf_instance_uid(settings, study_uid, bundle_id, result_version)
    ds.InstanceCreationDate = moment.strftime("%Y%m%d")
    ds.InstanceCreationTime = moment.strftime("%H%M%S")
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = pdf_series_uid(settings, study_uid, bundle_id)
    ds.SeriesNumber = PDF_SERIES_NUMBER
    ds.SeriesDescription = PDF_SERIES_DESCRIPTION
    # General Equipment + SC Equipment: a workstation made it (WSD), this software
    ds.Manufacturer = settings.manufacturer
    if settings.institution:
        ds.InstitutionName = settings.institution
    ds.ManufacturerModelName = bundle_name[:64]
    ds.SoftwareVersions = node_version()
    ds.ConversionType = "WSD"
    # Encapsulated Document
    ds.InstanceNumber = int(result_version)
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.AcquisitionDateTime = moment.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # it prints study dates, accessions and UIDs
    ds.DocumentTitle = TITLE
    ds.ConceptNameCodeSequence = []
    source = Dataset()
    source.ReferencedSOPClassUID = query_instance.SOPClassUID
    source.ReferencedSOPInstanceUID = query_instance.SOPInstanceUID
    ds.SourceInstanceSequence = [source]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    # Who made it, as on the SR (IHE AIR Contributing Equipment)
    ds.ContributingEquipmentSequence = [contributing_equipment(settings, bundle_id, bundle_name, bundle_version)]
    # Only the schemes this object uses (the IHE purpose-of-reference code), not the SR's private one.
    ds.CodingSchemeIdentificationSequence = [item for item in coding_schemes()
                                             if item.CodingSchemeDesignator == IHE_SCHEME]

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def companion_bytes(ds: pydicom.Dataset) -> bytes:
    """The companion as a Part 10 file's bytes."""
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
