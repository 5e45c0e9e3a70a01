"""Both vector index backends, held to the same behaviour.

``edge`` is the real Qdrant engine running in-process (qdrant-edge-py), on disk. ``qdrant`` is the
qdrant-client backend; no Qdrant server can run on these machines, so it is tested against qdrant-client's
*local mode* (a folder path, or ``:memory:``), which speaks the same client API as a server. Behaviour that
only a real server has (payload indexes taking effect, HNSW, quantisation) is therefore not covered for that
backend; local mode does implement named vectors, filters, paging, score thresholds and parametrised RRF.
Edge-only behaviour (format-1 migration, background HNSW builds, int8 quantisation) is tested on the real engine.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from config import load_settings
from workers.index import IndexMismatchError, SearchFilters, VectorIndex, open_index, point_id_for

DIM = 8
BUNDLE = "bundle-a"
BACKENDS = ["edge", "qdrant"]


def _settings(kind: str, root: Path, **index: object):
    options: dict[str, object] = {"backend": kind, **index}
    if kind == "qdrant" and "url" not in options:
        options["url"] = str(root / "qdrant-local")  # local mode on disk: stands in for a server
    return load_settings(None, overrides={"index": options}, environ={})


@pytest.fixture(params=BACKENDS)
def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., VectorIndex]]:
    """Opens the parametrised backend on one data folder (again after a close = a reopen from disk)."""
    index_folder = tmp_path / "data" / "index"
    opened: list[VectorIndex] = []

    def factory(**index: object) -> VectorIndex:
        handle = open_index(_settings(request.param, tmp_path, **index), index_folder)
        opened.append(handle)
        return handle

    factory.kind = request.param  # type: ignore[attr-defined]
    yield factory
    for handle in opened:
        handle.close()


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def _payload(i: int, patient: str) -> dict:
    return {"study_uid": f"1.2.3.{i}", "series_uid": f"1.2.3.{i}.1", "patient_pseudonym": patient,
            "modality": "CT", "body_part": "CHEST", "accession": f"ACC{i}", "study_date": "20240101",
            "study_description": None, "bundle_id": BUNDLE, "result_version": 1}


def _fill(index: VectorIndex, vectors: np.ndarray, patients: list[str]) -> list[str]:
    ids = []
    for i, (vector, patient) in enumerate(zip(vectors, patients)):
        point_id = point_id_for(f"1.2.3.{i}", BUNDLE)
        index.upsert(point_id, {"image": vector.tolist()}, _payload(i, patient))
        ids.append(point_id)
    return ids


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (b @ a) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a))


def test_search_ranks_by_cosine_similarity(open_backend) -> None:
    index = open_backend()
    index.ensure_collection(BUNDLE, DIM)
    vectors = _vectors(6)
    ids = _fill(index, vectors, ["p0", "p1", "p2", "p3", "p4", "p5"])
    query = vectors[2] + 0.05 * _vectors(1, seed=9)[0]

    matches = index.search(query.tolist(), 4)

    expected = np.argsort(-_cosine(query, vectors))[:4]
    assert [m.point_id for m in matches] == [ids[i] for i in expected]
    assert [m.score for m in matches] == pytest.approx(_cosine(query, vectors)[expected].tolist(), abs=1e-4)
    assert matches[0].payload["study_uid"] == "1.2.3.2"
    assert index.count() == 6


def test_search_excludes_the_query_study_and_a_patient(open_backend) -> None:
    index = open_backend()
    index.ensure_collection(BUNDLE, DIM)
    vectors = _vectors(6, seed=1)
    _fill(index, vectors, ["same", "same", "other", "other", "third", "same"])

    everything = {m.payload["study_uid"] for m in index.search(vectors[0].tolist(), 10)}
    no_study = {m.payload["study_uid"] for m in index.search(
        vectors[0].tolist(), 10, filters=SearchFilters(exclude_study_uid="1.2.3.0"))}
    no_patient = {m.payload["study_uid"] for m in index.search(
        vectors[0].tolist(), 10, filters=SearchFilters(exclude_patient="same"))}
    both = {m.payload["study_uid"] for m in index.search(
        vectors[0].tolist(), 10, filters=SearchFilters(exclude_study_uid="1.2.3.2", exclude_patient="same"))}

    assert everything == {f"1.2.3.{i}" for i in range(6)}
    assert no_study == everything - {"1.2.3.0"}
    assert no_patient == {"1.2.3.2", "1.2.3.3", "1.2.3.4"}
    assert both == {"1.2.3.3", "1.2.3.4"}
    first = index.search(vectors[0].tolist(), 2, filters=SearchFilters(exclude_patient="same"))[0]
    assert first.payload["patient_pseudonym"] != "same"


def test_reupsert_of_the_same_id_overwrites(open_backend) -> None:
    index = open_backend()
    index.ensure_collection(BUNDLE, DIM)
    vectors = _vectors(3, seed=2)
    ids = _fill(index, vectors, ["a", "b", "c"])
    moved = -vectors[0]  # study 0 re-embedded (e.g. a new result version) to the opposite direction
    updated = {**_payload(0, "a"), "result_version": 2}

    index.upsert(point_id_for("1.2.3.0", BUNDLE), {"image": moved.tolist()}, updated)

    assert index.count() == 3
    best = index.search(moved.tolist(), 1)[0]
    assert best.point_id == ids[0]
    assert best.score == pytest.approx(1.0, abs=1e-4)
    assert best.payload["result_version"] == 2


def test_payload_round_trips(open_backend) -> None:
    index = open_backend()
    index.ensure_collection(BUNDLE, DIM)
    payload = {"study_uid": "1.2.840.99.1", "accession": "A-1", "study_description": None, "n_slices": 64,
               "result_version": 3, "score_hint": 0.25, "patient_pseudonym": "f" * 32, "tags": ["x", "y"],
               "bundle_id": BUNDLE}
    point_id = point_id_for("1.2.840.99.1", BUNDLE)
    index.upsert(point_id, {"image": _vectors(1, seed=3)[0].tolist()}, payload)

    match = index.search(_vectors(1, seed=3)[0].tolist(), 1)[0]

    assert match.point_id == point_id
    assert match.payload == payload


def test_mismatched_bundle_or_dimension_is_refused(open_backend) -> None:
    index = open_backend()
    index.ensure_collection(BUNDLE, DIM)
    index.ensure_collection(BUNDLE, DIM)  # the same bundle again is fine (every node start does this)
    _fill(index, _vectors(2, seed=4), ["a", "b"])
    with pytest.raises(IndexMismatchError, match=f"{BUNDLE}.*bundle-b|bundle-b.*{BUNDLE}"):
        index.ensure_collection("bundle-b", DIM)
    with pytest.raises(IndexMismatchError, match="dim 16"):
        index.ensure_collection(BUNDLE, 16)
    with pytest.raises(IndexMismatchError, match="3 dimensions"):
        index.upsert(point_id_for("1.2.3.9", BUNDLE), {"image": [1.0, 2.0, 3.0]}, _payload(9, "a"))
    index.close()

    reopened = open_backend()
    with pytest.raises(IndexMismatchError, match="bundle-b"):
        reopened.ensure_collection("bundle-b", DIM)
    reopened.ensure_collection(BUNDLE, DIM)
    assert reopened.count() == 2  # a refused open changed nothing


def test_reopen_from_disk_keeps_points(open_backend) -> None:
    index = open_backend()
    index.ensure_collection(BUNDLE, DIM)
    vectors = _vectors(5, seed=5)
    ids = _fill(index, vectors, ["a", "b", "c", "d", "e"])
    index.close()

    reopened = open_backend()
    reopened.ensure_collection(BUNDLE, DIM)

    assert reopened.count() == 5
    best = reopened.search(vectors[3].tolist(), 1)[0]
    assert best.point_id == ids[3]
    assert best.payload == _payload(3, "d")


def test_bad_vectors_and_unopened_collections_are_clear_errors(open_backend) -> None:
    index = open_backend()
    with pytest.raises(RuntimeError, match="ensure_collection"):
        index.search([1.0] * DIM, 3)
    index.ensure_collection(BUNDLE, DIM)
    with pytest.raises(ValueError, match="NaN"):
        index.upsert(point_id_for("1.2.3.1", BUNDLE), {"image": [float("nan")] * DIM}, _payload(1, "a"))
    with pytest.raises(ValueError, match="zeros"):
        index.search([0.0] * DIM, 3)
    assert index.count() == 0


def test_point_ids_are_deterministic_uuid5() -> None:
    first = point_id_for("1.2.3.4", "bundle-a")
    assert first == point_id_for("1.2.3.4", "bundle-a")
    assert uuid.UUID(first).version == 5
    assert first != point_id_for("1.2.3.4", "bundle-b")
    assert first != point_id_for("1.2.3.5", "bundle-a")
    with pytest.raises(ValueError):
        point_id_for("", "bundle-a")


def test_edge_records_bundle_beside_the_shard_and_has_one_owner(tmp_path: Path) -> None:
    index_folder = tmp_path / "data" / "index"
    settings = _settings("edge", tmp_path)
    index = open_index(settings, index_folder)
    try:
        index.ensure_collection(BUNDLE, DIM)
        recorded = json.loads((index_folder / settings.index.collection / "collection.json").read_text())
        assert (recorded["bundle_id"], recorded["dim"]) == (BUNDLE, DIM)
        second = open_index(settings, index_folder)
        with pytest.raises(RuntimeError, match="another process|one owner"):
            second.ensure_collection(BUNDLE, DIM)
    finally:
        index.close()


def test_qdrant_backend_in_memory_local_mode(tmp_path: Path) -> None:
    """``index.url: ':memory:'`` = qdrant-client local mode without files (stands in for a server URL)."""
    index = open_index(_settings("qdrant", tmp_path, url=":memory:"), tmp_path / "data" / "index")
    try:
        index.ensure_collection(BUNDLE, DIM)
        _fill(index, _vectors(3, seed=6), ["a", "b", "c"])
        assert index.count() == 3
        assert len(index.search(_vectors(1, seed=7)[0].tolist(), 2)) == 2
    finally:
        index.close()


# --- named vectors, filters, paging, fusion (both backends) -----------------------------------------------------


def _unit(vector: np.ndarray) -> list[float]:
    """What a cosine collection stores: the vector scaled to unit length."""
    return (vector / np.linalg.norm(vector)).tolist()


def test_named_vectors_round_trip_via_get(open_backend) -> None:
    index = open_backend()
    index.ensure_collection(BUNDLE, DIM)
    image, report = _vectors(2, seed=11)
    with_report, image_only = point_id_for("1.2.9.1", BUNDLE), point_id_for("1.2.9.2", BUNDLE)
    index.upsert(with_report, {"image": image.tolist(), "report": report.tolist()}, _payload(1, "a"))
    index.upsert(image_only, {"image": report.tolist()}, _payload(2, "b"))

    stored = index.get(with_report)
    assert stored is not None and stored.point_id == with_report
    assert set(stored.vectors) == {"image", "report"}
    assert stored.vectors["image"] == pytest.approx(_unit(image), abs=1e-5)
    assert stored.vectors["report"] == pytest.approx(_unit(report), abs=1e-5)
    assert stored.payload == _payload(1, "a")
    alone = index.get(image_only)
    assert alone is not None and set(alone.vectors) == {"image"}
    assert index.get(point_id_for("1.2.9.404", BUNDLE)) is None

    # Searching by `report` sees only points that have one; an upsert without it removes it.
    assert [m.point_id for m in index.search(report.tolist(), 5, using="report")] == [with_report]
    index.upsert(with_report, {"image": image.tolist()}, _payload(1, "a"))
    assert set(index.get(with_report).vectors) == {"image"}
    assert index.search(report.tolist(), 5, using="report") == []

    with pytest.raises(ValueError, match="image"):
        index.upsert(image_only, {"report": report.tolist()}, _payload(2, "b"))
    with pytest.raises(ValueError, match="unknown vector"):
        index.upsert(image_only, {"image": image.tolist(), "text": image.tolist()}, _payload(2, "b"))
    with pytest.raises(ValueError, match="unknown vector"):
        index.search(image.tolist(), 3, using="text")


FILTER_VALUES = {"modality": ["CT", "MR", "CR"], "body_part": ["CHEST", "HEAD"], "sex": ["M", "F", "O", "F"],
                 "age_band": ["40-49", "50-59", "90+", "50-59", "60-69"], "institution": ["North", "South", "East"]}
N_FILTERED = 48


def _filtered_payload(i: int) -> dict:
    payload = _payload(i, f"patient-{i % 7}")
    for key, values in FILTER_VALUES.items():
        payload[key] = values[i % len(values)]
    payload["study_day"] = 20240101 + i  # 20240101 .. 20240148: integers, a range need not be a real date
    return payload


@pytest.fixture
def filtered_index(open_backend) -> tuple[VectorIndex, np.ndarray]:
    index = open_backend()
    index.ensure_collection(BUNDLE, DIM)
    vectors = _vectors(N_FILTERED, seed=12)
    for i, vector in enumerate(vectors):
        index.upsert(point_id_for(f"1.2.3.{i}", BUNDLE), {"image": vector.tolist()}, _filtered_payload(i))
    return index, vectors


def _uids(matches) -> set[str]:
    return {m.payload["study_uid"] for m in matches}


def test_each_payload_filter_narrows_to_exactly_the_matching_studies(filtered_index) -> None:
    index, vectors = filtered_index
    query = vectors[0].tolist()
    everything = _uids(index.search(query, 100))
    assert len(everything) == N_FILTERED
    for key, values in FILTER_VALUES.items():
        for value in set(values):
            expected = {f"1.2.3.{i}" for i in range(N_FILTERED) if _filtered_payload(i)[key] == value}
            found = _uids(index.search(query, 100, filters=SearchFilters(**{key: value})))
            assert found == expected, (key, value)
            assert 0 < len(found) < N_FILTERED
    combined = SearchFilters(modality="MR", sex="F", exclude_patient="patient-3", exclude_study_uid="1.2.3.13")
    expected = {f"1.2.3.{i}" for i in range(N_FILTERED) if _filtered_payload(i)["modality"] == "MR"
                and _filtered_payload(i)["sex"] == "F" and i % 7 != 3 and i != 13}
    assert _uids(index.search(query, 100, filters=combined)) == expected
    assert len(expected) >= 2
    assert index.search(query, 100, filters=SearchFilters(modality="US")) == []


def test_study_date_range_is_inclusive_on_both_ends(filtered_index) -> None:
    index, vectors = filtered_index
    query = vectors[5].tolist()
    both = _uids(index.search(query, 100, filters=SearchFilters(study_date_from="20240110",
                                                                study_date_to="20240120")))
    assert both == {f"1.2.3.{i}" for i in range(9, 20)}  # study_day 20240110 .. 20240120, both ends included
    since = _uids(index.search(query, 100, filters=SearchFilters(study_date_from="20240140")))
    assert since == {f"1.2.3.{i}" for i in range(39, N_FILTERED)}
    until = _uids(index.search(query, 100, filters=SearchFilters(study_date_to="20240103")))
    assert until == {"1.2.3.0", "1.2.3.1", "1.2.3.2"}
    one_day = _uids(index.search(query, 100, filters=SearchFilters(study_date_from="20240107",
                                                                   study_date_to="20240107")))
    assert one_day == {"1.2.3.6"}


def test_offset_pages_through_the_ranking(filtered_index) -> None:
    index, vectors = filtered_index
    query = vectors[7].tolist()
    ranking = [m.point_id for m in index.search(query, 15)]
    pages = [m.point_id for offset in (0, 5, 10) for m in index.search(query, 5, offset=offset)]
    assert pages == ranking
    assert len(set(ranking)) == 15
    assert [m.point_id for m in index.search(query, 5, offset=N_FILTERED - 2)] == \
        [m.point_id for m in index.search(query, N_FILTERED)][-2:]
    filtered = SearchFilters(body_part="HEAD")
    head = [m.point_id for m in index.search(query, 10, filters=filtered)]
    assert [m.point_id for m in index.search(query, 4, filters=filtered, offset=3)] == head[3:7]
    with pytest.raises(ValueError, match="offset"):
        index.search(query, 5, offset=-1)


def test_min_score_cuts_the_ranking(filtered_index) -> None:
    index, vectors = filtered_index
    query = vectors[9].tolist()
    ranking = index.search(query, N_FILTERED)
    threshold = (ranking[5].score + ranking[6].score) / 2  # between the 6th and 7th score
    kept = index.search(query, N_FILTERED, min_score=threshold)
    assert [m.point_id for m in kept] == [m.point_id for m in ranking[:6]]
    assert all(m.score >= threshold for m in kept)
    assert index.search(query, 10, min_score=1.01) == []


def test_fused_search_is_reciprocal_rank_fusion(open_backend) -> None:
    """A study 2nd on both rankings beats one 1st on the image ranking that has no report vector (it is still
    returned), and every fused score is sum 1/(k + position) over the separate rankings (positions from 0)."""
    index = open_backend()
    index.ensure_collection(BUNDLE, DIM)
    axes = np.eye(DIM)
    noise = 0.05 * _vectors(12, seed=13)
    points = {  # name: (image, report or None)
        "first-image-no-report": (axes[0], None),
        "second-on-both": (axes[0] + 0.4 * axes[2], axes[1] + 0.4 * axes[3]),
        "first-report": (axes[4], axes[1]),
    }
    for j in range(9):  # fillers further from both queries
        points[f"filler-{j}"] = (axes[5] + axes[j % 3 + 5] * 0.5 + noise[j],
                                 axes[6] + noise[j + 3] if j % 2 else None)
    ids = {}
    for i, (name, (image, report)) in enumerate(points.items()):  # _payload(i) names study 1.2.3.<i>
        ids[name] = point_id_for(f"1.2.4.{i}", BUNDLE)
        vectors = {"image": image.tolist()} | ({"report": report.tolist()} if report is not None else {})
        index.upsert(ids[name], vectors, {**_payload(i, f"p{i}"), "name": name})
    queries = {"image": axes[0].tolist(), "report": axes[1].tolist()}

    image_ranking = index.search(queries["image"], 50)
    report_ranking = index.search(queries["report"], 50, using="report")
    assert image_ranking[0].point_id == ids["first-image-no-report"]
    assert image_ranking[1].point_id == report_ranking[1].point_id == ids["second-on-both"]
    assert report_ranking[0].point_id == ids["first-report"]

    fused = index.search_fused(queries, 10)
    k = 60  # settings.index.rrf_k default
    expected = {}
    for ranking in (image_ranking, report_ranking):
        for position, match in enumerate(ranking):
            expected[match.point_id] = expected.get(match.point_id, 0.0) + 1 / (k + position)
    assert {m.point_id: m.score for m in fused} == pytest.approx(
        {pid: expected[pid] for pid in (m.point_id for m in fused)}, abs=1e-6)
    assert [m.score for m in fused] == sorted((m.score for m in fused), reverse=True)
    order = [m.point_id for m in fused]
    assert order.index(ids["second-on-both"]) < order.index(ids["first-image-no-report"])
    by_id = {m.point_id: m.score for m in fused}
    assert by_id[ids["second-on-both"]] == pytest.approx(2 / 61, abs=1e-6)
    assert by_id[ids["first-image-no-report"]] == pytest.approx(1 / 60, abs=1e-6)
    assert fused[0].payload["name"] in {"second-on-both", "first-report"}

    # Paging and filters apply to the fused ranking; one named vector alone is its own ranking, rescored.
    assert [m.point_id for m in index.search_fused(queries, 4, offset=2)] == order[2:6]
    no_second = index.search_fused(queries, 10, filters=SearchFilters(exclude_study_uid="1.2.3.1"))
    assert ids["second-on-both"] not in {m.point_id for m in no_second}
    alone = index.search_fused({"image": queries["image"]}, 3)
    assert [m.point_id for m in alone] == [m.point_id for m in image_ranking[:3]]
    assert [m.score for m in alone] == pytest.approx([1 / 60, 1 / 61, 1 / 62], abs=1e-6)


def test_fused_search_honours_rrf_k(open_backend) -> None:
    index = open_backend(rrf_k=5)
    index.ensure_collection(BUNDLE, DIM)
    vectors = _vectors(4, seed=14)
    for i, vector in enumerate(vectors):
        index.upsert(point_id_for(f"1.2.5.{i}", BUNDLE), {"image": vector.tolist()}, _payload(i, f"p{i}"))
    fused = index.search_fused({"image": vectors[0].tolist()}, 2)
    assert [m.score for m in fused] == pytest.approx([1 / 5, 1 / 6], abs=1e-6)


# --- edge: format-1 migration, background HNSW builds, int8 quantisation (the real engine) -------------------


def _old_format_index(folder: Path, vectors: np.ndarray) -> list[str]:
    """An edge index exactly as the code before named `report` vectors made it: collection.json format 1 and
    one shard in ``folder/shard`` holding only the `image` vector, with keyword payload indexes."""
    import qdrant_edge as qe

    folder.mkdir(parents=True)
    metadata = {"format": 1, "bundle_id": BUNDLE, "dim": DIM, "distance": "cosine", "vector": "image",
                "created_at": 1.0}
    (folder / "collection.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    (folder / "shard").mkdir()
    shard = qe.EdgeShard.create(str(folder / "shard"), qe.EdgeConfig(
        vectors={"image": qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine)}))
    for field in ("study_uid", "patient_pseudonym", "modality", "body_part", "bundle_id"):
        shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
    ids = []
    for i, vector in enumerate(vectors):
        point_id = point_id_for(f"1.2.3.{i}", BUNDLE)
        shard.update(qe.UpdateOperation.upsert_points([qe.Point(point_id, {"image": vector.tolist()},
                                                                _payload(i, f"p{i % 5}"))]))
        ids.append(point_id)
    shard.close()
    return ids


def _edge(tmp_path: Path, **index: object):
    return open_index(_settings("edge", tmp_path, **index), tmp_path / "data" / "index")


def test_format1_edge_index_migrates_with_every_point_intact(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "index" / "medfinder"
    vectors = _vectors(1100, seed=20)  # more than two scroll batches
    ids = _old_format_index(folder, vectors)

    index = _edge(tmp_path, optimize_after_points=0)  # no HNSW build of the migrated shard during the checks
    try:
        index.ensure_collection(BUNDLE, DIM)
        metadata = json.loads((folder / "collection.json").read_text())
        assert (metadata["format"], metadata["shard"], metadata["migrated_from_format"]) == (2, "shard-1", 1)
        assert (metadata["bundle_id"], metadata["dim"]) == (BUNDLE, DIM)
        assert sorted(p.name for p in folder.iterdir()) == ["collection.json", "shard-1"]  # old shard gone
        assert index.count() == len(ids)
        for i in (0, 1, 511, 512, 1023, 1024, 1099):
            stored = index.get(ids[i])
            assert stored is not None and set(stored.vectors) == {"image"}
            assert stored.vectors["image"] == pytest.approx(_unit(vectors[i]), abs=1e-5)
            assert stored.payload == _payload(i, f"p{i % 5}")
        assert {index.get(point_id).payload["study_uid"] for point_id in ids} == {f"1.2.3.{i}" for i in range(1100)}
        assert index.search(vectors[42].tolist(), 1)[0].point_id == ids[42]
        # The new format takes report vectors and filters on the new fields.
        index.upsert(ids[7], {"image": vectors[7].tolist(), "report": vectors[8].tolist()}, _payload(7, "p2"))
        assert index.search(vectors[8].tolist(), 1, using="report")[0].point_id == ids[7]
    finally:
        index.close()
    # Reopened with the default threshold (1000): the migrated shard has no HNSW yet, so a build starts on open.
    reopened = _edge(tmp_path)
    try:
        reopened.ensure_collection(BUNDLE, DIM)
        assert reopened.wait_for_optimization(timeout=120) and reopened.last_build is not None
        assert reopened.info().indexed_vectors >= len(ids)
        assert sorted(p.name for p in folder.iterdir()) == ["collection.json", "shard-2"]
        assert reopened.count() == len(ids)
        assert set(reopened.get(ids[7]).vectors) == {"image", "report"}
        assert reopened.get(ids[1099]).vectors["image"] == pytest.approx(_unit(vectors[1099]), abs=1e-5)
    finally:
        reopened.close()


def test_failed_migration_keeps_the_old_shard_and_the_next_open_completes_it(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.index import edge_migrate

    folder = tmp_path / "data" / "index" / "medfinder"
    vectors = _vectors(700, seed=21)
    ids = _old_format_index(folder, vectors)
    real_copy = edge_migrate.copy_points

    def copy_then_crash(source, target, batch=512):
        real_copy(source, target, batch)
        raise OSError("disk full (simulated) after copying")

    monkeypatch.setattr(edge_migrate, "copy_points", copy_then_crash)
    index = _edge(tmp_path, optimize_after_points=0)
    with pytest.raises(OSError, match="simulated"):
        index.ensure_collection(BUNDLE, DIM)
    index.close()
    assert json.loads((folder / "collection.json").read_text())["format"] == 1
    assert (folder / "shard").is_dir() and (folder / "shard-1.migrating").is_dir()  # half-done copy left behind

    monkeypatch.setattr(edge_migrate, "copy_points", real_copy)
    index = _edge(tmp_path, optimize_after_points=0)
    try:
        index.ensure_collection(BUNDLE, DIM)
        assert sorted(p.name for p in folder.iterdir()) == ["collection.json", "shard-1"]
        assert index.count() == 700
        assert index.get(ids[699]).vectors["image"] == pytest.approx(_unit(vectors[699]), abs=1e-5)
    finally:
        index.close()


def test_leftovers_of_a_crashed_build_are_removed_on_open(tmp_path: Path) -> None:
    index = _edge(tmp_path)
    index.ensure_collection(BUNDLE, DIM)
    ids = _fill(index, _vectors(5, seed=22), ["a", "b", "c", "d", "e"])
    index.close()
    folder = tmp_path / "data" / "index" / "medfinder"
    for leftover in ("shard-2.building", "shard-2", "shard"):  # a build copy, a built shard never switched to, ...
        (folder / leftover / "segments").mkdir(parents=True)
        (folder / leftover / "segments" / "junk").write_bytes(b"x" * 10)
    (folder / "unrelated").mkdir()

    reopened = _edge(tmp_path)
    try:
        reopened.ensure_collection(BUNDLE, DIM)
        assert sorted(p.name for p in folder.iterdir()) == ["collection.json", "shard-1", "unrelated"]
        assert reopened.count() == 5
        assert reopened.search(_vectors(5, seed=22)[2].tolist(), 1)[0].point_id == ids[2]
    finally:
        reopened.close()


def _clustered(n: int, dim: int, seed: int, clusters: int = 40, noise: float = 0.6) -> np.ndarray:
    """Embedding-like vectors: unit-norm points around random cluster centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def _recall_at_10(index, queries: np.ndarray) -> float:
    found = []
    for query in queries:
        approximate = {m.point_id for m in index.search(query.tolist(), 10)}
        exact = {m.point_id for m in index.search(query.tolist(), 10, exact=True)}
        found.append(len(approximate & exact) / 10)
    return float(np.mean(found))


