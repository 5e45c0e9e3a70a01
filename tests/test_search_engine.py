"""The query engine over the real edge index (qdrant-edge, on disk) and the tiny bundle's real ONNX encoders.

Vectors are placed by hand where a test needs known similarities (cosines it can compute itself); the
on-the-fly test embeds the real lung CT fixtures through the same ``compute_outcome`` a worker runs.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from config import Settings, load_settings
from model_export.keyword_queries import keyword_queries
from model_export.registry import install_bundle
from model_export.runtime import ModelBundle
from workers.embed_study import bundle_for, compute_outcome, patient_pseudonym
from workers.handoff import EmbedRequest, EmbedStatus, StudyPayload
from workers.index import VectorIndex, open_index, point_id_for
from workers.index.base import IMAGE_VECTOR, REPORT_VECTOR, SearchFilters
from workers.search import QueryEngine, QueryError, StudyNotFoundError, keyword_of

A0001 = "Lung_Dx-A0001_series2_5mm"  # 64 slices
A0002 = "Lung_Dx-A0002_series2_B70f"  # 30 slices
REPORT = "Large right pleural effusion with compressive atelectasis of the right lower lobe. No pneumothorax."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    folder = tmp_path_factory.mktemp("engine") / "node-data"
    install_bundle(tiny_bundle, folder, activate=True)
    return folder


@pytest.fixture(scope="module")
def settings(data_dir: Path) -> Settings:
    return load_settings(None, overrides={"paths": {"data_dir": str(data_dir)}, "selection": {"min_slices": 20},
                                          "workers": {"onnx_threads": 1}}, environ={})


@pytest.fixture(scope="module")
def bundle(settings: Settings, tiny_bundle: Path) -> ModelBundle:
    from model_export.bundle_manifest import read_manifest

    return bundle_for(settings, read_manifest(tiny_bundle).bundle_id)


@pytest.fixture
def index(tmp_path: Path, settings: Settings, bundle: ModelBundle) -> Iterator[VectorIndex]:
    opened = open_index(settings, tmp_path / "index")
    opened.ensure_collection(bundle.bundle_id, bundle.embedding_dim)
    yield opened
    opened.close()


def make_engine(settings: Settings, index: VectorIndex, bundle: ModelBundle,
                requests: dict[str, EmbedRequest] | None = None) -> QueryEngine:
    known = requests or {}
    return QueryEngine(settings, index, bundle, bundle.bundle_id, request_for=known.get)


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def directions(dim: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` orthonormal directions (rows) of a ``dim``-space."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, count)))
    return q.T


def at_cosine(base: np.ndarray, other: np.ndarray, cosine: float) -> list[float]:
    """A unit vector whose cosine with unit ``base`` is ``cosine`` (``other`` orthogonal to ``base``)."""
    return [float(v) for v in cosine * base + np.sqrt(1.0 - cosine**2) * other]


def put(index: VectorIndex, bundle: ModelBundle, uid: str, image: list[float], *, report: list[float] | None = None,
        patient: str | None = None, **fields: object) -> None:
    payload = StudyPayload(study_uid=uid, series_uid=f"{uid}.1", patient_pseudonym=patient, bundle_id=bundle.bundle_id,
                           result_version=1, n_slices=30, modality="CT", study_date="20240101",
                           has_report=report is not None, **fields)
    vectors = {IMAGE_VECTOR: image, **({REPORT_VECTOR: report} if report is not None else {})}
    index.upsert(point_id_for(uid, bundle.bundle_id), vectors, payload.model_dump())


# --- by study ----------------------------------------------------------------------------------------------


def test_by_study_excludes_itself_and_its_patient_and_ranks_by_cosine(settings: Settings, index: VectorIndex,
                                                                      bundle: ModelBundle) -> None:
    e = directions(bundle.embedding_dim, 6)
    put(index, bundle, "1.2.3.100", [float(v) for v in e[0]], patient="P1")  # the query study
    put(index, bundle, "1.2.3.101", at_cosine(e[0], e[1], 0.99), patient="P1")  # its patient's prior
    put(index, bundle, "1.2.3.102", at_cosine(e[0], e[2], 0.9), patient="P2", sex="M")
    put(index, bundle, "1.2.3.103", at_cosine(e[0], e[3], 0.7), patient="P3", sex="F")
    put(index, bundle, "1.2.3.104", at_cosine(e[0], e[4], 0.2), patient="P4", sex="M")
    engine = make_engine(settings, index, bundle)

    result = engine.similar_to_study("1.2.3.100", limit=10)
    assert result.kind == "study" and result.bundle_id == bundle.bundle_id
    assert [h.study_uid for h in result.hits] == ["1.2.3.102", "1.2.3.103", "1.2.3.104"]
    assert [h.rank for h in result.hits] == [1, 2, 3]
    assert [h.score for h in result.hits] == pytest.approx([0.9, 0.7, 0.2], abs=1e-4)
    assert result.query["ranking"] == "cosine" and result.query["vectors"] == ["image"]
    assert result.hits[0].modality == "CT" and result.hits[0].study_date == "20240101"
    assert "P1" not in repr(result), "the patient pseudonym is never echoed"

    with_patient = engine.similar_to_study("1.2.3.100", limit=10, include_same_patient=True)
    assert [h.study_uid for h in with_patient.hits][:2] == ["1.2.3.101", "1.2.3.102"]

    page = engine.similar_to_study("1.2.3.100", limit=2, offset=1)
    assert [(h.rank, h.study_uid) for h in page.hits] == [(2, "1.2.3.103"), (3, "1.2.3.104")]

    above = engine.similar_to_study("1.2.3.100", limit=10, min_score=0.5)
    assert [h.study_uid for h in above.hits] == ["1.2.3.102", "1.2.3.103"]

    women = engine.similar_to_study("1.2.3.100", limit=10, filters=SearchFilters(sex="F"))
    assert [h.study_uid for h in women.hits] == ["1.2.3.103"]
    assert women.query["filters"] == {"sex": "F"}


def test_by_study_with_a_report_fuses_image_and_report_rankings(settings: Settings, index: VectorIndex,
                                                                bundle: ModelBundle) -> None:
    e = directions(bundle.embedding_dim, 5, seed=1)
    report = [float(v) for v in e[4]]
    put(index, bundle, "1.2.3.200", [float(v) for v in e[0]], report=report, patient="Q")
    put(index, bundle, "1.2.3.201", at_cosine(e[0], e[1], 0.8), patient="A")  # images alike, no report
    put(index, bundle, "1.2.3.202", at_cosine(e[0], e[2], 0.3), report=report, patient="B")  # the same report
    result = make_engine(settings, index, bundle).similar_to_study("1.2.3.200", limit=5)
    assert result.query["ranking"] == "rrf" and result.query["vectors"] == ["image", "report"]
    assert [h.study_uid for h in result.hits] == ["1.2.3.202", "1.2.3.201"], "second by image, first by report"
    k = settings.index.rrf_k  # RRF scores: a sum of one 1/(k + rank) per ranking the hit is in, not cosines
    assert 1 / (k + 2) < result.hits[1].score < result.hits[0].score <= 2 / k
    assert result.hits[0].has_report and not result.hits[1].has_report


def test_an_unknown_study_is_not_found(settings: Settings, index: VectorIndex, bundle: ModelBundle) -> None:
    with pytest.raises(StudyNotFoundError, match="neither indexed nor held"):
        make_engine(settings, index, bundle).similar_to_study("1.2.3.999", limit=5)


def _spool_series(spool: Path, series_dir: Path, files: int | None = None) -> tuple[str, Path]:
    """Copy a fixture series into ``<spool>/<StudyUID>/<SeriesUID>/``; returns the study UID and its folder."""
    paths = sorted(series_dir.glob("*.dcm"))[:files]
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    target = spool / str(header.StudyInstanceUID) / str(header.SeriesInstanceUID)
    target.mkdir(parents=True)
    for path in paths:
        shutil.copy(path, target / path.name)
    return str(header.StudyInstanceUID), target.parent


def test_a_spooled_unindexed_study_is_embedded_on_the_fly(tmp_path: Path, lung_ct_dir: Path, settings: Settings,
                                                          index: VectorIndex, bundle: ModelBundle) -> None:
    key_file = tmp_path / "pseudonym.key"
    key_file.write_bytes(secrets.token_bytes(32))

    def request(study_uid: str, folder: Path) -> EmbedRequest:
        return EmbedRequest(study_uid=study_uid, version=1, bundle_id=bundle.bundle_id, study_folder=folder,
                            outcome_path=tmp_path / "outcomes" / f"{study_uid}.json", pseudonym_key_file=key_file)

    first_uid, first_folder = _spool_series(tmp_path / "spool-a", lung_ct_dir / A0001)
    first = compute_outcome(settings, request(first_uid, first_folder))
    assert first.status == EmbedStatus.EMBEDDED and first.payload is not None and first.vector is not None
    put(index, bundle, first_uid, first.vector, patient=first.payload.patient_pseudonym)
    query_uid, query_folder = _spool_series(tmp_path / "spool", lung_ct_dir / A0002)
    expected = compute_outcome(settings, request(query_uid, query_folder))  # what the engine must compute too
    assert expected.vector is not None and expected.payload is not None
    # The payload fields filters use, from the header: PatientSex F, PatientAge 053Y, StudyDate 20070425.
    assert (expected.payload.sex, expected.payload.age_band, expected.payload.study_day) == ("F", "50-59", 20070425)
    same_patient = patient_pseudonym(key_file.read_bytes(), "Lung_Dx-A0002")
    put(index, bundle, "1.2.3.300", expected.vector, patient=same_patient)  # identical images, same patient
    count = index.count()

    engine = make_engine(settings, index, bundle, {query_uid: request(query_uid, query_folder)})
    result = engine.similar_to_study(query_uid, limit=5)
    assert result.query["embedded_on_the_fly"] is True
    assert [h.study_uid for h in result.hits] == [first_uid], "the query's own patient is excluded"
    cosine = float(np.dot(unit(np.asarray(expected.vector)), unit(np.asarray(first.vector))))
    assert result.hits[0].score == pytest.approx(cosine, abs=1e-4)
    assert index.count() == count, "a query never writes the index"
    assert not (tmp_path / "outcomes").exists(), "no outcome file for an on-the-fly embedding"

    with_patient = engine.similar_to_study(query_uid, limit=5, include_same_patient=True)
    assert with_patient.hits[0].study_uid == "1.2.3.300" and with_patient.hits[0].score == pytest.approx(1, abs=1e-4)


def test_a_spooled_study_that_cannot_be_embedded_is_not_found(tmp_path: Path, lung_ct_dir: Path, settings: Settings,
                                                              index: VectorIndex, bundle: ModelBundle) -> None:
    uid, folder = _spool_series(tmp_path / "spool", lung_ct_dir / A0002, files=12)
    key_file = tmp_path / "key"
    key_file.write_bytes(b"k" * 32)
    request = EmbedRequest(study_uid=uid, version=1, bundle_id=bundle.bundle_id, study_folder=folder,
                           outcome_path=tmp_path / "o.json", pseudonym_key_file=key_file)
    with pytest.raises(StudyNotFoundError, match="cannot be embedded: .*only 12 slice"):
        make_engine(settings, index, bundle, {uid: request}).similar_to_study(uid, limit=5)


@pytest.mark.parametrize(("attributes", "years", "band"), [
    ({"PatientAge": "045Y"}, 45, "40-49"),
    ({"PatientAge": "090Y"}, 90, "90+"),
    ({"PatientAge": "006M"}, 0, "0-9"),
    ({"PatientAge": "", "PatientBirthDate": "19300505", "StudyDate": "20200504"}, 89, "80-89"),
    ({"PatientBirthDate": "19300505", "StudyDate": "20200505"}, 90, "90+"),
    ({"PatientBirthDate": "20200505", "StudyDate": "20100101"}, None, None),
    ({"PatientAge": "abc"}, None, None),
    ({}, None, None),
])
@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # the malformed PatientAge case, on purpose
def test_age_bands_from_patient_age_or_birth_date(attributes: dict[str, str], years: int | None,
                                                  band: str | None) -> None:
    from workers.embed_study import age_band, age_years

    header = pydicom.Dataset()
    for keyword, value in attributes.items():
        setattr(header, keyword, value)
    assert age_years(header) == years and age_band(years) == band


# --- by text ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "name"), [
    ("atelectasis", "atelectasis"),
    ("  Pleural effusion. ", "Pleural effusion"),
    ("right lower lobe consolidation", "right lower lobe consolidation"),
    ("ground-glass opacity", "ground-glass opacity"),
    ("LYMPHADENOPATHY", "LYMPHADENOPATHY"),
    ("No pneumothorax", None),
    ("nodule 8 mm", None),
    ("Consolidation, left base.", None),
    ("There is a small left pleural effusion with adjacent atelectasis", None),
    ("Findings: atelectasis", None),
])
def test_keyword_rule(text: str, name: str | None, settings: Settings) -> None:
    assert keyword_of(text, settings.eval.keywords, settings.query.keyword_max_words) == name


def test_a_long_known_finding_name_is_a_keyword_however_many_words() -> None:
    assert keyword_of("chronic obstructive pulmonary airway disease", ["Chronic obstructive pulmonary airway disease"],
                      2) == "chronic obstructive pulmonary airway disease"
    assert keyword_of("chronic obstructive pulmonary airway disease", [], 2) is None


def test_a_finding_name_uses_the_in_context_keyword_query(settings: Settings, index: VectorIndex,
                                                          bundle: ModelBundle) -> None:
    engine = make_engine(settings, index, bundle)
    in_context = keyword_queries(bundle.embed_text, ["atelectasis"], settings.eval.keyword_context)[0]
    bare = bundle.embed_text("atelectasis")
    vector, mode = engine.text_vector("atelectasis")
    assert mode == "keyword"
    np.testing.assert_allclose(vector, in_context, atol=1e-6)
    assert not np.allclose(vector, bare, atol=1e-3), "not the bare word"

    sentence = "Subsegmental atelectasis at both lung bases."
    vector, mode = engine.text_vector(sentence)
    assert mode == "report"
    np.testing.assert_allclose(vector, bundle.embed_text(sentence), atol=1e-6)

    put(index, bundle, "1.2.3.400", [float(v) for v in in_context])
    put(index, bundle, "1.2.3.401", [float(v) for v in bare])
    put(index, bundle, "1.2.3.402", [float(v) for v in bundle.embed_text(sentence)])
    found = engine.search_text("Atelectasis", limit=3)
    assert found.kind == "text" and found.query["text_mode"] == "keyword" and found.query["ranking"] == "cosine"
    assert found.hits[0].study_uid == "1.2.3.400" and found.hits[0].score == pytest.approx(1.0, abs=1e-4)
    by_sentence = engine.search_text(sentence, limit=3)
    assert by_sentence.hits[0].study_uid == "1.2.3.402" and by_sentence.query["text_mode"] == "report"
    assert by_sentence.query["text_length"] == len(sentence)
    assert sentence not in repr(by_sentence), "the text itself is never echoed"


def test_hybrid_a_matching_report_ranks_first_whatever_its_images(settings: Settings, index: VectorIndex,
                                                                   bundle: ModelBundle) -> None:
    text = unit(np.asarray(bundle.embed_text(REPORT), dtype=np.float64))
    others = directions(bundle.embedding_dim, 6, seed=2)
    others -= np.outer(others @ text, text)  # orthogonal to the query
    others = others / np.linalg.norm(others, axis=1, keepdims=True)
    reported = "1.2.3.500"
    put(index, bundle, reported, [float(v) for v in others[0]], report=[float(v) for v in bundle.embed_text(REPORT)])
    for i, cosine in enumerate((0.6, 0.5, 0.4, 0.3), start=1):
        put(index, bundle, f"1.2.3.50{i}", at_cosine(text, others[i], cosine))
    engine = make_engine(settings, index, bundle)

    image_only = index.search([float(v) for v in text], 10, using=IMAGE_VECTOR)
    assert image_only[-1].payload["study_uid"] == reported, "by its images it is the least similar"
    result = engine.search_text(REPORT, limit=10)
    assert result.query["ranking"] == "rrf" and result.query["vectors"] == ["image", "report"]
    assert result.hits[0].study_uid == reported and result.hits[0].has_report
    assert [h.rank for h in result.hits] == list(range(1, 6))

    # min_score on a fused search: a hit stays when its image or its report reaches the cosine.
    strict = engine.search_text(REPORT, limit=10, min_score=0.9)
    assert [h.study_uid for h in strict.hits] == [reported]
    middle = engine.search_text(REPORT, limit=10, min_score=0.45)
    assert [h.study_uid for h in middle.hits] == [reported, "1.2.3.501", "1.2.3.502"]
    assert [h.rank for h in engine.search_text(REPORT, limit=1, offset=1, min_score=0.45).hits] == [2]


def test_text_search_applies_filters_and_offsets(settings: Settings, index: VectorIndex, bundle: ModelBundle) -> None:
    text = unit(np.asarray(bundle.embed_text(REPORT), dtype=np.float64))
    e = directions(bundle.embedding_dim, 4, seed=3)
    e -= np.outer(e @ text, text)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    put(index, bundle, "1.2.3.601", at_cosine(text, e[0], 0.8), institution="North", study_day=20240105)
    put(index, bundle, "1.2.3.602", at_cosine(text, e[1], 0.6), institution="South", study_day=20240210)
    put(index, bundle, "1.2.3.603", at_cosine(text, e[2], 0.4), institution="North", study_day=20240315)
    engine = make_engine(settings, index, bundle)
    north = engine.search_text(REPORT, limit=5, filters=SearchFilters(institution="North"))
    assert [h.study_uid for h in north.hits] == ["1.2.3.601", "1.2.3.603"]
    assert north.hits[0].institution == "North"
    dated = engine.search_text(REPORT, limit=5, filters=SearchFilters(study_date_from="20240201"))
    assert [h.study_uid for h in dated.hits] == ["1.2.3.602", "1.2.3.603"]
    paged = engine.search_text(REPORT, limit=1, offset=2)
    assert [(h.rank, h.study_uid) for h in paged.hits] == [(3, "1.2.3.603")]


# --- validation and description --------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "message"), [
    (lambda e: e.search_text("", limit=5), "text must not be empty"),
    (lambda e: e.search_text(" \n\t", limit=5), "text must not be empty"),
    (lambda e: e.search_text("effusion", limit=0), "limit must be an integer from 1 to 100"),
    (lambda e: e.search_text("effusion", limit=101), "limit must be an integer from 1 to 100"),
    (lambda e: e.search_text("effusion", limit=5, offset=-1), "offset must be an integer >= 0"),
    (lambda e: e.search_text("effusion", limit=5, min_score=1.5), "min_score must be"),
    (lambda e: e.search_text("effusion", limit=5, filters=SearchFilters(study_date_from="20240301",
                                                                        study_date_to="20240101")),
     "study_date_from is after"),
    (lambda e: e.similar_to_study("", limit=5), "study_uid must not be empty"),
    (lambda e: e.similar_to_study("1.2.abc", limit=5), "not a valid DICOM UID"),
    (lambda e: e.similar_to_study("1.2.3", limit=1000), "limit must be"),
])
def test_bad_queries_say_what_is_wrong(call, message: str, settings: Settings, index: VectorIndex,
                                       bundle: ModelBundle) -> None:
    with pytest.raises(QueryError, match=message):
        call(make_engine(settings, index, bundle))


def test_describe_names_the_bundle_and_the_indexed_count(settings: Settings, index: VectorIndex,
                                                         bundle: ModelBundle) -> None:
    engine = make_engine(settings, index, bundle)
    assert engine.describe()["indexed_studies"] == 0
    put(index, bundle, "1.2.3.700", [float(v) for v in directions(bundle.embedding_dim, 1)[0]])
    described = engine.describe()
    assert described["bundle_id"] == bundle.bundle_id and described["indexed_studies"] == 1
    assert described["embedding_dim"] == bundle.embedding_dim


def test_the_engine_refuses_a_bundle_other_than_the_index_s(settings: Settings, index: VectorIndex,
                                                            bundle: ModelBundle) -> None:
    with pytest.raises(ValueError, match="the index holds vectors of"):
        QueryEngine(settings, index, bundle, "another-bundle", request_for=lambda uid: None)
