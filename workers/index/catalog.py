"""One collection per model bundle, and the one atomic pointer that says which collection serves.

Vectors of two bundles live in different spaces (base.py), so upgrading the model embeds every study into a new
collection while the old one keeps serving; switching is then one atomic write that every reader sees whole:

* **edge** (Qdrant Edge has no aliases and no collections, field notes 13.5): ``<index folder>/active.json``
  ``{"active": {"collection", "bundle_id"}, "previous": {...} | null}``, written to a temporary file, fsynced and
  renamed over the old one.
* **qdrant server**: the aliases ``<index.collection>-active`` and ``<index.collection>-previous``, changed in one
  ``update_collection_aliases`` request (atomic on the server; every client of the cluster sees the switch).

Names: the first bundle takes ``index.collection`` itself (an index made before this module keeps its folder or
collection), every other bundle ``<index.collection>-<first 12 characters of its id>``. ``previous`` is the
collection a switch replaced, kept for a rollback.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from config.settings import IndexSettings
from model_export.atomic_files import atomic_path
from workers.index.base import IndexMismatchError, VectorIndex
from workers.index.edge_layout import CollectionFolder, fsync_folder

logger = logging.getLogger(__name__)

POINTER_FILE = "active.json"
ACTIVE_SUFFIX = "-active"
PREVIOUS_SUFFIX = "-previous"
ID_CHARS = 12  # bundle-id characters in a collection name: unique among a registry's few bundles


@dataclass(frozen=True)
class CollectionRef:
    """A collection and the bundle whose vectors it holds."""

    name: str
    bundle_id: str

    def as_dict(self) -> dict[str, str]:
        return {"collection": self.name, "bundle_id": self.bundle_id}


@dataclass(frozen=True)
class ActivePointer:
    """Which collection serves queries, and the one it replaced (kept for a rollback), if any."""

    active: CollectionRef
    previous: CollectionRef | None = None


class IndexCatalog(Protocol):
    """The collections of one index (edge folder or Qdrant server) and its active pointer."""

    def collection_for(self, bundle_id: str) -> str:
        """The collection that holds (or will hold) ``bundle_id``'s vectors."""

    def bundle_of(self, name: str) -> str | None:
        """The bundle a collection records, None when it does not exist."""

    def open(self, name: str) -> VectorIndex:
        """The collection as a :class:`VectorIndex`; call ``ensure_collection`` on it before use."""

    def read_pointer(self) -> ActivePointer | None:
        """The active pointer; None before any collection was made active."""

    def write_pointer(self, pointer: ActivePointer) -> None:
        """Switch atomically: after this returns, every reader sees ``pointer``."""

    def close(self) -> None:
        """Release what the catalog itself holds (collections opened from it are closed by their users)."""


def _name_for(base: str, bundle_id: str, recorded_in_base: str | None,
              pointer: ActivePointer | None) -> str:
    """The naming rule shared by both backends (see the module docstring)."""
    if pointer is not None:
        for ref in (pointer.active, pointer.previous):
            if ref is not None and ref.bundle_id == bundle_id:
                return ref.name
    if recorded_in_base is None or recorded_in_base == bundle_id:
        return base
    return f"{base}-{bundle_id[:ID_CHARS]}"


def _ref(data: Any, where: str) -> CollectionRef | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("collection"), str) \
            or not isinstance(data.get("bundle_id"), str):
        raise IndexMismatchError(f"{where}: expected {{'collection': ..., 'bundle_id': ...}}, found {data!r}")
    return CollectionRef(data["collection"], data["bundle_id"])


