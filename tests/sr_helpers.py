"""Helpers for the SR and delivery tests: a synthetic query header, a written SR, the text of a PDF companion."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from config.settings import ResultSettings
from dicom_node.report.similar_case_sr import SimilarCase, build_similar_case_sr


def synthetic_ct_header(patient_id: str = "DELIVERY-TEST", study_uid: str | None = None) -> Dataset:
    """A CT instance header with the patient and study attributes an SR inherits (no pixels needed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC-DELIVERY"
    ds.Modality = "CT"
    return ds


def write_sr(folder: Path, header: Dataset | None = None, version: int = 1) -> tuple[Path, pydicom.Dataset]:
    """Build one similar-case SR for ``header`` and save it as a DICOM file; returns (path, dataset)."""
    header = header if header is not None else synthetic_ct_header()
    matches = [SimilarCase(rank=1, score=0.91, study_uid=generate_uid(), accession="ACC-1", study_date="20230405",
                           description="CT CHEST")]
    sr = build_similar_case_sr(header, matches, bundle_id="test-bundle-0001", bundle_name="test-bundle",
                               bundle_version="1.0.0", result_version=version, settings=ResultSettings())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sr.SOPInstanceUID}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path, sr


def pdf_text(pdf: bytes) -> str:
    """The text-showing operands of a PDF's uncompressed content streams (reportlab ``pageCompression=0``), joined
    without whitespace: a wrapped line or a split run then reads as one string (compare with :func:`squash`)."""
    raw = pdf.decode("latin-1")
    strings = re.findall(r"\(((?:\\.|[^\\)])*)\)\s*Tj", raw)
    unescaped = [re.sub(r"\\([()\\])", r"\1", s) for s in strings]
    decoded = "".join(re.sub(r"\\(\d{3})", lambda m: bytes([int(m.group(1), 8)]).decode("cp1252"), s)
                      for s in unescaped)
    return squash(decoded)


def squash(text: str) -> str:
    """``text`` without whitespace, to look it up in :func:`pdf_text`."""
    return re.sub(r"\s+", "", text)
