"""Spool retention: keep the DICOM (default), only the HU volume of the embedded series, or nothing.

A real node (dcmtk storescu in, storescp as the PACS) reports a lung study; retention then deletes its spool and
keeps ``volumes/<study>/<series>.npz``. The kept volume gives the same preprocessed array, the same vector and the
same thumbnail as the DICOM did; later instances of the study meet the kept volume (a new version still embeds);
with ``keep: none`` a re-embedding fails with "nothing kept" and where to re-fetch from.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
from node_helpers import storescp, storescu, wait_for

from config import Settings, load_settings
from dicom_node.node import Node
from dicom_node.pipeline.retention import apply_retention, sweep_retention
from dicom_node.report.thumbnails import (
    ThumbnailCache,
    render_thumbnail,
    study_thumbnail,
)
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import StateStore, StudyState
from model_export.preprocessing import load_dicom_series, preprocess_volume
from model_export.registry import install_bundle
from model_export.runtime import load_bundle
from workers.embed_study import compute_outcome
from workers.handoff import EmbedRequest, EmbedStatus, read_outcome
from workers.series_selection import read_first_header, summarise_series
from workers.volume_store import (
    kept_volume_path,
    load_kept_volume,
    read_retention_record,
    save_kept_volume,
    series_header,
    volume_folder,
)

SERIES = "Lung_Dx-A0002_series2_B70f"  # 30 slices, BodyPartExamined CHEST
OTHER_SERIES_OF_THE_STUDY = "Lung_Dx-A0002_series3_B40f"
REFETCH = "PACS@127.0.0.1:11112"


def test_a_kept_volume_is_the_dicom_volume(tmp_path: Path, lung_ct_dir: Path, shared_data: Path,
                                           tiny_bundle: Path) -> None:
    """Lossless either way: int16 for plain CT, float32 where assembly resampled (the tilted head CT)."""
    bundle = load_bundle(tiny_bundle, providers=["CPUExecutionProvider"], threads=1)
    for folder, dtype in ((lung_ct_dir / SERIES, np.int16), (shared_data / "ct" / "dcm_qa_ct-ge-head", np.float32)):
        volume = load_dicom_series(folder)
        (summary,) = summarise_series(sorted(folder.glob("*.dcm")))
        path = save_kept_volume(tmp_path / folder.name, summary, volume, read_first_header(folder))
        with np.load(path) as data:
            assert data["hu"].dtype == dtype
        kept = load_kept_volume(path)
        assert np.array_equal(kept.volume.array, volume.array) and np.array_equal(kept.volume.affine, volume.affine)
        assert kept.summary.series_uid == summary.series_uid and kept.summary.kept == path
        assert kept.header.StudyInstanceUID == read_first_header(folder).StudyInstanceUID
        assert "PixelData" not in kept.header
        direct = preprocess_volume(volume, bundle.preprocessing)
        assert np.array_equal(preprocess_volume(kept.volume, bundle.preprocessing), direct)
        assert np.array_equal(bundle.embed_volume(preprocess_volume(kept.volume, bundle.preprocessing)),
                              bundle.embed_volume(direct)), "the same vector from the kept volume as from the DICOM"


def node_settings(data_dir: Path, pacs_port: int, keep: str) -> Settings:
    return load_settings(None, overrides={
        "paths": {"data_dir": str(data_dir)},
        "node": {"bind": "127.0.0.1", "port": 0, "quiet_seconds": 1.0, "poll_interval_s": 0.05,
                 "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]},
        "selection": {"min_slices": 20}, "workers": {"onnx_threads": 1},
        "retention": {"keep": keep, "refetch_from": REFETCH},
    })


def request(layout: NodeLayout, study_uid: str, version: int, bundle_id: str) -> EmbedRequest:
    """What the pipeline (or a reindex) hands the worker for one study version."""
    return EmbedRequest(study_uid=study_uid, version=version, bundle_id=bundle_id,
                        study_folder=layout.study_spool(study_uid), outcome_path=layout.outcome_path(study_uid, version),
                        pseudonym_key_file=layout.pseudonym_key_file, volume_folder=volume_folder(layout.root, study_uid))


def spool_late(layout: NodeLayout, study_uid: str, files: list[Path]) -> Path:
    """Instances arriving after the spool was deleted, placed where the SCP would put them."""
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        target = layout.instance_path(study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return target.parent


def test_keep_volume_then_later_instances_then_keep_none(tmp_path: Path, lung_ct_dir: Path,
                                                         tiny_bundle: Path) -> None:
    data_dir = tmp_path / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    files = sorted((lung_ct_dir / SERIES).glob("*.dcm"))
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, series_uid = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
    pacs = tmp_path / "pacs"
    with storescp(pacs) as pacs_port:
        settings = node_settings(data_dir, pacs_port, "volume")
        node = Node(settings)
        node.start()
        try:
            assert storescu(node.scp.port, files).returncode == 0
            wait_for(lambda: node.store.studies() and node.store.studies()[0].state == StudyState.REPORTED, 90,
                     "the study reported")
            # "reported" means the SR is made and queued; the delivery worker sends it on its next poll.
            wait_for(lambda: any(pacs.glob("SR*")), 30, "the SR at the PACS")
            # The pipeline applies retention after reporting once it is wired; applying it again is harmless.
            apply_retention(settings, node.layout, node.store, study_uid, 1)
            (study,) = node.store.studies()
        finally:
            node.stop()
    assert len(list(pacs.glob("SR*"))) == 1, "the SR was built from the spool before it went"
    layout, store = NodeLayout.create(data_dir), StateStore(data_dir / "state.sqlite3")
    folder = volume_folder(data_dir, study_uid)
    kept = kept_volume_path(folder, series_uid)
    assert kept.is_file() and not list(layout.study_spool(study_uid).glob("*/*.dcm")), "volume kept, DICOM gone"
    assert not layout.study_spool(study_uid).exists(), "emptied folders removed"
    record = read_retention_record(folder)
    assert record and record["keep"] == "volume" and record["instances_deleted"] == 30
    assert study.state == StudyState.REPORTED and len(store.instances(study_uid)) == 30, "metadata stays"
    assert apply_retention(settings, layout, store, study_uid, 1) is None, "idempotent"
    assert sweep_retention(settings, layout, store) == 0, "nothing left to do"

    # Thumbnails: drawn from the kept volume, the same picture as from the DICOM.
    picture = study_thumbnail(layout, store, ThumbnailCache(tmp_path / "thumbs"), study_uid, window="lung", size=96)
    assert picture == render_thumbnail(lung_ct_dir / SERIES, window="lung", size=96)
    assert series_header(layout.study_spool(study_uid), series_uid, folder).SOPInstanceUID

    # Re-embedding (a reindex, a new version) reads the kept volume: the same vector as from the DICOM.
    first = read_outcome(layout.outcome_path(study_uid, 1))
    assert first is not None and first.vector is not None and first.payload is not None
    again = compute_outcome(settings, request(layout, study_uid, 2, first.bundle_id))
    assert again.status == EmbedStatus.EMBEDDED, again.reason
    assert again.vector == first.vector and again.payload is not None
    assert again.payload.model_dump(exclude={"result_version"}) == first.payload.model_dump(
        exclude={"result_version"}), "the payload comes from the kept header"
    assert again.selection and again.selection["source"] == "kept volume"

    # Later instances: a short other series beside the kept volume -> the kept volume is embedded again.
    other = sorted((lung_ct_dir / OTHER_SERIES_OF_THE_STUDY).glob("*.dcm"))[:5]
    late = spool_late(layout, study_uid, other)
    outcome = compute_outcome(settings, request(layout, study_uid, 3, first.bundle_id))
    assert outcome.status == EmbedStatus.EMBEDDED and outcome.series_uid == series_uid and \
        outcome.vector == first.vector
    shutil.rmtree(late)
    # Late instances of the kept series itself cannot be merged into its volume: said, and the volume is used.
    spool_late(layout, study_uid, files[:3])
    outcome = compute_outcome(settings, request(layout, study_uid, 4, first.bundle_id))
    assert outcome.status == EmbedStatus.EMBEDDED and outcome.vector == first.vector
    assert outcome.selection and "not merged into its kept volume" in outcome.selection["notes"][0]
    # The whole series sent again (a re-fetch): the spool wins over the kept volume.
    spool_late(layout, study_uid, files)
    outcome = compute_outcome(settings, request(layout, study_uid, 5, first.bundle_id))
    assert outcome.vector == first.vector and outcome.selection and "source" not in outcome.selection

    # keep none: spool and volume go; re-embedding says what happened and where to re-fetch from.
    none = node_settings(data_dir, 1, "none")
    assert apply_retention(none, layout, store, study_uid, 1) is not None
    assert not kept.exists() and not layout.study_spool(study_uid).exists()
    nothing = compute_outcome(none, request(layout, study_uid, 6, first.bundle_id))
    assert nothing.status == EmbedStatus.FAILED
    assert nothing.reason == (f"nothing kept of study {study_uid}: retention.keep=none deleted its spooled DICOM "
                              f"after version 1; re-fetch it from {REFETCH} (retention.refetch_from)")
    assert study_thumbnail(layout, store, ThumbnailCache(tmp_path / "thumbs2"), study_uid, window="lung",
                           size=96) is None, "no image held: a placeholder"
