"""The node's one ``EVT_C_FIND`` handler: the called AE title picks ordinary or similar-case matching.

pynetdicom runs the handler (a generator) in the association's thread and sends each yielded pending response
at once, then Success when the generator ends. Between responses a C-CANCEL is honoured with 0xFE00. Failures
are answered, never raised: 0xA900 for an identifier this SCP cannot answer (the Error Comment says what, the
Offending Element names the key), 0xC000 for a query refused (the engine's message, or patient-identity
matching while it is off), 0xC001 when similar-case search is not available (no model bundle active yet),
0xC002 for an internal error.
Logs name the AE titles, the kind of query and counts; never a value of the identifier.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pydicom.dataset import Dataset

from config.settings import QuerySettings, Settings
from dicom_node.metrics import observe_query
from dicom_node.query.identifier import parse_similar_query, parse_study_query
from dicom_node.query.matching import IdentifierError
from dicom_node.query.responses import failure_status, similar_response, study_response
from dicom_node.query.similar_find import find_similar
from dicom_node.query.study_find import find_studies
from dicom_node.store.state import StateStore
from workers.search import NoBundleError, QueryEngine, QueryError

logger = logging.getLogger(__name__)

STATUS_PENDING = 0xFF00
STATUS_PENDING_UNSUPPORTED_KEYS = 0xFF01  # matches continue; some optional keys were not matched on
STATUS_CANCELLED = 0xFE00
STATUS_QUERY_REFUSED = 0xC000
STATUS_SEARCH_UNAVAILABLE = 0xC001
STATUS_INTERNAL_ERROR = 0xC002
CANCEL_CHECK_EVERY = 16  # responses between two waits for the DUL to read what the peer sent (C-CANCEL)

Response = tuple[int | Dataset, Dataset | None]
Q = TypeVar("Q")


class FindService:
    """Study Root FIND for both AE titles; ``engine`` gives the query engine (None until the node has one)."""

    def __init__(self, settings: Settings, store: StateStore,
                 engine: Callable[[], QueryEngine | None] = lambda: None) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.node_title = settings.node.ae_title.strip()
        self.similar_title = settings.query.similar_ae_title.strip()
        if self.node_title == self.similar_title:
            raise ValueError("query.similar_ae_title must differ from node.ae_title (the called AE title picks "
                             "ordinary or similar-case C-FIND)")

    @property
    def called_titles(self) -> frozenset[str]:
        """The called AE titles the node answers to."""
        return frozenset({self.node_title, self.similar_title})

    def handle(self, event: Any) -> Iterator[Response]:
        """The ``EVT_C_FIND`` handler."""
        started = time.perf_counter()
        called = str(event.assoc.acceptor.ae_title).strip()
        calling = str(event.assoc.requestor.ae_title).strip()
        similar = called == self.similar_title
        kind, sent, outcome = ("similar" if similar else "studies"), 0, STATUS_PENDING
        try:
            identifier = _decoded(event)
            responses = self._similar(identifier) if similar else self._studies(identifier)
            for status, response in responses:
                if sent % CANCEL_CHECK_EVERY == 0:
                    _let_requests_in(event)
                if event.is_cancelled:
                    outcome = STATUS_CANCELLED
                    yield STATUS_CANCELLED, None
                    return
                yield status, response
                sent += 1
            outcome = 0x0000
        except IdentifierError as error:
            outcome = error.status
            yield failure_status(error.status, error.message, error.keyword), None
        except NoBundleError as error:  # the query is fine; the node cannot search yet
            outcome = STATUS_SEARCH_UNAVAILABLE
            yield failure_status(STATUS_SEARCH_UNAVAILABLE, str(error)), None
        except QueryError as error:
            outcome = STATUS_QUERY_REFUSED
            yield failure_status(STATUS_QUERY_REFUSED, str(error)), None
        except _Unavailable as error:
            outcome = STATUS_SEARCH_UNAVAILABLE
            yield failure_status(STATUS_SEARCH_UNAVAILABLE, str(error)), None
        except Exception as error:  # noqa: BLE001 - answer the peer; the type only (a message may quote a value)
            outcome = STATUS_INTERNAL_ERROR
            logger.error("event=cfind_error called_ae=%s calling_ae=%s kind=%s error=%s", called, calling, kind,
                         type(error).__name__, exc_info=logger.isEnabledFor(logging.DEBUG))
            yield failure_status(STATUS_INTERNAL_ERROR, "internal error; see the node's log"), None
        finally:
            observe_query("cfind", "similar" if similar else "studies", time.perf_counter() - started,
                          ok=outcome == 0x0000)  # metrics
            logger.info("event=cfind called_ae=%s calling_ae=%s kind=%s matches=%d status=0x%04X ms=%.1f", called,
                        calling, kind, sent, outcome, (time.perf_counter() - started) * 1000)

    # --- the two kinds ------------------------------------------------------------------------------

    def _studies(self, identifier: Dataset) -> Iterator[Response]:
        query = _parsed(parse_study_query, identifier, self.settings)
        status = STATUS_PENDING_UNSUPPORTED_KEYS if query.unsupported else STATUS_PENDING
        for study in find_studies(query, self.store):
            yield status, study_response(study, query.return_keys, self.settings.query)

    def _similar(self, identifier: Dataset) -> Iterator[Response]:
        query = _parsed(parse_similar_query, identifier, self.settings)
        engine = self.engine()
        if engine is None:
            raise _Unavailable("similar-case search is not available on this node")
        status = STATUS_PENDING_UNSUPPORTED_KEYS if query.unsupported else STATUS_PENDING
        for hit in find_similar(query, engine, self.settings):
            stored = self.store.study_attributes(hit.study_uid)
            yield status, similar_response(hit, stored, query.return_keys, self.settings.query)


def _let_requests_in(event: Any, timeout_s: float = 5.0) -> None:
    """Wait until the responses already queued are on the wire, so a C-CANCEL can be read.

    pynetdicom's DUL thread either sends a queued PDU or reads one per loop, sending first: a handler that yields
    faster than the socket drains keeps the peer's C-CANCEL unread until every response is out. Waiting for an
    empty queue every :data:`CANCEL_CHECK_EVERY` responses lets the DUL read in between (bounded, so a stalled
    peer cannot hold the handler).
    """
    queue = getattr(getattr(event.assoc, "dul", None), "to_provider_queue", None)
    if queue is None:
        return
    deadline = time.monotonic() + timeout_s
    while queue.qsize() and time.monotonic() < deadline and event.assoc.is_established:
        time.sleep(0.0005)
    time.sleep(0.0005)  # one more loop of the DUL: the read check after the last send


class _Unavailable(RuntimeError):
    """Similar-case search cannot run (no query engine)."""


def _parsed(parse: Callable[[Dataset, QuerySettings], Q], identifier: Dataset, settings: Settings) -> Q:
    """``parse`` applied; a value pydicom cannot convert is an identifier error, not an internal one."""
    try:
        return parse(identifier, settings.query)
    except IdentifierError:
        raise
    except Exception:  # noqa: BLE001 - pydicom raises many types on malformed values
        raise IdentifierError("the identifier could not be decoded") from None


def _decoded(event: Any) -> Dataset:
    try:
        return event.identifier
    except Exception:  # noqa: BLE001 - pydicom raises many types on a malformed identifier
        raise IdentifierError("the identifier could not be decoded") from None
