"""Prometheus metrics of the node (``GET /metrics``): event counters and histograms fed by one-line hooks where
things happen (:mod:`.events`), and gauges read from the state store, the index and the disk on each scrape
(:mod:`.collector`), so that nothing has to keep them up to date."""

from dicom_node.metrics.collector import CollectionsProbe, CollectionView, NodeCollector, node_collections
from dicom_node.metrics.events import (
    count_routed_associations,
    count_store,
    observe_embed,
    observe_query,
    routed_associations,
)
from dicom_node.metrics.registry import metrics_registry

__all__ = ["CollectionView", "CollectionsProbe", "NodeCollector", "count_routed_associations", "count_store",
           "metrics_registry", "node_collections", "observe_embed", "observe_query", "routed_associations"]