def test_background_hnsw_build_never_blocks_search_and_results_stay_correct(tmp_path: Path) -> None:
    """The build runs in a child process on a copy: searches are answered (exact) while optimize() runs, points
    written during the build are in the swapped-in shard, and HNSW then returns the exact top-10."""
    dim, n = 64, 3000
    vectors = _clustered(n + 40, dim, seed=23)
    index = open_index(_settings("edge", tmp_path, optimize_after_points=n), tmp_path / "data" / "index")
    try:
        index.ensure_collection(BUNDLE, dim)
        for i in range(n):
            index.upsert(point_id_for(f"1.2.3.{i}", BUNDLE), {"image": vectors[i].tolist()}, _payload(i, f"p{i}"))
        assert index.optimizing  # the n-th point started the build
        answered: list[tuple[float, float]] = []  # (start, end) wall clock of each search during the build
        late = 0
        deadline = time.monotonic() + 300
        while index.optimizing and time.monotonic() < deadline:
            i = len(answered) % n
            started = time.time()
            best = index.search(vectors[i].tolist(), 10)
            answered.append((started, time.time()))
            assert best[0].point_id == point_id_for(f"1.2.3.{i}", BUNDLE)
            if late < 40 and len(answered) % 25 == 0:  # writes during the build: replayed into the new shard
                j = n + late
                index.upsert(point_id_for(f"1.2.3.{j}", BUNDLE), {"image": vectors[j].tolist()}, _payload(j, "q"))
                late += 1
            time.sleep(0.001)
        assert index.wait_for_optimization(timeout=60)
        build = index.last_build
        assert build is not None and build.indexed_vectors >= n
        during = [(a, b) for a, b in answered if a >= build.started and b <= build.finished]
        print(f"{len(during)} of {len(answered)} searches answered during the {build.seconds:.2f} s optimize()")
        assert len(during) >= 10, f"only {len(during)} searches answered during a {build.seconds:.1f} s build"
        assert max(b - a for a, b in answered) < 2.0  # every search answered in bounded time, swap included

        folder = tmp_path / "data" / "index" / "medfinder"
        assert json.loads((folder / "collection.json").read_text())["shard"] == "shard-2"
        assert sorted(p.name for p in folder.iterdir()) == ["collection.json", "shard-2"]
        info = index.info()
        assert info.indexed_vectors >= n and not info.optimizing
        assert index.count() == n + late and late > 0
        for j in range(n, n + late):
            assert index.search(vectors[j].tolist(), 1)[0].point_id == point_id_for(f"1.2.3.{j}", BUNDLE)
        assert _recall_at_10(index, vectors[:40]) >= 0.98
    finally:
        index.close()


