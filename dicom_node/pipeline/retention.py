"""Spool retention: what the node keeps of a study once it is indexed and reported (``retention.keep``).

* ``dicom`` (default): the spool stays; nothing happens here.
* ``volume``: the HU volume of the embedded series is kept (``volumes/<StudyUID>/<SeriesUID>.npz``, written by
  the worker that embedded it, or here from the spool if it did not) and the spooled DICOM is deleted.
* ``none``: the spooled DICOM and any kept volume are deleted; the state store and the index keep the metadata,
  and re-embedding (a reindex) needs the study re-fetched from ``retention.refetch_from``.

It runs after the study is *reported* (or finished as a quiet backfill), not right after indexing, because the
Similar-case SR and its PDF are built from the spooled header and thumbnail. Studies that were not embedded or
failed keep their spool (a later bundle or an operator may still need it). Only the instances the study held when
it was reported are deleted, file by file (paths from the state store), and emptied folders removed with
``rmdir``: an instance that arrives meanwhile stays, and makes a new version (``workers.volume_store.merge_
candidates`` says how later instances meet a kept volume). ``retention.json`` records what was deleted.
Idempotent: :func:`sweep_retention` at start-up finishes what a crash interrupted.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from config import Settings
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import StateStore, StudyRow, StudyState
from model_export.preprocessing import VolumeError, load_dicom_series
from workers.handoff import EmbedStatus, read_outcome
from workers.series_selection import read_first_header, summarise_series
from workers.volume_store import (
    kept_paths,
    kept_volume_path,
    read_retention_record,
    save_kept_volume,
    volume_folder,
    write_retention_record,
)

logger = logging.getLogger(__name__)

FINISHED = (StudyState.REPORTED, StudyState.BACKFILLED)


@dataclass(frozen=True)
class RetentionResult:
    """What retention did to one study version."""

    study_uid: str
    version: int
    keep: str
    instances_deleted: int
    kept_volume: Path | None


def _keep_volume(layout: NodeLayout, study_uid: str, series_uid: str, folder: Path) -> Path | None:
    """The kept volume of the embedded series, written from the spool when the worker did not; None if neither
    exists (then nothing is deleted)."""
    path = kept_volume_path(folder, series_uid)
    if path.is_file():
        return path
    series_dir = layout.study_spool(study_uid) / series_uid
    summaries = summarise_series(sorted(series_dir.glob("*.dcm")))
    if not summaries:
        return None
    return save_kept_volume(folder, summaries[0], load_dicom_series(series_dir), read_first_header(series_dir))


def _delete_spooled(layout: NodeLayout, store: StateStore, row: StudyRow) -> int:
    """Delete the study's instances received up to ``row.last_received``; remove folders left empty."""
    deleted = 0
    folders: set[Path] = set()
    for instance in store.instances(row.study_uid):
        if float(instance["received_at"]) > row.last_received:
            continue  # arrived after the reported version: part of the next one
        path = layout.instance_path(row.study_uid, instance["series_uid"], instance["sop_uid"])
        try:
            path.unlink()
            deleted += 1
        except FileNotFoundError:
            pass
        folders.add(path.parent)
    for folder in sorted(folders, reverse=True):
        for empty in (folder, folder.parent):
            try:
                os.rmdir(empty)
            except OSError:  # not empty (a new arrival) or already gone
                pass
    return deleted


def apply_retention(settings: Settings, layout: NodeLayout, store: StateStore, study_uid: str, version: int,
                    in_flight: Collection[str] = ()) -> RetentionResult | None:
    """Apply ``retention.keep`` to a reported study version; None when there is nothing to do (keep dicom, the
    study moved on to a newer version, was not embedded, or an association is still sending it). Never raises:
    a failure is logged and the spool stays."""
    keep = settings.retention.keep
    if keep == "dicom" or study_uid in in_flight:
        return None
    row = store.study(study_uid)
    if row is None or row.version != version or row.state not in FINISHED:
        return None
    outcome = read_outcome(layout.outcome_path(study_uid, version))
    if outcome is None or outcome.status != EmbedStatus.EMBEDDED or outcome.series_uid is None:
        return None
    folder = volume_folder(layout.root, study_uid)
    try:
        kept = None
        if keep == "volume":
            kept = _keep_volume(layout, study_uid, outcome.series_uid, folder)
            if kept is None and not kept_paths(folder):
                logger.warning("event=retention_skipped study_uid=%s version=%d reason='no volume to keep'",
                               study_uid, version)
                return None
        removed = 0
        for path in kept_paths(folder):
            if path != kept:  # keep none: every volume; keep volume: those of series no longer embedded
                path.unlink(missing_ok=True)
                removed += 1
        deleted = _delete_spooled(layout, store, row)
        if not deleted and not removed and read_retention_record(folder) is not None:
            return None  # done before
        write_retention_record(folder, {"keep": keep, "version": version, "series_uid": outcome.series_uid,
                                        "instances_deleted": deleted, "at": time.time()})
    except (OSError, VolumeError, ValueError) as error:
        logger.error("event=retention_failed study_uid=%s version=%d error=%s", study_uid, version,
                     type(error).__name__)
        return None
    logger.info("event=retention study_uid=%s version=%d keep=%s instances_deleted=%d", study_uid, version, keep,
                deleted)
    return RetentionResult(study_uid, version, keep, deleted, kept)


def sweep_retention(settings: Settings, layout: NodeLayout, store: StateStore,
                    in_flight: Collection[str] = ()) -> int:
    """Apply retention to every finished study whose spool is still there (after a crash, or after switching
    ``retention.keep`` from dicom); returns how many studies it acted on."""
    if settings.retention.keep == "dicom":
        return 0
    done = 0
    for row in store.studies():
        if row.state in FINISHED and layout.study_spool(row.study_uid).is_dir():
            done += apply_retention(settings, layout, store, row.study_uid, row.version, in_flight) is not None
    return done
