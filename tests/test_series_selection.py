"""Series selection: axial CT with enough slices wins; localizers, dose screens, reformats and short series are
refused with a reason each."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from config.settings import SeriesSelectionSettings
from workers.series_selection import SeriesSummary, choose_series, judge_series, summarise_series

RULES = SeriesSelectionSettings(min_slices=20)
AXIAL = SeriesSummary(series_uid="1.2.3.1", folder=Path("/x/1.2.3.1"), n_instances=120, modality="CT",
                      description="CHEST 1.25mm", image_types=("ORIGINAL", "PRIMARY", "AXIAL"),
                      axial_tilt_deg=0.0, slice_thickness=1.25, sop_class_uid=CTImageStorage)


def test_each_rule_refuses_with_its_reason() -> None:
    cases = {
        "localizer": replace(AXIAL, image_types=("ORIGINAL", "PRIMARY", "LOCALIZER"), n_instances=2),
        "dose": replace(AXIAL, description="Dose Report", modality="CT"),
        "not axial": replace(AXIAL, axial_tilt_deg=90.0, description="COR MPR"),
        "only 12 slice(s)": replace(AXIAL, n_instances=12),
        "modality PT": replace(AXIAL, modality="PT"),
        "no usable ImageOrientationPatient": replace(AXIAL, axial_tilt_deg=None),
    }
    for expected, summary in cases.items():
        verdict = judge_series(summary, RULES)
        assert not verdict.eligible and expected in verdict.reason, (expected, verdict.reason)
    assert judge_series(AXIAL, RULES).eligible
    assert judge_series(replace(AXIAL, sop_class_uid=EnhancedCTImageStorage), RULES).eligible, "frames are slices"
    assert judge_series(replace(AXIAL, axial_tilt_deg=20.0), RULES).eligible, "gantry tilt is still axial"


def test_most_slices_then_thinnest_and_the_choice_is_explained() -> None:
    thick = replace(AXIAL, series_uid="1.2.3.2", n_instances=60, slice_thickness=5.0, description="CHEST 5mm")
    scout = replace(AXIAL, series_uid="1.2.3.3", n_instances=1, image_types=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    choice = choose_series([thick, scout, AXIAL], RULES)
    assert choice.series_uid == AXIAL.series_uid
    assert "120 slices" in choice.reason and "2 eligible of 3" in choice.reason
    assert [v.eligible for v in choice.verdicts] == [True, False, True]
    same_count = replace(thick, n_instances=120)
    assert choose_series([same_count, AXIAL], RULES).series_uid == AXIAL.series_uid, "ties go to thinner slices"
    thinnest = SeriesSelectionSettings(min_slices=20, prefer="thinnest")
    assert choose_series([thick, AXIAL], thinnest).series_uid == AXIAL.series_uid


def test_nothing_eligible_says_why_for_every_series() -> None:
    choice = choose_series([replace(AXIAL, n_instances=5)], RULES)
    assert choice.series_uid is None
    assert "no series qualifies" in choice.reason and "only 5 slice(s)" in choice.reason
    assert choose_series([], RULES).reason.endswith("(the study has no series)")


def test_summaries_come_from_real_headers(tmp_path: Path, lung_ct_dir: Path) -> None:
    """Two real series of one study laid out as the spool does; the 64-slice one is chosen over a cut 30."""
    files = []
    for name, keep in (("Lung_Dx-A0001_series2_5mm", 64), ("Lung_Dx-A0001_series3_5mm", 30)):
        sources = sorted((lung_ct_dir / name).glob("*.dcm"))[:keep]
        series_uid = str(pydicom.dcmread(sources[0], stop_before_pixels=True).SeriesInstanceUID)
        for source in sources:
            target = tmp_path / series_uid / source.name
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(source, target)
            files.append(target)
    summaries = summarise_series(files)
    assert sorted(s.n_instances for s in summaries) == [30, 64]
    assert all(s.modality == "CT" and s.axial_tilt_deg is not None and s.axial_tilt_deg < 1 for s in summaries)
    choice = choose_series(summaries, RULES)
    assert choice.series_uid == next(s.series_uid for s in summaries if s.n_instances == 64)
