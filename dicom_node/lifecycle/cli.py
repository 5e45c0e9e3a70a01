"""``medfinder reindex``: ask the running node to re-embed every study with another bundle, switch, roll back.

The node owns the index (one writer), so this command never touches it: it writes a job into the data folder's
``reindex.sqlite3`` and follows the node's progress there (done/total, rate, ETA). Interrupting the command does
not stop the job; ``medfinder reindex status`` shows it, ``medfinder reindex cancel`` stops it. A job written while
no node runs starts when the node does.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from config.settings import Settings
from dicom_node.lifecycle.jobs import Job, JobKind, JobState, JobStore

POLL_S = 0.5
NODE_HINT_AFTER_S = 15.0  # a job still "requested" this long: probably no node is running


def _when(value: float | None) -> str:
    return datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds") if value else "-"


def describe(job: Job) -> str:
    target = f" to {job.bundle_id[:12]}" if job.bundle_id else ""
    source = f" from {job.from_bundle[:12]}" if job.from_bundle else ""
    failed = f", {job.failed} without a vector" if job.failed else ""
    message = f" — {job.message}" if job.message else ""
    return (f"job {job.id}: {job.kind.value}{target}{source}  {job.state.value}  {job.done}/{job.total} "
            f"studies{failed}  requested {_when(job.requested_at)}  finished {_when(job.finished_at)}{message}")


def follow(store: JobStore, job_id: int) -> int:
    """Show a job's progress until it ends; 0 when it is done."""
    from tqdm import tqdm

    started = time.monotonic()
    hinted = False
    bar = tqdm(total=0, unit="study", desc="reindex", dynamic_ncols=True)
    try:
        while True:
            job = store.job(job_id)
            assert job is not None
            if job.total != bar.total:
                bar.total = job.total
                bar.refresh()
            if job.done > bar.n:
                bar.update(job.done - bar.n)
            bar.set_postfix_str(job.state.value, refresh=False)
            if not job.open:
                break
            if job.state == JobState.REQUESTED and not hinted and time.monotonic() - started > NODE_HINT_AFTER_S:
                bar.write("waiting for the node to pick the job up (is `medfinder serve` running on this data "
                          "folder? the job starts when it does)")
                hinted = True
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        bar.close()
        print(f"\nthe node goes on with job {job_id}: `medfinder reindex status` shows it, `medfinder reindex "
              "cancel` stops it", file=sys.stderr)
        return 130
    bar.close()
    print(describe(job))
    return 0 if job.state == JobState.DONE else 1


def cmd_reindex(args: argparse.Namespace) -> int:
    from dicom_node.cli import node_settings

    settings = node_settings(args)
    store = JobStore(settings.paths.data_dir)
    try:
        action = args.action or ("reindex" if args.bundle else None)
        if action is None:
            print("medfinder reindex: give --bundle ID, or one of status, rollback, cancel", file=sys.stderr)
            return 2
        if action == "status":
            return _status(settings, store)
        if action == "cancel":
            return _cancel(store)
        if action == "rollback":
            job = store.request(JobKind.ROLLBACK)
        else:
            bundle_id = _installed(settings, args.bundle)
            if bundle_id is None:
                return 1
            open_job = store.open_job()
            if open_job is not None and open_job.kind == JobKind.REINDEX and open_job.bundle_id == bundle_id:
                print(f"following job {open_job.id}, already {open_job.state.value}")
                job = open_job
            else:
                job = store.request(JobKind.REINDEX, bundle_id)
        print(describe(job), flush=True)
        return 0 if args.no_wait else follow(store, job.id)
    except ValueError as error:
        print(f"medfinder reindex: {error}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _installed(settings: Settings, bundle: str) -> str | None:
    """The full id of an installed, intact bundle; None (with the reason printed) otherwise."""
    from model_export.bundle_manifest import verify_bundle
    from model_export.errors import BundleError
    from model_export.registry import find_bundle

    try:
        return verify_bundle(find_bundle(settings, bundle)).bundle_id
    except BundleError as error:
        print(f"medfinder reindex: {error}", file=sys.stderr)
        return None


def _status(settings: Settings, store: JobStore) -> int:
    from workers.index import open_catalog

    catalog = open_catalog(settings, Path(settings.paths.data_dir) / "index")
    try:
        pointer = catalog.read_pointer()
    except Exception as error:  # noqa: BLE001 - a Qdrant server down: say so, show the jobs all the same
        print(f"index pointer: unreadable ({error})")
        pointer = None
    finally:
        catalog.close()
    if pointer is None:
        print("serving: no bundle yet")
    else:
        print(f"serving: bundle {pointer.active.bundle_id} (collection {pointer.active.name})")
        if pointer.previous is not None:
            print(f"previous (rollback): bundle {pointer.previous.bundle_id} (collection {pointer.previous.name})")
    jobs = store.jobs()
    if not jobs:
        print("no reindex jobs")
    for job in jobs:
        print(describe(job))
    return 0


def _cancel(store: JobStore) -> int:
    job = store.open_job()
    if job is None:
        print("no open job to cancel")
        return 1
    if job.state == JobState.SWITCHING:
        print(f"job {job.id} is switching already (a moment): not cancelled", file=sys.stderr)
        return 1
    store.move(job.id, JobState.CANCELLED, message="cancelled by the operator")
    print(f"job {job.id} cancelled; the node stops it within a second (the new collection stays on disk: a later "
          "reindex to the same bundle continues it)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from config.arguments import add_config_arguments
    from dicom_node.cli import add_data_dir

    reindex = subparsers.add_parser(
        "reindex", help="embed every study with another installed bundle while the node serves, then switch",
        description="With --bundle ID: the running node embeds every indexed study with that bundle into a new "
                    "collection while the active one keeps serving (new arrivals go into both), then switches "
                    "atomically. status: the serving bundle and the jobs. rollback: switch back to the previous "
                    "collection. cancel: stop the open job.")
    reindex.add_argument("action", nargs="?", choices=("status", "rollback", "cancel"),
                         help="instead of --bundle: show, roll back or cancel")
    reindex.add_argument("--bundle", help="id of an installed bundle (a unique prefix is enough)")
    reindex.add_argument("--no-wait", action="store_true", help="write the job and return (do not follow it)")
    add_config_arguments(reindex)
    add_data_dir(reindex)
    reindex.set_defaults(handler=cmd_reindex)
