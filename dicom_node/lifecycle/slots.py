"""The bundles a node embeds with at one time: the active one (queries, reports) and its followers.

A *follower* is a collection kept in step with the active one: the target of a running reindex, and the previous
collection a switch replaced (kept for a rollback while ``reindex.keep_previous``). Every study the active
collection indexes is embedded for each follower too (:mod:`dicom_node.lifecycle.follower`).

:class:`ModelSet` is replaced as a whole (one assignment), so a reader — the pipeline thread, a report arriving
on an association thread — sees either the set before a switch or the set after it, never half of each.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from config import Settings
from dicom_node.pipeline.report_vectors import ReportVectors
from dicom_node.store.reports import ReportStore
from model_export.bundle_manifest import BundleManifest, read_manifest
from model_export.registry import find_bundle
from model_export.runtime import ModelBundle
from workers.embed_study import bundle_for
from workers.index import VectorIndex
from workers.index.catalog import CollectionRef, IndexCatalog


@dataclass(frozen=True)
class BundleSlot:
    """One bundle, loaded, and the collection of its vectors (opened and checked)."""

    manifest: BundleManifest
    runtime: ModelBundle
    collection: str
    index: VectorIndex
    reports: ReportVectors

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def ref(self) -> CollectionRef:
        return CollectionRef(self.collection, self.bundle_id)


def open_slot(settings: Settings, catalog: IndexCatalog, bundle_id: str, reports: ReportStore,
              index_write_lock: threading.RLock, collection: str | None = None) -> BundleSlot:
    """Load an installed bundle (once per process) and open its collection, creating it when new.

    Raises :class:`~model_export.errors.BundleError` when the bundle is not installed or broken, and
    :class:`~workers.index.IndexMismatchError` when the collection was made for another bundle.
    """
    manifest = read_manifest(find_bundle(settings, bundle_id))
    runtime = bundle_for(settings, manifest.bundle_id)
    name = collection or catalog.collection_for(manifest.bundle_id)
    index = catalog.open(name)
    index.ensure_collection(manifest.bundle_id, manifest.embedding_dim)
    return BundleSlot(manifest, runtime, name, index,
                      ReportVectors(reports, index, runtime, index_write_lock))


@dataclass(frozen=True)
class ModelSet:
    """The active slot (None: no bundle yet) and the followers, in one immutable value."""

    active: BundleSlot | None = None
    followers: tuple[BundleSlot, ...] = field(default_factory=tuple)

    def slots(self) -> tuple[BundleSlot, ...]:
        """Active first, then the followers."""
        return ((self.active,) if self.active is not None else ()) + self.followers

    def slot_for(self, bundle_id: str) -> BundleSlot | None:
        return next((slot for slot in self.slots() if slot.bundle_id == bundle_id), None)

    def follower(self, bundle_id: str) -> BundleSlot | None:
        return next((slot for slot in self.followers if slot.bundle_id == bundle_id), None)