def test_closing_during_a_background_build_keeps_the_live_shard(tmp_path: Path) -> None:
    dim, n = 64, 3000
    vectors = _clustered(n, dim, seed=28)
    index = open_index(_settings("edge", tmp_path, optimize_after_points=n), tmp_path / "data" / "index")
    index.ensure_collection(BUNDLE, dim)
    for i in range(n):
        index.upsert(point_id_for(f"1.2.3.{i}", BUNDLE), {"image": vectors[i].tolist()}, _payload(i, f"p{i}"))
    assert index.optimizing
    index.close()  # terminates the child, waits for the build thread, closes the shard
    assert not index.optimizing and index.last_build is None

    reopened = open_index(_settings("edge", tmp_path, optimize_after_points=0), tmp_path / "data" / "index")
    try:
        reopened.ensure_collection(BUNDLE, dim)
        folder = tmp_path / "data" / "index" / "medfinder"
        assert sorted(p.name for p in folder.iterdir()) == ["collection.json", "shard-1"]
        assert reopened.count() == n
        assert reopened.search(vectors[17].tolist(), 1)[0].point_id == point_id_for("1.2.3.17", BUNDLE)
    finally:
        reopened.close()


def test_int8_quantisation_keeps_the_exact_top10(tmp_path: Path) -> None:
    dim, n = 64, 4000
    vectors = _clustered(n, dim, seed=24)
    index = open_index(_settings("edge", tmp_path, quantization="int8", vectors_on_disk=True, rescore=True,
                                 oversampling=2.0, optimize_after_points=0), tmp_path / "data" / "index")
    try:
        index.ensure_collection(BUNDLE, dim)
        for i, vector in enumerate(vectors):
            index.upsert(point_id_for(f"1.2.3.{i}", BUNDLE), {"image": vector.tolist()}, _payload(i, f"p{i}"))
        assert not index.optimizing  # optimize_after_points 0: never on its own
        assert index.start_optimization() and index.wait_for_optimization(timeout=300)
        live = tmp_path / "data" / "index" / "medfinder" / "shard-2"
        assert list(live.glob("segments/*/vector_storage-image/quantized.data"))  # int8 copy of `image` built
        assert not list(live.glob("segments/*/vector_storage-report/quantized.data"))  # `report` not quantised
        queries = _clustered(60, dim, seed=25)
        assert _recall_at_10(index, queries) >= 0.95
    finally:
        index.close()


