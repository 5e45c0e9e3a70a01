"""Search results as the cards of a page: what each card shows, computed here so templates only lay it out.

Score bars: a single-vector search scores by cosine (bar = the cosine, 0 to 1); a fused search by reciprocal rank
fusion, whose best possible score is ``n_vectors / rrf_k`` (first in every ranking), so the bar is the score over
that maximum. The number shown is the score itself, with what it is in the tooltip.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.api.services import ApiServices
from dicom_node.report.similar_case_sr import format_date
from dicom_node.report.thumbnails import series_image_source
from dicom_node.store.state import StudyAttributes
from workers.search import SearchHit, SearchResult

SNIPPET_CHARACTERS = 200


@dataclass(frozen=True)
class Card:
    study_uid: str
    study_date: str | None  # YYYY-MM-DD
    description: str | None
    accession: str | None
    modality: str | None
    body_part: str | None
    has_image: bool  # the node holds its embedded series: a thumbnail can be drawn
    rank: int | None = None
    score: float | None = None
    score_text: str = ""
    score_title: str = ""
    bar_percent: int = 0
    snippet: str | None = None
    orthanc_url: str | None = None


def holds_image(api: ApiServices, study_uid: str) -> bool:
    """Whether the node still holds the study's embedded series, spooled or as a kept volume (known before the
    image is asked for)."""
    if api.layout is None or api.thumbnails is None:
        return False
    row = api.store.study(study_uid)
    if row is None or not row.series_uid:
        return False
    try:
        return series_image_source(api.layout, study_uid, row.series_uid) is not None
    except ValueError:
        return False


def _snippet(api: ApiServices, hit: SearchHit) -> str | None:
    if not (api.settings.query.return_report_snippets and hit.has_report and api.reports is not None):
        return None
    record = api.reports.get(hit.study_uid)
    if record is None:
        return None
    text = " ".join(record.text.split())
    return text if len(text) <= SNIPPET_CHARACTERS else text[:SNIPPET_CHARACTERS].rstrip() + "…"


def _bar(result: SearchResult, score: float, rrf_k: int) -> tuple[int, str, str]:
    if result.query.get("ranking") == "rrf":
        vectors = max(1, len(result.query.get("vectors") or ()))
        best = vectors / rrf_k
        return (round(100 * min(1.0, max(0.0, score / best))), f"{score:.4f}",
                f"Fused score (reciprocal rank fusion of {vectors} rankings, k={rrf_k}); best possible {best:.4f}")
    return round(100 * min(1.0, max(0.0, score))), f"{score:.3f}", "Cosine similarity (1 = identical embedding)"


def result_cards(api: ApiServices, result: SearchResult, orthanc_urls: dict[str, str]) -> list[Card]:
    rrf_k = api.settings.index.rrf_k
    cards = []
    for hit in result.hits:
        percent, text, title = _bar(result, hit.score, rrf_k)
        cards.append(Card(study_uid=hit.study_uid, study_date=format_date(hit.study_date, missing=None),
                          description=hit.study_description, accession=hit.accession_number, modality=hit.modality,
                          body_part=hit.body_part, has_image=holds_image(api, hit.study_uid), rank=hit.rank,
                          score=hit.score, score_text=text, score_title=title, bar_percent=percent,
                          snippet=_snippet(api, hit), orthanc_url=orthanc_urls.get(hit.study_uid)))
    return cards


def study_card(api: ApiServices, study_uid: str, attributes: StudyAttributes | None, body_part: str | None,
               orthanc_url: str | None) -> Card:
    """The query study's own card (from the state store's attributes; body part from its index payload)."""
    study_date = format_date(attributes.study_date if attributes else None, missing=None)
    return Card(study_uid=study_uid, study_date=study_date,
                description=attributes.study_description if attributes else None,
                accession=attributes.accession_number if attributes else None,
                modality=" ".join(attributes.modalities_in_study) if attributes and attributes.modalities_in_study
                else None, body_part=body_part, has_image=holds_image(api, study_uid), orthanc_url=orthanc_url)
