"""The result we send back to PACS: a Comprehensive 3D SR listing the most similar other studies.

Tree (field notes 6.2; IHE AI Results' IOD), all codes not from DCM/UCUM from our private scheme
``99MEDFINDER``, declared in the Coding Scheme Identification Sequence::

    CONTAINER (MF001 "Similar case search report")
      HAS CONCEPT MOD  TEXT Algorithm Name / Version / Parameters (TID 4019: bundle name, version, bundle id)
      HAS OBS CONTEXT  CODE Observer Type = Device; UIDREF Device Observer UID; TEXT name/manufacturer/model
      CONTAINS         NUM  (MF006 "Number of similar cases")
      CONTAINS         TEXT (MF007 "Search result"): a one-line summary, also when nothing matched
      CONTAINS         CONTAINER (MF002 "Similar case") × K, rank order, SEPARATE
                         NUM  (MF003 "Similarity rank"), NUM (MF004 "Similarity score", UCUM "1"),
                         UIDREF (110180, DCM, "Study Instance UID") = the matched study,
                         TEXT (MF005 "Similar case summary"): date, accession, description

Matches are other patients' studies: they appear only by Study UID, date, accession and description, never
with a name or patient id, and not as IMAGE references (a PACS cannot resolve those across patients).
The SR lives in the query study, in its own series; its UIDs are derived from (study, bundle[, version]) so
rebuilding a result version gives the same SOP Instance UID and a re-send is a harmless duplicate.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass
from importlib import metadata as importlib_metadata

import highdicom as hd
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    RelationshipTypeValues,
    TextContentItem,
    UIDRefContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from config.settings import ResultSettings
from dicom_node.report.uids import deterministic_uid
from workers.dicom_uids import check_uid

SCHEME = "99MEDFINDER"
IHE_SCHEME = "99IHE"
SR_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "MedFinder similar cases"
DEVICE_NAME = "MedFinder"

REPORT = CodedConcept("MF001", SCHEME, "Similar case search report")
SIMILAR_CASE = CodedConcept("MF002", SCHEME, "Similar case")
RANK = CodedConcept("MF003", SCHEME, "Similarity rank")
SCORE = CodedConcept("MF004", SCHEME, "Similarity score")
CASE_SUMMARY = CodedConcept("MF005", SCHEME, "Similar case summary")
N_CASES = CodedConcept("MF006", SCHEME, "Number of similar cases")
RESULT_SUMMARY = CodedConcept("MF007", SCHEME, "Search result")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
# IHE AIR: Contributing Equipment's purpose of reference for the algorithm that made the result.
PROCESSING_ALGORITHM = CodedConcept("Newcode1", IHE_SCHEME, "Processing Algorithm")

# Patient and study attributes the SR inherits from the query instance (Type 2 ones default to empty).
_INHERITED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber")
_INHERITED_OPTIONAL = ("IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientAge", "PatientSize",
                       "PatientWeight", "StudyDescription", "IssuerOfAccessionNumberSequence")
_REFERENCE = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class SimilarCase:
    """One match to report: its rank (1 = most similar), cosine similarity and what identifies the study."""

    rank: int
    score: float
    study_uid: str
    accession: str | None
    study_date: str | None
    description: str | None


def sr_series_uid(settings: ResultSettings, study_uid: str, bundle_id: str) -> str:
    """One SR series per (query study, bundle): later result versions join the same series."""
    return deterministic_uid(settings.uid_root, "sr-series", study_uid, bundle_id)


def sr_instance_uid(settings: ResultSettings, study_uid: str, bundle_id: str, result_version: int) -> str:
    """One SOP Instance UID per (query study, bundle, result version)."""
    return deterministic_uid(settings.uid_root, "sr-instance", study_uid, bundle_id, str(int(result_version)))


def device_uid(settings: ResultSettings, bundle_id: str) -> str:
    """The algorithm's device UID: it changes whenever the model (bundle) changes, as IHE AIR asks."""
    return deterministic_uid(settings.uid_root, "device", bundle_id)


def node_version() -> str:
    """This package's version, for SoftwareVersions of everything we write."""
    try:
        return importlib_metadata.version("medfinder-node")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def query_evidence(query_instance: Dataset) -> Dataset:
    """The query instance reduced to what the SR references and inherits (no pixels, no private tags)."""
    evidence = Dataset()
    for keyword in _REFERENCE:
        value = query_instance.get(keyword)
        if value in (None, ""):
            raise ValueError(f"the query instance has no {keyword}")
        check_uid(value, keyword)
        setattr(evidence, keyword, value)
    for keyword in _INHERITED_TYPE2 + _INHERITED_OPTIONAL:
        if keyword in query_instance:
            evidence.add(deepcopy(query_instance.data_element(keyword)))
        elif keyword in _INHERITED_TYPE2:
            setattr(evidence, keyword, "")
    return evidence


def format_date(value: str | None, missing: str | None = "not recorded") -> str | None:
    """A DICOM DA as YYYY-MM-DD for people (DATE items and raw DA are rendered poorly by viewers); anything else
    as it is, and ``missing`` when there is nothing."""
    text = (value or "").strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or missing


