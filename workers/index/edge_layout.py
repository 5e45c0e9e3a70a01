"""Where an edge collection lives on disk, and the one file that says which shard folder is the live one.

``<folder>/collection.json`` records the bundle id and dimension the collection was made for, its format, and
(format 2) the name of the live shard folder. Replacing a shard (a migration, a background HNSW build) builds the
new one beside the old, then rewrites collection.json atomically to name it, and only then removes the old one:
a crash at any point leaves either the old shard or the new one named, complete, and the other folder as a
leftover that the next open removes.

Formats: 1 = one shard in ``<folder>/shard`` holding only the ``image`` vector (before named ``report``
vectors); 2 = named vectors ``image`` and ``report``, the live shard folder named by the ``shard`` key.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from model_export.atomic_files import atomic_path
from workers.index.base import IndexMismatchError

logger = logging.getLogger(__name__)

METADATA_FILE = "collection.json"
LEGACY_SHARD = "shard"  # format 1's only shard folder
FORMAT_VERSION = 2
# Every folder name this module ever creates: live shards, builds and migrations in progress.
_SHARD_FOLDER = re.compile(r"^shard(?:-(\d+))?(?:\.(building|migrating))?$")


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (the directory entry itself)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class CollectionFolder:
    """One collection's folder: its metadata file and its shard folders."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)

    @property
    def metadata_path(self) -> Path:
        return self.folder / METADATA_FILE

    def read(self) -> dict[str, Any] | None:
        """The recorded metadata, None when there is none; a clear error when it cannot be read."""
        try:
            data = json.loads(self.metadata_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise IndexMismatchError(f"{self.metadata_path} is unreadable ({error}); refusing to guess which "
                                     "bundle this index belongs to") from None
        if not isinstance(data, dict):
            raise IndexMismatchError(f"{self.metadata_path} does not hold a JSON object")
        return data

    def write(self, metadata: dict[str, Any]) -> None:
        """Replace the metadata atomically and durably: this write is what switches the live shard."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.metadata_path) as temporary, open(temporary, "wb") as handle:
            handle.write(json.dumps(metadata, indent=2).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        fsync_folder(self.folder)

    @staticmethod
    def format_of(metadata: dict[str, Any]) -> int:
        found = metadata.get("format", 1)
        return int(found) if isinstance(found, int) else 1

    @staticmethod
    def live_name(metadata: dict[str, Any]) -> str:
        """The live shard folder's name (format 1 had only ``shard``)."""
        name = metadata.get("shard", LEGACY_SHARD)
        if not isinstance(name, str) or not _SHARD_FOLDER.match(name) or "." in name:
            raise IndexMismatchError(f"{METADATA_FILE} names an unexpected shard folder {name!r}")
        return name

    @staticmethod
    def next_name(metadata: dict[str, Any]) -> str:
        """A fresh live-shard name: one generation after the current one."""
        match = _SHARD_FOLDER.match(str(metadata.get("shard", LEGACY_SHARD)))
        generation = int(match.group(1)) if match and match.group(1) else 0
        return f"shard-{generation + 1}"

    def path(self, name: str) -> Path:
        return self.folder / name

    def staging_path(self, name: str, purpose: str) -> Path:
        """Where a shard is built before it may become ``name`` (``purpose``: building or migrating)."""
        return self.folder / f"{name}.{purpose}"

    def holds_data(self, name: str) -> bool:
        path = self.path(name)
        return path.is_dir() and any(path.iterdir())

    def any_shard_data(self) -> bool:
        """Whether some shard folder holds files (used when collection.json is missing)."""
        if not self.folder.is_dir():
            return False
        return any(_SHARD_FOLDER.match(entry.name) and entry.is_dir() and any(entry.iterdir())
                   for entry in self.folder.iterdir())

    def remove_leftovers(self, live: str) -> list[str]:
        """Remove shard folders other than the live one: builds, migrations and old shards a crash left behind.

        Call only while holding the live shard open (its WAL lock): a second process would otherwise delete the
        owner's build in progress.
        """
        removed = []
        if not self.folder.is_dir():
            return removed
        for entry in sorted(self.folder.iterdir()):
            if entry.name != live and _SHARD_FOLDER.match(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        if removed:
            logger.info("event=index_leftovers_removed folder=%s count=%d", self.folder, len(removed))
        return removed
