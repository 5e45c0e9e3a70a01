"""The synthetic paired benchmark: determinism, caching, split hygiene, label/text agreement, geometry."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from config.settings import SyntheticSettings
from trainer.data.manifest import read_manifest
from trainer.data.synthetic import (
    BENCHMARK_FILE,
    ORIENTATIONS,
    benchmark_prevalence,
    generate_case,
    generate_synthetic_benchmark,
    load_benchmark_record,
    oriented_image,
)
from trainer.data.synthetic_findings import FINDINGS

TINY = SyntheticSettings(n_train=12, n_val=4, n_test=8, seed=7, volume_shape=(32, 32, 16))
NEGATION_STARTS = ("no ", "there is no ", "without ", "pleural spaces are clear", "mediastinal and hilar nodes are not",
                   "the lungs are without", "lung parenchyma without")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tiny procedural benchmark generated twice, into two folders: by 2 processes, then by 1."""
    first = tmp_path_factory.mktemp("synthetic_a")
    second = tmp_path_factory.mktemp("synthetic_b")
    generate_synthetic_benchmark(first, TINY, ct_root=None, progress=False, workers=2)
    generate_synthetic_benchmark(second, TINY, ct_root=None, progress=False, workers=1)
    return first, second


def test_generation_is_deterministic_and_independent_of_workers(tiny_dirs: tuple[Path, Path]) -> None:
    first, second = tiny_dirs
    rows_a, rows_b = read_manifest(first / "manifest.csv"), read_manifest(second / "manifest.csv")
    assert len(rows_a) == TINY.n_train + TINY.n_val + TINY.n_test
    assert [(r.volume_id, r.report, r.labels, r.patient_id, r.split) for r in rows_a] == [
        (r.volume_id, r.report, r.labels, r.patient_id, r.split) for r in rows_b
    ]
    for row_a, row_b in zip(rows_a, rows_b):
        img_a, img_b = nib.load(row_a.volume), nib.load(row_b.volume)
        assert img_a.shape == TINY.volume_shape
        assert img_a.get_data_dtype() == np.int16
        assert np.array_equal(np.asarray(img_a.dataobj), np.asarray(img_b.dataobj))
        assert np.allclose(img_a.affine, img_b.affine)