def case_summary(case: SimilarCase) -> str:
    """The human-readable line of one match (what a PACS SR viewer shows)."""
    description = (case.description or "").strip() or "no description"
    accession = (case.accession or "").strip() or "not recorded"
    return f"Study date {format_date(case.study_date)}; accession {accession}; {description}"


def _case_container(case: SimilarCase) -> ContainerContentItem:
    container = ContainerContentItem(name=SIMILAR_CASE, relationship_type=RelationshipTypeValues.CONTAINS,
                                     is_content_continuous=False)
    container.ContentSequence = [
        NumContentItem(name=RANK, value=int(case.rank), unit=NO_UNITS,
                       relationship_type=RelationshipTypeValues.CONTAINS),
        NumContentItem(name=SCORE, value=round(float(case.score), 6), unit=NO_UNITS,
                       relationship_type=RelationshipTypeValues.CONTAINS),
        UIDRefContentItem(name=codes.DCM.StudyInstanceUID, value=check_uid(case.study_uid, "matched StudyInstanceUID"),
                          relationship_type=RelationshipTypeValues.CONTAINS),
        TextContentItem(name=CASE_SUMMARY, value=case_summary(case), relationship_type=RelationshipTypeValues.CONTAINS),
    ]
    return container


def coding_schemes() -> list[Dataset]:
    """Declarations of our private coding schemes (dciodvfy flags undeclared ones; field notes 4.5)."""
    items = []
    for designator, name in ((SCHEME, "MedFinder Node similar-case search codes"),
                             (IHE_SCHEME, "IHE Radiology provisional codes")):
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = name
        item.CodingSchemeResponsibleOrganization = "MedFinder Node" if designator == SCHEME else "IHE"
        items.append(item)
    return items


def contributing_equipment(settings: ResultSettings, bundle_id: str, bundle_name: str,
                           bundle_version: str) -> Dataset:
    """IHE AIR's Contributing Equipment item for the algorithm (field notes 6.4)."""
    item = Dataset()
    item.Manufacturer = settings.manufacturer
    item.ManufacturerModelName = bundle_name[:64]
    item.SoftwareVersions = [f"medfinder-node {node_version()}"[:64], str(bundle_version)[:64]]
    item.DeviceUID = device_uid(settings, bundle_id)
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    if settings.institution:
        item.InstitutionName = settings.institution
    item.ContributionDescription = f"Similar-case search with model bundle {bundle_id}"
    return item


def _comprehensive_3d_sr(evidence: Dataset, root: ContainerContentItem, settings: ResultSettings, study_uid: str,
                         bundle_id: str, result_version: int) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        evidence=[evidence],
        content=root,
        series_instance_uid=sr_series_uid(settings, study_uid, bundle_id),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_instance_uid(settings, study_uid, bundle_id, result_version),
        instance_number=int(result_version),
        manufacturer=settings.manufacturer,
        institution_name=settings.institution,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def build_similar_case_sr(query_instance: pydicom.Dataset, matches: Sequence[SimilarCase], *, bundle_id: str,
                          bundle_name: str, bundle_version: str, result_version: int,
                          settings: ResultSettings) -> pydicom.Dataset:
    """The SR of one result version of the query study; ``matches`` in any order (sorted by rank here)."""
    if int(result_version) < 1:
        raise ValueError(f"result_version must be ≥ 1, got {result_version}")
    if not bundle_id:
        raise ValueError("bundle_id must not be empty")
    evidence = query_evidence(query_instance)
    study_uid = str(evidence.StudyInstanceUID)
    cases = sorted(matches, key=lambda case: case.rank)
    if len({case.rank for case in cases}) != len(cases):
        raise ValueError("similar cases must have distinct ranks")

    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(settings, bundle_id), name=DEVICE_NAME, manufacturer_name=settings.manufacturer,
            model_name=bundle_name[:64]),
    )
    if cases:
        summary = (f"{len(cases)} similar case(s) found by {bundle_name} {bundle_version}; "
                   "rank 1 is the most similar.")
    else:
        summary = "No similar case found: no other indexed study qualified."

    root = ContainerContentItem(name=REPORT, is_content_continuous=True)
    root.ContentSequence = [
        *AlgorithmIdentification(name=bundle_name, version=str(bundle_version),
                                 parameters=[f"bundle_id={bundle_id}", f"result_version={int(result_version)}"]),
        *ObservationContext(observer_device_context=observer),
        NumContentItem(name=N_CASES, value=len(cases), unit=NO_UNITS,
                       relationship_type=RelationshipTypeValues.CONTAINS),
        TextContentItem(name=RESULT_SUMMARY, value=summary, relationship_type=RelationshipTypeValues.CONTAINS),
        *(_case_container(case) for case in cases),
    ]

    with warnings.catch_warnings():
        # highdicom warns about oddly formed patient names *with the name in the message*: keep PHI out of logs.
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        sr = _comprehensive_3d_sr(evidence, root, settings, study_uid, bundle_id, result_version)
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.SoftwareVersions = node_version()
    sr.CodingSchemeIdentificationSequence = [*sr.get("CodingSchemeIdentificationSequence", []), *coding_schemes()]
    sr.ContributingEquipmentSequence = [*sr.get("ContributingEquipmentSequence", []),
                                        contributing_equipment(settings, bundle_id, bundle_name, bundle_version)]
    return sr
