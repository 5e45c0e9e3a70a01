"""``medfinder backfill``: fill a running node from the archive; ``medfinder backfill status``: what the runs did.

Run it beside ``medfinder serve`` with the same ``--config`` / ``--data-dir`` (it reads the node's AE title, port
and state store from them). For C-MOVE the PACS must know the node's AE title and address; for C-GET and
``--from-orthanc`` the node's allow-list must admit ``backfill.calling_ae_title``. With ``--tls`` the PACS is
reached over DICOM TLS; C-GET and Orthanc objects go on to the node over TLS when the node's SCP speaks it; both
use ``node.tls`` (its CA checks the peer, its certificate is ours).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from config.arguments import add_config_arguments
from config.settings import Destination, Settings


def _source(text: str) -> Destination:
    try:
        return Destination.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _day(text: str) -> date:
    from dicom_node.backfill.schedule import parse_day

    try:
        return parse_day(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def tls_problem(settings: Settings, pacs_tls: bool, forwards: bool) -> str | None:
    """Why this run's TLS cannot work, said before any association (a TLS PACS, or a TLS node that C-GET or
    Orthanc objects are forwarded to, needs ``node.tls``'s files), or None."""
    tls = settings.node.tls
    for name, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file), ("ca_file", tls.ca_file)):
        if path and not os.path.isfile(path):
            return f"node.tls.{name}: no such file: {path}"
    if pacs_tls and not (tls.enabled and tls.ca_file):
        return ("--tls: the PACS is reached over DICOM TLS with node.tls: set node.tls.ca_file (the CA that signed "
                "the PACS certificate) and node.tls.cert_file / key_file (ours), in --config or with --set")
    if forwards and tls.enabled and not tls.ca_file:
        return ("the node speaks DICOM TLS: node.tls.ca_file must name the CA that signed its certificate, so that "
                "objects can be forwarded to it over TLS")
    return None


def backfill_settings(args: argparse.Namespace) -> Settings:
    """The node's settings (``--config``, ``--set``, ``--data-dir``) with this run's flags on ``backfill``."""
    from dicom_node.cli import node_settings

    settings = node_settings(args)
    flags: dict[str, Any] = {"method": args.method, "rate_per_min": args.rate, "window": args.window,
                             "modality": args.modality, "report": True if args.report else None}
    data = settings.model_dump(mode="json")
    data["backfill"].update({k: v for k, v in flags.items() if v is not None})
    return Settings.model_validate(data)


def cmd_backfill(args: argparse.Namespace) -> int:
    if args.action == "status":
        return cmd_status(args)
    from dicom_node.backfill.dimse import DimseSource, PacsError
    from dicom_node.backfill.forward import ForwardError, NodeAddress
    from dicom_node.backfill.orthanc_source import OrthancSource, OrthancSourceError
    from dicom_node.backfill.progress import BackfillStore
    from dicom_node.backfill.runner import Backfill, BackfillRequest
    from dicom_node.backfill.schedule import DailyWindow, Pacer
    from dicom_node.cli import CHATTY_LOGGERS
    from dicom_node.store.state import StateStore
    from dicom_node.tls import client_context

    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if (args.source is None) == (args.from_orthanc is None):
        print("medfinder backfill: give exactly one of --from AET@HOST:PORT and --from-orthanc URL", file=sys.stderr)
        return 2
    settings = backfill_settings(args)
    config = settings.backfill
    until = args.until or date.today()
    since = args.since or until - timedelta(days=365)
    try:
        window = DailyWindow.parse(config.window) if config.window else None
        if until < since:
            raise ValueError(f"--until {until:%Y%m%d} is before --since {since:%Y%m%d}")
    except ValueError as error:
        print(f"medfinder backfill: {error}", file=sys.stderr)
        return 2
    data_dir = Path(settings.paths.data_dir)
    state_db = data_dir / "state.sqlite3"
    if not args.dry_run and not state_db.is_file():
        print(f"medfinder backfill: no node data in {data_dir} (start `medfinder serve` with this --data-dir / "
              f"--config first: the backfill fills a running node)", file=sys.stderr)
        return 2
    pacs = args.source.model_copy(update={"tls": True}) if args.source is not None and args.tls else args.source
    forwards = args.from_orthanc is not None or config.method == "get"
    problem = tls_problem(settings, pacs is not None and pacs.tls, forwards)
    if problem is None and args.tls and pacs is None:
        problem = "--tls is for a DICOM PACS (--from), not for --from-orthanc"
    if problem is not None:
        print(f"medfinder backfill: {problem}", file=sys.stderr)
        return 2
    try:
        node = NodeAddress.from_settings(settings)
        pacs_tls = client_context(settings.node.tls) if pacs is not None and pacs.tls else None
    except OSError as error:  # ssl.SSLError included: a PEM file that does not parse, a key that does not match
        print(f"medfinder backfill: node.tls: {error}", file=sys.stderr)
        return 2
    if args.from_orthanc is not None:
        try:
            source: Any = OrthancSource(args.from_orthanc, node, config.calling_ae_title, config.dimse_timeout_s,
                                        args.orthanc_user,
                                        Path(args.orthanc_password_file) if args.orthanc_password_file else None)
        except (OrthancSourceError, OSError) as error:
            print(f"medfinder backfill: {error}", file=sys.stderr)
            return 2
        method = source.method
    else:
        source = DimseSource(pacs, config.calling_ae_title, node, config.method, config.dimse_timeout_s,
                             tls=pacs_tls)
        method = config.method
    request = BackfillRequest(since=since, until=until, modality=config.modality, method=method, limit=args.limit,
                              dry_run=args.dry_run, report=config.report,
                              arrival_timeout_s=config.arrival_timeout_s,
                              options={"rate_per_min": config.rate_per_min, "window": config.window,
                                       "node": str(node)})
    store = BackfillStore.in_data_dir(data_dir)
    node_store = StateStore(state_db) if state_db.is_file() else None
    pacer = Pacer(config.rate_per_min, window, lambda line: print(line, file=sys.stderr, flush=True))
    try:
        summary = Backfill(request, source, store, node_store, pacer).run()
    except (PacsError, OrthancSourceError, ForwardError) as error:
        print(f"medfinder backfill: {error}", file=sys.stderr)
        return 2
    finally:
        store.close()
        if node_store is not None:
            node_store.close()
    if args.dry_run:
        return 0
    print(f"backfill run {summary.run_id}: {summary.found} studies found, {summary.already_complete} complete "
          f"already, {summary.asked} asked for, {summary.completed} complete, {summary.incomplete} incomplete; "
          f"{summary.studies_per_min:.1f} studies/min", flush=True)
    return 0 if summary.incomplete == 0 else 1


