"""The similar-case Structured Report, built from a real Lung-PET-CT-Dx header and checked by real validators.

``dciodvfy`` (dicom3tools) checks the IOD; it exits 0 even with errors, so its output is parsed. ``dsrdump``
(dcmtk) must render the tree. Matches are the other patient's study: its name and id must not leak.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from node_helpers import dciodvfy, require_tools

from config.settings import ResultSettings
from dicom_node.report.similar_case_sr import (
    SCHEME,
    SR_SERIES_NUMBER,
    SimilarCase,
    build_similar_case_sr,
    case_summary,
    device_uid,
)
from dicom_node.report.uids import deterministic_uid
from workers.dicom_uids import UID_PATTERN

SETTINGS = ResultSettings()
BUNDLE_ID = "medfinder-ref-0123abcd"
STANDARD_SCHEMES = {"DCM", "UCUM", "LN", "SCT"}

# dciodvfy warnings we accept, each with why. Anything else (and any error) fails the test.
ACCEPTED_WARNINGS = {
    # Inherited unchanged from the query CT's Patient/Study modules (we never rewrite patient data): the TCIA
    # sample has an empty Study ID (Type 2) and a pseudonym without carets as Patient's Name.
    r"needed to build DICOMDIR - Study ID$": "the source CT's Study ID is empty",
    r"Patient's Name .* Retired Person Name form$": "the source CT's Patient's Name has no '^'",
    # dciodvfy knows only the standard coding schemes; it warns for ours although it is declared in the Coding
    # Scheme Identification Sequence (7 warnings without the declaration, 8 with it: the declaration itself).
    r"Unrecognized defined term <99MEDFINDER> for value 1 of attribute <Coding Scheme Designator>$":
        "private scheme, declared",
    # IHE AI Results asks for the algorithm's Device UID in Contributing Equipment; dicom3tools' 2022 tables
    # do not list it there, so the SR is reported as a Standard Extended SOP Class (allowed by PS3.4 B.1.3).
    r"not present in standard DICOM IOD - \(0x0018,0x1002\) UI Device UID": "IHE AIR Device UID",
    r"this is a Standard Extended SOP Class$": "consequence of the Device UID above",
}


def _first_file(folder: Path) -> Path:
    return sorted(folder.glob("*.dcm"))[0]


@pytest.fixture(scope="module")
def headers(lung_ct_dir: Path) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """(query header of patient A0001, header of the other patient's study A0002)."""
    query = pydicom.dcmread(_first_file(lung_ct_dir / "Lung_Dx-A0001_series2_5mm"), stop_before_pixels=True)
    other = pydicom.dcmread(_first_file(lung_ct_dir / "Lung_Dx-A0002_series2_B70f"), stop_before_pixels=True)
    return query, other


def _matches(other: pydicom.Dataset) -> list[SimilarCase]:
    return [
        SimilarCase(rank=2, score=0.41234567, study_uid="1.2.826.0.1.3680043.8.498.999", accession=None,
                    study_date=None, description=None),
        SimilarCase(rank=1, score=0.87654321, study_uid=str(other.StudyInstanceUID),
                    accession=str(other.get("AccessionNumber", "")) or None, study_date=str(other.StudyDate),
                    description=str(other.get("StudyDescription", "")) or None),
    ]


def _build(query: pydicom.Dataset, matches: list[SimilarCase], version: int = 1,
           bundle_id: str = BUNDLE_ID) -> pydicom.Dataset:
    return build_similar_case_sr(query, matches, bundle_id=bundle_id, bundle_name="medfinder-ref",
                                 bundle_version="1.2.0", result_version=version, settings=SETTINGS)


def _save(sr: pydicom.Dataset, folder: Path) -> Path:
    path = folder / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def _unaccepted(warnings: list[str]) -> list[str]:
    return [w for w in warnings if not any(re.search(pattern, w) for pattern in ACCEPTED_WARNINGS)]


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _containers(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    return [item for item in sr.ContentSequence if item.ValueType == "CONTAINER"]


def _child(container: pydicom.Dataset, meaning: str) -> pydicom.Dataset:
    (item,) = [i for i in container.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]
    return item


def test_sr_passes_dciodvfy_without_errors(headers, tmp_path: Path) -> None:
    query, other = headers
    path = _save(_build(query, _matches(other)), tmp_path)

    errors, warnings = dciodvfy(path)

    assert errors == []
    assert _unaccepted(warnings) == []


def test_sr_without_matches_is_valid_and_says_so(headers, tmp_path: Path) -> None:
    query, _ = headers
    sr = _build(query, [])
    path = _save(sr, tmp_path)

    errors, warnings = dciodvfy(path)

    assert errors == [] and _unaccepted(warnings) == []
    assert _containers(sr) == []
    summary = [i for i in sr.ContentSequence if i.ValueType == "TEXT"
               and i.ConceptNameCodeSequence[0].CodeMeaning == "Search result"]
    assert "No similar case" in summary[0].TextValue
    count = [i for i in sr.ContentSequence if i.ValueType == "NUM"][0]
    assert float(count.MeasuredValueSequence[0].NumericValue) == 0


def test_sr_tree_lists_matches_in_rank_order(headers) -> None:
    query, other = headers
    sr = _build(query, _matches(other))

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ConceptNameCodeSequence[0].CodingSchemeDesignator == SCHEME
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.Modality) == ("COMPLETE", "UNVERIFIED", "SR")
    cases = _containers(sr)
    assert [c.ContinuityOfContent for c in cases] == ["SEPARATE", "SEPARATE"]
    ranks = [float(_child(c, "Similarity rank").MeasuredValueSequence[0].NumericValue) for c in cases]
    assert ranks == [1, 2]
    best = cases[0]
    score = _child(best, "Similarity score").MeasuredValueSequence[0]
    assert float(score.NumericValue) == pytest.approx(0.876543)
    assert score.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert score.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    study_ref = _child(best, "Study Instance UID")
    assert (study_ref.ValueType, study_ref.UID) == ("UIDREF", other.StudyInstanceUID)
    assert study_ref.ConceptNameCodeSequence[0].CodeValue == "110180"
    text = _child(best, "Similar case summary").TextValue
    assert text == case_summary(_matches(other)[1])
    assert _child(cases[1], "Similar case summary").TextValue == (
        "Study date not recorded; accession not recorded; no description")


def test_sr_identifies_device_algorithm_and_contributing_equipment(headers) -> None:
    query, other = headers
    sr = _build(query, _matches(other))
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}

    assert items["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
    assert items["Device Observer Name"].TextValue == "MedFinder"
    assert items["Device Observer Model Name"].TextValue == "medfinder-ref"
    assert items["Device Observer UID"].UID == device_uid(SETTINGS, BUNDLE_ID)
    assert items["Algorithm Name"].TextValue == "medfinder-ref"
    assert items["Algorithm Version"].TextValue == "1.2.0"
    parameters = [i.TextValue for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning
                  == "Algorithm Parameters"]
    assert f"bundle_id={BUNDLE_ID}" in parameters
    (ours,) = [e for e in sr.ContributingEquipmentSequence if e.get("DeviceUID") == device_uid(SETTINGS, BUNDLE_ID)]
    purpose = ours.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1", "99IHE", "Processing Algorithm")
    assert ours.ManufacturerModelName == "medfinder-ref" and "1.2.0" in ours.SoftwareVersions
    assert device_uid(SETTINGS, "another-bundle") != device_uid(SETTINGS, BUNDLE_ID)


def test_every_private_code_scheme_is_declared(headers) -> None:
    query, other = headers
    sr = _build(query, _matches(other))
    declared = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    used = set()
    for item in _walk([sr]):
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            used.update(code.CodingSchemeDesignator for code in item.get(key, []))
        for measured in item.get("MeasuredValueSequence", []):
            used.update(c.CodingSchemeDesignator for c in measured.MeasurementUnitsCodeSequence)
    for equipment in sr.ContributingEquipmentSequence:
        used.update(c.CodingSchemeDesignator for c in equipment.PurposeOfReferenceCodeSequence)

    assert SCHEME in declared and "99IHE" in declared
    assert used - STANDARD_SCHEMES <= declared


def test_sr_uids_are_deterministic(headers) -> None:
    query, other = headers
    first, again = _build(query, _matches(other)), _build(query, _matches(other))
    second_version = _build(query, _matches(other), version=2)
    other_bundle = _build(query, _matches(other), bundle_id="another-bundle")

    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert second_version.SeriesInstanceUID == first.SeriesInstanceUID
    assert second_version.SOPInstanceUID != first.SOPInstanceUID
    assert (second_version.InstanceNumber, first.InstanceNumber) == (2, 1)
    assert other_bundle.SeriesInstanceUID != first.SeriesInstanceUID
    assert other_bundle.SOPInstanceUID != first.SOPInstanceUID
    assert first.StudyInstanceUID == query.StudyInstanceUID
    assert first.SeriesInstanceUID != query.SeriesInstanceUID
    assert first.SeriesNumber == SR_SERIES_NUMBER
    for uid in (first.SOPInstanceUID, first.SeriesInstanceUID, second_version.SOPInstanceUID):
        assert len(uid) <= 64 and UID_PATTERN.match(uid)


def test_no_other_patient_identity_in_the_sr(headers, tmp_path: Path) -> None:
    query, other = headers
    assert other.PatientID != query.PatientID
    data = _save(_build(query, _matches(other)), tmp_path).read_bytes()

    assert str(other.PatientID).encode() not in data
    for part in str(other.PatientName).split("^"):
        if len(part) >= 3:
            assert part.encode() not in data
    assert str(query.PatientID).encode() in data  # the SR belongs to the query patient


def test_dsrdump_renders_the_report(headers, tmp_path: Path) -> None:
    query, other = headers
    path = _save(_build(query, _matches(other)), tmp_path)

    require_tools("dsrdump")
    result = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "Similar case search report" in result.stdout
    assert str(other.StudyInstanceUID) in result.stdout
    assert "Similarity score" in result.stdout


def test_query_without_uids_is_a_clear_error(headers) -> None:
    query, _ = headers
    broken = pydicom.Dataset()
    broken.update(query)
    del broken.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        _build(broken, [])
    with pytest.raises(ValueError, match="distinct ranks"):
        _build(query, [SimilarCase(1, 0.5, "1.2.3", None, None, None), SimilarCase(1, 0.4, "1.2.4", None, None, None)])


def test_deterministic_uid() -> None:
    root = SETTINGS.uid_root
    uid = deterministic_uid(root, "a", "b")
    assert uid == deterministic_uid(root, "a", "b")
    assert uid.startswith(root) and len(uid) <= 64 and UID_PATTERN.match(uid)
    assert uid != deterministic_uid(root, "ab", "")  # parts are separated before hashing
    assert deterministic_uid(root.rstrip("."), "a", "b") == uid
    with pytest.raises(ValueError):
        deterministic_uid(root)
    with pytest.raises(ValueError):
        deterministic_uid("1.2.03", "a")