# --- server backend (qdrant-client local mode stands in for a server) -------------------------------------------


def test_server_collection_without_report_vector_gets_it(tmp_path: Path) -> None:
    """A collection the code before `report` made (image only): opening it adds `report` (create_vector_name,
    which local mode implements as a server 1.18+ does)."""
    from qdrant_client import models

    from workers.index.server import BUNDLE_KEY, DIM_KEY, make_client

    url = str(tmp_path / "qdrant-local")
    client = make_client(url)
    client.create_collection("medfinder", vectors_config={"image": models.VectorParams(
        size=DIM, distance=models.Distance.COSINE)}, metadata={BUNDLE_KEY: BUNDLE, DIM_KEY: DIM})
    vector = _vectors(1, seed=26)[0]
    client.upsert("medfinder", points=[models.PointStruct(id=point_id_for("1.2.3.0", BUNDLE),
                                                          vector={"image": vector.tolist()}, payload=_payload(0, "a"))])
    client.close()

    index = open_index(_settings("qdrant", tmp_path, url=url), tmp_path / "data" / "index")
    try:
        index.ensure_collection(BUNDLE, DIM)
        point_id = point_id_for("1.2.3.0", BUNDLE)
        assert set(index.get(point_id).vectors) == {"image"}
        index.upsert(point_id, {"image": vector.tolist(), "report": (-vector).tolist()}, _payload(0, "a"))
        assert index.search((-vector).tolist(), 1, using="report")[0].point_id == point_id
    finally:
        index.close()


