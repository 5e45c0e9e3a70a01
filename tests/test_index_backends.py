"""Both vector index backends, held to the same behaviour.

``edge`` is the real Qdrant engine running in-process (qdrant-edge-py), on disk. ``qdrant`` is the
qdrant-client backend; no Qdrant server can run on these machines, so it is tested against qdrant-client's
*local mode* (a folder path, or ``:memory:``), which speaks the same client API as a server. Behaviour that
only a real server has (payload indexes taking effect, HNSW) is therefore not covered for that backend.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from config import load_settings
from workers.index import IndexMismatchError, VectorIndex, open_index, point_id_for

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
        index.upsert(point_id, vector.tolist(), _payload(i, patient))
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
    no_study = {m.payload["study_uid"] for m in index.search(vectors[0].tolist(), 10, exclude_study_uid="1.2.3.0")}
    no_patient = {m.payload["study_uid"] for m in index.search(vectors[0].tolist(), 10, exclude_patient="same")}
    both = {m.payload["study_uid"] for m in index.search(vectors[0].tolist(), 10, exclude_study_uid="1.2.3.2",
                                                          exclude_patient="same")}

    assert everything == {f"1.2.3.{i}" for i in range(6)}
    assert no_study == everything - {"1.2.3.0"}
    assert no_patient == {"1.2.3.2", "1.2.3.3", "1.2.3.4"}
    assert both == {"1.2.3.3", "1.2.3.4"}
    assert index.search(vectors[0].tolist(), 2, exclude_patient="same")[0].payload["patient_pseudonym"] != "same"


def test_reupsert_of_the_same_id_overwrites(open_backend) -> None:
    index = open_backend()
    index.ensure_collection(BUNDLE, DIM)
    vectors = _vectors(3, seed=2)
    ids = _fill(index, vectors, ["a", "b", "c"])
    moved = -vectors[0]  # study 0 re-embedded (e.g. a new result version) to the opposite direction
    updated = {**_payload(0, "a"), "result_version": 2}

    index.upsert(point_id_for("1.2.3.0", BUNDLE), moved.tolist(), updated)

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
    index.upsert(point_id, _vectors(1, seed=3)[0].tolist(), payload)

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
        index.upsert(point_id_for("1.2.3.9", BUNDLE), [1.0, 2.0, 3.0], _payload(9, "a"))
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
        index.upsert(point_id_for("1.2.3.1", BUNDLE), [float("nan")] * DIM, _payload(1, "a"))
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
