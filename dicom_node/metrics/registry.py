"""One node's registry: the process-wide event instruments, the node's scrape-time gauges, and the process and
Python runtime collectors prometheus-client provides (CPU, memory, open files, GC)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)

from dicom_node.metrics.collector import CollectionsProbe, NodeCollector
from dicom_node.metrics.events import EVENT_COLLECTORS


def metrics_registry(state_db: Path, data_dir: Path, collections: CollectionsProbe) -> CollectorRegistry:
    """A registry to expose with ``generate_latest`` (a new one per app: a test process may run several)."""
    registry = CollectorRegistry()
    for collector in EVENT_COLLECTORS:
        registry.register(collector)
    registry.register(NodeCollector(state_db, data_dir, collections))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