class EdgeCatalog:
    """Collections as sub-folders of the node's index folder, the pointer as ``active.json`` beside them."""

    def __init__(self, root: Path | str, settings: IndexSettings) -> None:
        self.root = Path(root)
        self.settings = settings

    @property
    def pointer_path(self) -> Path:
        return self.root / POINTER_FILE

    def bundle_of(self, name: str) -> str | None:
        metadata = CollectionFolder(self.root / name).read()
        bundle = (metadata or {}).get("bundle_id")
        return str(bundle) if bundle is not None else None

    def collection_for(self, bundle_id: str) -> str:
        return _name_for(self.settings.collection, bundle_id, self.bundle_of(self.settings.collection),
                         self.read_pointer())

    def open(self, name: str) -> VectorIndex:
        from workers.index.edge import EdgeIndex

        return EdgeIndex(self.root / name, self.settings)

    def read_pointer(self) -> ActivePointer | None:
        try:
            data = json.loads(self.pointer_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise IndexMismatchError(f"{self.pointer_path} is unreadable ({error}); it names the collection that "
                                     "serves queries: restore it or remove it to start from the registry's "
                                     "active bundle") from None
        where = str(self.pointer_path)
        active = _ref(data.get("active") if isinstance(data, dict) else None, where)
        if active is None:
            raise IndexMismatchError(f"{where} names no active collection")
        return ActivePointer(active, _ref(data.get("previous"), where))

    def write_pointer(self, pointer: ActivePointer) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        body = {"active": pointer.active.as_dict(),
                "previous": pointer.previous.as_dict() if pointer.previous else None}
        with atomic_path(self.pointer_path) as temporary, open(temporary, "wb") as handle:
            handle.write(json.dumps(body, indent=2).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        fsync_folder(self.root)
        logger.info("event=index_pointer_switched backend=edge active=%s bundle_id=%s previous=%s",
                    pointer.active.name, pointer.active.bundle_id, pointer.previous.name if pointer.previous else "-")

    def close(self) -> None:
        return None


class ServerCatalog:
    """Collections of a Qdrant server, the pointer as two aliases; one client shared by every collection."""

    def __init__(self, url: str, settings: IndexSettings, api_key: str | None = None) -> None:
        from workers.index.server import make_client

        self.url = url
        self.settings = settings
        self.client = make_client(url, api_key)
        self.active_alias = f"{settings.collection}{ACTIVE_SUFFIX}"
        self.previous_alias = f"{settings.collection}{PREVIOUS_SUFFIX}"

    def bundle_of(self, name: str) -> str | None:
        from workers.index.server import BUNDLE_KEY

        if not self.client.collection_exists(name):
            return None
        metadata = self.client.get_collection(name).config.metadata or {}
        bundle = metadata.get(BUNDLE_KEY)
        return str(bundle) if bundle is not None else None

    def collection_for(self, bundle_id: str) -> str:
        return _name_for(self.settings.collection, bundle_id, self.bundle_of(self.settings.collection),
                         self.read_pointer())

    def open(self, name: str) -> VectorIndex:
        from workers.index.server import ServerIndex

        return ServerIndex(self.url, name, settings=self.settings, client=self.client)

    def _aliases(self) -> dict[str, str]:
        return {a.alias_name: a.collection_name for a in self.client.get_aliases().aliases}

    def read_pointer(self) -> ActivePointer | None:
        aliases = self._aliases()
        refs = []
        for alias in (self.active_alias, self.previous_alias):
            name = aliases.get(alias)
            bundle = self.bundle_of(name) if name is not None else None
            if name is not None and bundle is None:
                raise IndexMismatchError(f"alias {alias!r} points at collection {name!r}, which records no MedFinder "
                                         "bundle")
            refs.append(CollectionRef(name, bundle) if name is not None and bundle is not None else None)
        return ActivePointer(refs[0], refs[1]) if refs[0] is not None else None

    def write_pointer(self, pointer: ActivePointer) -> None:
        from qdrant_client import models

        existing = self._aliases()
        operations: list[Any] = [models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
                                 for alias in (self.active_alias, self.previous_alias) if alias in existing]
        operations.append(models.CreateAliasOperation(create_alias=models.CreateAlias(
            collection_name=pointer.active.name, alias_name=self.active_alias)))
        if pointer.previous is not None:
            operations.append(models.CreateAliasOperation(create_alias=models.CreateAlias(
                collection_name=pointer.previous.name, alias_name=self.previous_alias)))
        self.client.update_collection_aliases(change_aliases_operations=operations)  # one request: atomic
        logger.info("event=index_pointer_switched backend=qdrant active=%s bundle_id=%s previous=%s",
                    pointer.active.name, pointer.active.bundle_id, pointer.previous.name if pointer.previous else "-")

    def close(self) -> None:
        self.client.close()

