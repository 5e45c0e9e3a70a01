"""Gauges read on each scrape, so that nothing has to keep them up to date: studies by state and the queue depth,
deliveries by state (the state store), points per collection (the index), free space of the data folder, and open
DICOM associations (pynetdicom's association threads).

The state store is read over a read-only SQLite connection of its own (WAL: readers never wait for the node's
writer, and the node's connection lock is not taken). A part that fails (the index closing during a switch) is
left out of that scrape and logged; the rest is still answered.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pynetdicom.association import Association

from dicom_node.metrics.events import routed_associations
from dicom_node.store.state import DeliveryState, StudyState
from workers.index import VectorIndex

if TYPE_CHECKING:
    from dicom_node.node import Node

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectionView:
    """One collection the node keeps: the active one (queries, reports) or a follower (a reindex, a rollback)."""

    name: str
    bundle_id: str
    role: Literal["active", "follower"]
    index: VectorIndex


CollectionsProbe = Callable[[], Sequence[CollectionView]]


def node_collections(node: Node) -> list[CollectionView]:
    """Every collection ``node`` keeps, active first (the model set is replaced whole: one consistent read)."""
    models = node.lifecycle.models
    views = [CollectionView(models.active.collection, models.active.bundle_id, "active", models.active.index)] \
        if models.active is not None else []
    return views + [CollectionView(slot.collection, slot.bundle_id, "follower", slot.index)
                    for slot in models.followers]


class NodeCollector(Collector):
    """The node's gauges, computed when scraped."""

    def __init__(self, state_db: Path, data_dir: Path, collections: CollectionsProbe) -> None:
        self.state_db = Path(state_db)
        self.data_dir = Path(data_dir)
        self.collections = collections

    def collect(self) -> Iterator[Metric]:
        for part in (self._studies_and_deliveries, self._index, self._disk, self._associations):
            try:
                yield from list(part())  # all of a part or none of it
            except Exception as error:  # noqa: BLE001 - one part missing, not the whole scrape
                logger.warning("event=metrics_part_failed part=%s error=%s", part.__name__.lstrip("_"),
                               type(error).__name__)

    def _studies_and_deliveries(self) -> Iterator[Metric]:
        studies = dict.fromkeys((state.value for state in StudyState), 0)
        deliveries = dict.fromkeys((state.value for state in DeliveryState), 0)
        with _read_only(self.state_db) as db:
            for state, count in db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state"):
                studies[str(state)] = int(count)
            for state, count in db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state"):
                deliveries[str(state)] = int(count)
        by_state = GaugeMetricFamily("medfinder_studies", "Studies the node holds, by state", labels=["state"])
        for state, count in studies.items():
            by_state.add_metric([state], count)
        yield by_state
        yield GaugeMetricFamily("medfinder_queue_depth", "Studies handed to a worker and not yet collected "
                                "(state queued)", value=studies[StudyState.QUEUED.value])
        sr = GaugeMetricFamily("medfinder_deliveries", "SR deliveries (one per SR and destination), by state",
                               labels=["state"])
        for state, count in deliveries.items():
            sr.add_metric([state], count)
        yield sr

    def _index(self) -> Iterator[Metric]:
        points = GaugeMetricFamily("medfinder_index_points", "Points (studies) per collection of the vector index",
                                   labels=["collection", "bundle_id", "role"])
        for view in self.collections():
            try:
                points.add_metric([view.name, view.bundle_id, view.role], view.index.count())
            except Exception as error:  # noqa: BLE001 - a follower closed by a switch meanwhile
                logger.info("event=metrics_index_skipped collection=%s error=%s", view.name, type(error).__name__)
        yield points

    def _disk(self) -> Iterator[Metric]:
        usage = shutil.disk_usage(self.data_dir)
        yield GaugeMetricFamily("medfinder_data_dir_free_bytes", "Free bytes on the file system of the data folder "
                                "(spool, index, state)", value=usage.free)
        yield GaugeMetricFamily("medfinder_data_dir_size_bytes", "Size in bytes of the file system of the data "
                                "folder", value=usage.total)

    @staticmethod
    def _associations() -> Iterator[Metric]:
        open_now = {"scp": 0, "scu": 0}
        for thread in threading.enumerate():
            if isinstance(thread, Association) and thread.is_established:
                open_now["scp" if thread.is_acceptor else "scu"] += 1
        open_now["scp"] += routed_associations()  # answered by receiving processes
        family = GaugeMetricFamily("medfinder_dicom_associations", "DICOM associations open now: scp (peers "
                                   "sending or querying) and scu (deliveries, backfill)", labels=["role"])
        for role, count in open_now.items():
            family.add_metric([role], count)
        yield family


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A short read-only connection to a SQLite file, closed on exit."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        yield db
    finally:
        db.close()