def test_server_that_cannot_add_the_report_vector_is_a_clear_error(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from qdrant_client import QdrantClient, models
    from qdrant_client.http.exceptions import UnexpectedResponse

    from workers.index.server import BUNDLE_KEY, DIM_KEY

    def refuse(self, *args, **kwargs):  # what an older server answers for the unknown endpoint
        raise UnexpectedResponse(404, "Not Found", b"", None)

    index = open_index(_settings("qdrant", tmp_path, url=":memory:"), tmp_path / "data" / "index")
    try:
        index._require().create_collection("medfinder", vectors_config={"image": models.VectorParams(
            size=DIM, distance=models.Distance.COSINE)}, metadata={BUNDLE_KEY: BUNDLE, DIM_KEY: DIM})
        monkeypatch.setattr(QdrantClient, "create_vector_name", refuse)
        with pytest.raises(IndexMismatchError, match=r"(?s)no .report. vector.*1\.18 or newer.*index\.collection"):
            index.ensure_collection(BUNDLE, DIM)
    finally:
        index.close()


def test_server_fuses_in_python_when_the_server_lacks_parametrised_rrf(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from qdrant_client import QdrantClient, models
    from qdrant_client.http.exceptions import UnexpectedResponse

    index = open_index(_settings("qdrant", tmp_path, url=":memory:"), tmp_path / "data" / "index")
    try:
        index.ensure_collection(BUNDLE, DIM)
        vectors = _vectors(20, seed=27)
        for i, vector in enumerate(vectors):
            named = {"image": vector.tolist()} | ({"report": (-vector).tolist()} if i % 2 else {})
            index.upsert(point_id_for(f"1.2.3.{i}", BUNDLE), named, _payload(i, f"p{i}"))
        queries = {"image": vectors[3].tolist(), "report": vectors[4].tolist()}
        native = index.search_fused(queries, 8, offset=1)
        real_query_points = QdrantClient.query_points

        def old_server(self, *args, **kwargs):
            if isinstance(kwargs.get("query"), models.RrfQuery):
                raise UnexpectedResponse(400, "Bad Request", b"unknown variant `rrf`", None)
            return real_query_points(self, *args, **kwargs)

        monkeypatch.setattr(QdrantClient, "query_points", old_server)
        fallback = index.search_fused(queries, 8, offset=1)
        assert [m.point_id for m in fallback] == [m.point_id for m in native]
        assert [m.score for m in fallback] == pytest.approx([m.score for m in native], abs=1e-9)
    finally:
        index.close()


def test_server_search_params_carry_the_scale_settings() -> None:
    """Sent to real servers only (local mode warns and ignores them)."""
    from config.settings import IndexSettings
    from workers.index.server import ServerIndex, search_params

    settings = IndexSettings(hnsw_ef=200, quantization="int8", rescore=True, oversampling=3.0)
    params = search_params(settings)
    assert params.hnsw_ef == 200 and params.acorn.enable
    assert (params.quantization.rescore, params.quantization.oversampling) == (True, 3.0)
    assert search_params(IndexSettings()).quantization is None
    exact = search_params(settings, exact=True)
    assert exact.exact and exact.quantization.ignore
    local = ServerIndex(":memory:", "medfinder", settings=settings)
    assert local._search_params() is None
    local.close()
