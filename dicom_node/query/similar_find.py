"""Similar-case C-FIND (``query.similar_ae_title``): the query engine's ranked hits for a study or a text.

An unknown study is zero matches (``StudyNotFoundError``); a :class:`~workers.search.QueryError` goes up to
the service, which answers it with a failure status carrying its message.
"""

from __future__ import annotations

from config.settings import Settings
from dicom_node.query.identifier import SimilarQuery
from workers.search import QueryEngine, SearchHit, StudyNotFoundError


def find_similar(query: SimilarQuery, engine: QueryEngine, settings: Settings) -> list[SearchHit]:
    """The hits in rank order (best first); empty for a study neither indexed nor held by the node."""
    try:
        if query.study_uid is not None:
            result = engine.similar_to_study(query.study_uid, limit=query.limit, filters=query.filters,
                                             include_same_patient=settings.index.same_patient == "include")
        else:
            assert query.text is not None
            result = engine.search_text(query.text, limit=query.limit, filters=query.filters)
    except StudyNotFoundError:
        return []
    return sorted(result.hits, key=lambda hit: hit.rank)
