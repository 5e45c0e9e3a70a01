"""Enhanced CT (multi-frame) goes through the same preprocessing as single-frame CT and embeds the same.

The Enhanced CT object is built in the test from the real single-frame lung series (highdicom's legacy converter,
then turned into an Enhanced CT Image Storage object with the modules that IOD requires) and checked with
dciodvfy. Both are sent to a real ``medfinder serve`` under different study UIDs; their vectors, read from the
node's outcome files, must agree (cosine >= 0.9999).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian

from config.settings import SeriesSelectionSettings
from model_export.preprocessing import MixedSeriesError, load_dicom_series, load_volume
from model_export.registry import install_bundle
from node_helpers import dciodvfy, free_port, start_node, stop_process, storescu, wait_for, write_node_config
from workers.series_selection import choose_series, summarise_series

# highdicom warns that the anonymised PatientName "Lung_Dx-A0001" has a single component: true, and harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")

SERIES = "Lung_Dx-A0001_series2_5mm"
FRAME_TYPE = ["DERIVED", "PRIMARY", "AXIAL", "NONE"]  # derived: made from the single-frame series


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def enhanced_ct(single_frames: list[Dataset], study_uid: str) -> Dataset:
    """An Enhanced CT Image Storage object with the frames of ``single_frames`` in a new study.

    highdicom builds the multi-frame functional groups (Legacy Converted Enhanced CT); the legacy-only
    sequences are dropped and what the Enhanced CT IOD adds is filled in (frame anatomy, irradiation event,
    device serial number, burned-in annotation, lossy compression).
    """
    ds = LegacyConvertedEnhancedCTImage(single_frames, series_instance_uid=hd.UID(), series_number=99,
                                        sop_instance_uid=hd.UID(), instance_number=1,
                                        transfer_syntax_uid=ExplicitVRLittleEndian)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.StudyInstanceUID = study_uid
    ds.ImageType = FRAME_TYPE
    ds.SeriesDescription = "5mm Enhanced CT"
    for keyword in ("ReferencedSeriesSequence", "ReferencedPerformedProcedureStepSequence", "ReferencedStudySequence",
                    "ContrastBolusAgent"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.DeviceSerialNumber = ds.get("DeviceSerialNumber") or "UNKNOWN"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    shared = ds.SharedFunctionalGroupsSequence[0]
    for keyword in ("UnassignedSharedConvertedAttributesSequence", "ReferencedImageSequence"):
        if keyword in shared:
            delattr(shared, keyword)
    shared.CTImageFrameTypeSequence[0].FrameType = FRAME_TYPE
    thorax = _item(CodeValue="51185008", CodingSchemeDesignator="SCT", CodeMeaning="Thorax")
    shared.FrameAnatomySequence = [_item(FrameLaterality="U", AnatomicRegionSequence=[thorax])]
    shared.IrradiationEventIdentificationSequence = [_item(IrradiationEventUID=hd.UID())]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        for keyword in ("UnassignedPerFrameConvertedAttributesSequence", "ConversionSourceAttributesSequence"):
            if keyword in frame:
                delattr(frame, keyword)
    return ds


@pytest.fixture(scope="module")
def series_dir(lung_ct_dir: Path) -> Path:
    return lung_ct_dir / SERIES


@pytest.fixture(scope="module")
def single_frames(series_dir: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(series_dir.glob("*.dcm"))]


@pytest.fixture(scope="module")
def enhanced_file(single_frames: list[Dataset], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Enhanced CT object in its own series folder (the spool's layout), in a new study."""
    ds = enhanced_ct(single_frames, hd.UID())
    path = tmp_path_factory.mktemp("enhanced") / str(ds.SeriesInstanceUID) / "enhanced.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_ct_object_is_valid(enhanced_file: Path, single_frames: list[Dataset]) -> None:
    errors, _warnings = dciodvfy(enhanced_file)
    assert errors == [], errors
    ds = pydicom.dcmread(enhanced_file, stop_before_pixels=True)
    assert ds.SOPClassUID == EnhancedCTImageStorage and int(ds.NumberOfFrames) == len(single_frames)
    assert ds.StudyInstanceUID != single_frames[0].StudyInstanceUID


def test_multiframe_volume_equals_the_single_frame_series(enhanced_file: Path, series_dir: Path) -> None:
    """highdicom's volume, reordered to our convention, is the single-frame loader's volume voxel for voxel."""
    single = load_dicom_series(series_dir)
    for multi in (load_dicom_series(enhanced_file.parent), load_volume(enhanced_file)):
        assert multi.meta["multiframe_geometry"] == "highdicom" and multi.meta["n_frames"] == 64
        np.testing.assert_array_equal(multi.array, single.array)
        np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)