def test_second_call_reuses_the_benchmark(tiny_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    first, _ = tiny_dirs
    record, volume = first / BENCHMARK_FILE, next((first / "volumes").glob("*.nii.gz"))
    before = (record.stat().st_mtime_ns, volume.stat().st_mtime_ns)
    started = time.perf_counter()
    manifest = generate_synthetic_benchmark(first, TINY, ct_root=None, progress=False)
    assert time.perf_counter() - started < 1.0
    assert manifest == first / "manifest.csv"
    assert (record.stat().st_mtime_ns, volume.stat().st_mtime_ns) == before

    # an incomplete folder (no benchmark.json, e.g. an interrupted run) is regenerated, not trusted
    small = SyntheticSettings(n_train=2, n_val=1, n_test=1, seed=3, volume_shape=(16, 16, 8))
    generate_synthetic_benchmark(tmp_path, small, ct_root=None, progress=False)
    (tmp_path / BENCHMARK_FILE).unlink()
    generate_synthetic_benchmark(tmp_path, small, ct_root=None, progress=False)
    assert (tmp_path / BENCHMARK_FILE).is_file()
    # different settings regenerate in place and drop stale volumes
    generate_synthetic_benchmark(tmp_path, small.model_copy(update={"n_train": 1}), ct_root=None, progress=False)
    assert len(list((tmp_path / "volumes").glob("*.nii.gz"))) == 3


def test_train_and_test_share_no_background_or_lesion(tiny_dirs: tuple[Path, Path]) -> None:
    record = load_benchmark_record(tiny_dirs[0])
    by_split: dict[str, dict[str, set[str]]] = {}
    for info in record["volumes"].values():
        ids = by_split.setdefault(info["split"], {"backgrounds": set(), "lesions": set()})
        assert info["background_id"] not in ids["backgrounds"], "background instances must be unique"
        ids["backgrounds"].add(info["background_id"])
        ids["lesions"].update(info["lesion_ids"])
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        assert not by_split[a]["backgrounds"] & by_split[b]["backgrounds"]
        assert not by_split[a]["lesions"] & by_split[b]["lesions"]
    rows = read_manifest(tiny_dirs[0] / "manifest.csv")
    assert not {r.patient_id for r in rows if r.split == "train"} & {r.patient_id for r in rows if r.split == "test"}
    assert record["counts"] == {"train": 12, "val": 4, "test": 8}


def test_labels_agree_with_report(tiny_dirs: tuple[Path, Path]) -> None:
    record = load_benchmark_record(tiny_dirs[0])
    rows = {r.volume_id: r for r in read_manifest(tiny_dirs[0] / "manifest.csv")}
    for volume_id, info in record["volumes"].items():
        labels = set(rows[volume_id].labels)
        assert labels == set(info["labels"]) == {x["finding"] for x in info["lesions"]}
        assert labels <= set(FINDINGS)
        report = rows[volume_id].report
        assert "FINDINGS:" in report and "IMPRESSION:" in report
        positive = {"findings": set(), "impression": set()}
        for section, kind, findings, text in info["report_sentences"]:
            assert text in report
            if kind == "positive":
                positive[section].update(findings)
                assert not text.lower().startswith(NEGATION_STARTS), text
            elif kind == "negative":
                assert not set(findings) & labels, f"{volume_id}: negated a labelled finding: {text}"
                assert text.lower().startswith(NEGATION_STARTS), text
            else:
                assert not findings
        assert positive["findings"] == labels and positive["impression"] == labels
        if not labels:
            assert any(kind == "normal" for _, kind, _, _ in info["report_sentences"])


def test_every_finding_appears_and_reports_vary(tmp_path: Path) -> None:
    settings = SyntheticSettings(n_train=60, n_val=0, n_test=0, seed=11, volume_shape=(32, 32, 16))
    rows = read_manifest(generate_synthetic_benchmark(tmp_path, settings, ct_root=None, progress=False))
    prevalence = benchmark_prevalence(rows)
    assert set(prevalence) == set(FINDINGS)
    assert all(0.1 <= prevalence[f] <= 0.65 for f in FINDINGS), prevalence
    words = [len(r.report.split()) for r in rows]
    assert min(words) >= 25 and max(words) <= 200 and max(words) > 100 > min(words)
    assert len({r.report for r in rows}) == len(rows)


def _later_lesions_mask(case, position: int) -> np.ndarray:  # noqa: ANN001
    """Voxels painted by lesions inserted after ``position`` (they may overwrite earlier ones)."""
    covered = np.zeros(case.hu.shape, dtype=bool)
    for lesion in case.lesions[position + 1 :]:
        covered[lesion.region] |= lesion.mask
    return covered


def test_inserted_findings_change_voxels_in_the_expected_direction() -> None:
    settings = SyntheticSettings(seed=5, volume_shape=(64, 64, 32))
    seen: set[str] = set()
    for index in range(40):
        case = generate_case(settings, "train", index, keep_background=True)
        assert case.background is not None
        for position, lesion in enumerate(case.lesions):
            own = np.zeros(case.hu.shape, dtype=bool)
            own[lesion.region] = lesion.mask
            own &= ~_later_lesions_mask(case, position)
            if own.sum() < 3:
                continue
            change = float((case.hu[own] - case.background[own]).mean())
            if lesion.finding == "emphysema":
                assert change < -40.0, (index, lesion.finding, change)
            else:
                assert change > 40.0, (index, lesion.finding, change)
            assert lesion.zone in ("upper", "lower") and lesion.side in ("left", "right")
            seen.add(lesion.finding)
        if seen == set(FINDINGS):
            break
    assert seen == set(FINDINGS)


def test_nodules_sit_clear_of_the_pleura_and_nodes_bulge_into_the_lung() -> None:
    """Visibility rules (since generator 1.2): a nodule's centre lies deeper in the lung than its radius (not
    merged into the chest wall); a node lies about half in the lung, half in the mediastinum."""
    from scipy import ndimage

    settings = SyntheticSettings(seed=3, volume_shape=(96, 96, 48))
    nodule_depth_ratios: list[float] = []
    node_lung_fractions: list[float] = []
    for index in range(12):
        case = generate_case(settings, "train", index, keep_background=True)
        assert case.background is not None
        # air-density voxels before any finding was painted; closing fills the thin vessels drawn in the lung
        lung = ndimage.binary_closing(case.background < -600.0, iterations=2)
        depth = ndimage.distance_transform_edt(lung, sampling=case.spacing)
        for lesion in case.lesions:
            centre = tuple(int(round(c)) for c in lesion.centre_vox)
            if lesion.finding == "nodule":
                nodule_depth_ratios.append(float(depth[centre]) / (lesion.size_mm / 2.0))
            elif lesion.finding == "lymphadenopathy" and lesion.mask is not None and lesion.mask.any():
                node_lung_fractions.append(float(lung[lesion.region][lesion.mask].mean()))
    assert len(nodule_depth_ratios) >= 3 and len(node_lung_fractions) >= 3
    assert np.quantile(nodule_depth_ratios, 0.25) >= 0.9, sorted(nodule_depth_ratios)
    assert 0.25 <= np.median(node_lung_fractions) <= 0.75, node_lung_fractions


def test_lower_zone_collapse_raises_its_hemidiaphragm() -> None:
    """Volume loss (generator 1.3): the lowest ``lift_mm`` of each lung column becomes soft tissue and
    leaves the lung mask, and the cached insertion sites follow, so later lesions are not put there."""
    from trainer.data.synthetic_anatomy import LEFT, procedural_chest
    from trainer.data.synthetic_findings import _elevate_hemidiaphragm, _Sites

    anatomy = procedural_chest((64, 64, 32), np.random.default_rng(11))
    sites = _Sites(anatomy)
    before = anatomy.lung == LEFT
    lowest_before = np.argmax(before, axis=2)[before.any(axis=2)].min()
    assert len(sites.lung(LEFT)) == int(before.sum())
    lift_mm = 3.0 * anatomy.spacing[2]
    lifted = _elevate_hemidiaphragm(anatomy, sites, LEFT, lift_mm, np.random.default_rng(0))
    after = anatomy.lung == LEFT
    assert lifted.any() and not (lifted & after).any() and (before == (after | lifted)).all()
    assert float(anatomy.hu[lifted].mean()) > 0.0  # soft tissue where aerated lung was
    assert np.argmax(after, axis=2)[after.any(axis=2)].min() >= lowest_before + 3
    assert len(sites.lung(LEFT)) == int(after.sum())  # the stale cache was dropped


def test_consolidation_carries_air_bronchograms_and_nodules_avoid_it() -> None:
    """A consolidation holds air-density bronchi; nodules and nodes inserted later are placed in lung that
    is still aerated, not buried in an earlier consolidation or collapse where they would be invisible."""
    settings = SyntheticSettings(seed=4, volume_shape=(64, 64, 32))
    bronchi = overlaps = checked = 0
    for index in range(30):
        case = generate_case(settings, "train", index)
        dense = np.zeros(case.hu.shape, dtype=bool)
        for lesion in case.lesions:
            own = np.zeros(case.hu.shape, dtype=bool)
            own[lesion.region] = lesion.mask
            if lesion.finding == "consolidation":
                bronchi += int((case.hu[own] < -800.0).any())
            if lesion.finding in ("consolidation", "atelectasis"):
                dense |= own
            elif lesion.finding == "nodule" and dense.any():
                checked += 1
                overlaps += int((dense & own).sum() > 0.5 * own.sum())
    consolidations = sum(x.finding == "consolidation" for i in range(30) for x in generate_case(settings, "train", i).lesions)
    assert consolidations >= 3 and bronchi == consolidations
    assert checked >= 3 and overlaps == 0


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_orientation_variants_decode_to_the_same_ras_content(orientation: str) -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1000, size=(12, 10, 6)).astype(np.float32)
    spacing = (3.7, 3.7, 7.0)
    reference = nib.as_closest_canonical(oriented_image(hu, spacing, "RAS"))
    image = oriented_image(hu, spacing, orientation)
    assert "".join(nib.aff2axcodes(image.affine)) == orientation
    canonical = nib.as_closest_canonical(image)
    assert np.array_equal(np.asarray(canonical.dataobj), np.rint(hu).astype(np.int16))
    assert np.allclose(canonical.affine, reference.affine)


