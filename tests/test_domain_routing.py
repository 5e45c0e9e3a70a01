"""Domain routing: a bundle's manifest says what it was made for (chest CT for MedFinder exports); the node embeds
only studies of that body region, read from BodyPartExamined, else the series/protocol/study descriptions through
model_export.domain's synonym list. The GE head CT is stored but not embedded, with the reason; the lung studies
(one with BodyPartExamined CHEST, one with only descriptions) are embedded."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from node_helpers import storescp, storescu, wait_for
from pydicom.uid import CTImageStorage

from config import Settings, load_settings
from config.settings import SeriesSelectionSettings
from dicom_node.node import Node
from dicom_node.pipeline.retention import apply_retention
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import StateStore, StudyState
from model_export.bundle_manifest import read_manifest
from model_export.domain import (
    BundleDomain,
    RegionFinding,
    bundle_domain,
    check_region_names,
    find_region,
    judge_domain,
    regions_in_body_part,
    regions_in_text,
)
from model_export.registry import install_bundle
from workers.embed_study import compute_outcome
from workers.handoff import EmbedRequest, EmbedStatus
from workers.series_selection import SeriesSummary, choose_series, summarise_series

HEAD_CT = ("ct", "dcm_qa_ct-ge-head")
CHEST_ONLY_BY_DESCRIPTION = "Lung_Dx-A0001_series2_5mm"  # no BodyPartExamined; ProtocolName "2 Chest C-/Thorax"
CHEST_BY_BODY_PART = "Lung_Dx-A0002_series2_B70f"  # BodyPartExamined CHEST, 30 slices
CHEST = BundleDomain(label="chest-model", body_regions=("CHEST",))
RULES = SeriesSelectionSettings(min_slices=20)
AXIAL = SeriesSummary(series_uid="1.2.3.1", folder=Path("/x/1.2.3.1"), n_instances=120, modality="CT",
                      description="", image_types=("ORIGINAL", "PRIMARY", "AXIAL"), axial_tilt_deg=0.0,
                      slice_thickness=1.25, sop_class_uid=CTImageStorage)


@pytest.mark.parametrize(("text", "regions"), [
    ("CHEST", ("CHEST",)),
    ("Thorax^AThoraxRoutine (Adult)", ("CHEST",)),  # Siemens CamelCase protocol
    ("2 Chest C-/Thorax", ("CHEST",)),
    ("HRCT Lungen", ("CHEST",)),
    ("Tórax sin contraste", ("CHEST",)),
    ("CTPA", ("CHEST",)),
    ("CT HEAD W/O", ("HEAD",)),
    ("Schädel nativ", ("HEAD",)),
    ("Brain perfusion", ("HEAD",)),
    ("CT C-Spine", ("SPINE",)),
    ("thoracic spine", ("SPINE",)),  # the phrase wins over "thoracic"
    ("Thoracolumbar spine", ("SPINE",)),
    ("cervical lymph nodes", ("NECK",)),
    ("CT CAP", ("CHEST", "ABDOMEN", "PELVIS")),
    ("Abdomen/Pelvis", ("ABDOMEN", "PELVIS")),
    ("Coronary CTA", ("HEART",)),
    ("Knee left", ("LOWER_LIMB",)),
    ("5mm", ()),
    ("ThoraxRoutine  8.0.0  B70f", ("CHEST",)),
    ("surface rendering delivery", ()),  # "face" and "liver" only as whole words
    ("CT Body 3.0", ()),
    ("", ()),
])
def test_synonyms_in_descriptions(text: str, regions: tuple[str, ...]) -> None:
    assert regions_in_text(text) == regions


@pytest.mark.parametrize(("code", "regions"), [
    ("CHEST", ("CHEST",)), ("HEAD", ("HEAD",)), ("THORAX", ("CHEST",)), ("LUNG", ("CHEST",)),
    ("CHESTABDPELVIS", ("CHEST", "ABDOMEN", "PELVIS")), ("ABDOMENPELVIS", ("ABDOMEN", "PELVIS")),
    ("HEADNECK", ("HEAD", "NECK")), ("CSPINE", ("SPINE",)), ("TLSPINE", ("SPINE",)),
    ("WHOLEBODY", ("WHOLE_BODY",)), ("PARTIALBODY", ()), ("BODY", ()), ("OTHER", ()),
])
def test_body_part_codes(code: str, regions: tuple[str, ...]) -> None:
    assert regions_in_body_part(code) == regions


def test_body_part_first_then_series_protocol_study_descriptions() -> None:
    header = {"BodyPartExamined": "HEAD", "SeriesDescription": "Chest 5mm", "StudyDescription": "Thorax"}
    assert find_region(header) == RegionFinding(("HEAD",), "BodyPartExamined")
    header = {"BodyPartExamined": "PARTIALBODY", "SeriesDescription": "5mm", "ProtocolName": "2 Chest C-/Thorax",
              "StudyDescription": "Head"}
    assert find_region(header) == RegionFinding(("CHEST",), "ProtocolName"), "an unknown code falls through"
    assert find_region({"SeriesDescription": "B70f", "StudyDescription": "Thorax^Routine"}) == \
        RegionFinding(("CHEST",), "StudyDescription")
    assert not find_region({"BodyPartExamined": "", "StudyDescription": "e+1"}).known
    assert check_region_names(["chest", "whole body"]) == ("CHEST", "WHOLE_BODY")
    with pytest.raises(ValueError, match="unknown body region 'THRONE'"):
        check_region_names(["THRONE"])


def test_the_selection_refuses_another_region_and_says_so() -> None:
    head = replace(AXIAL, body_part="HEAD", study_description="HEAD")
    choice = choose_series([head], RULES, CHEST)
    assert choice.series_uid is None
    assert choice.reason == "body region HEAD (BodyPartExamined) is not one the bundle 'chest-model' was made for " \
                           "(CHEST)"
    assert choice.as_dict()["domain"]["regions"] == ["HEAD"]
    assert choose_series([head], RULES).series_uid == head.series_uid, "no domain: no check"
    # A head series and a chest series in one study: the chest one is embedded, the head one is judged.
    chest = replace(AXIAL, series_uid="1.2.3.2", n_instances=60, protocol_name="Thorax routine")
    choice = choose_series([head, chest], RULES, CHEST)
    assert choice.series_uid == chest.series_uid and "matches the bundle's CHEST" in choice.reason
    assert [v.eligible for v in choice.verdicts] == [False, True] and "HEAD" in choice.verdicts[0].reason
    # Unknown region: selection.unknown_region decides.
    unknown = replace(AXIAL, description="5mm")
    assert choose_series([unknown], RULES, CHEST).series_uid == unknown.series_uid
    skipped = choose_series([unknown], RULES, replace(CHEST, unknown_region="skip"))
    assert skipped.series_uid is None and "body region unknown" in skipped.reason and "skip" in skipped.reason
    assert not judge_domain(CHEST, "MR", {"BodyPartExamined": "CHEST"}).matches, "the modality is part of it"
    assert judge_domain(BundleDomain(label="any"), "CT", {"BodyPartExamined": "HEAD"}).matches


def copy_as_spool(source: Path, study_root: Path) -> Path:
    """One series folder laid out as the node's spool does (<study>/<series>/<file>.dcm); returns the study folder."""
    files = sorted(source.glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    target = study_root / str(first.StudyInstanceUID) / str(first.SeriesInstanceUID)
    target.mkdir(parents=True)
    for path in files:
        shutil.copyfile(path, target / path.name)
    return target.parent


def worker_settings(data_dir: Path, **selection: object) -> Settings:
    return load_settings(None, overrides={"paths": {"data_dir": str(data_dir)},
                                          "selection": {"min_slices": 20, **selection},
                                          "workers": {"onnx_threads": 1}})


def embed(settings: Settings, study_folder: Path, bundle_id: str, key: Path) -> EmbedRequest:
    request = EmbedRequest(study_uid=study_folder.name, version=1, bundle_id=bundle_id, study_folder=study_folder,
                           outcome_path=study_folder.parent / "outcome.json", pseudonym_key_file=key)
    return request


def test_exports_are_chest_ct_and_the_worker_routes_by_it(tmp_path: Path, tiny_bundle: Path, shared_data: Path,
                                                         lung_ct_dir: Path) -> None:
    manifest = read_manifest(tiny_bundle)
    assert manifest.domain is not None and manifest.domain.body_regions == ["CHEST"]
    assert manifest.domain.modalities == ["CT"]
    assert bundle_domain(manifest.model_copy(update={"domain": None})) is None, "no domain, no check"
    data_dir = tmp_path / "data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    key = tmp_path / "pseudonym.key"
    key.write_bytes(b"k" * 32)
    settings = worker_settings(data_dir)

    head = copy_as_spool(shared_data.joinpath(*HEAD_CT), tmp_path / "head")
    outcome = compute_outcome(settings, embed(settings, head, manifest.bundle_id, key))
    assert outcome.status == EmbedStatus.NOT_EMBEDDED
    assert outcome.reason == (f"body region HEAD (BodyPartExamined) is not one the bundle '{manifest.model.name}' "
                              "was made for (CHEST)")
    assert outcome.vector is None and outcome.selection and outcome.selection["domain"]["matches"] is False
    off = worker_settings(data_dir, domain_check=False)
    assert compute_outcome(off, embed(off, head, manifest.bundle_id, key)).status == EmbedStatus.EMBEDDED, \
        "selection.domain_check false: the chest model embeds the head CT as it did before"

    lung = copy_as_spool(lung_ct_dir / CHEST_ONLY_BY_DESCRIPTION, tmp_path / "lung")
    (summary,) = summarise_series(sorted(lung.glob("*/*.dcm")))
    assert summary.body_part == "" and find_region(summary.region_fields()).source == "ProtocolName"
    outcome = compute_outcome(settings, embed(settings, lung, manifest.bundle_id, key))
    assert outcome.status == EmbedStatus.EMBEDDED, outcome.reason
    assert outcome.selection and outcome.selection["domain"] == {
        "regions": ["CHEST"], "source": "ProtocolName", "matches": True,
        "reason": "body region CHEST (ProtocolName) matches the bundle's CHEST"}


def node_settings(data_dir: Path, pacs_port: int, **overrides: object) -> Settings:
    return load_settings(None, overrides={
        "paths": {"data_dir": str(data_dir)},
        "node": {"bind": "127.0.0.1", "port": 0, "quiet_seconds": 1.0, "poll_interval_s": 0.05,
                 "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]},
        "selection": {"min_slices": 20}, "workers": {"onnx_threads": 1}, **overrides,
    })


def test_the_node_stores_the_head_ct_but_embeds_only_the_chest_study(tmp_path: Path, tiny_bundle: Path,
                                                                     shared_data: Path, lung_ct_dir: Path) -> None:
    data_dir = tmp_path / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    head_files = sorted(shared_data.joinpath(*HEAD_CT).glob("*.dcm"))
    head_uid = str(pydicom.dcmread(head_files[0], stop_before_pixels=True).StudyInstanceUID)
    pacs = tmp_path / "pacs"
    with storescp(pacs) as pacs_port:
        node = Node(node_settings(data_dir, pacs_port))
        node.start()
        try:
            assert storescu(node.scp.port, head_files).returncode == 0
            assert storescu(node.scp.port, lung_ct_dir / CHEST_BY_BODY_PART).returncode == 0
            wait_for(lambda: {s.state for s in node.store.studies()} == {StudyState.NOT_EMBEDDED,
                                                                         StudyState.REPORTED}, 90,
                     "the head CT judged and the chest CT reported")
            # "reported" means the SR is made and queued; the delivery worker sends it on its next poll.
            wait_for(lambda: any(pacs.glob("SR*")), 30, "the chest study's SR at the PACS")
            studies = {s.study_uid: s for s in node.store.studies()}
        finally:
            node.stop()
    head = studies.pop(head_uid)
    assert head.state == StudyState.NOT_EMBEDDED
    assert head.reason is not None and head.reason.startswith("body region HEAD (BodyPartExamined) is not one the "
                                                              "bundle '") and head.reason.endswith("(CHEST)")
    assert len(list((data_dir / "spool" / head_uid).glob("*/*.dcm"))) == 28, "stored all the same"
    (lung,) = studies.values()
    assert lung.state == StudyState.REPORTED and lung.point_id
    assert len(list(pacs.glob("SR*"))) == 1, "an SR for the chest study only"
    # Retention keeps the spool of a study that was not embedded (a later bundle may take it).
    keep_volume = node_settings(data_dir, pacs_port, retention={"keep": "volume"})
    layout, store = NodeLayout.create(data_dir), StateStore(data_dir / "state.sqlite3")
    assert apply_retention(keep_volume, layout, store, head_uid, head.version) is None
    assert len(list((data_dir / "spool" / head_uid).glob("*/*.dcm"))) == 28
