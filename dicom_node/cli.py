"""``medfinder serve``, ``medfinder studies`` and ``medfinder deliveries``: run the node and look inside it."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from datetime import datetime
from typing import Any

from config.arguments import add_config_arguments, settings_from_args
from config.settings import AllowedSource, Destination, Settings


def _allowed(text: str) -> AllowedSource:
    try:
        return AllowedSource.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _destination(text: str) -> Destination:
    try:
        return Destination.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def node_settings(args: argparse.Namespace) -> Settings:
    """The config file and ``--set`` overrides, then the administrator's flags on top."""
    settings = settings_from_args(args)
    node: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        node["port"] = args.port
    if getattr(args, "ae_title", None):
        node["ae_title"] = args.ae_title
    if getattr(args, "bind", None):
        node["bind"] = args.bind
    if getattr(args, "quiet_seconds", None) is not None:
        node["quiet_seconds"] = args.quiet_seconds
    if getattr(args, "allow_ae", None):
        node["allow"] = [a.model_dump() for a in args.allow_ae]
    if getattr(args, "destination", None):
        node["destinations"] = [d.model_dump() for d in args.destination]
    data = settings.model_dump(mode="json")
    data["node"].update(node)
    if getattr(args, "data_dir", None):
        data["paths"]["data_dir"] = str(args.data_dir)
    if getattr(args, "mode", None):
        data["workers"]["mode"] = args.mode
    return Settings.model_validate(data)


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="the node's data folder (spool, state, index, results); "
                                           "default paths.data_dir")


# pynetdicom logs every C-STORE at INFO and dumps whole datasets (names, ids) at DEBUG; highdicom narrates
# every copied module. Our own event= lines say what an operator needs, without PHI.
CHATTY_LOGGERS = ("pynetdicom", "highdicom")


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from dicom_node.node import Node
    from model_export.errors import BundleError

    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    from workers.index import IndexMismatchError

    settings = node_settings(args)
    try:
        node = Node(settings)
    except (BundleError, IndexMismatchError) as error:
        print(f"medfinder serve: {error}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    node.start()
    print(f"MedFinder node listening: AE title {settings.node.ae_title} on {settings.node.bind}:{node.scp.port} "
          f"({settings.workers.mode} mode, data in {node.layout.root}). Try: echoscu -aec {settings.node.ae_title} "
          f"127.0.0.1 {node.scp.port}", flush=True)
    while not stopping.wait(0.5):
        pass
    node.stop()
    return 0


def _when(value: float | None) -> str:
    return datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds") if value else "-"


def cmd_studies(args: argparse.Namespace) -> int:
    from dicom_node.store.layout import NodeLayout
    from dicom_node.store.state import StateStore

    settings = node_settings(args)
    layout = NodeLayout.create(settings.paths.data_dir)
    store = StateStore(layout.state_db)
    studies = store.studies()
    if args.json:
        rows = [{**study.__dict__, "state": study.state.value,
                 "deliveries": [{**d.__dict__, "state": d.state.value} for d in store.deliveries(study.study_uid)]}
                for study in studies]
        print(json.dumps(rows, indent=2))
        return 0
    if not studies:
        print(f"no studies received yet in {layout.root}")
        return 0
    for study in studies:
        reason = f"  reason: {study.reason}" if study.reason else ""
        if not reason and study.selection:
            reason = f"  embedded: {json.loads(study.selection).get('reason', '')}"
        print(f"{study.study_uid}  {study.state.value:<12} v{study.version}  {study.n_instances} instance(s)  "
              f"from {study.calling_ae or '?'}  last received {_when(study.last_received)}{reason}")
        for delivery in store.deliveries(study.study_uid):
            error = f"  last error: {delivery.last_error}" if delivery.last_error else ""
            print(f"    SR v{delivery.version} -> {delivery.destination}: {delivery.state.value} "
                  f"(attempts {delivery.attempts}, status {delivery.last_status or '-'}, "
                  f"delivered {_when(delivery.delivered_at)}){error}")
    store.close()
    return 0


def cmd_deliveries(args: argparse.Namespace) -> int:
    from dicom_node.store.layout import NodeLayout
    from dicom_node.store.state import DeliveryState, StateStore

    settings = node_settings(args)
    store = StateStore(NodeLayout.create(settings.paths.data_dir).state_db)
    if args.action == "retry":
        ids = args.ids or [d.id for d in store.deliveries(state=DeliveryState.DEAD)]
        retried = [i for i in ids if store.retry_delivery(int(i))]
        print(f"retrying {len(retried)} dead deliver{'y' if len(retried) == 1 else 'ies'}: {retried}")
        return 0 if len(retried) == len(ids) else 1
    state = DeliveryState(args.state) if args.state else None
    for delivery in store.deliveries(state=state):
        print(f"{delivery.id:>5}  {delivery.state.value:<9} {delivery.destination}  study {delivery.study_uid} "
              f"v{delivery.version}  attempts {delivery.attempts}  {delivery.last_error or ''}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the DICOM node (receive, embed, index, report)")
    add_config_arguments(serve)
    add_data_dir(serve)
    serve.add_argument("--port", type=int, help="DICOM port (default 11112)")
    serve.add_argument("--ae-title", help="our AE title (default MEDFINDER)")
    serve.add_argument("--bind", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--quiet-seconds", type=float, help="a study is complete after this long without instances")
    serve.add_argument("--allow-ae", type=_allowed, action="append", metavar="AET[@IP[:PORT]]",
                       help="calling AE allowed to send (repeatable); @IP binds it to a source address, :PORT is "
                            "where it takes results")
    serve.add_argument("--destination", type=_destination, action="append", metavar="AET@HOST:PORT",
                       help="where Structured Reports go (repeatable; default: back to the sender)")
    serve.add_argument("--mode", choices=("embedded", "distributed"),
                       help="embedded (default): all in this process; distributed: Celery workers via Redis")
    serve.set_defaults(handler=cmd_serve)

    studies = subparsers.add_parser("studies", help="list received studies, their state and result deliveries")
    add_config_arguments(studies)
    add_data_dir(studies)
    studies.add_argument("--json", action="store_true", help="machine-readable output")
    studies.set_defaults(handler=cmd_studies)

    deliveries = subparsers.add_parser("deliveries", help="list SR deliveries or retry dead ones")
    add_config_arguments(deliveries)
    add_data_dir(deliveries)
    deliveries.add_argument("action", choices=("list", "retry"), nargs="?", default="list")
    deliveries.add_argument("ids", nargs="*", type=int, help="delivery ids to retry (default: every dead one)")
    deliveries.add_argument("--state", choices=("pending", "delivered", "dead"), help="list only this state")
    deliveries.set_defaults(handler=cmd_deliveries)