def test_written_files_match_the_generated_ras_arrays(tiny_dirs: tuple[Path, Path]) -> None:
    record = load_benchmark_record(tiny_dirs[0])
    checked = set()
    for volume_id, info in record["volumes"].items():
        if info["orientation"] in checked:
            continue
        case = generate_case(TINY, info["split"], info["index"])
        canonical = nib.as_closest_canonical(nib.load(tiny_dirs[0] / "volumes" / f"{volume_id}.nii.gz"))
        assert np.array_equal(np.asarray(canonical.dataobj), np.clip(np.rint(case.hu), -1024, 3071).astype(np.int16))
        assert np.allclose(np.abs(np.diag(canonical.affine)[:3]), case.spacing, rtol=1e-4)
        checked.add(info["orientation"])
    assert len(checked) >= 2


def test_real_backgrounds_follow_the_patient_split(lung_ct_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("model_export.preprocessing")
    settings = SyntheticSettings(n_train=3, n_val=1, n_test=3, seed=2, volume_shape=(32, 32, 16),
                                 real_background_fraction=1.0)
    manifest = generate_synthetic_benchmark(tmp_path, settings, ct_root=lung_ct_dir, progress=False)
    record = load_benchmark_record(tmp_path)
    sources = {split: {v["background_source"] for v in record["volumes"].values() if v["split"] == split}
               for split in ("train", "val", "test")}
    assert sources["train"] and all(s.startswith("A0001/") for s in sources["train"])
    assert sources["test"] and all(s.startswith("A0002/") for s in sources["test"])
    assert sources["val"] == {"procedural"}
    assert record["cache_key"]["real_series"]
    rows = read_manifest(manifest)
    for row in rows:
        data = np.asarray(nib.as_closest_canonical(nib.load(row.volume)).dataobj)
        assert data.shape == settings.volume_shape
        assert (data < -500).mean() > 0.2 and (data > -200).mean() > 0.2  # air/lung and tissue both present
