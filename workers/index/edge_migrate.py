"""Format 1 -> 2: an edge index made before named ``report`` vectors, rebuilt with both vectors on open.

Format 1 kept one shard in ``<folder>/shard`` with only the ``image`` vector. The migration creates a new shard
with ``image`` and ``report`` (and the current HNSW/quantisation settings) in ``shard-1.migrating``, copies every
point with its vectors and payload by scrolling, checks the count, renames the folder to ``shard-1``, and then
rewrites collection.json (format 2, naming ``shard-1``) in one atomic write. The old shard is removed only after
that write: a crash before it leaves format 1 and the old shard untouched (the next open starts over), a crash
after it leaves the new shard live and the old folder as a leftover that the next open removes.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

import qdrant_edge as qe

from workers.index.edge_layout import FORMAT_VERSION, CollectionFolder, fsync_folder
from workers.index.edge_shard import ShardLockedError, copy_points, open_shard

logger = logging.getLogger(__name__)


def migrate_to_named_vectors(layout: CollectionFolder, metadata: dict[str, Any], config: Any) -> dict[str, Any]:
    """Migrate the format-1 collection in ``layout`` (recorded as ``metadata``); returns the format-2 metadata.

    ``config``: the new shard's configuration (both named vectors).
    """
    old_name = layout.live_name(metadata)
    new_name = layout.next_name(metadata)
    started = time.perf_counter()
    migrated = 0
    old_shard = None
    if layout.holds_data(old_name):
        try:
            old_shard = qe.EdgeShard.load(str(layout.path(old_name)))  # as it was made: no new config applied
        except Exception as error:
            if "WouldBlock" in str(error):
                raise ShardLockedError(f"index {layout.path(old_name)} is already open in another process; "
                                       "qdrant-edge allows one owner (run one node per data folder)") from error
            raise
    try:
        layout.remove_leftovers(old_name)  # a crashed migration's half-built folder (we hold the old shard now)
        staging = layout.staging_path(new_name, "migrating")
        new_shard = open_shard(staging, config, create=True)
        try:
            if old_shard is not None:
                migrated = copy_points(old_shard, new_shard)
                expected = int(old_shard.count(qe.CountRequest(exact=True)))
                found = int(new_shard.count(qe.CountRequest(exact=True)))
                if found != expected or migrated != expected:
                    raise RuntimeError(f"migration copied {migrated} points, the new shard holds {found}, the old "
                                       f"one {expected}; the old shard is kept")
            new_shard.flush()
        finally:
            new_shard.close()
    finally:
        if old_shard is not None:
            old_shard.close()
    staging.rename(layout.path(new_name))
    fsync_folder(layout.folder)
    upgraded = {**metadata, "format": FORMAT_VERSION, "shard": new_name, "vectors": ["image", "report"],
                "migrated_from_format": CollectionFolder.format_of(metadata), "migrated_at": time.time(),
                "built_points": 0}
    upgraded.pop("vector", None)
    layout.write(upgraded)  # the switch: from here on the new shard is the index
    shutil.rmtree(layout.path(old_name), ignore_errors=True)
    logger.info("event=index_migrated folder=%s from_format=%d to_format=%d points=%d seconds=%.2f",
                layout.folder, upgraded["migrated_from_format"], FORMAT_VERSION, migrated,
                time.perf_counter() - started)
    return upgraded