def cmd_status(args: argparse.Namespace) -> int:
    from datetime import datetime

    from dicom_node.backfill.progress import FILE_NAME, BackfillState, BackfillStore
    from dicom_node.cli import node_settings

    data_dir = Path(node_settings(args).paths.data_dir)
    if not (data_dir / FILE_NAME).is_file():
        print(f"no backfill has run with the data folder {data_dir}")
        return 0
    store = BackfillStore.in_data_dir(data_dir)
    try:
        for run in store.runs():
            started = datetime.fromtimestamp(run["started_at"]).isoformat(sep=" ", timespec="seconds")
            ended = (datetime.fromtimestamp(run["finished_at"]).isoformat(sep=" ", timespec="seconds")
                     if run["finished_at"] else "-")
            print(f"run {run['id']:>3}  {run['source']}  {run['method']}  {run['since']}-{run['until']} "
                  f"{run['modality']}  started {started}  ended {ended}  {run['outcome'] or 'running or killed'}  "
                  f"asked {run['asked']}, complete {run['completed']}, incomplete {run['incomplete']}")
        counts = store.counts()
        total = sum(counts.values())
        print(f"studies: {total} found, " + ", ".join(f"{counts.get(s.value, 0)} {s.value}" for s in BackfillState)
              + f"; {store.days_queried()} day(s) queried")
        for study in store.studies(states=[BackfillState.INCOMPLETE, BackfillState.ASKED]):
            print(f"  {study.state.value:<10} {study.study_date} {study.study_uid} attempts {study.attempts}"
                  f"{'  ' + study.reason if study.reason else ''}")
    finally:
        store.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    backfill = subparsers.add_parser(
        "backfill", help="fill a running node from the archive (C-FIND per day, C-MOVE/C-GET, or Orthanc REST)",
        description="Query the PACS day by day and fetch every study of the range into the running node "
                    "(no SR for them unless --report). Resumable: a re-run continues and never re-fetches a "
                    "complete study. `medfinder backfill status` lists the runs.")
    backfill.add_argument("action", nargs="?", choices=("run", "status"), default="run",
                          help="run (default) or status")
    backfill.add_argument("--from", dest="source", type=_source, metavar="AET@HOST:PORT",
                          help="the PACS (Study Root Q/R); for C-MOVE it must know the node's AE title")
    backfill.add_argument("--tls", action="store_true",
                          help="reach the --from PACS over DICOM TLS: node.tls.ca_file checks its certificate "
                               "(which must name HOST), node.tls.cert_file/key_file are ours")
    backfill.add_argument("--from-orthanc", metavar="URL", help="an Orthanc's REST root, for sites without Q/R rights")
    backfill.add_argument("--orthanc-user", help="Orthanc user (HTTP basic auth)")
    backfill.add_argument("--orthanc-password-file", help="file holding that user's password")
    backfill.add_argument("--since", type=_day, metavar="YYYYMMDD", help="first study date (default: a year "
                                                                          "before --until)")
    backfill.add_argument("--until", type=_day, metavar="YYYYMMDD", help="last study date (default today)")
    backfill.add_argument("--modality", help="only studies holding this modality (default backfill.modality, CT; "
                                             "'' = any)")
    backfill.add_argument("--limit", type=int, help="fetch at most this many studies in this run")
    backfill.add_argument("--rate", type=float, metavar="STUDIES_PER_MIN",
                          help="ask for at most this many studies a minute (default backfill.rate_per_min; 0 = no "
                               "limit)")
    backfill.add_argument("--window", metavar="HH:MM-HH:MM", help="ask only inside this daily window (local time; "
                                                                  "may cross midnight)")
    backfill.add_argument("--method", choices=("move", "get"), help="C-MOVE to the node (default) or C-GET here "
                                                                    "and C-STORE on to the node")
    backfill.add_argument("--dry-run", action="store_true", help="query and list what would be fetched")
    backfill.add_argument("--report", action="store_true", help="send SRs for backfilled studies too")
    backfill.add_argument("--data-dir", help="the node's data folder (default paths.data_dir)")
    add_config_arguments(backfill)
    backfill.set_defaults(handler=cmd_backfill)