def test_selection_counts_frames_as_slices(enhanced_file: Path) -> None:
    (summary,) = summarise_series([enhanced_file])
    assert summary.n_instances == 64 and summary.axial_tilt_deg == pytest.approx(0.0)
    assert summary.slice_thickness == pytest.approx(5.0) and summary.sop_class_uid == EnhancedCTImageStorage
    choice = choose_series([summary], SeriesSelectionSettings(min_slices=20))
    assert choice.series_uid == summary.series_uid and "64 slices" in choice.reason
    assert not choose_series([summary], SeriesSelectionSettings(min_slices=65)).verdicts[0].eligible


def _move(position: list[float]) -> list[float]:
    """Uneven spacing (one 7 mm gap) and a gantry tilt (in-plane drift of 0.1 mm per mm along z)."""
    x, y, z = (float(v) for v in position)
    z_new = z + (2.0 if z > -280 else 0.0)
    return [x, y + 0.1 * (z_new + 439.0), z_new]


def test_irregular_frames_use_our_assembly_like_single_frames(single_frames: list[Dataset], tmp_path: Path) -> None:
    """Where highdicom refuses a volume (tilt, uneven gaps), the frames go through our slice assembly, exactly as
    the same positions in single-frame files do."""
    moved = tmp_path / "single"
    moved.mkdir()
    for k, source in enumerate(single_frames):
        ds = copy.deepcopy(source)  # Dataset.copy() is shallow: the shared fixture would move too
        ds.ImagePositionPatient = _move(ds.ImagePositionPatient)
        ds.save_as(moved / f"{k:03d}.dcm")
    enhanced = enhanced_ct(single_frames, hd.UID())
    for frame in enhanced.PerFrameFunctionalGroupsSequence:
        plane = frame.PlanePositionSequence[0]
        plane.ImagePositionPatient = _move(plane.ImagePositionPatient)
    path = tmp_path / "multi" / "enhanced.dcm"
    path.parent.mkdir()
    enhanced.save_as(path, enforce_file_format=True)

    single, multi = load_dicom_series(moved), load_dicom_series(path)
    assert multi.meta["multiframe_geometry"] == "assembled"
    assert multi.meta["gantry_tilt_corrected"] and multi.meta["slice_resampled"]
    assert single.shape == multi.shape and multi.spacing[2] == pytest.approx(317 / 63), "even planes, exact extent"
    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)

    (path.parent / "extra.dcm").write_bytes((moved / "000.dcm").read_bytes())
    with pytest.raises(MixedSeriesError, match="single-frame and 1 multi-frame"):
        load_dicom_series(path.parent)


def _outcome(data_dir: Path, study_uid: str) -> Callable[[], dict | None]:
    def read() -> dict | None:
        path = data_dir / "outcomes" / study_uid / "v1.json"
        try:
            outcome = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return outcome if outcome.get("status") != "queued" else None
    return read


def test_node_embeds_enhanced_ct_like_the_single_frame_series(tmp_path: Path, tiny_bundle: Path, series_dir: Path,
                                                             enhanced_file: Path) -> None:
    """Both sent to a real node (different studies): the Enhanced CT study is embedded, with the same vector."""
    data_dir = tmp_path / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    config = write_node_config(tmp_path / "node.yaml", data_dir, None)
    port = free_port()
    node = start_node(config, port, tmp_path / "node.log")
    single_study = str(pydicom.dcmread(next(series_dir.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    multi_study = str(pydicom.dcmread(enhanced_file, stop_before_pixels=True).StudyInstanceUID)
    try:
        for files in (series_dir, enhanced_file):
            result = storescu(port, files)
            assert result.returncode == 0, result.stdout + result.stderr
        single = wait_for(_outcome(data_dir, single_study), 120, "the single-frame study's outcome", interval=0.3)
        multi = wait_for(_outcome(data_dir, multi_study), 120, "the Enhanced CT study's outcome", interval=0.3)
    finally:
        stop_process(node)
    assert single["status"] == "embedded", single.get("reason")
    assert multi["status"] == "embedded", multi.get("reason")
    assert multi["payload"]["n_slices"] == single["payload"]["n_slices"] == 64
    a, b = np.asarray(single["vector"], dtype=np.float64), np.asarray(multi["vector"], dtype=np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    print(f"cosine(single-frame, Enhanced CT) = {cosine!r}")
    assert cosine >= 0.9999
