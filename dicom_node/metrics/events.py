"""What happens, counted where it happens: C-STORE answers, collected embed outcomes, answered queries.

The instruments are process-wide (one node per process, as one StorageSCP per process), created outside any
registry and added to each node's registry by :func:`dicom_node.metrics.metrics_registry`. Hooks call the three
functions below; each is cheap (a lock and an add) and never raises into the caller's path. Labels hold no PHI:
statuses, kinds and stage names only, never a UID.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Literal, Protocol

from prometheus_client import Counter, Histogram, disable_created_metrics
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

Interface = Literal["rest", "ui", "cfind"]
# similar: by study (C-FIND similar-case: by study or by text); search: by text; studies: listing / ordinary C-FIND
QueryKind = Literal["similar", "search", "studies"]

# No *_created series: they double every counter's output and no dashboard here uses them (process-wide switch;
# the node's process has no other prometheus-client users).
disable_created_metrics()

QUERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
EMBED_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

INSTANCES = Counter("medfinder_dicom_instances", "C-STORE requests answered, by outcome (stored, duplicate, "
                    "ignored, refused) and the DIMSE status sent", ["outcome", "status"], registry=None)
EMBED_OUTCOMES = Counter("medfinder_embed_outcomes", "Worker outcomes collected by the pipeline, by status",
                         ["status"], registry=None)
EMBED_SECONDS = Histogram("medfinder_embed_seconds", "Worker seconds per stage of each collected outcome (select, "
                          "decode, preprocess, embed, keep_volume, total)", ["stage"], buckets=EMBED_BUCKETS,
                          registry=None)
QUERY_SECONDS = Histogram("medfinder_query_seconds", "Seconds to answer a query that succeeded, by interface "
                          "(rest, ui, cfind) and kind (similar, search, studies)", ["interface", "kind"],
                          buckets=QUERY_BUCKETS, registry=None)
QUERY_FAILURES = Counter("medfinder_query_failures", "Queries answered with an error (HTTP 4xx/5xx, C-FIND "
                         "failure or cancel), by interface and kind", ["interface", "kind"], registry=None)

INSTANCES.labels(outcome="stored", status="0x0000")  # present from the start (0), so rate() has a series

EVENT_COLLECTORS: tuple[Collector, ...] = (INSTANCES, EMBED_OUTCOMES, EMBED_SECONDS, QUERY_SECONDS, QUERY_FAILURES)


class StoreAnswer(Protocol):
    """What :func:`count_store` reads of the C-STORE handler's outcome (``dicom_node.receive.ingest.IngestOutcome``)."""

    status: int
    duplicate: bool
    ignored: bool

    @property
    def ok(self) -> bool: ...


class CollectedOutcome(Protocol):
    """What :func:`observe_embed` reads of a worker outcome (``workers.handoff.EmbedOutcome``)."""

    status: object  # EmbedStatus (a str enum)
    timings: Mapping[str, float]


# Associations answered by receiving processes (dicom_node.receive.receivers), which pynetdicom's threads here do not
# show: each pool registers how many it holds open.
_ROUTED_ASSOCIATIONS: list[Callable[[], int]] = []


def count_routed_associations(open_now: Callable[[], int]) -> Callable[[], None]:
    """Count ``open_now()`` into the open-association gauge until the returned function is called."""
    _ROUTED_ASSOCIATIONS.append(open_now)
    return lambda: _ROUTED_ASSOCIATIONS.remove(open_now)


def routed_associations() -> int:
    return sum(open_now() for open_now in list(_ROUTED_ASSOCIATIONS))


def count_store(answer: StoreAnswer) -> None:
    """One C-STORE answered (the hook in the SCP's C-STORE handler, after the status is decided)."""
    try:
        if not answer.ok:
            outcome = "refused"
        elif answer.duplicate:
            outcome = "duplicate"
        elif answer.ignored:
            outcome = "ignored"
        else:
            outcome = "stored"
        INSTANCES.labels(outcome=outcome, status=f"0x{int(answer.status):04X}").inc()
    except Exception:  # noqa: BLE001 - a metric must never fail a C-STORE
        logger.debug("event=metrics_error hook=count_store", exc_info=True)


def observe_embed(outcome: CollectedOutcome) -> None:
    """One worker outcome collected (the hook in the pipeline, after it is indexed or recorded)."""
    try:
        status = getattr(outcome.status, "value", outcome.status)
        EMBED_OUTCOMES.labels(status=str(status)).inc()
        for key, seconds in outcome.timings.items():
            stage = key.removesuffix("_s")
            EMBED_SECONDS.labels(stage=stage).observe(max(0.0, float(seconds)))
    except Exception:  # noqa: BLE001 - a metric must never fail the pipeline
        logger.debug("event=metrics_error hook=observe_embed", exc_info=True)


def observe_query(interface: Interface, kind: QueryKind, seconds: float, ok: bool = True) -> None:
    """One query answered: its latency when it succeeded, a failure count otherwise."""
    try:
        if ok:
            QUERY_SECONDS.labels(interface=interface, kind=kind).observe(max(0.0, seconds))
        else:
            QUERY_FAILURES.labels(interface=interface, kind=kind).inc()
    except Exception:  # noqa: BLE001 - a metric must never fail a query
        logger.debug("event=metrics_error hook=observe_query", exc_info=True)
